"""The receive buffer: bytes from the peer, and command-line extraction with a hard cap.

Owns: buffering received bytes and cutting complete command lines out of them. A line is
everything up to and including the next LF; checking how it ends (CRLF or a bare LF) is the
caller's job. A line longer than the cap is reported once and then thrown away up to its LF
without being stored, so the buffer never holds more than the cap plus what the last
``append`` brought, whatever the peer sends.

Trust: none; the bytes are arbitrary. Scanning uses ``bytearray.find`` from where the last scan
stopped, so trickling a line in byte by byte costs linear time, not quadratic.
"""

from __future__ import annotations

import enum

__all__ = ["TOO_LONG", "ReceiveBuffer", "TooLong"]


class TooLong(enum.Enum):
    """Marker returned by ``ReceiveBuffer.next_line`` for a line over the cap."""

    TOO_LONG = "TOO_LONG"


TOO_LONG = TooLong.TOO_LONG


class ReceiveBuffer:
    """Received, not yet consumed bytes."""

    __slots__ = ("_buf", "_discarding", "_scanned")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scanned = 0  # no LF in _buf[:_scanned]
        self._discarding = False  # inside an over-long line: drop bytes up to the next LF

    def __len__(self) -> int:
        return len(self._buf)

    def __bytes__(self) -> bytes:
        return bytes(self._buf)

    def append(self, data: bytes) -> None:
        """Adds received bytes (the rest of an over-long line is dropped at once)."""
        if self._discarding:
            lf = data.find(b"\n")
            if lf < 0:
                return
            self._discarding = False
            data = data[lf + 1 :]
        self._buf += data

    def consume(self, count: int) -> None:
        """Drops the first ``count`` bytes."""
        del self._buf[:count]
        self._scanned = 0

    def clear(self) -> None:
        """Drops everything, including an over-long line in progress."""
        self._buf.clear()
        self._scanned = 0
        self._discarding = False

    def next_line(self, max_len: int) -> bytes | TooLong | None:
        """The next complete line (LF included), ``TOO_LONG``, or None if none is complete.

        ``max_len`` counts the line ending. ``TOO_LONG`` is returned once per over-long line;
        the line is dropped, as is the rest of it when it arrives.
        """
        buf = self._buf
        lf = buf.find(b"\n", self._scanned, max_len)
        if lf >= 0:
            line = bytes(buf[: lf + 1])
            del buf[: lf + 1]
            self._scanned = 0
            return line
        if len(buf) < max_len:
            self._scanned = len(buf)
            return None
        # No LF within the first max_len bytes: the line, its LF included, is over the cap.
        lf = buf.find(b"\n", max_len)
        if lf >= 0:
            del buf[: lf + 1]
        else:
            buf.clear()
            self._discarding = True
        self._scanned = 0
        return TOO_LONG
