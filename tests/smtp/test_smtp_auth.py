"""The SMTP core's AUTH (RFC 4954) on a submission listener: offered only under TLS, the
sequence refusals, the AUTH state where lines are SASL responses and not commands, 235 marking
the session authenticated, MAIL refused before it, and the pipelining rule for AUTH. The SASL
helpers (smtp.sasl) decode PLAIN and LOGIN without ever quoting the input."""

from __future__ import annotations

import pytest

from palisade.smtp import Features, Limits, Reply, SmtpConnection, State, events, sasl
from tests.smtp.smtp_harness import EHLO, Driver, default_answer, state_of

OK_235 = Reply(235, "2.7.0", "Authentication successful")


def make(*, tls: bool = True, starttls: bool = False) -> SmtpConnection:
    return SmtpConnection(
        features=Features("mx.test", 10_000, starttls=starttls, auth=True, auth_required=True),
        limits=Limits(max_message_size=10_000),
        tls_active=tls,
    )


def answer(conn: SmtpConnection, ev: events.Event) -> Reply:
    """An application that asks once (334) and accepts the response "secret"."""
    match ev:
        case events.Auth() if ev.initial_response is None:
            return Reply(334, None, "")
        case events.Auth():
            return OK_235
        case events.AuthResponse():
            return OK_235 if ev.text == "c2VjcmV0" else Reply(535, "5.7.8", "no")
    return default_answer(conn, ev)


def replies(d: Driver) -> list[bytes]:
    return d.replies()


def test_ehlo_offers_auth_only_under_tls() -> None:
    d = Driver(make(tls=False, starttls=True), answer, auto_tls=True)
    d.feed(EHLO)
    assert b"AUTH" not in d.replies()[-1] and b"250-STARTTLS" in d.replies()[-1]
    d.feed(b"STARTTLS\r\n").feed(EHLO)
    assert b"250-AUTH PLAIN LOGIN\r\n" in d.replies()[-1]
    assert b"STARTTLS" not in d.replies()[-1]


def test_port_25_features_never_offer_auth() -> None:
    conn = SmtpConnection(
        features=Features("mx.test", 10_000, starttls=False),
        limits=Limits(max_message_size=10_000),
        tls_active=True,
    )
    d = Driver(conn).feed(EHLO)
    assert b"AUTH" not in d.replies()[-1]
    d.feed(b"AUTH PLAIN AGEAYg==\r\n")
    ev = d.last()
    assert isinstance(ev, events.Auth) and ev.argument == "PLAIN AGEAYg=="


@pytest.mark.parametrize(
    ("tls", "before", "line", "reply"),
    [
        (False, EHLO, b"AUTH PLAIN\r\n", b"530 5.7.0 Must issue a STARTTLS command first\r\n"),
        (False, EHLO, b"MAIL FROM:<a@b.example>\r\n",
         b"530 5.7.0 Must issue a STARTTLS command first\r\n"),
        (True, EHLO, b"MAIL FROM:<a@b.example>\r\n", b"530 5.7.0 Authentication required\r\n"),
        (True, b"", b"AUTH PLAIN\r\n", b"503 5.5.1 Error: send EHLO first\r\n"),
        (True, EHLO, b"AUTH CRAM-MD5\r\n", b"504 5.5.4 Unrecognized authentication type\r\n"),
        (True, EHLO, b"AUTH PLAIN a b\r\n",
         b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"),
    ],
)  # fmt: skip
def test_refusals(tls: bool, before: bytes, line: bytes, reply: bytes) -> None:
    d = Driver(make(tls=tls), answer)
    if before:
        d.feed(before)
    d.feed(line)
    assert d.replies()[-1] == reply
    err = d.last()
    assert isinstance(err, events.CommandError)
    assert err.kind in ("auth", "syntax", "sequence")


def test_plain_with_initial_response_authenticates_and_mail_is_allowed() -> None:
    d = Driver(make(), answer).feed(EHLO).feed(b"AUTH plain AGFAYgBj\r\n")
    ev = d.events()[-1]
    assert isinstance(ev, events.Auth)
    assert (ev.mechanism, ev.initial_response) == ("PLAIN", "AGFAYgBj")
    assert d.replies()[-1] == b"235 2.7.0 Authentication successful\r\n"
    assert d.conn.authenticated
    d.feed(b"MAIL FROM:<a@b.example>\r\n")
    assert d.replies()[-1] == b"250 2.0.0 Ok\r\n"
    d.feed(b"AUTH PLAIN AGFAYgBj\r\n")
    assert d.replies()[-1] == b"503 5.5.1 Error: already authenticated\r\n"
    assert d.conn.state is State.MAIL  # the transaction goes on


def test_a_response_line_is_never_a_command() -> None:
    d = Driver(make(), answer).feed(EHLO).feed(b"AUTH LOGIN\r\n")
    assert d.conn.state is State.AUTH and d.replies()[-1] == b"334 \r\n"
    d.feed(b"QUIT\r\n")  # a response, not QUIT
    ev = d.events()[-1]
    assert isinstance(ev, events.AuthResponse) and ev.text == "QUIT"
    assert "QUIT" not in repr(ev)  # responses carry passwords: their repr hides them
    assert d.replies()[-1] == b"535 5.7.8 no\r\n"
    assert state_of(d.conn) is State.READY and not d.conn.authenticated
    d.feed(b"AUTH PLAIN\r\n").feed(b"c2VjcmV0\r\n")
    assert d.replies()[-1] == b"235 2.7.0 Authentication successful\r\n"
    assert d.conn.authenticated


def test_a_bad_response_line_ends_the_exchange() -> None:
    d = Driver(make(), answer).feed(EHLO).feed(b"AUTH PLAIN\r\n").feed(b"abc\n")
    assert d.replies()[-1] == b"500 5.5.2 Error: bare <LF> received\r\n"
    assert d.conn.state is State.READY


def test_pipelining_only_plain_with_initial_response_may_lead_a_group() -> None:
    d = Driver(make(), answer).feed(EHLO)
    d.feed(b"AUTH PLAIN AGFAYgBj\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n")
    assert d.replies()[-3:] == [
        b"235 2.7.0 Authentication successful\r\n", b"250 2.0.0 Ok\r\n", b"250 2.0.0 Ok\r\n",
    ]  # fmt: skip
    other = Driver(make(), answer).feed(EHLO).feed(b"AUTH LOGIN\r\nYWxpY2U=\r\n")
    assert other.replies()[-1] == b"554 5.5.0 Error: SMTP protocol synchronization\r\n"
    assert not other.conn.is_open


def test_sasl_decoding() -> None:
    assert sasl.decode("=") == ""
    assert sasl.split_plain(sasl.decode("AGFsaWNlAHMzY3JldA==")) == ("", "alice", "s3cret")
    assert sasl.split_plain("admin\0alice\0pw") == ("admin", "alice", "pw")
    for bad in ("not base64!", "YWJ", "/w=="):  # bad characters, padding, not UTF-8
        with pytest.raises(sasl.SaslError) as exc:
            sasl.decode(bad)
        assert bad not in str(exc.value)
    for message in ("alice\0pw", "\0\0pw", "\0alice\0", "a\0b\0c\0d"):
        with pytest.raises(sasl.SaslError) as exc:
            sasl.split_plain(message)
        assert "pw" not in str(exc.value)
