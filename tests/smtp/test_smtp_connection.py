"""The state machine: sequence rules, line hygiene, limits, counting, reply pairing."""

from __future__ import annotations

import pytest

from palisade.smtp import (
    NEED_DATA,
    PAUSED,
    Address,
    LocalProtocolError,
    Reply,
    SmtpConnection,
    State,
    events,
)
from tests.smtp.smtp_harness import (
    DATA,
    EHLO,
    ENVELOPE,
    HELO,
    HOST,
    MAIL,
    QUIT,
    RCPT,
    Driver,
    make,
    merged,
    session,
    state_of,
)


def errors(d: Driver) -> list[events.CommandError]:
    return [ev for ev in d.events() if isinstance(ev, events.CommandError)]


def only_error(d: Driver) -> events.CommandError:
    errs = errors(d)
    assert len(errs) == 1, d.events()
    return errs[0]


def codes(err: events.CommandError) -> tuple[int, str | None, str]:
    return err.reply.code, err.reply.enhanced, err.kind


# -- a whole transaction -----------------------------------------------------------------------


def test_full_transaction_transcript() -> None:
    d = session(EHLO, MAIL, RCPT, DATA, b"Subject: hi\r\n\r\n..body\r\n.\r\n", QUIT)
    assert merged(d.events()) == [
        events.Helo(name="client.example", extended=True),
        events.Mail(address=Address("sender", "example.org"), size=None, body=None, params=()),
        events.Rcpt(address=Address("rcpt", "example.net")),
        events.Data(),
        events.DataChunk(b"Subject: hi\r\n\r\n.body\r\n"),
        events.DataEnd(size=22, flaw=None, flaw_reason=""),
        events.Quit(),
        events.ConnectionClosed(),
    ]
    assert d.replies()[0] == (
        b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10000\r\n250-8BITMIME\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n250-STARTTLS\r\n250 HELP\r\n"
    )
    assert d.conn.state is State.CLOSED
    assert d.conn.next_event() == events.ConnectionClosed()


def test_helo_reply_is_single_line() -> None:
    d = session(HELO)
    assert d.replies() == [b"250 mx.test\r\n"]
    assert d.conn.state is State.READY
    assert not d.conn.pipelining_allowed


def test_ehlo_without_optional_features() -> None:
    conn = make(starttls=False, pipelining=False, enhanced=False)
    d = session(EHLO, conn=conn)
    assert d.replies()[0] == b"250-mx.test\r\n250-SIZE 10000\r\n250-8BITMIME\r\n250 HELP\r\n"
    d.feed(b"NOOP\r\n")
    assert d.replies()[-1] == b"250 Ok\r\n"  # no enhanced code when not offered


def test_states_follow_replies() -> None:
    d = session(EHLO)
    assert state_of(d.conn) is State.READY
    d.feed(MAIL)
    assert state_of(d.conn) is State.MAIL
    assert d.conn.transaction_sender == Address("sender", "example.org")
    d.feed(RCPT)
    assert state_of(d.conn) is State.RCPT
    assert d.conn.transaction_recipients == [Address("rcpt", "example.net")]
    d.feed(DATA)
    assert state_of(d.conn) is State.DATA
    d.feed(b"x\r\n.\r\n")
    assert state_of(d.conn) is State.READY
    assert d.conn.transaction_recipients == []
    assert d.conn.transaction_sender is None


def test_null_sender() -> None:
    d = session(EHLO, b"MAIL FROM:<>\r\n")
    assert d.last() == events.Mail(address=None)
    assert d.conn.state is State.MAIL


@pytest.mark.parametrize(
    "line",
    [b"mail from:<a@b>\r\n", b"MAIL FROM: <a@b>\r\n", b"Mail From:  <a@b>  \r\n"],
)
def test_mail_spelling_tolerated(line: bytes) -> None:
    d = session(EHLO, line)
    assert isinstance(d.last(), events.Mail)


def test_rcpt_postmaster_without_domain() -> None:
    d = session(EHLO, MAIL, b"RCPT TO:<PostMaster>\r\n")
    assert d.last() == events.Rcpt(address=Address("PostMaster", ""))


# -- sequence ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("turns", "reply"),
    [
        ((MAIL,), b"503 5.5.1 Error: send HELO/EHLO first\r\n"),
        ((EHLO, RCPT), b"503 5.5.1 Error: need MAIL command\r\n"),
        ((EHLO, DATA), b"503 5.5.1 Error: need RCPT command\r\n"),
        ((EHLO, MAIL, DATA), b"503 5.5.1 Error: need RCPT command\r\n"),
        ((EHLO, MAIL, MAIL), b"503 5.5.1 Error: nested MAIL command\r\n"),
        ((EHLO, MAIL, RCPT, MAIL), b"503 5.5.1 Error: nested MAIL command\r\n"),
        ((RCPT,), b"503 5.5.1 Error: need MAIL command\r\n"),
        ((DATA,), b"503 5.5.1 Error: need RCPT command\r\n"),
    ],
)
def test_sequence_errors(turns: tuple[bytes, ...], reply: bytes) -> None:
    d = session(*turns)
    err = d.last()
    assert isinstance(err, events.CommandError)
    assert err.kind == "sequence"
    assert d.replies()[-1] == reply


def test_data_after_all_recipients_refused_is_554() -> None:
    def answer(conn: SmtpConnection, ev: events.Event) -> Reply:
        if isinstance(ev, events.Rcpt):
            return Reply(550, "5.1.1", "User unknown")
        from tests.smtp.smtp_harness import default_answer

        return default_answer(conn, ev)

    d = Driver(answer=answer)
    for turn in (EHLO, MAIL, RCPT, DATA):
        d.feed(turn)
    assert d.replies()[-1] == b"554 5.5.1 Error: no valid recipients\r\n"
    assert d.conn.state is State.MAIL


def test_refused_mail_stays_ready() -> None:
    d = Driver(answer=lambda conn, ev: Reply(550, "5.7.1", "no"))
    d.conn  # noqa: B018
    conn = d.conn
    conn.receive_data(EHLO)
    ev = conn.next_event()
    assert isinstance(ev, events.Helo)
    conn.send_reply(conn.helo_reply(ev, HOST))
    d.feed(MAIL)
    assert conn.state is State.READY


def test_helo_resets_transaction_and_rset() -> None:
    d = session(EHLO, MAIL, RCPT, EHLO)
    assert d.conn.state is State.READY
    assert d.conn.transaction_recipients == []
    d.feed(MAIL).feed(RCPT).feed(b"RSET\r\n")
    assert d.conn.state is State.READY
    assert d.conn.transaction_sender is None
    assert session(b"RSET\r\n").conn.state is State.INITIAL


def test_data_refused_keeps_lines_as_commands() -> None:
    def answer(conn: SmtpConnection, ev: events.Event) -> Reply:
        from tests.smtp.smtp_harness import default_answer

        if isinstance(ev, events.Data):
            return Reply(451, "4.3.0", "try later")
        return default_answer(conn, ev)

    d = Driver(answer=answer)
    for turn in (EHLO, MAIL, RCPT, DATA, b"RSET\r\n"):
        d.feed(turn)
    assert d.conn.state is State.READY
    assert isinstance(d.last(), events.Rset)


def test_every_other_command_in_initial_state() -> None:
    d = session(
        b"NOOP\r\n", b"HELP\r\n", b"HELP mail\r\n", b"VRFY bob\r\n", b"EXPN list\r\n",
        b"AUTH PLAIN AGVtAA==\r\n", b"RSET\r\n", QUIT,
    )  # fmt: skip
    assert d.events() == [
        events.Noop(),
        events.Help(""),
        events.Help("mail"),
        events.Vrfy("bob"),
        events.Expn("list"),
        events.Auth("PLAIN AGVtAA=="),
        events.Rset(),
        events.Quit(),
        events.ConnectionClosed(),
    ]


# -- syntax ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "code", "enhanced", "kind"),
    [
        (b"\r\n", 500, "5.5.2", "syntax"),
        (b"FOO bar\r\n", 500, "5.5.1", "unknown_command"),
        (b"MAILFROM:<a@b>\r\n", 500, "5.5.1", "unknown_command"),
        (b"\xff\xfe\r\n", 500, "5.5.1", "unknown_command"),
        (b"EHLO\r\n", 501, "5.5.4", "syntax"),
        (b"HELO \r\n", 501, "5.5.4", "syntax"),
        (b"EHLO caf\xe9\r\n", 501, "5.5.2", "syntax"),
        (b"EHLO a\x01b\r\n", 501, "5.5.2", "syntax"),
        (b"VRFY\r\n", 501, "5.5.4", "syntax"),
        (b"QUIT now\r\n", 501, "5.5.4", "syntax"),
        (b"DATA x\r\n", 503, "5.5.1", "sequence"),  # sequence is checked before syntax
        (b"HELO a\x00b\r\n", 500, "5.5.2", "nul"),
        (b"HELO a\n", 500, "5.5.2", "bare_lf"),
        (b"HELO a\rb\r\n", 500, "5.5.2", "bare_cr"),
        (b"HELO a\r\r\n", 500, "5.5.2", "bare_cr"),
    ],
)
def test_command_syntax_errors(line: bytes, code: int, enhanced: str, kind: str) -> None:
    err = only_error(session(line))
    assert codes(err) == (code, enhanced, kind)


@pytest.mark.parametrize(
    "line",
    [
        b"EHLO a b\r\n",
        b"HELO a b\r\n",
        b"EHLO client.example  x\r\n",
        b"ehlo x [1.2.3.4] rejected\r\n",
    ],
)
@pytest.mark.parametrize("bytewise", [False, True])
def test_helo_with_inner_space_is_refused_and_counted(line: bytes, bytewise: bool) -> None:
    """A HELO/EHLO argument with a space is neither a domain nor an address literal: 501 5.5.4,
    one error counted, and the session stays in its greeting state. (No trailing-data variant:
    input after HELO/EHLO in the same group is a pipelining violation, tested on its own.)"""
    d = session(line, b"EHLO ok.example\r\n", conn=make(max_errors=5), bytewise=bytewise)
    err = d.events()[0]
    assert isinstance(err, events.CommandError), d.events()
    assert codes(err) == (501, "5.5.4", "syntax")
    assert d.replies()[0].startswith(b"501 5.5.4 Syntax: ")
    assert d.conn.error_count == 1
    helo = d.events()[1]  # the client may still greet properly afterwards
    assert isinstance(helo, events.Helo) and helo.name == "ok.example"
    assert [ev for ev in d.events() if isinstance(ev, events.Helo)] == [helo]


@pytest.mark.parametrize(
    ("line", "name"),
    [
        (b"EHLO a.example \r\n", "a.example"),
        (b"HELO a.example  \t \r\n", "a.example"),
        (b"EHLO  [192.0.2.1]\r\n", "[192.0.2.1]"),
    ],
)
@pytest.mark.parametrize("bytewise", [False, True])
def test_helo_trailing_blanks_are_stripped(line: bytes, name: str, bytewise: bool) -> None:
    d = session(line, bytewise=bytewise)
    ev = d.events()[0]
    assert isinstance(ev, events.Helo) and ev.name == name
    assert d.conn.state is State.READY and d.conn.error_count == 0


@pytest.mark.parametrize(
    ("line", "code", "enhanced", "kind"),
    [
        (b"MAIL\r\n", 501, "5.5.4", "syntax"),
        (b"MAIL TO:<a@b>\r\n", 501, "5.5.4", "syntax"),
        (b"MAIL FROM:a@b\r\n", 501, "5.1.7", "address"),
        (b"MAIL FROM:<a>\r\n", 501, "5.1.7", "address"),
        (b"MAIL FROM:<a b@c>\r\n", 501, "5.1.7", "address"),
        (b"MAIL FROM:<a\xe9@c>\r\n", 501, "5.1.7", "address"),
        (b"MAIL FROM:<a\x7f@c>\r\n", 501, "5.1.7", "address"),
        (b"MAIL FROM:<a@[300.1.1.1]>\r\n", 501, "5.1.7", "address"),
        (b"MAIL FROM:<postmaster>\r\n", 501, "5.1.7", "address"),
        (b"MAIL FROM:<a@b>garbage\r\n", 501, "5.5.4", "syntax"),
        (b"MAIL FROM:<a@b> SIZE=abc\r\n", 501, "5.5.4", "syntax"),
        (b"MAIL FROM:<a@b> SIZE\r\n", 501, "5.5.4", "syntax"),
        (b"MAIL FROM:<a@b> SIZE=10001\r\n", 552, "5.3.4", "size"),
        (b"MAIL FROM:<a@b> SIZE=99999999999999999999\r\n", 552, "5.3.4", "size"),
        (b"MAIL FROM:<a@b> BODY=BINARYMIME\r\n", 501, "5.5.4", "syntax"),
        (b"MAIL FROM:<a@b> SIZE=1 SIZE=2\r\n", 501, "5.5.4", "syntax"),
        (b"MAIL FROM:<a@b> SMTPUTF8\r\n", 555, "5.5.4", "parameter"),
        (b"MAIL FROM:<a@b> AUTH=<>\r\n", 555, "5.5.4", "parameter"),
    ],
)
def test_mail_errors(line: bytes, code: int, enhanced: str, kind: str) -> None:
    d = session(EHLO, line)
    assert codes(only_error(d)) == (code, enhanced, kind)
    assert d.conn.state is State.READY


def test_size_over_limit_reply_text() -> None:
    d = session(EHLO, b"MAIL FROM:<a@b> SIZE=10001\r\n")
    assert d.replies()[-1] == b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"


@pytest.mark.parametrize(
    ("line", "size", "body"),
    [
        (b"MAIL FROM:<a@b> SIZE=10000\r\n", 10000, None),
        (b"MAIL FROM:<a@b> size=0 body=8bitmime\r\n", 0, "8BITMIME"),
        (b"MAIL FROM:<a@b> BODY=7BIT\r\n", None, "7BIT"),
    ],
)
def test_mail_parameters(line: bytes, size: int | None, body: str | None) -> None:
    ev = session(EHLO, line).last()
    assert isinstance(ev, events.Mail)
    assert (ev.size, ev.body) == (size, body)


@pytest.mark.parametrize(
    ("line", "code", "enhanced", "kind"),
    [
        (b"RCPT\r\n", 501, "5.5.4", "syntax"),
        (b"RCPT TO:<>\r\n", 501, "5.1.3", "address"),
        (b"RCPT TO:rcpt@example.net\r\n", 501, "5.1.3", "address"),
        (b"RCPT TO:<rcpt@>\r\n", 501, "5.1.3", "address"),
        (b"RCPT TO:<a@b> NOTIFY=NEVER\r\n", 555, "5.5.4", "parameter"),
        (b"RCPT TO:<a@b> ORCPT=rfc822;a@b\r\n", 555, "5.5.4", "parameter"),
    ],
)
def test_rcpt_errors(line: bytes, code: int, enhanced: str, kind: str) -> None:
    d = session(EHLO, MAIL, line)
    assert codes(only_error(d)) == (code, enhanced, kind)
    assert d.conn.state is State.MAIL


def test_relay_tricks_are_parsed_not_refused() -> None:
    d = session(EHLO, MAIL)
    for line in (
        b"RCPT TO:<@relay.example:victim@target.example>\r\n",
        b"RCPT TO:<victim%target.example@local.example>\r\n",
        b"RCPT TO:<target!victim@local.example>\r\n",
        b'RCPT TO:<"victim@target.example"@local.example>\r\n',
    ):
        d.feed(line)
        ev = d.last()
        assert isinstance(ev, events.Rcpt), ev
        assert ev.address.relay_tricks


# -- line caps ---------------------------------------------------------------------------------


def test_command_line_cap_counts_crlf() -> None:
    exact = b"NOOP " + b"x" * (512 - 7) + b"\r\n"
    assert len(exact) == 512
    assert isinstance(session(exact).last(), events.Noop)
    over = b"NOOP " + b"x" * (512 - 6) + b"\r\n"
    d = session(over, b"NOOP\r\n")
    assert [type(ev) for ev in d.events()] == [events.CommandError, events.Noop]
    assert codes(errors(d)[0]) == (500, "5.5.2", "line_too_long")


def test_ten_megabyte_line_keeps_buffer_bounded() -> None:
    d = Driver()
    chunk = b"A" * 65536
    for _ in range(160):
        d.feed(chunk)
        assert d.conn.pending_input() <= 65536
    assert d.conn.pending_input() == 0
    d.feed(b"AAAA\r\nNOOP\r\n")
    assert [type(ev) for ev in d.events()] == [events.CommandError, events.Noop]
    assert errors(d)[0].kind == "line_too_long"


# -- limits and counting -----------------------------------------------------------------------


def test_too_many_recipients() -> None:
    conn = make(max_recipients=3)
    d = session(EHLO, MAIL, RCPT, RCPT, RCPT, RCPT, conn=conn)
    err = d.last()
    assert isinstance(err, events.CommandError)
    assert codes(err) == (452, "4.5.3", "too_many_recipients")
    assert len(conn.transaction_recipients) == 3
    assert conn.error_count == 0  # the client is expected to send the rest later
    d.feed(DATA)
    assert isinstance(d.last(), events.Data)


def test_too_many_errors_closes() -> None:
    conn = make(max_errors=3)
    d = session(b"FOO\r\n", b"BAR\r\n", b"BAZ\r\n", conn=conn)
    assert conn.error_count == 3
    tme = d.events()[3]
    assert isinstance(tme, events.TooManyErrors)
    assert d.replies()[-1] == b"421 4.7.0 mx.test Too many errors, closing connection\r\n"
    assert conn.state is State.CLOSED
    assert d.events()[-1] == events.ConnectionClosed()


def test_last_command_is_kept_for_the_drop_line_without_auth_data() -> None:
    """exim's "too many syntax or protocol errors (last command was ...)": the core keeps the
    last command line read, cut, without its line ending; an AUTH line keeps its mechanism
    only (its initial response may be a credential)."""
    conn = make(max_errors=3)
    session(b"FOO 1\r\n", b"BAR " + b"x" * 200 + b"\r\n", conn=conn)
    assert conn.last_command == "BAR " + "x" * 96
    session(b"FOO\r\n", b"AUTH PLAIN AGFAYg==\r\n", conn=(conn := make(max_errors=5)))
    assert conn.last_command == "AUTH PLAIN"


def test_app_5xx_replies_count_as_errors() -> None:
    def answer(conn: SmtpConnection, ev: events.Event) -> Reply:
        from tests.smtp.smtp_harness import default_answer

        if isinstance(ev, events.Rcpt):
            return Reply(550, "5.1.1", "User unknown")
        return default_answer(conn, ev)

    d = Driver(make(max_errors=4), answer)
    d.feed(EHLO).feed(MAIL)
    for _ in range(4):
        d.feed(RCPT)
    assert d.conn.error_count == 4
    assert isinstance(d.events()[-2], events.TooManyErrors)


def test_data_end_counting() -> None:
    def answer(conn: SmtpConnection, ev: events.Event) -> Reply:
        from tests.smtp.smtp_harness import default_answer

        if isinstance(ev, events.DataEnd):
            return ev.suggested_reply if ev.flaw else Reply(550, "5.7.1", "spam")
        return default_answer(conn, ev)

    d = Driver(answer=answer)
    d.feed(EHLO).feed(ENVELOPE).feed(b"clean\r\n.\r\n")
    assert d.conn.error_count == 0  # content refusal of a clean message
    d.feed(ENVELOPE).feed(b"bad\nline\r\n.\r\n")
    assert d.conn.error_count == 1  # refusal of a smuggling attempt


# -- reply pairing (local errors) --------------------------------------------------------------


def test_paused_until_answered() -> None:
    conn = make()
    conn.receive_data(EHLO)
    ev = conn.next_event()
    assert isinstance(ev, events.Helo)
    assert conn.awaiting_reply
    assert conn.next_event() is PAUSED
    conn.send_reply(conn.helo_reply(ev, HOST))
    assert not conn.awaiting_reply
    assert conn.next_event() is NEED_DATA


def test_reply_without_event_is_local_error() -> None:
    conn = make()
    with pytest.raises(LocalProtocolError):
        conn.send_reply(Reply(250, None, "Ok"))


def test_354_to_non_data_is_local_error() -> None:
    conn = make()
    conn.receive_data(b"NOOP\r\n")
    conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.send_reply(Reply(354, None, "go"))


def test_tls_started_out_of_turn_is_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        make().tls_started()


def test_app_may_send_another_reply_to_a_command_error() -> None:
    conn = make()
    conn.receive_data(b"FOO\r\n")
    ev = conn.next_event()
    assert isinstance(ev, events.CommandError)
    assert conn.send_reply(Reply(421, "4.7.0", "go away")) == b"421 4.7.0 go away\r\n"
    assert conn.state is State.CLOSED


def test_421_to_any_command_closes() -> None:
    conn = make()
    conn.receive_data(EHLO)
    conn.next_event()
    conn.send_reply(Reply(421, "4.3.2", "shutting down"))
    assert not conn.is_open
    conn.receive_data(b"NOOP\r\n")  # ignored
    assert conn.next_event() == events.ConnectionClosed()


# -- EOF ---------------------------------------------------------------------------------------


def test_eof_gives_connection_closed_forever() -> None:
    conn = make()
    conn.receive_data(b"NOOP\r\nHALF")
    conn.receive_data(b"")
    ev = conn.next_event()
    assert isinstance(ev, events.CommandError)  # NOOP with bytes after it, before EHLO
    conn.send_reply(ev.reply)
    assert conn.next_event() == events.ConnectionClosed()
    assert conn.next_event() == events.ConnectionClosed()


def test_eof_in_data() -> None:
    d = session(EHLO, ENVELOPE.replace(DATA, b""), DATA, b"partial\r\n")
    d.conn.receive_data(b"")
    d.drain()
    assert d.events()[-1] == events.ConnectionClosed()
    assert not any(isinstance(ev, events.DataEnd) for ev in d.events())


def test_eof_while_paused_waits_for_the_reply() -> None:
    conn = make()
    conn.receive_data(b"NOOP\r\n")
    conn.receive_data(b"")
    ev = conn.next_event()
    assert ev == events.Noop()
    assert conn.next_event() is PAUSED
    conn.send_reply(Reply(250, "2.0.0", "Ok"))
    assert conn.next_event() == events.ConnectionClosed()
