"""The writer: one message being received, from its first byte to the commit point.

Owns: ``tmp/<id>`` while the message is received (created 0600, or claimed from ``free/``, see
palisade.spool.recycle) and its rename into ``queue/<id>``. The records it writes are those of
palisade.spool.format. A message counts only once it has been renamed into ``queue/`` and the
directory fsynced (:meth:`SpoolWriter.commit` returns only then, batched with other sessions'
commits by palisade.spool.commit): that rename is the commit point, and the server must not
answer 250 before it. The body is streamed to the file, never held whole in memory.
Must not touch: ``queue/`` beyond that one rename, the delivery state, SMTP or MIME.
Trust: the envelope and the body come from the session; the queue id was validated by
``Spool.open_message`` before any path was built from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from palisade.spool.commit import CommitJob, rename_noreplace
from palisade.spool.envelope import Envelope
from palisade.spool.format import first_record, late_fields, tail_records

if TYPE_CHECKING:
    from palisade.spool.queue import Spool

FILE_MODE = 0o600  # every file of the spool (the umask cannot widen it; recycled ones are checked)
DIR_MODE = 0o700  # every directory the spool creates


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ReceivedMessage:
    """The message being received, read back from the tmp file (a ``MessageSource``).

    Scanners and DKIM read it from disk after the final dot, before the commit; the writer
    flushes first, so what they read is exactly what was written.
    """

    def __init__(self, path: str | Path, start: int, size: int) -> None:
        self._path, self._start, self._size = path, start, size

    @property
    def size(self) -> int:
        return self._size

    def open(self) -> BinaryIO:
        f = open(self._path, "rb")  # noqa: SIM115 (returned to the caller)
        f.seek(self._start)
        return f


class SpoolWriter:
    """One message being received. ``write`` appends body bytes; ``commit`` makes it durable."""

    def __init__(self, spool: Spool, envelope: Envelope) -> None:
        self._spool = spool
        self.envelope = envelope
        self.queue_id = envelope.queue_id
        self._tmp_path = f"{spool.tmp_dir}/{envelope.queue_id}"
        self._final_path = f"{spool.queue_dir}/{envelope.queue_id}"
        # An id already in queue/ is caught at the commit (rename_noreplace), never replaced.
        # A recycled file still holds an old message: it is overwritten from the start and cut
        # to length at the commit (see palisade.spool.recycle).
        self._recycled = spool.pool.claim(self._tmp_path)
        if self._recycled:  # never through a link, whatever were put in free/
            fd = os.open(self._tmp_path, os.O_RDWR | os.O_NOFOLLOW)
            self._file: BinaryIO | None = open(fd, "r+b")  # noqa: SIM115 (kept open)
        else:  # 0600 whatever the umask: mail is nobody else's business
            fd = os.open(self._tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            self._file = open(fd, "wb")  # noqa: SIM115 (kept open)
        self._hash = hashlib.sha256()
        self.size = 0
        self._added: list[bytes] = []
        self._committed = False
        # The message's Message-ID, when the session found one (stored in the LATE record).
        self.message_id: str | None = None
        first = first_record(envelope)
        self._body_start = len(first)
        try:
            self._file.write(first)
        except BaseException:
            self.abort()
            raise

    def write(self, data: bytes) -> None:
        """Append body bytes (buffered; the message is never held whole in memory)."""
        if self._file is None:
            raise ValueError("writer is closed")
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    def prepend(self, lines: bytes, *, first: bool = False) -> None:
        """Header lines to deliver before the body (known only after the final dot), after
        those prepended before; ``first``: before them (a DKIM signature goes on top)."""
        if first:
            self._added.insert(0, lines)
        else:
            self._added.append(lines)

    def received(self) -> ReceivedMessage:
        """The body written so far, readable from disk (flushes the buffer first)."""
        if self._file is None:
            raise ValueError("writer is closed")
        self._file.flush()
        return ReceivedMessage(self._tmp_path, self._body_start, self.size)

    async def commit(self) -> None:
        """Write the END record, fsync, rename into queue/, fsync the directory.

        Returns only when the message is durable; raises (and leaves nothing in queue/) if not.
        Concurrent commits are batched by the spool's group committer.
        """
        f = self._file
        if f is None:
            raise ValueError("writer is closed")
        try:
            added = b"".join(self._added)
            self._hash.update(added)
            late = b"" if self.message_id is None else late_fields(self.message_id)
            f.write(added)
            f.write(tail_records(late, len(added), self.size, self._hash.hexdigest()))
            if self._recycled:
                f.truncate()  # what is left of the file's previous message goes
            f.flush()
            if not self._spool.fsync:
                rename_noreplace(self._tmp_path, self._final_path)
            else:
                loop = asyncio.get_running_loop()
                future: asyncio.Future[None] = loop.create_future()
                job = CommitJob(f.fileno(), self._tmp_path, self._final_path, loop, future)
                self._spool.committer.submit(job)
                try:
                    await asyncio.shield(future)
                except asyncio.CancelledError:
                    # The thread still owns the descriptor: let it finish before closing.
                    await asyncio.wait([future])
                    if future.exception() is None:
                        self._committed = True
                    raise
        except BaseException:
            self._close()
            raise
        self._committed = True
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            with contextlib.suppress(OSError):
                f.close()

    def abort(self) -> None:
        """Forget the message: remove the tmp file. Idempotent; safe after a failed commit."""
        self._close()
        if not self._committed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp_path)

    @property
    def committed(self) -> bool:
        return self._committed
