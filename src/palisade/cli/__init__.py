"""The ``palisade`` command line: serve, config check, check-host, queue, history, recipients, tls.

Owns: argument parsing, what each command prints and its exit status (``main``; one module per
command group). Every command is a thin call into the other packages' public API: it builds the
parts the server would use through the composition root (``palisade.server.generation``), reads
the spool through :class:`palisade.spool.Spool` and the incident history through the
``StateStore`` port; ``serve`` hands over to the server's entry point and ``config check`` runs
its self-check (``palisade.server.selfcheck``).
Must not touch: the server's internals (sessions, listener, streams, process context, connection
caps, steering, probes: import-linter), spool files or the SQLite file directly, and it never
delivers mail (``queue retry`` only marks a message due).
Trust: arguments and the files they name are the operator's, checked and refused in one line
naming the argument, file or key (exit statuses in ``main``); remote text (a stored message's
envelope and headers, what a probed server says) is escaped before it is printed.
"""
