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

:class:`MessageIdFinder` is the cheap sibling every message gets, whether or not anything
examines its content: it finds the first Message-ID field of the header section (same rules for
where the section ends) with a few regular-expression calls per message, for the spool record,
the arrival log line and the DSN's In-Reply-To. It looks at no more than ``max_bytes`` of
header section.

Trust: content is client data; names and values are decoded as latin-1 (every byte survives)
and must be treated as text to examine, never as instructions. A Message-ID leaves
:func:`clean_message_id` without control characters and at most 998 characters long, but it is
still client text: the log escapes it, and a header writer checks it again.
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["MAX_MESSAGE_ID", "HeaderSplitter", "MessageIdFinder", "clean_message_id"]

_FIELD_NAME = re.compile(rb"^[!-9;-~]+[ \t]*:")  # RFC 5322 ftext, then obs-FWS before ':'
# The header section as the splitter sees it: whole fields (continuation lines included) from the
# start, up to the first line that is neither (the empty line, or body text without one).
_SECTION = re.compile(rb"(?:[!-9;-~]+[ \t]*:[^\n]*\n(?:[ \t][^\n]*\n)*)*")
_MESSAGE_ID = re.compile(rb"^message-id[ \t]*:([^\n]*\n(?:[ \t][^\n]*\n)*)", re.I | re.M)
_SECTION_END = re.compile(rb"(?:\A|\n)\r?\n")  # the empty line (at the start: no header)
MAX_MESSAGE_ID = 998  # RFC 5322's line limit: no real Message-ID is longer
_CONTROLS = {i: " " for i in range(32)} | {127: " "}


def clean_message_id(value: str) -> str | None:
    """A Message-ID field value fit to store: control characters (CR, LF, TAB, NUL...) become
    spaces, runs of spaces one, and the text is cut to 998 characters. None when empty."""
    text = " ".join(value.translate(_CONTROLS).split())
    return text[:MAX_MESSAGE_ID] or None


class MessageIdFinder:
    """Feed the content as it streams; ``finish`` returns the first Message-ID (cleaned) or None.

    The header section is gathered (at most ``max_bytes``) until an empty line shows it is
    complete, then parsed once, so a client trickling bytes costs one search per chunk.
    """

    __slots__ = ("_buf", "_max_bytes", "_searched", "done", "value")

    def __init__(self, max_bytes: int = 64 * 1024) -> None:
        self._buf = bytearray()
        self._max_bytes = max_bytes
        self._searched = 0  # where the next search for the empty line starts
        self.done = False
        self.value: str | None = None

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        buf = self._buf
        if not buf and _SECTION_END.search(data, 0, self._max_bytes) is not None:
            self._parse(data[: self._max_bytes])  # the usual case: it all came in one chunk
            return
        buf += data[: self._max_bytes - len(buf)]
        if _SECTION_END.search(buf, self._searched) is not None or len(buf) >= self._max_bytes:
            self._parse(buf)
        else:
            self._searched = max(0, len(buf) - 2)

    def finish(self) -> str | None:
        """The end of the content: parse what was gathered if that has not happened yet."""
        if not self.done:
            self._parse(self._buf)
        return self.value

    def _parse(self, buf: bytes | bytearray) -> None:
        section = _SECTION.match(buf)
        end = section.end() if section is not None else 0
        found = _MESSAGE_ID.search(buf, 0, end)
        if found is not None:
            self.value = clean_message_id(found.group(1).decode("latin-1"))
        self.done = True
        self._buf = bytearray()


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
