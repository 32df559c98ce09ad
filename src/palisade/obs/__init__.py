"""Observability: log lines in exim's shape (``log``), queue ids (``queueid``), and the modes of
the directories the gateway creates (``files``).

Owns: the main, reject and panic log formats and their files, the queue id format.
Must not touch: policy, SMTP state or the spool: callers build the line, this package writes it.
Trust: the text handed in may carry client input; every client-supplied field goes through
``escape_field`` so that no client can forge a log line that firewalls (fail2ban, nftfw) read.
"""
