"""The DATA reader: finds the end of message, removes dot-stuffing, detects smuggling.

Owns: the message content between the 354 reply and the terminating CR LF . CR LF (RFC 5321
§4.1.1.4, §4.5.2). Its only job is to turn the received bytes into unstuffed content, the size,
and at most one flaw; it keeps no content itself.

Trust: none. The ONLY end of data is ``<CRLF>.<CRLF>`` (or ``.<CRLF>`` as the very first line).
A bare LF (LF not after CR), a bare CR (CR not before LF) or a NUL anywhere in the content never
ends a line or the message: they make the message flawed (the SMTP smuggling variants
``<LF>.<CRLF>``, ``<CR>.<CRLF>``, ``<LF>.<LF>``, ``<CRLF>.<CR>``, ``<CRLF>.<LF>``, ``<CR>.<LF>``),
and reading goes on until the real terminator. Lines over the text-line cap and content over
the size cap are flaws too. After a flaw, or past the size cap, no more content is handed out.

Work is done per received chunk with C-level bytes operations (find, count, replace); the
caller's buffer keeps at most the last four bytes (a possible partial terminator, or a CR whose
partner has not arrived yet), so the result does not depend on how the input was split: the
flaws present are all recorded and the one reported is the most serious (``FLAW_ORDER``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FLAW_ORDER", "FLAW_REASONS", "DataReader", "DataStep"]

FLAW_ORDER = ("bare_lf", "bare_cr", "nul", "line_too_long", "size")
FLAW_REASONS = {
    "bare_lf": "bare LF in message data (SMTP smuggling attempt)",
    "bare_cr": "bare CR in message data (SMTP smuggling attempt)",
    "nul": "NUL in message data",
    "line_too_long": "message text line over the length limit",
    "size": "message over the size limit",
}

_END = b"\r\n.\r\n"
# Tails the caller must keep back: they may begin the terminator (or a stuffed dot) or be a CR
# whose LF is still on its way. Longest first.
_HOLD = (b"\r\n.\r", b"\r\n.", b"\r\n", b"\r")


@dataclass(frozen=True, slots=True)
class DataStep:
    """What one call of ``DataReader.feed`` produced."""

    content: bytes  # unstuffed content to hand out ("" once flawed or over size)
    consumed: int  # bytes of the input used up (terminator included when done)
    done: bool  # the terminator was seen


class DataReader:
    """State of one message being received."""

    __slots__ = (
        "_at_start",
        "_flaws",
        "_line_len",
        "_max_line",
        "_max_size",
        "size",
    )

    def __init__(self, *, max_size: int, max_line: int) -> None:
        self._max_size = max_size
        self._max_line = max_line
        self._at_start = True  # nothing consumed yet: the input starts a line
        self._line_len = 0  # octets of the current line consumed so far (LF not yet seen)
        self._flaws: set[str] = set()
        self.size = 0  # unstuffed octets so far

    @property
    def flaw(self) -> str | None:
        """The most serious flaw seen so far, or None."""
        for name in FLAW_ORDER:
            if name in self._flaws:
                return name
        return None

    @property
    def flaw_reason(self) -> str:
        """A log text for ``flaw`` ("" when there is none)."""
        flaw = self.flaw
        return FLAW_REASONS[flaw] if flaw is not None else ""

    def feed(self, buf: bytes) -> DataStep:
        """Processes as much of ``buf`` as can be decided now."""
        if self._at_start:
            if buf.startswith(b".\r\n"):
                return DataStep(b"", 3, True)
            if b".\r\n".startswith(buf):  # "", "." or ".\r": undecided
                return DataStep(b"", 0, False)
        end = buf.find(_END)
        if end >= 0:
            raw = buf[: end + 2]  # the CRLF before the dot belongs to the content
            consumed = end + 5
            done = True
        else:
            cut = len(buf)
            for tail in _HOLD:
                if buf.endswith(tail):
                    cut -= len(tail)
                    break
            raw = buf[:cut]
            consumed = cut
            done = False
        if not raw:
            return DataStep(b"", consumed, done)
        content = self._process(raw)
        return DataStep(content, consumed, done)

    def _process(self, raw: bytes) -> bytes:
        """Unstuffs ``raw`` (whole lines' worth, never ending in CR), records flaws and size."""
        at_start = self._at_start
        self._at_start = False
        flaws = self._flaws
        # Smuggling-class checks: exact because raw never ends in CR (held back above).
        crlf = raw.count(b"\r\n")
        if raw.count(b"\n") != crlf:
            flaws.add("bare_lf")
        if raw.count(b"\r") != crlf:
            flaws.add("bare_cr")
        if b"\0" in raw:
            flaws.add("nul")
        self._check_lines(raw)
        content = raw.replace(b"\r\n.", b"\r\n")
        if at_start and content.startswith(b"."):
            content = content[1:]
        self.size += len(content)
        if self.size > self._max_size:
            flaws.add("size")
        return b"" if flaws else content

    def _check_lines(self, raw: bytes) -> None:
        max_line = self._max_line
        last_lf = raw.rfind(b"\n")
        if last_lf < 0:
            self._line_len += len(raw)
            # This line will get at least its LF: it is already too long once it reaches the cap.
            if self._line_len >= max_line:
                self._flaws.add("line_too_long")
            return
        if self._line_len + len(raw) > max_line:
            first_lf = raw.find(b"\n")
            longest = self._line_len + first_lf + 1
            if first_lf != last_lf:
                inner = raw[first_lf + 1 : last_lf].split(b"\n")
                longest = max(longest, max(map(len, inner)) + 1)
            if longest > max_line:
                self._flaws.add("line_too_long")
        self._line_len = len(raw) - last_lf - 1
        if self._line_len >= max_line:
            self._flaws.add("line_too_long")
