"""The attacks the core must stop: SMTP smuggling, STARTTLS command injection, improper
pipelining; and the three-way parser tests of whole sessions."""

from __future__ import annotations

import pytest

from palisade.smtp import NEED_DATA, Reply, SmtpConnection, State, events
from tests.smtp.smtp_harness import (
    DATA,
    EHLO,
    ENVELOPE,
    HELO,
    MAIL,
    QUIT,
    RCPT,
    Driver,
    make,
    merged,
    session,
    state_of,
)

SMUGGLED = b"MAIL FROM:<admin@victim.example>\r\nRCPT TO:<x@example.net>\r\nDATA\r\nevil\r\n"

# -- SMTP smuggling ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fake_end", "flaw"),
    [
        (b"\n.\r\n", "bare_lf"),
        (b"\r.\r\n", "bare_cr"),
        (b"\n.\n", "bare_lf"),
        (b"\r\n.\r", "bare_cr"),
        (b"\r\n.\n", "bare_lf"),
        (b"\r.\n", "bare_lf"),  # bare CR and bare LF both present; LF is reported
    ],
)
@pytest.mark.parametrize("bytewise", [False, True])
def test_smuggling_variants_never_end_data(fake_end: bytes, flaw: str, bytewise: bool) -> None:
    message = b"Subject: hi\r\n\r\nbody" + fake_end + SMUGGLED + b"\r\n.\r\n"
    d = session(EHLO, ENVELOPE, message, QUIT, bytewise=bytewise)
    evs = d.events()
    ends = [ev for ev in evs if isinstance(ev, events.DataEnd)]
    assert len(ends) == 1
    assert ends[0].flaw == flaw
    assert not any(isinstance(ev, events.Mail) for ev in evs[2:])  # only the real MAIL
    assert sum(isinstance(ev, events.Mail) for ev in evs) == 1
    assert not any(isinstance(ev, events.DataChunk) and b"evil" in ev.data for ev in evs)
    assert d.replies()[-2] == (
        b"550 5.6.0 Message refused: bare CR or LF (SMTP smuggling attempt)\r\n"
    )
    assert isinstance(evs[-2], events.Quit)


@pytest.mark.parametrize(
    ("content", "flaw"),
    [
        (b"a\x00b\r\n", "nul"),
        (b"x" * 999 + b"\r\n", "line_too_long"),
        ((b"y" * 98 + b"\r\n") * 101, "size"),
    ],
    ids=["nul", "line_too_long", "size"],
)
def test_other_data_flaws(content: bytes, flaw: str) -> None:
    d = session(EHLO, ENVELOPE, content + b"\r\n.\r\n")
    end = d.events()[-1]
    assert isinstance(end, events.DataEnd)
    assert end.flaw == flaw
    assert end.flaw_reason
    assert d.conn.state is State.READY


def test_oversize_message_stops_chunks_but_counts_size() -> None:
    conn = make(max_message_size=100)
    d = Driver(conn)
    d.feed(EHLO).feed(ENVELOPE)
    for _ in range(5):
        d.feed(b"z" * 48 + b"\r\n")
    d.feed(b".\r\n")
    handed_out = sum(len(ev.data) for ev in d.events() if isinstance(ev, events.DataChunk))
    assert handed_out <= 100
    end = d.events()[-1]
    assert isinstance(end, events.DataEnd)
    assert (end.size, end.flaw) == (250, "size")
    assert d.replies()[-1].startswith(b"552 5.3.4 ")


# -- STARTTLS command injection ----------------------------------------------------------------


def test_starttls_injection_is_discarded() -> None:
    d = Driver(auto_tls=False)
    d.feed(EHLO)
    assert b"STARTTLS" in d.replies()[0]
    d.feed(b"STARTTLS\r\nRSET\r\n")
    assert d.events()[-1] == events.StartTls()
    assert state_of(d.conn) is State.STARTTLS_PENDING
    assert d.conn.pending_input() == 0
    assert d.conn.starttls_discarded == 6
    d.feed(b"MAIL FROM:<injected@example>\r\n")  # still plaintext, before the handshake ended
    assert d.conn.next_event() is NEED_DATA
    d.conn.tls_started()
    assert state_of(d.conn) is State.INITIAL
    d.feed(b"NOOP\r\n")
    assert [type(ev) for ev in d.events()] == [events.Helo, events.StartTls, events.Noop]
    # the session starts over: EHLO again, STARTTLS no longer offered or accepted
    d.feed(MAIL)
    assert getattr(d.events()[-1], "kind", None) == "sequence"
    d.feed(EHLO)
    assert b"STARTTLS" not in d.replies()[-1]
    d.feed(b"STARTTLS\r\n")
    assert d.replies()[-1] == b"503 5.5.1 Error: TLS already active\r\n"
    assert d.conn.tls_active


@pytest.mark.parametrize(
    ("turns", "reply"),
    [
        ((EHLO, b"STARTTLS\r\n"), b"503 5.5.1 Error: STARTTLS not offered\r\n"),
    ],
)
def test_starttls_not_offered(turns: tuple[bytes, ...], reply: bytes) -> None:
    d = session(*turns, conn=make(starttls=False))
    assert b"STARTTLS" not in d.replies()[0]
    assert d.replies()[-1] == reply
    assert getattr(d.events()[-1], "kind", None) == "starttls"


@pytest.mark.parametrize(
    ("turns", "reply"),
    [
        ((b"STARTTLS\r\n",), b"503 5.5.1 Error: send EHLO first\r\n"),
        ((HELO, b"STARTTLS\r\n"), b"503 5.5.1 Error: send EHLO first\r\n"),
        ((EHLO, MAIL, b"STARTTLS\r\n"), b"503 5.5.1 Error: MAIL transaction in progress\r\n"),
        ((EHLO, b"STARTTLS now\r\n"), b"501 5.5.4 Syntax: STARTTLS\r\n"),
    ],
)
def test_starttls_refused(turns: tuple[bytes, ...], reply: bytes) -> None:
    assert session(*turns).replies()[-1] == reply


def test_starttls_answered_454_keeps_plaintext_session() -> None:
    def answer(conn: SmtpConnection, ev: events.Event) -> Reply:
        from tests.smtp.smtp_harness import default_answer

        if isinstance(ev, events.StartTls):
            return Reply(454, "4.7.0", "TLS not available due to temporary reason")
        return default_answer(conn, ev)

    d = Driver(answer=answer)
    d.feed(EHLO).feed(b"STARTTLS\r\nRSET\r\n")
    assert [type(ev) for ev in d.events()] == [events.Helo, events.StartTls, events.Rset]
    assert d.conn.state is State.READY


# -- pipelining --------------------------------------------------------------------------------


def test_pipelining_allowed_after_ehlo() -> None:
    d = session(EHLO, MAIL + RCPT + RCPT + b"RSET\r\n" + MAIL + RCPT + DATA)
    assert [type(ev) for ev in d.events()] == [
        events.Helo, events.Mail, events.Rcpt, events.Rcpt, events.Rset, events.Mail,
        events.Rcpt, events.Data,
    ]  # fmt: skip
    assert d.conn.state is State.DATA


def test_commands_after_end_of_data_allowed_after_ehlo() -> None:
    d = session(EHLO, ENVELOPE, b"hi\r\n.\r\n" + MAIL + RCPT + DATA)
    assert [type(ev) for ev in d.events()][-4:] == [
        events.DataEnd, events.Mail, events.Rcpt, events.Data,
    ]  # fmt: skip


def pipelining_error(d: Driver) -> events.CommandError:
    err = [ev for ev in d.events() if isinstance(ev, events.CommandError)]
    assert len(err) == 1, d.events()
    assert err[0].kind == "pipelining"
    assert err[0].closes
    assert d.conn.state is State.CLOSED
    assert d.events()[-1] == events.ConnectionClosed()
    assert b"554 5.5.0 Error: SMTP protocol synchronization\r\n" in d.replies()
    return err[0]


@pytest.mark.parametrize(
    "turns",
    [
        (EHLO + MAIL,),  # before any greeting was accepted
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",),
        (HELO, MAIL + RCPT),  # PIPELINING not offered after HELO
        (EHLO, b"NOOP\r\n" + MAIL),  # must be last in a group
        (EHLO, b"VRFY a\r\n" + MAIL),
        (EHLO, b"EXPN a\r\n" + MAIL),
        (EHLO, b"EHLO again\r\n" + MAIL),
        (EHLO, b"HELO again\r\n" + MAIL),
        (EHLO, b"AUTH LOGIN\r\n" + MAIL),
        (EHLO, ENVELOPE + b"Subject: content sent without waiting for 354\r\n"),
        (HELO, MAIL, RCPT, DATA, b"hi\r\n.\r\n" + MAIL),  # after end of data, no PIPELINING
    ],
)
def test_improper_pipelining_closes(turns: tuple[bytes, ...]) -> None:
    pipelining_error(session(*turns))


def test_improper_pipelining_reports_the_input_sent_too_soon() -> None:
    """exim's ``next input="..."``: what followed the command in the buffer, at most 256
    bytes; nothing when the command itself came early (after the end of data)."""
    assert pipelining_error(session(EHLO + MAIL)).pending == MAIL
    long = b"NOOP " + b"y" * 400 + b"\r\n"
    assert pipelining_error(session(EHLO, b"NOOP\r\n" + long)).pending == long[:256]
    assert pipelining_error(session(HELO, MAIL, RCPT, DATA, b"hi\r\n.\r\n" + MAIL)).pending == b""


def test_pipelining_feature_off_behaves_like_helo() -> None:
    pipelining_error(session(EHLO, MAIL + RCPT, conn=make(pipelining=False)))


@pytest.mark.parametrize("before", [b"", HELO, EHLO])
def test_bytes_after_quit_are_harmless(before: bytes) -> None:
    turns = (before, QUIT + b"NOOP\r\ngarbage") if before else (QUIT + b"NOOP\r\ngarbage",)
    d = session(*turns)
    assert not any(isinstance(ev, events.CommandError) for ev in d.events())
    assert d.events()[-2:] == [events.Quit(), events.ConnectionClosed()]


def test_quit_right_after_end_of_data_in_helo_session() -> None:
    d = session(HELO, MAIL, RCPT, DATA, b"hi\r\n.\r\n" + QUIT)
    assert d.events()[-2:] == [events.Quit(), events.ConnectionClosed()]


# -- three-way tests of whole sessions ---------------------------------------------------------

SESSIONS = [
    (EHLO, ENVELOPE, b"Subject: x\r\n\r\nline\r\n..dot\r\n.\r\n", QUIT),
    (HELO, MAIL, RCPT, DATA, b".\r\n", QUIT),
    (EHLO, ENVELOPE, b"a\n.\r\nMAIL FROM:<x@y>\r\n.\r\n", QUIT),
    (EHLO, ENVELOPE, b"a\r\n.\rb\r\n.\r\n", QUIT),
    (EHLO, ENVELOPE, b"x" * 3000 + b"\r\n.\r\n", QUIT),
    (EHLO, b"MAIL FROM:<a b@c>\r\n", b"x" * 600 + b"\r\n", b"FOO\n", b"NOOP\x00\r\n", QUIT),
    (EHLO, b"RCPT TO:<a@b>\r\n", b"\r\n", b"DATA\r\n", QUIT),
    (EHLO, b"STARTTLS\r\n", EHLO, QUIT),
    (b"x" * 10_000, b"\r\n", EHLO, QUIT),
]


@pytest.mark.parametrize("turns", SESSIONS)
def test_session_three_ways(turns: tuple[bytes, ...]) -> None:
    whole = session(*turns)
    bytewise = session(*turns, bytewise=True)
    trailing = session(*turns[:-1], turns[-1] + b"TRAILING DATA\r\nNOOP\r\n")
    assert merged(whole.events()) == merged(bytewise.events())
    assert merged(whole.events()) == merged(trailing.events())
    assert whole.replies() == bytewise.replies() == trailing.replies()
    assert whole.events()[-1] == events.ConnectionClosed()
