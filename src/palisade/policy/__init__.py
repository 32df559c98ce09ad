"""Policy: what the gateway decides about a client, stage by stage, from facts to verdicts.

Owns: the stages and the verbs (``rules``, ``verdict``), the rule engine (``engine``), the
runtime ``Policy`` with its named lists (``policy``, ``lists``), the always-on DATA findings
(``findings``: SPF, DKIM, DMARC, scans), relay control and the route of each accepted recipient
(``relay``), the typed keys of what checks learn (``keys``) and the checks themselves
(``checks``, one module each).
Must not touch: sockets, files, the config, the spool, delivery or the server (import-linter:
policy imports only ``smtp`` and ``ports``). The outside world is reached through the ports
(resolver, state store, directory, scanners) the caller hands in; the policy is built from the
config by ``palisade.config.policy`` and never reads it. A verdict is a decision with its reply
and log texts; writing bytes and log lines is the conversation's job.
Trust: every fact that came from the network (HELO, addresses, headers, DNS answers) is untrusted
text, used as data, never as a pattern, a path or a format; the rules and lists are operator
input already checked when the policy was built.
"""
