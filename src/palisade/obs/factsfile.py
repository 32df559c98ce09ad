"""The policy facts file (``[record] facts``): finished JSON lines appended in batches.

Owns: writing lines that a session hands over after its connection ended, so that recording
never stands between a client and its reply: a line is buffered, and the buffer goes out in one
``os.write`` on an O_APPEND descriptor when it holds :data:`BATCH_LINES` lines or
:data:`BATCH_BYTES` bytes, after :data:`BATCH_DELAY` seconds at the latest, at SIGUSR1 and at
shutdown. Several worker processes may append to one file: each write holds whole lines only.
Rotation is the logs' (``obs.log``): before each write the path is checked (device, inode), so a
file renamed by logrotate is noticed and a new one made; :meth:`FactsFile.reopen` reopens at
once. A batch lost to a crash is at most :data:`BATCH_DELAY` seconds of facts: they are for
trying policy changes, not an audit trail.
Must not touch: what a line says (``conversation.record`` builds it).
Trust: the lines are built by us from escaped JSON; nothing here reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from palisade.obs.files import make_dirs
from palisade.obs.log import _LogFile

BATCH_LINES = 256
BATCH_BYTES = 64 * 1024
BATCH_DELAY = 0.5


class FactsFile:
    """Appends lines to the facts file(s) named by each connection's config, in batches.

    The path comes with each line (the generation the connection began with says where): a
    reload that names another file switches to it for new connections, and the old file is
    closed once its last batch is written."""

    def __init__(self, on_error: Callable[[str], None] | None = None) -> None:
        """``on_error``: told (the panic log) when a batch cannot be written, at most once a
        minute per file."""
        self._on_error = on_error
        self._reported: dict[Path, float] = {}
        self._files: dict[Path, _LogFile] = {}
        self._pending: dict[Path, list[bytes]] = {}
        self._size = 0
        self._lines = 0
        self._timer: asyncio.TimerHandle | None = None
        self.errors = 0  # batches that could not be written (the caller reports them)
        self.last_error = ""

    def add(self, path: Path, line: bytes) -> None:
        """Queues one finished line (ending with a newline) for ``path``."""
        self._pending.setdefault(path, []).append(line)
        self._size += len(line)
        self._lines += 1
        if self._lines >= BATCH_LINES or self._size >= BATCH_BYTES:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(BATCH_DELAY, self.flush)

    def flush(self) -> None:
        """Writes everything queued; a file that cannot be written loses its batch (counted)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, {}
        self._size = self._lines = 0
        for path, lines in pending.items():
            try:
                file = self._files.get(path)
                if file is None:
                    make_dirs(path.parent, 0o750)
                    file = self._files[path] = _LogFile(path)
                os.write(file.current(), b"".join(lines))
            except OSError as exc:
                self.errors += 1
                self.last_error = f"{path}: {exc.strerror or exc}"
                now = time.monotonic()
                if self._on_error is not None and now - self._reported.get(path, -1e9) >= 60:
                    self._reported[path] = now
                    self._on_error(
                        f"facts file {self.last_error}: {len(lines)} record(s) lost "
                        "(said once a minute)"
                    )
        if pending:
            for path in [p for p in self._files if p not in pending]:  # a path no longer used
                with contextlib.suppress(OSError):
                    self._files.pop(path).close()

    def reopen(self) -> None:
        """SIGUSR1: the queued lines written, every file opened again at its path."""
        self.flush()
        for file in self._files.values():
            with contextlib.suppress(OSError):
                file.open()

    def close(self) -> None:
        self.flush()
        for file in self._files.values():
            with contextlib.suppress(OSError):
                file.close()
        self._files.clear()
