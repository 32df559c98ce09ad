"""The header section of a message as it streams in: fields for the checks, forged ones dropped.

Owns: splitting the message content (after dot-unstuffing) into header fields and body while
it is written to the spool, without holding more than one header field in memory. Each field is
handed, unfolded, to a ``drop`` predicate (the server drops inbound Authentication-Results
headers that claim our authserv-id, RFC 8601 section 5); kept fields are passed through
byte for byte, so DKIM signatures over them still verify.

The header section ends at the first empty line, or at the first line that is not a header
field (no ``name:`` at its start), which then belongs to the body, as Postfix's cleanup does.
Past ``max_bytes`` of header section, or ``max_fields`` fields, parsing stops and the rest is
passed through untouched: what the checks see is then incomplete, never a hang or a blow-up.

Trust: content is client data; names and values are decoded as latin-1 (every byte survives)
and must be treated as text to examine, never as instructions.
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["HeaderSplitter"]

_FIELD_NAME = re.compile(rb"^[!-9;-~]+[ \t]*:")  # RFC 5322 ftext, then obs-FWS before ':'


class HeaderSplitter:
    """Feeds content through; ``fields`` holds (name, unfolded value) pairs once seen."""

    def __init__(
        self,
        drop: Callable[[str, str], bool] | None = None,
        *,
        max_bytes: int = 1024 * 1024,
        max_fields: int = 1000,
    ) -> None:
        self._drop = drop
        self._max_bytes = max_bytes
        self._max_fields = max_fields
        self.fields: list[tuple[str, str]] = []
        self.dropped: list[tuple[str, str]] = []
        self.in_headers = True
        self._partial = b""  # an incomplete line
        self._field: list[bytes] = []  # lines of the field being gathered
        self._seen = 0

    def feed(self, data: bytes) -> bytes:
        """Content in, content to store out (the same bytes, less dropped fields)."""
        if not self.in_headers:
            return data
        data = self._partial + data
        self._partial = b""
        out: list[bytes] = []
        start = 0
        while self.in_headers:
            end = data.find(b"\n", start)
            if end < 0:
                self._partial = data[start:]
                if len(self._partial) + self._seen > self._max_bytes:
                    self._give_up(out)
                    out.append(self._partial)
                    self._partial = b""
                return b"".join(out)
            line = data[start : end + 1]
            start = end + 1
            self._seen += len(line)
            self._line(line, out)
            if self._seen > self._max_bytes or len(self.fields) >= self._max_fields:
                self._give_up(out)
        out.append(data[start:])
        return b"".join(out)

    def finish(self) -> bytes:
        """The end of data: what is still held back (a last field without a body)."""
        out: list[bytes] = []
        if self._partial:
            line, self._partial = self._partial, b""
            if self.in_headers:
                self._line(line, out)
            else:
                out.append(line)
        self._close_field(out)
        self.in_headers = False
        return b"".join(out)

    def _line(self, line: bytes, out: list[bytes]) -> None:
        if line[:1] in (b" ", b"\t") and self._field:
            self._field.append(line)  # a continuation of the current field
            return
        self._close_field(out)
        if line in (b"\r\n", b"\n") or not _FIELD_NAME.match(line):
            self.in_headers = False  # the empty line, or body text without one
            out.append(line)
            return
        self._field.append(line)

    def _close_field(self, out: list[bytes]) -> None:
        if not self._field:
            return
        raw = b"".join(self._field)
        self._field = []
        text = raw.decode("latin-1")
        name, _, value = text.partition(":")
        name = name.strip()
        value = re.sub(r"\r?\n(?=[ \t])", "", value).strip()
        if self._drop is not None and self._drop(name, value):
            self.dropped.append((name, value))
            return
        self.fields.append((name, value))
        out.append(raw)

    def _give_up(self, out: list[bytes]) -> None:
        """Too much header: stop parsing, pass everything through from here on."""
        self._close_field(out)  # its lines are complete: judged like any other field
        self.in_headers = False
