"""Event log: one line per event, in exim's shape, to a main log and a reject log.

Owns: the file format of ``mainlog`` / ``rejectlog`` (and optional JSON lines). Every caller hands
in a line it has built; client-supplied text must go through :func:`escape_field` first,
because these files are read by firewalls (fail2ban, nftfw) and a client must never be able to
forge a line or put an address of its choosing where a reader looks for the client's: the only
bracketed address a line may show is the one Palisade writes in ``H=... [ip]:port``, and nothing
client-supplied comes before the ``H=`` field except the sender of an arrival line (escaped).
Trust: none of the text is trusted; line breaks are replaced here as a last line of defence.
Files: the log files it creates are 0640 (see ``_open_log``), the directory 0750.
Rotation: before each write the file's path is checked (``stat``: device and inode, as
``logging.handlers.WatchedFileHandler`` does); a log renamed or removed by logrotate is noticed
and a new file opened at the path, in every process, with no signal. :meth:`FileEventLog.reopen`
(SIGUSR1) reopens every file at once, for copy-and-truncate set-ups and a forced reopen.
Syslog: with :class:`SyslogSink` every line also goes, as one datagram ``<PRI>palisade[pid]:
line``, to the local syslog socket; never blocking, dropped when the daemon does not take it
(the files stay the record).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from email.utils import formatdate
from pathlib import Path
from typing import Protocol

from palisade.obs.files import make_dirs

# C0 and C1 controls and DEL (U+0085 is a line break to Python's ``splitlines``; client bytes
# are decoded as latin-1, so 0x80-0x9f arrive as those code points).
_ESCAPES = {i: f"\\x{i:02x}" for i in (*range(32), *range(127, 160))}
_ESCAPES[ord("\\")] = "\\\\"
# In a field of a log line, also the characters that delimit fields: ``[`` and ``]`` (the one
# bracketed address of a line is the client's, in ``H=... [ip]:port``), quotes (``input="..."``,
# rule names) and angle brackets (``F=<...>``, ``RCPT <...>``).
# Everything ``str.splitlines`` breaks on: a last line of defence in the writer itself.
_LINE_BREAKS = dict.fromkeys(map(ord, "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"), " ")
_FIELD_ESCAPES = _ESCAPES | {ord(c): f"\\x{ord(c):02x}" for c in '[]"<>'}


def escape(text: str, limit: int = 256) -> str:
    """Make text safe for one line (a log line, a header, terminal output): no control
    characters, bounded length. For client text in a log line use :func:`escape_field`."""
    out = text.translate(_ESCAPES)
    if len(out) > limit:
        out = out[:limit] + "..."
    return out


def escape_field(text: str, limit: int = 256) -> str:
    """Client-supplied text (HELO name, addresses, AUTH mechanism, early input, rule log texts
    that may quote them) made safe for one field of a log line.

    Besides what :func:`escape` does, ``[``, ``]``, ``"``, ``<`` and ``>`` become ``\\x5b``,
    ``\\x5d``, ``\\x22``, ``\\x3c`` and ``\\x3e``: a log reader (fail2ban, nftfw, a grep) that
    takes the first or any bracketed address of a line can only ever find the address Palisade
    itself wrote in ``H=... [ip]:port``, never one a client typed (``HELO x [1.2.3.4] rejected``),
    and a field can never be closed early from inside. The backslash is escaped too, so the
    form is unambiguous. Length is bounded after escaping; a cut never makes a bracket.
    """
    out = text.translate(_FIELD_ESCAPES)
    if len(out) > limit:
        out = out[:limit] + "..."
    return out


class _PerSecond:
    """A local-time date text, formatted once per second: every log line and every Received
    header of a busy server would otherwise format the same second again."""

    def __init__(self, render: Callable[[int], str]) -> None:
        self._render = render
        self._last: tuple[int, str] = (-1, "")  # one tuple: replaced whole, safe across threads

    def __call__(self, now: float | None = None) -> str:
        second = int(time.time() if now is None else now)
        last = self._last
        if last[0] != second:
            last = self._last = (second, self._render(second))
        return last[1]


# exim's stamp at the start of a log line: ``2026-11-22 10:00:00``.
timestamp = _PerSecond(lambda second: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second)))
# The date of a ``Received:`` header (RFC 5322 section 3.3).
rfc5322_date = _PerSecond(lambda second: formatdate(second, localtime=True))


class EventLog(Protocol):
    """What the rest of the program may do with the log: hand over finished lines."""

    def main(self, line: str, **fields: object) -> None:
        """A main-log event (arrival ``<=``, delivery ``=>``, deferral ``==``, failure ``**``)."""

    def reject(self, line: str, **fields: object) -> None:
        """A refusal: written to the reject log and to the main log, as exim does."""

    def panic(self, line: str, **fields: object) -> None:
        """Something the operator must look at (broken config on reload, spool corruption)."""

    def event(self, name: str, **fields: object) -> None:
        """A fact with no line of its own (a check's time, a connection closed, a handshake):
        for an observer such as the metrics (:mod:`palisade.obs.metrics`); the files write
        nothing. Lines that are events carry ``event=NAME`` among their fields."""


LOG_MODE = 0o640  # as exim's: the owner writes, its group (e.g. adm) reads, nobody else


# syslog(3)'s facility codes (RFC 5424 section 6.2.1) for ``[log] syslog_facility``.
FACILITIES = {
    "user": 1, "mail": 2, "daemon": 3, "auth": 4, "authpriv": 10,
    "local0": 16, "local1": 17, "local2": 18, "local3": 19,
    "local4": 20, "local5": 21, "local6": 22, "local7": 23,
}  # fmt: skip
SEVERITY = {"main": 6, "reject": 6, "panic": 3}  # info; panic lines are errors (err)


class SyslogSink:
    """Sends each line to the syslog socket (``/dev/log``: rsyslog, or journald which passes it
    on) as ``<facility*8+severity>palisade[pid]: line``, without a time stamp (the receiver adds
    its own, as for Python's ``SysLogHandler``). Non-blocking: a line the receiver cannot take at
    once is dropped, never waited for; a socket that fails is connected again at most once a
    second."""

    RETRY = 1.0

    def __init__(self, path: Path, facility: str, ident: str = "palisade") -> None:
        self.path = path
        self.facility = FACILITIES[facility]
        self.ident = ident
        self._sock: socket.socket | None = None
        self._next_try = 0.0
        self._connect()

    def _connect(self) -> None:
        self._next_try = time.monotonic() + self.RETRY
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            sock.connect(str(self.path))
        except OSError:
            sock.close()
            return
        self._sock = sock

    def send(self, kind: str, line: str) -> None:
        data = f"<{self.facility * 8 + SEVERITY[kind]}>{self.ident}[{os.getpid()}]: {line}"
        for _attempt in range(2):
            if self._sock is None:
                if time.monotonic() < self._next_try:
                    return
                self._connect()
                if self._sock is None:
                    return
            try:
                self._sock.send(data.encode("utf-8", "replace"))
                return
            except BlockingIOError:
                return  # the receiver is behind: this line is only in the files
            except OSError as exc:  # the receiver restarted: its socket is a new one
                if exc.errno == errno.EMSGSIZE:
                    return  # this line is too long for a datagram; the socket is fine
                self._sock.close()
                self._sock = None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class _LogFile:
    """One log file: its path, the descriptor written to, and the file that descriptor is
    (device, inode), to notice a rename or removal of the path."""

    __slots__ = ("fd", "ident", "path")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1
        self.ident = (0, 0)
        self.open()

    def open(self) -> None:
        """Opens the path (creating the file) and closes the descriptor it replaces."""
        fd = _open_log(self.path)
        status = os.fstat(fd)
        old, self.fd, self.ident = self.fd, fd, (status.st_dev, status.st_ino)
        if old >= 0:
            os.close(old)

    def current(self) -> int:
        """The descriptor to write to: a new one when the path names another file now or none.
        If the new file cannot be made (the directory gone), the old descriptor serves on."""
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            pass
        else:
            if (status.st_dev, status.st_ino) == self.ident:
                return self.fd
        with contextlib.suppress(OSError):
            self.open()
        return self.fd

    def close(self) -> None:
        os.close(self.fd)


def _open_log(path: Path) -> int:
    """An O_APPEND descriptor on ``path``. A file this call creates gets mode 0640 whatever the
    umask (the gateway runs with 0077); an existing file keeps the mode the operator or
    logrotate gave it. The group is the process's, or the directory's when it is setgid."""
    flags = os.O_WRONLY | os.O_APPEND
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, LOG_MODE)
    except FileExistsError:
        return os.open(path, flags | os.O_CREAT, LOG_MODE)  # O_CREAT: it may vanish meanwhile
    os.fchmod(fd, LOG_MODE)
    return fd


class FileEventLog:
    """Appends lines to ``mainlog``, ``rejectlog`` and ``paniclog`` in one directory.

    Lines are written with ``os.write`` on O_APPEND descriptors so that several worker processes
    can share the files without interleaving inside a line. ``json_lines`` adds ``main.jsonl``
    with one object per event (``fields`` plus the text). ``syslog``: every line also goes there.
    ``observer``: told every event (``event=NAME`` of a line's fields, and :meth:`event`), after
    the line is written: the metrics (:class:`palisade.obs.metrics.Metrics`).
    """

    def __init__(
        self,
        directory: Path,
        *,
        json_lines: bool = False,
        echo: bool = False,
        syslog: SyslogSink | None = None,
        observer: Callable[[object, dict[str, object]], None] | None = None,
    ) -> None:
        make_dirs(directory, 0o750)
        self._observer = observer
        self.directory = directory
        self._echo = echo
        self._syslog = syslog
        self._lock = threading.Lock()
        self._main = _LogFile(directory / "mainlog")
        self._reject = _LogFile(directory / "rejectlog")
        self._panic = _LogFile(directory / "paniclog")
        self._json = _LogFile(directory / "main.jsonl") if json_lines else None

    def _files(self) -> tuple[_LogFile, ...]:
        return tuple(f for f in (self._main, self._reject, self._panic, self._json) if f)

    def _write(
        self, files: tuple[_LogFile, ...], kind: str, line: str, fields: dict[str, object]
    ) -> None:
        now = time.time()
        flat = line.translate(_LINE_BREAKS)
        text = f"{timestamp(now)} {flat}\n".encode("utf-8", "replace")
        with self._lock:
            for file in files:
                os.write(file.current(), text)
            if self._json is not None:
                record = {"time": now, "kind": kind, "line": line, **fields}
                os.write(self._json.current(), (json.dumps(record, default=str) + "\n").encode())
            if self._syslog is not None:
                self._syslog.send(kind, flat)
        if self._echo:
            print(text.decode(), end="", flush=True)

    def main(self, line: str, **fields: object) -> None:
        self._write((self._main,), "main", line, fields)
        if self._observer is not None and "event" in fields:
            self._observer(fields["event"], fields)

    def reject(self, line: str, **fields: object) -> None:
        self._write((self._main, self._reject), "reject", line, fields)
        if self._observer is not None and "event" in fields:
            self._observer(fields["event"], fields)

    def panic(self, line: str, **fields: object) -> None:
        self._write((self._main, self._panic), "panic", line, fields)

    def event(self, name: str, **fields: object) -> None:
        if self._observer is not None:  # no line: see EventLog.event
            self._observer(name, fields)

    def reopen(self) -> None:
        """SIGUSR1: every file opened again at its path (a new one made if it is gone). A file
        that cannot be opened keeps its old descriptor, and a panic line says why."""
        failed = []
        with self._lock:
            for file in self._files():
                try:
                    file.open()
                except OSError as exc:
                    failed.append(f"{file.path}: {exc.strerror or exc}")
        for problem in failed:
            self.panic(f"log reopen: cannot open {problem}: writing to the old file")

    def close(self) -> None:
        for file in self._files():
            file.close()
        if self._syslog is not None:
            self._syslog.close()


class MemoryEventLog:
    """Keeps lines in lists: for unit tests of pure decision code only."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def main(self, line: str, **fields: object) -> None:
        self.lines.append(("main", line))

    def reject(self, line: str, **fields: object) -> None:
        self.lines.append(("reject", line))

    def panic(self, line: str, **fields: object) -> None:
        self.lines.append(("panic", line))

    def event(self, name: str, **fields: object) -> None:
        pass
