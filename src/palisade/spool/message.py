"""The message handle: a committed message as delivery reads it, loaded once per attempt.

Owns: reading the message of a queue file as delivered (the added header lines, then the body)
for every reader of one delivery attempt: the Maildir transport once per recipient, the next hop
once, the DSN for the original's headers. :class:`Message` is that handle. A small file (most
mail, up to ``SMALL_FILE``) was read whole with one system call when it was loaded, so the
message is in memory; a larger one stays on disk behind the one descriptor opened to load it,
and each reader reads it with ``pread`` at its own offsets (no file is reopened, no file position
is shared between the worker thread that writes Maildir files and the event loop).
:class:`MessageReader` is the older stream over an open file, for ``Spool.open_body``.
Must not touch: anything but the file handed in; it never parses or changes the envelope.
Trust: the offsets come from records already validated by palisade.spool.format; a file that
is shorter than they say (changed under us) raises CorruptMessage.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import BinaryIO

from palisade.spool.errors import CorruptMessage
from palisade.spool.format import Records

SMALL_FILE = 256 * 1024  # queue files up to this size are read whole for delivery
CHUNK = 64 * 1024


class Message:
    """One committed message, as delivered: the added header lines, then the body.

    Build it with :meth:`in_memory` or :meth:`on_file`; close it when the attempt is over (a
    no-op for one in memory). Every read starts again at the first byte.
    """

    __slots__ = ("_fd", "_segments", "data", "length")

    def __init__(
        self, length: int, data: bytes | None, fd: int | None, segments: tuple[tuple[int, int], ...]
    ) -> None:
        self.length = length
        self.data = data  # the whole message when it is in memory, else None
        self._fd = fd
        self._segments = segments

    @classmethod
    def in_memory(cls, data: bytes) -> Message:
        return cls(len(data), data, None, ())

    @classmethod
    def on_file(cls, fd: int, records: Records) -> Message:
        """Takes ownership of ``fd`` (closed by :meth:`close`)."""
        return cls(records.message_length, None, fd, records.segments)

    def chunks(self, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """The message in pieces of at most ``chunk_size`` bytes (blocking reads when on disk)."""
        data = self.data
        if data is not None:
            if len(data) <= chunk_size:
                if data:
                    yield data
                return
            for start in range(0, len(data), chunk_size):
                yield data[start : start + chunk_size]
            return
        fd = self._fd
        if fd is None:
            raise ValueError("message handle is closed")
        for offset, length in self._segments:
            while length:
                chunk = os.pread(fd, min(chunk_size, length), offset)
                if not chunk:
                    raise CorruptMessage("message shorter than recorded")
                offset += len(chunk)
                length -= len(chunk)
                yield chunk

    def read(self, limit: int | None = None) -> bytes:
        """The whole message, or its first ``limit`` bytes (for the header section)."""
        if self.data is not None:
            return self.data if limit is None or limit >= self.length else self.data[:limit]
        want = self.length if limit is None else min(limit, self.length)
        parts: list[bytes] = []
        for chunk in self.chunks(1 << 20):
            parts.append(chunk[:want])
            want -= len(parts[-1])
            if not want:
                break
        return b"".join(parts)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> Message:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MessageReader:
    """Reads the added header lines, then the body, from one open queue file (as one stream)."""

    def __init__(self, f: BinaryIO, records: Records) -> None:
        self._f = f
        self._segments = list(records.segments)  # (offset, length) in reading order
        self._left = 0
        self._next_segment()

    def _next_segment(self) -> None:
        while self._segments and self._left == 0:
            offset, self._left = self._segments.pop(0)
            self._f.seek(offset)

    def read(self, size: int = -1) -> bytes:
        parts: list[bytes] = []
        want = size if size >= 0 else None
        while self._left and (want is None or want > 0):
            n = self._left if want is None else min(want, self._left)
            chunk = self._f.read(n)
            if not chunk:
                raise CorruptMessage("message shorter than recorded")
            parts.append(chunk)
            self._left -= len(chunk)
            if want is not None:
                want -= len(chunk)
            self._next_segment()
        return b"".join(parts)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> MessageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
