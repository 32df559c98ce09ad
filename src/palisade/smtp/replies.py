"""SMTP replies: the one value type the core, the policy and the server use to answer a client.

Owns: the ``Reply`` value, its wire encoding (RFC 5321 §4.2, RFC 2034 enhanced codes on every
line) and the constants for the standard answers the core gives on its own.

Trust: reply text is written by the application and may quote client-supplied strings (a HELO
name, an address). Encoding therefore never lets a CR, LF or any other control character reach
the wire (no reply splitting), and non-ASCII text is replaced, never raised on. The code and the
enhanced code are checked when the value is built: a bad one is a bug in the caller.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from palisade.smtp.errors import LocalProtocolError

__all__ = [
    "AUTH_NOT_ENABLED",
    "AUTH_REQUIRED",
    "AUTH_SUCCESSFUL",
    "BAD_SEQUENCE_NEED_HELO",
    "BAD_SEQUENCE_NEED_MAIL",
    "BAD_SEQUENCE_NEED_RCPT",
    "BAD_SEQUENCE_NESTED_MAIL",
    "BYE",
    "COMMAND_UNRECOGNIZED",
    "DATA_BARE_CR_LF",
    "DATA_LINE_TOO_LONG",
    "DATA_NOT_ACCEPTED",
    "DATA_NUL",
    "DATA_START",
    "LINE_BARE_CR",
    "LINE_BARE_LF",
    "LINE_NUL",
    "LINE_TOO_LONG",
    "MESSAGE_TOO_BIG",
    "MUST_STARTTLS_FIRST",
    "NO_VALID_RECIPIENTS",
    "OK",
    "PIPELINING_VIOLATION",
    "READY_FOR_TLS",
    "RECIPIENT_OK",
    "SENDER_OK",
    "SYNTAX_ERROR",
    "TLS_NOT_AVAILABLE",
    "TOO_MANY_RECIPIENTS",
    "VRFY_CANNOT",
    "Reply",
    "service_closing",
    "too_many_errors",
]

_ENHANCED_RE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")
# Everything that must not reach the wire inside a reply line: C0 controls (CR, LF, NUL, ...)
# and DEL. They become a space.
_UNSAFE_RE = re.compile(r"[\x00-\x1f\x7f]")


@functools.lru_cache(maxsize=256)
def _render(code: str, prefix: str, lines: tuple[str, ...]) -> bytes:
    """A multi-line (or unusual) reply on the wire. Cached: the EHLO reply, the same for
    every client of a listener, is rendered once instead of once per connection."""
    last = len(lines) - 1
    out = []
    for i, line in enumerate(lines):
        safe = _UNSAFE_RE.sub(" ", line)
        text = f"{prefix}{safe}".rstrip(" ")
        sep = " " if i == last else "-"
        out.append(f"{code}{sep}{text}\r\n" if text else f"{code}{sep}\r\n")
    return "".join(out).encode("ascii", "replace")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: a three-digit code, an optional enhanced status code and its text.

    ``text`` is one line, or a tuple of lines for a multi-line reply. The enhanced code, when
    present, is written at the start of every line (RFC 2034 §4).
    """

    code: int
    enhanced: str | None
    text: str | tuple[str, ...]

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise LocalProtocolError(f"reply code {self.code} is not a 2xx-5xx SMTP code")
        if self.enhanced is not None:
            if not _ENHANCED_RE.match(self.enhanced):
                raise LocalProtocolError(f"malformed enhanced status code {self.enhanced!r}")
            if self.enhanced[0] != str(self.code)[0] and self.code // 100 != 3:
                raise LocalProtocolError(
                    f"enhanced code {self.enhanced} does not match reply class {self.code}"
                )

    @property
    def is_positive(self) -> bool:
        """True for 2xx and 3xx replies."""
        return 200 <= self.code < 400

    @property
    def lines(self) -> tuple[str, ...]:
        """The text as a tuple of lines (at least one, possibly empty)."""
        if isinstance(self.text, str):
            return (self.text,)
        return self.text or ("",)

    def to_bytes(self, *, enhanced: bool = True) -> bytes:
        """The reply as it goes on the wire; ``enhanced=False`` leaves the enhanced code out."""
        code = str(self.code)
        prefix = f"{self.enhanced} " if enhanced and self.enhanced is not None else ""
        text = self.text
        if isinstance(text, str) and text.isascii() and text.isprintable() and text:
            return f"{code} {prefix}{text}\r\n".encode("ascii")  # the common case, fast
        return _render(code, prefix, self.lines)


def service_closing(hostname: str, why: str = "Service not available") -> Reply:
    """``421 4.3.2 <host> <why>, closing transmission channel``."""
    return Reply(421, "4.3.2", f"{hostname} {why}, closing transmission channel")


def too_many_errors(hostname: str) -> Reply:
    """``421 4.7.0 <host> Too many errors, closing connection`` (sent with TooManyErrors)."""
    return Reply(421, "4.7.0", f"{hostname} Too many errors, closing connection")


# -- positive answers the application usually sends -------------------------------------------
OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
DATA_START = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
BYE = Reply(221, "2.0.0", "Bye")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
VRFY_CANNOT = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available due to temporary reason")
AUTH_NOT_ENABLED = Reply(503, "5.5.1", "Error: authentication not enabled")
AUTH_SUCCESSFUL = Reply(235, "2.7.0", "Authentication successful")
# Postfix's words (RFC 4954 section 6 and RFC 3207 section 4 codes)
MUST_STARTTLS_FIRST = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")

# -- answers the core gives in CommandError events --------------------------------------------
SYNTAX_ERROR = Reply(500, "5.5.2", "Error: bad syntax")
COMMAND_UNRECOGNIZED = Reply(500, "5.5.1", "Error: command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: command line too long")
LINE_NUL = Reply(500, "5.5.2", "Error: NUL character in command")
LINE_BARE_LF = Reply(500, "5.5.2", "Error: bare <LF> received")
LINE_BARE_CR = Reply(500, "5.5.2", "Error: bare <CR> received")
BAD_SEQUENCE_NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
BAD_SEQUENCE_NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
BAD_SEQUENCE_NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
BAD_SEQUENCE_NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "Error: no valid recipients")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
PIPELINING_VIOLATION = Reply(554, "5.5.0", "Error: SMTP protocol synchronization")

# -- suggested answers to a flawed DataEnd ----------------------------------------------------
DATA_BARE_CR_LF = Reply(550, "5.6.0", "Message refused: bare CR or LF (SMTP smuggling attempt)")
DATA_NUL = Reply(550, "5.6.0", "Message refused: NUL character in message")
DATA_LINE_TOO_LONG = Reply(550, "5.6.0", "Message refused: text line too long")
# Only the application can accept a message (after committing it); a DataEnd without a flaw
# therefore has a temporary failure as its "suggestion", so a mistake never acknowledges mail.
DATA_NOT_ACCEPTED = Reply(451, "4.3.0", "Error: message not accepted, try again later")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing")  # e.g. the spool failed
