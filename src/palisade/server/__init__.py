"""The server: processes, sockets and the asyncio glue around the sans-I/O conversation.

Owns: the process layout, signals and reload (``app``), the composition root that turns a config
into one immutable generation of everything built from it (``generation``), the per-process
context sessions share (``context``), the listening sockets and connection caps (``listener``,
``conncount``, ``steering``), one session per connection (``session``, ``stream``), STARTTLS
(``tls``), the DNSBL health probes (``probes``) and the start-up self-check (``selfcheck``).
The only package that binds sockets, forks and wires the others together.
Must not touch: what is said on a connection (the conversation's stages, replies and log lines),
policy decisions, the spool's file format or delivery's transports: it calls their public API.
Trust: every byte from a client is hostile and goes to the SMTP core unread; peers are bounded
by deadlines, size caps and connection caps here. The config it is given is already validated;
a reload that fails to build is refused whole and the old generation stays.
"""
