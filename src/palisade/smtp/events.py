"""The events the SMTP core hands to the application, one per parsed command or data step.

Owns: the event value types and which of them need an answer. Every event whose class has
``needs_reply = True`` (all commands, ``CommandError``, ``TooManyErrors``, ``DataEnd``) must be
answered with exactly one ``SmtpConnection.send_reply``; ``DataChunk`` and ``ConnectionClosed``
need none.

Trust: the values were produced by the core's own parsers; strings in them are still client
text (decoded as latin-1, free of CR/LF/NUL) and must be escaped before they are logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from palisade.smtp import replies
from palisade.smtp.address import Address
from palisade.smtp.replies import Reply

__all__ = [
    "Auth",
    "AuthResponse",
    "CommandError",
    "ConnectionClosed",
    "Data",
    "DataChunk",
    "DataEnd",
    "Event",
    "Expn",
    "Helo",
    "Help",
    "Mail",
    "Noop",
    "Quit",
    "Rcpt",
    "Rset",
    "StartTls",
    "TooManyErrors",
    "Vrfy",
]

Params = tuple[tuple[str, str | None], ...]


@dataclass(frozen=True, slots=True)
class Event:
    """Base of all events."""

    needs_reply: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class Helo(Event):
    """HELO (``extended=False``) or EHLO (``extended=True``) with the name the client gave."""

    needs_reply: ClassVar[bool] = True
    name: str
    extended: bool


@dataclass(frozen=True, slots=True)
class Mail(Event):
    """MAIL FROM; ``address`` is None for the null sender ``<>``.

    ``size`` and ``body`` are the values of SIZE= and BODY= (body upper-cased: 7BIT/8BITMIME);
    ``params`` holds every parameter as (KEYWORD, value or None), keywords upper-cased.
    """

    needs_reply: ClassVar[bool] = True
    address: Address | None
    size: int | None = None
    body: str | None = None
    params: Params = ()


@dataclass(frozen=True, slots=True)
class Rcpt(Event):
    """RCPT TO (no parameters are supported, so ``params`` is always empty)."""

    needs_reply: ClassVar[bool] = True
    address: Address
    params: Params = ()


@dataclass(frozen=True, slots=True)
class Data(Event):
    """DATA; answer 354 to start receiving content."""

    needs_reply: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class Rset(Event):
    """RSET."""

    needs_reply: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class Noop(Event):
    """NOOP (any argument ignored)."""

    needs_reply: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class Quit(Event):
    """QUIT; answer 221 and close."""

    needs_reply: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class Help(Event):
    """HELP with its optional topic ("" when none)."""

    needs_reply: ClassVar[bool] = True
    topic: str = ""


@dataclass(frozen=True, slots=True)
class Vrfy(Event):
    """VRFY with its argument."""

    needs_reply: ClassVar[bool] = True
    argument: str


@dataclass(frozen=True, slots=True)
class Expn(Event):
    """EXPN with its argument."""

    needs_reply: ClassVar[bool] = True
    argument: str


@dataclass(frozen=True, slots=True)
class StartTls(Event):
    """STARTTLS, offered and allowed in this state; answer 220 and start the handshake."""

    needs_reply: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class Auth(Event):
    """AUTH. Where it is not offered (``Features.auth`` off) it comes with only ``argument`` set,
    so the application can refuse and log it. Where it is offered, the core has checked the
    sequence (TLS, EHLO, not yet authenticated, no transaction) and the mechanism:
    ``mechanism`` is "PLAIN" or "LOGIN" and ``initial_response`` the base64 text that followed
    it (None: none given; "=" stands for an empty one, RFC 4954 section 4). Answer 334 to ask
    for a response line (an :class:`AuthResponse` follows), 235 on success, or a refusal.
    """

    needs_reply: ClassVar[bool] = True
    argument: str = ""
    mechanism: str = ""
    initial_response: str | None = None


@dataclass(frozen=True, slots=True)
class AuthResponse(Event):
    """The client's answer to a 334 challenge: one line of base64 text, or "*" to cancel.

    Answer 334 for another step, 235 on success, or a refusal (which ends the exchange). The
    text is a secret (it carries the password): never log it.
    """

    needs_reply: ClassVar[bool] = True
    text: str = ""

    def __repr__(self) -> str:
        return "AuthResponse(<hidden>)"


@dataclass(frozen=True, slots=True)
class CommandError(Event):
    """A command the core already refused; ``reply`` is the answer it suggests.

    ``kind`` is a stable token for logs and firewalls (see ``connection`` for the list),
    ``reason`` a human log text, ``command`` the verb as sent (upper-cased, may be "").
    ``closes`` is True when the reply ends the session (improper pipelining).
    """

    needs_reply: ClassVar[bool] = True
    reply: Reply
    reason: str
    kind: str
    command: str = ""
    closes: bool = False


@dataclass(frozen=True, slots=True)
class TooManyErrors(Event):
    """The client made ``Limits.max_errors`` errors; send ``reply`` (421) and close."""

    needs_reply: ClassVar[bool] = True
    reply: Reply


@dataclass(frozen=True, slots=True)
class DataChunk(Event):
    """Message content: dot-unstuffed, CRLF line ends kept, never the final ``.<CRLF>``."""

    data: bytes


@dataclass(frozen=True, slots=True)
class DataEnd(Event):
    """The end of data (CR LF . CR LF) was seen; needs a reply.

    ``size`` counts the unstuffed octets received. ``flaw`` is None or one of "bare_lf",
    "bare_cr", "nul", "line_too_long", "size"; with a flaw the application must refuse the
    message (``suggested_reply``) and discard what it received.
    """

    needs_reply: ClassVar[bool] = True
    size: int
    flaw: str | None = None
    flaw_reason: str = ""

    @property
    def suggested_reply(self) -> Reply:
        """The refusal for the flaw; 451 when there is none (only the app may accept mail)."""
        match self.flaw:
            case "bare_lf" | "bare_cr":
                return replies.DATA_BARE_CR_LF
            case "nul":
                return replies.DATA_NUL
            case "line_too_long":
                return replies.DATA_LINE_TOO_LONG
            case "size":
                return replies.MESSAGE_TOO_BIG
            case _:
                return replies.DATA_NOT_ACCEPTED


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The peer closed (EOF), or the session was closed by a reply; nothing more will come."""
