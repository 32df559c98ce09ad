"""What a service manager or logrotate sees of the daemon, besides sd_notify (:mod:`.notify`):
the event log as the config asks for it (files, syslog), its reopening on SIGUSR1, and the pid
file.

Owns: ``[server] pid_file`` (written by the parent once it serves, atomically, removed at exit
if it still names this process) and :func:`open_event_log`. Must not touch: the process layout
or the other signals (:mod:`.app`).
Trust: paths come from the validated configuration.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from pathlib import Path

from palisade.config import Config
from palisade.obs.files import make_dirs
from palisade.obs.log import FileEventLog, SyslogSink

__all__ = ["open_event_log", "remove_pid_file", "write_pid_file"]


def open_event_log(
    config: Config, observer: Callable[[object, dict[str, object]], None] | None = None
) -> FileEventLog:
    """The files of ``[paths] log`` and, with ``[log] syslog``, the syslog socket; ``observer``
    is told the events (the metrics, when ``[metrics] listen`` is set)."""
    log = config.log
    syslog = SyslogSink(log.syslog_socket, log.syslog_facility) if log.syslog else None
    return FileEventLog(
        config.paths.log, json_lines=log.json, echo=log.echo, syslog=syslog, observer=observer
    )


def write_pid_file(config: Config) -> None:
    """``[server] pid_file``: this process's pid and a newline, mode 0644, put in place by a
    rename so a reader never sees half of it. Its directory is made (0750) when missing."""
    path = config.server.pid_file
    if path is None:
        return
    if path.parent.exists() and not path.parent.is_dir():  # make_dirs would say "File exists"
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path.parent))
    make_dirs(path.parent, 0o750)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.fchmod(fd, 0o644)  # the umask is 0077: logrotate's postrotate may run as another user
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)
    os.replace(temporary, path)


def remove_pid_file(config: Config) -> None:
    """At exit: the pid file goes if it still names this process (another may have taken
    it over), and if it can (its directory may not be writable after the privilege drop)."""
    path = config.server.pid_file
    if path is None:
        return
    with contextlib.suppress(OSError, ValueError):
        if int(Path(path).read_text().strip()) == os.getpid():
            path.unlink()
