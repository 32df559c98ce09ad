"""The SMTP server-side state machine: the one place where session state changes.

Owns: the session state (``State``), the one table of transitions (``TRANSITIONS``), the
pipelining discipline, the STARTTLS input discard, the recipient and error counts, and the
pairing of every event that needs an answer with exactly one ``send_reply``.

Does not own: sockets, clocks, TLS, logging, policy. Bytes come in through ``receive_data``,
events go out through ``next_event``, replies become bytes in ``send_reply``.

Trust: every received byte is hostile. Nothing the peer sends raises out of this module; it
becomes a ``CommandError``, a flaw on ``DataEnd``, ``TooManyErrors`` or ``ConnectionClosed``.
Mistakes of the application (a reply when none is due, ``tls_started`` out of turn) raise
``LocalProtocolError``. The buffer is bounded by the command-line cap plus the size of one
``receive_data`` call, as long as the application drains events until ``NEED_DATA``; while an
answer is outstanding (``PAUSED``) it should stop reading (``pending_input`` tells how much is
waiting).

Error kinds (``CommandError.kind``): syntax, address, parameter, size, sequence,
unknown_command, line_too_long, nul, bare_lf, bare_cr, too_many_recipients, pipelining,
starttls, auth.

AUTH (``Features.auth``, RFC 4954): offered only once TLS is active; the core checks the
sequence (530 before TLS, 503 before EHLO, twice, or in a transaction; 504 for another
mechanism), then hands out :class:`~palisade.smtp.events.Auth`. A 334 answer puts the session
in ``AUTH``, where the next line is not a command but the client's response
(:class:`~palisade.smtp.events.AuthResponse`); any other answer ends the exchange, and 235
marks the session authenticated. AUTH ends a pipelined group, except ``AUTH PLAIN`` with its
initial response, which completes in one round trip (RFC 4954 section 4). No SASL security
layer is ever negotiated (PLAIN and LOGIN have none), so nothing buffered needs discarding after
235. With ``Features.auth_required`` MAIL is refused (530) until the session is authenticated.

Error counting (``error_count``, compared with ``Limits.max_errors`` before each command): every
``CommandError`` except too_many_recipients (a client is expected to retry those later, RFC 5321
§4.5.3.1.10), every reply >= 500 the application sends to a command event (so refused
recipients count, as in Postfix), and a reply >= 500 to a ``DataEnd`` that carries a flaw
(smuggling, NUL, line or size); a content refusal of a clean message does not count.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from palisade.smtp import replies
from palisade.smtp.address import Address
from palisade.smtp.buffer import TOO_LONG, ReceiveBuffer
from palisade.smtp.commands import MUST_BE_LAST, VERBS, check_line, parse_command, split_verb
from palisade.smtp.data import DataReader
from palisade.smtp.errors import LocalProtocolError
from palisade.smtp.events import Auth as AuthEvent
from palisade.smtp.events import (
    AuthResponse,
    CommandError,
    ConnectionClosed,
    Data,
    DataChunk,
    DataEnd,
    Event,
    Helo,
    Mail,
    Rcpt,
    TooManyErrors,
)
from palisade.smtp.options import Features, Limits
from palisade.smtp.replies import Reply

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "TRANSITIONS",
    "Sentinel",
    "SmtpConnection",
    "State",
    "Step",
]


class State(enum.Enum):
    """Where the session is."""

    INITIAL = "INITIAL"  # greeted by us, no HELO/EHLO accepted yet
    READY = "READY"  # HELO/EHLO accepted, no transaction
    MAIL = "MAIL"  # sender accepted
    RCPT = "RCPT"  # at least one recipient accepted
    DATA = "DATA"  # receiving content (and answering its end)
    STARTTLS_PENDING = "STARTTLS_PENDING"  # 220 sent; waiting for tls_started(), input dropped
    AUTH = "AUTH"  # 334 sent: the next line is a SASL response, not a command
    CLOSED = "CLOSED"  # QUIT answered, a closing reply sent, or the peer closed


class Sentinel(enum.Enum):
    """Non-event results of ``next_event``."""

    NEED_DATA = "NEED_DATA"  # feed more bytes (receive_data) before asking again
    PAUSED = "PAUSED"  # an event still awaits its send_reply


NEED_DATA = Sentinel.NEED_DATA
PAUSED = Sentinel.PAUSED


@dataclass(frozen=True, slots=True)
class Step:
    """What a command does in a state: refused up front, or moved by some reply codes."""

    refuse: Reply | None = None  # the command is out of sequence here: CommandError with this
    codes: range = range(0)  # reply codes that take the transition
    to: State | None = None  # the state they lead to


def _go(codes: range, to: State) -> Step:
    return Step(codes=codes, to=to)


def _no(reply: Reply) -> Step:
    return Step(refuse=reply)


_2XX = range(200, 300)
_221 = range(221, 222)
_220 = range(220, 221)
_354 = range(354, 355)
_334 = range(334, 335)
_ANY = range(200, 600)
_STAY = Step()
END_OF_DATA = "<end of data>"  # the pseudo-verb of DataEnd in the table
AUTH_RESPONSE = "<auth response>"  # the pseudo-verb of AuthResponse in the table
_AUTH_MECHANISMS = ("PLAIN", "LOGIN")

_IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
_EHLO_FIRST = Reply(503, "5.5.1", "Error: send EHLO first")

I, R, M, T, D = State.INITIAL, State.READY, State.MAIL, State.RCPT, State.DATA  # noqa: E741
A = State.AUTH

# THE transition table. (state, verb) -> Step. A command missing from a state's row is never
# parsed in that state (DATA, AUTH, STARTTLS_PENDING and CLOSED read no commands). In AUTH a
# reply other than 334 ends the exchange: back to READY (send_reply).
# fmt: off
TRANSITIONS: dict[tuple[State, str], Step] = {
    (I, "HELO"): _go(_2XX, R), (I, "EHLO"): _go(_2XX, R),
    (I, "MAIL"): _no(replies.BAD_SEQUENCE_NEED_HELO),
    (I, "RCPT"): _no(replies.BAD_SEQUENCE_NEED_MAIL),
    (I, "DATA"): _no(replies.BAD_SEQUENCE_NEED_RCPT),
    (I, "STARTTLS"): _no(_EHLO_FIRST),
    (I, "RSET"): _go(_2XX, I), (I, "QUIT"): _go(_221, State.CLOSED),
    (I, "NOOP"): _STAY, (I, "HELP"): _STAY, (I, "VRFY"): _STAY, (I, "EXPN"): _STAY,
    (I, "AUTH"): _STAY,

    (R, "HELO"): _go(_2XX, R), (R, "EHLO"): _go(_2XX, R),
    (R, "MAIL"): _go(_2XX, M),
    (R, "RCPT"): _no(replies.BAD_SEQUENCE_NEED_MAIL),
    (R, "DATA"): _no(replies.BAD_SEQUENCE_NEED_RCPT),
    (R, "STARTTLS"): _go(_220, State.STARTTLS_PENDING),
    (R, "RSET"): _go(_2XX, R), (R, "QUIT"): _go(_221, State.CLOSED),
    (R, "NOOP"): _STAY, (R, "HELP"): _STAY, (R, "VRFY"): _STAY, (R, "EXPN"): _STAY,
    (R, "AUTH"): _go(_334, A),

    (M, "HELO"): _go(_2XX, R), (M, "EHLO"): _go(_2XX, R),
    (M, "MAIL"): _no(replies.BAD_SEQUENCE_NESTED_MAIL),
    (M, "RCPT"): _go(_2XX, T),
    (M, "DATA"): _no(replies.BAD_SEQUENCE_NEED_RCPT),  # 554 if every RCPT was refused
    (M, "STARTTLS"): _no(_IN_TRANSACTION),
    (M, "RSET"): _go(_2XX, R), (M, "QUIT"): _go(_221, State.CLOSED),
    (M, "NOOP"): _STAY, (M, "HELP"): _STAY, (M, "VRFY"): _STAY, (M, "EXPN"): _STAY,
    (M, "AUTH"): _STAY,

    (T, "HELO"): _go(_2XX, R), (T, "EHLO"): _go(_2XX, R),
    (T, "MAIL"): _no(replies.BAD_SEQUENCE_NESTED_MAIL),
    (T, "RCPT"): _go(_2XX, T),
    (T, "DATA"): _go(_354, D),
    (T, "STARTTLS"): _no(_IN_TRANSACTION),
    (T, "RSET"): _go(_2XX, R), (T, "QUIT"): _go(_221, State.CLOSED),
    (T, "NOOP"): _STAY, (T, "HELP"): _STAY, (T, "VRFY"): _STAY, (T, "EXPN"): _STAY,
    (T, "AUTH"): _STAY,

    (D, END_OF_DATA): _go(_ANY, R),

    (A, AUTH_RESPONSE): _go(_334, A),
}
# fmt: on
del I, R, M, T, D, A

_CLOSING_CODES = frozenset({421, 521})


class SmtpConnection:
    """One server-side SMTP session, without I/O."""

    def __init__(self, *, features: Features, limits: Limits, tls_active: bool = False) -> None:
        """``tls_active``: the connection is encrypted from its first byte (implicit TLS, the
        submissions port 465 of RFC 8314): STARTTLS is not offered, AUTH is."""
        self._features = features
        self._limits = limits
        self._state = State.INITIAL
        self._buffer = ReceiveBuffer()
        self._eof = False
        self._pending: Event | None = None  # the event awaiting send_reply
        self._pending_verb: str | None = None  # its key in TRANSITIONS (None: no transition)
        self._queued: DataEnd | None = None  # DataEnd to hand out after the last DataChunk
        self._reader: DataReader | None = None
        self._extended = False  # the accepted greeting was EHLO
        self._helo_name: str | None = None
        self._tls_active = tls_active
        self._authenticated = False
        self._sender: Address | None = None
        self._recipients: list[Address] = []
        self._refused_recipients = 0
        self._sent_early = False  # input followed end-of-data without waiting (no PIPELINING)
        self.error_count = 0
        self.starttls_discarded = 0  # octets dropped after STARTTLS (command injection attempt)

    # -- read-only views ------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self._state

    @property
    def features(self) -> Features:
        return self._features

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def awaiting_reply(self) -> bool:
        """True while an event still needs its ``send_reply``."""
        return self._pending is not None

    @property
    def is_open(self) -> bool:
        """False once the session is over (closing reply sent, QUIT answered, or EOF)."""
        return self._state is not State.CLOSED

    @property
    def tls_active(self) -> bool:
        return self._tls_active

    @property
    def authenticated(self) -> bool:
        """True once an AUTH exchange was answered 235."""
        return self._authenticated

    @property
    def extended(self) -> bool:
        """True when the accepted greeting was EHLO."""
        return self._extended

    @property
    def helo_name(self) -> str | None:
        """The name of the accepted HELO/EHLO, if any."""
        return self._helo_name

    @property
    def pipelining_allowed(self) -> bool:
        """True when the client was offered PIPELINING (EHLO accepted, feature on)."""
        return self._extended and self._features.pipelining

    @property
    def transaction_sender(self) -> Address | None:
        """The accepted sender (None before MAIL and for the null sender)."""
        return self._sender

    @property
    def transaction_recipients(self) -> list[Address]:
        """The accepted recipients of the current transaction (a copy)."""
        return list(self._recipients)

    def pending_input(self) -> int:
        """Bytes received and not yet parsed."""
        return len(self._buffer)

    # -- input ----------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Adds bytes from the peer; ``b""`` means the peer closed its side (EOF)."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("receive_data after EOF")
        if self._state is State.CLOSED:
            return
        if self._state is State.STARTTLS_PENDING:
            self.starttls_discarded += len(data)
            return
        self._buffer.append(data)

    def next_event(self) -> Event | Sentinel:
        """The next event, ``NEED_DATA`` (feed more) or ``PAUSED`` (answer the last one)."""
        if self._pending is not None:
            return PAUSED
        if self._queued is not None:
            end, self._queued = self._queued, None
            return self._emit(end, END_OF_DATA)
        state = self._state
        if state is State.CLOSED:
            return ConnectionClosed()
        if state is State.STARTTLS_PENDING:
            return self._closed() if self._eof else NEED_DATA
        if state is State.DATA:
            return self._next_data_event()
        if state is State.AUTH:
            return self._next_auth_response()
        return self._next_command_event()

    # -- output ---------------------------------------------------------------------------
    def send_reply(self, reply: Reply) -> bytes:
        """Answers the pending event; returns the bytes to send."""
        event = self._pending
        if event is None:
            raise LocalProtocolError("send_reply with no event awaiting a reply")
        if not isinstance(reply, Reply):
            raise LocalProtocolError(f"send_reply needs a Reply, not {type(reply).__name__}")
        if reply.code == 354 and not isinstance(event, Data):
            raise LocalProtocolError("354 is only an answer to DATA")
        verb = self._pending_verb
        self._pending = None
        self._pending_verb = None
        self._count_error(event, reply)
        if (
            reply.code in _CLOSING_CODES
            or isinstance(event, TooManyErrors)
            or (isinstance(event, CommandError) and event.closes)
        ):
            self._close()
        elif verb is not None:
            step = TRANSITIONS[(self._state, verb)]
            if reply.code in step.codes and step.to is not None:
                self._enter(step.to, event)
            elif isinstance(event, Rcpt):
                self._refused_recipients += 1
            elif self._state is State.AUTH:
                self._state = State.READY  # the exchange is over, whatever the answer
            if reply.code == 235 and isinstance(event, AuthEvent | AuthResponse):
                self._authenticated = True
        return reply.to_bytes(enhanced=self._features.enhanced_status)

    def tls_started(self) -> None:
        """The TLS handshake after STARTTLS finished: the session starts over (RFC 3207 §4.2)."""
        if self._state is not State.STARTTLS_PENDING:
            raise LocalProtocolError(f"tls_started in state {self._state.name}")
        self._buffer.clear()
        self._sent_early = False
        self._tls_active = True
        self._extended = False
        self._helo_name = None
        self._reset_transaction()
        self._state = State.INITIAL

    def greeting(self, hostname: str) -> bytes:
        """The 220 greeting line."""
        return Reply(220, None, f"{hostname} ESMTP Palisade").to_bytes()

    def helo_reply(self, ev: Helo, hostname: str) -> Reply:
        """250 for HELO; the multi-line EHLO reply listing the offered extensions."""
        if not ev.extended:
            return Reply(250, None, hostname)
        features = self._features
        lines = [hostname]
        if features.pipelining:
            lines.append("PIPELINING")
        lines.append(f"SIZE {features.max_size}")
        if features.eightbitmime:
            lines.append("8BITMIME")
        if features.enhanced_status:
            lines.append("ENHANCEDSTATUSCODES")
        if features.starttls and not self._tls_active:
            lines.append("STARTTLS")
        if features.auth and self._tls_active:
            lines.append("AUTH PLAIN LOGIN")
        lines.append("HELP")
        return Reply(250, None, tuple(lines))

    # -- internals ------------------------------------------------------------------------
    def _emit(self, event: Event, verb: str | None) -> Event:
        if event.needs_reply:
            self._pending = event
            self._pending_verb = verb
        return event

    def _error(
        self, reply: Reply, reason: str, kind: str, command: str = "", *, closes: bool = False
    ) -> CommandError:
        error = CommandError(reply=reply, reason=reason, kind=kind, command=command, closes=closes)
        self._emit(error, None)
        if kind != "too_many_recipients":
            self.error_count += 1
        return error

    def _count_error(self, event: Event, reply: Reply) -> None:
        if reply.code < 500 or isinstance(event, CommandError | TooManyErrors):
            return
        if isinstance(event, DataEnd) and event.flaw is None:
            return
        self.error_count += 1

    def _closed(self) -> ConnectionClosed:
        self._close()
        return ConnectionClosed()

    def _close(self) -> None:
        self._state = State.CLOSED
        self._buffer.clear()
        self._reader = None
        self._queued = None

    def _reset_transaction(self) -> None:
        self._sender = None
        self._recipients = []
        self._refused_recipients = 0

    def _enter(self, to: State, event: Event) -> None:
        """Takes a transition of the table, with its side effects on the transaction."""
        match event:
            case Helo():
                self._reset_transaction()
                self._extended = event.extended
                self._helo_name = event.name
            case Mail():
                self._reset_transaction()
                self._sender = event.address
            case Rcpt():
                self._recipients.append(event.address)
            case Data():
                self._reader = DataReader(
                    max_size=self._limits.max_message_size, max_line=self._limits.max_text_line
                )
            case _:
                if to is State.READY or to is State.INITIAL:
                    self._reset_transaction()  # RSET, end of data
                elif to is State.STARTTLS_PENDING:
                    self.starttls_discarded += len(self._buffer)
                    self._buffer.clear()
        if to is State.CLOSED:
            self._close()
        else:
            self._state = to

    def _next_data_event(self) -> Event | Sentinel:
        reader = self._reader
        assert reader is not None
        step = reader.feed(bytes(self._buffer))
        self._buffer.consume(step.consumed)
        if step.done:
            self._reader = None
            if not self.pipelining_allowed and len(self._buffer):
                self._sent_early = True
            end = DataEnd(size=reader.size, flaw=reader.flaw, flaw_reason=reader.flaw_reason)
            if step.content:
                self._queued = end
                return DataChunk(step.content)
            return self._emit(end, END_OF_DATA)
        if step.content:
            return DataChunk(step.content)
        return self._closed() if self._eof else NEED_DATA

    def _next_command_event(self) -> Event | Sentinel:
        limits = self._limits
        if self.error_count >= limits.max_errors:
            return self._emit(TooManyErrors(replies.too_many_errors(self._features.hostname)), None)
        line = self._buffer.next_line(limits.max_command_line)
        if line is None:
            return self._closed() if self._eof else NEED_DATA
        if line is TOO_LONG:
            return self._error(
                replies.LINE_TOO_LONG,
                f"command line longer than {limits.max_command_line} octets",
                "line_too_long",
            )
        text = check_line(line)
        if isinstance(text, CommandError):
            self._emit(text, None)
            self.error_count += 1
            return text
        verb, args = split_verb(text)
        early, self._sent_early = self._sent_early, False
        if verb != "QUIT":
            extra = len(self._buffer) > 0
            if (extra or early) and not self.pipelining_allowed:
                return self._pipelining_error(verb, "pipelining was not offered")
            if extra and verb in MUST_BE_LAST and not _one_round_trip(verb, args):
                return self._pipelining_error(verb, f"{verb} must be the last command of a group")
        if verb not in VERBS:
            if not verb:
                return self._error(replies.SYNTAX_ERROR, "empty command line", "syntax")
            return self._error(
                replies.COMMAND_UNRECOGNIZED,
                f"unknown command {verb[:20]!a}",
                "unknown_command",
                verb[:20],
            )
        step = TRANSITIONS[(self._state, verb)]
        if step.refuse is not None:
            reply = step.refuse
            if verb == "DATA" and self._state is State.MAIL and self._refused_recipients:
                reply = replies.NO_VALID_RECIPIENTS
            return self._error(reply, f"{verb} in state {self._state.name}", "sequence", verb)
        if verb == "AUTH" and self._features.auth:
            return self._auth_event(args)
        if verb == "MAIL" and self._features.auth_required and not self._authenticated:
            reply = replies.AUTH_REQUIRED if self._tls_active else replies.MUST_STARTTLS_FIRST
            return self._error(reply, "MAIL before AUTH", "auth", verb)
        if verb == "STARTTLS":
            refusal = self._starttls_refusal()
            if refusal is not None:
                return self._error(
                    refusal, f"STARTTLS refused: {refusal.lines[0]}", "starttls", verb
                )
        event = parse_command(verb, args, limits=limits, features=self._features)
        if isinstance(event, CommandError):
            self._emit(event, None)
            self.error_count += 1
            return event
        if isinstance(event, Rcpt) and len(self._recipients) >= limits.max_recipients:
            return self._error(
                replies.TOO_MANY_RECIPIENTS,
                f"more than {limits.max_recipients} recipients",
                "too_many_recipients",
                verb,
            )
        return self._emit(event, verb)

    def _auth_event(self, args: str) -> Event:
        """AUTH on a listener that offers it: the sequence and mechanism checked."""
        refusal = None
        if not self._tls_active:
            refusal = replies.MUST_STARTTLS_FIRST
        elif not self._extended:
            refusal = _EHLO_FIRST
        elif self._authenticated:
            refusal = Reply(503, "5.5.1", "Error: already authenticated")
        elif self._state is not State.READY:
            refusal = _IN_TRANSACTION
        if refusal is not None:
            return self._error(refusal, f"AUTH refused: {refusal.lines[0]}", "auth", "AUTH")
        words = args.strip(" ").split(" ")
        mechanism = words[0].upper() if words[0].isascii() else words[0]
        if mechanism not in _AUTH_MECHANISMS:
            return self._error(
                Reply(504, "5.5.4", "Unrecognized authentication type"),
                f"AUTH mechanism {mechanism[:20]!a} not offered",
                "auth",
                "AUTH",
            )
        if len(words) > 2:
            return self._error(
                Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"),
                "AUTH with more than one initial response",
                "syntax",
                "AUTH",
            )
        initial = words[1] if len(words) == 2 else None
        return self._emit(
            AuthEvent(argument="", mechanism=mechanism, initial_response=initial), "AUTH"
        )

    def _next_auth_response(self) -> Event | Sentinel:
        """The line after a 334: the client's SASL response, never parsed as a command."""
        line = self._buffer.next_line(self._limits.max_command_line)
        if line is None:
            return self._closed() if self._eof else NEED_DATA
        self._state = State.READY  # an error below ends the exchange; a response may resume it
        if line is TOO_LONG:
            return self._error(
                replies.LINE_TOO_LONG,
                f"AUTH response longer than {self._limits.max_command_line} octets",
                "line_too_long",
            )
        text = check_line(line)
        if isinstance(text, CommandError):
            self._emit(text, None)
            self.error_count += 1
            return text
        self._state = State.AUTH
        return self._emit(AuthResponse(text=text), AUTH_RESPONSE)

    def _pipelining_error(self, verb: str, why: str) -> CommandError:
        return self._error(
            replies.PIPELINING_VIOLATION,
            f"improper command pipelining after {verb[:20] or 'empty line'}: {why}",
            "pipelining",
            verb[:20],
            closes=True,
        )

    def _starttls_refusal(self) -> Reply | None:
        if self._tls_active:
            return Reply(503, "5.5.1", "Error: TLS already active")
        if not self._features.starttls:
            return Reply(503, "5.5.1", "Error: STARTTLS not offered")
        if not self._extended:
            return _EHLO_FIRST
        return None


def _one_round_trip(verb: str, args: str) -> bool:
    """``AUTH PLAIN <initial-response>``: the one AUTH that may be followed by more commands
    in a pipelined group (RFC 4954 section 4: it completes in one round trip, no security
    layer)."""
    if verb != "AUTH":
        return False
    words = args.strip(" ").split(" ")
    return len(words) == 2 and words[0].upper() == "PLAIN"
