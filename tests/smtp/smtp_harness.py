"""Test driver for the sans-I/O SMTP core: feeds bytes, answers events, records a transcript."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace

from palisade.smtp import (
    NEED_DATA,
    PAUSED,
    Features,
    Limits,
    Reply,
    SmtpConnection,
    State,
    events,
)
from palisade.smtp.events import Event

HOST = "mx.test"

Answer = Callable[[SmtpConnection, events.Event], Reply]


def make(
    *, starttls: bool = True, pipelining: bool = True, enhanced: bool = True, **limits: int
) -> SmtpConnection:
    limits.setdefault("max_message_size", 10_000)
    return SmtpConnection(
        features=Features(
            HOST,
            max_size=limits["max_message_size"],
            starttls=starttls,
            pipelining=pipelining,
            enhanced_status=enhanced,
        ),
        limits=Limits(**limits),
    )


def state_of(conn: SmtpConnection) -> State:
    """``conn.state``, read through a call: mypy keeps the narrowing of an earlier
    ``assert conn.state is X`` across the calls that change the state, so a later comparison
    written directly would look impossible to it."""
    return conn.state


def default_answer(conn: SmtpConnection, ev: events.Event) -> Reply:
    """What a permissive application answers to each event."""
    match ev:
        case events.Helo():
            return conn.helo_reply(ev, HOST)
        case events.Data():
            return Reply(354, None, "go ahead")
        case events.Quit():
            return Reply(221, "2.0.0", "Bye")
        case events.StartTls():
            return Reply(220, "2.0.0", "Ready to start TLS")
        case events.CommandError() | events.TooManyErrors():
            return ev.reply
        case events.DataEnd():
            return ev.suggested_reply if ev.flaw else Reply(250, "2.0.0", "Ok: queued")
        case events.Auth():
            return Reply(503, "5.5.1", "Error: authentication not enabled")
        case _:
            return Reply(250, "2.0.0", "Ok")


class Driver:
    """Feeds a connection and answers every event, recording (event, reply bytes)."""

    def __init__(
        self,
        conn: SmtpConnection | None = None,
        answer: Answer = default_answer,
        *,
        auto_tls: bool = True,
    ) -> None:
        self.conn = conn if conn is not None else make()
        self.answer = answer
        self.auto_tls = auto_tls
        self.log: list[tuple[events.Event, bytes | None]] = []

    def drain(self) -> None:
        conn = self.conn
        for _ in range(100_000):
            ev = conn.next_event()
            if ev is NEED_DATA:
                return
            assert ev is not PAUSED, "driver always answers"
            assert isinstance(ev, events.Event), ev
            if isinstance(ev, events.ConnectionClosed):
                self.log.append((ev, None))
                return
            out: bytes | None = None
            if ev.needs_reply:
                reply = self.answer(conn, ev)
                out = conn.send_reply(reply)
                if isinstance(ev, events.StartTls) and reply.code == 220 and self.auto_tls:
                    conn.tls_started()
            self.log.append((ev, out))
        raise AssertionError("no NEED_DATA after 100000 events")

    def feed(self, data: bytes) -> Driver:
        self.conn.receive_data(data)
        self.drain()
        return self

    def feed_bytewise(self, data: bytes) -> Driver:
        for i in range(len(data)):
            self.feed(data[i : i + 1])
        return self

    def events(self) -> list[Event]:
        return [ev for ev, _ in self.log]

    def replies(self) -> list[bytes]:
        return [out for _, out in self.log if out is not None]

    def last(self) -> Event:
        return self.log[-1][0]


def merged(evs: Iterable[events.Event]) -> list[events.Event]:
    """Joins consecutive DataChunks, and drops the content of flawed messages (how much of
    it was handed out before the flaw was seen depends on how the input was split)."""
    out: list[events.Event] = []
    for ev in evs:
        if isinstance(ev, events.DataChunk) and out and isinstance(out[-1], events.DataChunk):
            out[-1] = replace(out[-1], data=out[-1].data + ev.data)
        else:
            out.append(ev)
    result: list[events.Event] = []
    for ev in out:
        if (
            isinstance(ev, events.DataEnd)
            and ev.flaw
            and result
            and isinstance(result[-1], events.DataChunk)
        ):
            result.pop()
        result.append(ev)
    return result


def session(*turns: bytes, conn: SmtpConnection | None = None, bytewise: bool = False) -> Driver:
    """Runs the client turns (each sent after the previous one's replies)."""
    d = Driver(conn)
    for turn in turns:
        if bytewise:
            d.feed_bytewise(turn)
        else:
            d.feed(turn)
    return d


EHLO = b"EHLO client.example\r\n"
HELO = b"HELO client.example\r\n"
MAIL = b"MAIL FROM:<sender@example.org>\r\n"
RCPT = b"RCPT TO:<rcpt@example.net>\r\n"
DATA = b"DATA\r\n"
QUIT = b"QUIT\r\n"
ENVELOPE = MAIL + RCPT + DATA
