"""Adapters: the implementations of the ports (``palisade.ports``) that talk to the world.

Owns: the I/O behind each port -- the DNS resolver (``dns``), the shared SQLite state store
(``sqlite_state``) and the in-process rate windows written behind to it (``local_rates``), the
Redis state store of several MX hosts (``redis_state``) and its fall-back to the host's own
store while Redis is away (``state_fallback``; both stores share ``state_keys``), the
LDAP recipient directory (``ldap_directory``), and the spamd, rspamd and clamd scanner clients
(their shared connection and streaming plumbing in ``scanner_io``). One module per outside
service; each is built by the composition root (``palisade.server.generation``) from its settings.
Must not touch: SMTP, policy decisions, the spool, delivery, the server, or another adapter but
``scanner_io`` and ``state_keys`` (import-linter: adapters import ports only, and not each
other). An adapter reports facts and failures through the port's types (``DnsTempError``,
``ServiceTempError``, ``StateTempError``); what they mean for a client is the engine's business.
Trust: everything a remote service answers is untrusted (a resolver, a directory, a scanner may
be wrong, slow or hostile): answers are parsed defensively and time-limited, and a service that
fails or answers nonsense is a temporary failure of the port, never a crash of the caller.
"""
