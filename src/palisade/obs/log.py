"""Event log: one line per event, in exim's shape, to a main log and a reject log.

Owns: the file format of ``mainlog`` / ``rejectlog`` (and optional JSON lines). Every caller hands
in a line it has built; client-supplied text must go through :func:`escape` first, because these
files are read by firewalls (fail2ban, nftfw) and a client must never be able to forge a line.
Trust: none of the text is trusted; control characters are escaped here as a last line of defence.
Files: the log files it creates are 0640 (see ``_open_log``), the directory 0750.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from email.utils import formatdate
from pathlib import Path
from typing import Protocol

from palisade.obs.files import make_dirs

_ESCAPES = {i: f"\\x{i:02x}" for i in range(32)} | {127: "\\x7f"}
_ESCAPES[ord("\\")] = "\\\\"


def escape(text: str, limit: int = 256) -> str:
    """Make client text safe for one log line: no control characters, bounded length."""
    out = text.translate(_ESCAPES)
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


LOG_MODE = 0o640  # as exim's: the owner writes, its group (e.g. adm) reads, nobody else


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
    with one object per event (``fields`` plus the text).
    """

    def __init__(self, directory: Path, *, json_lines: bool = False, echo: bool = False) -> None:
        make_dirs(directory, 0o750)
        self.directory = directory
        self._echo = echo
        self._lock = threading.Lock()
        self._main = _open_log(directory / "mainlog")
        self._reject = _open_log(directory / "rejectlog")
        self._panic = _open_log(directory / "paniclog")
        self._json = _open_log(directory / "main.jsonl") if json_lines else None

    def _write(self, fds: tuple[int, ...], kind: str, line: str, fields: dict[str, object]) -> None:
        now = time.time()
        text = f"{timestamp(now)} {line.replace(chr(10), ' ')}\n".encode("utf-8", "replace")
        with self._lock:
            for fd in fds:
                os.write(fd, text)
            if self._json is not None:
                record = {"time": now, "kind": kind, "line": line, **fields}
                os.write(self._json, (json.dumps(record, default=str) + "\n").encode())
        if self._echo:
            print(text.decode(), end="", flush=True)

    def main(self, line: str, **fields: object) -> None:
        self._write((self._main,), "main", line, fields)

    def reject(self, line: str, **fields: object) -> None:
        self._write((self._main, self._reject), "reject", line, fields)

    def panic(self, line: str, **fields: object) -> None:
        self._write((self._main, self._panic), "panic", line, fields)

    def close(self) -> None:
        for fd in (self._main, self._reject, self._panic, self._json):
            if fd is not None:
                os.close(fd)


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
