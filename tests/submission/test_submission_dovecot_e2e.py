"""End to end with Dovecot as the password back end (``[submission] auth = "dovecot"``): a real
Dovecot (``tests/dovecot.py``: passwd-file with SHA512-CRYPT hashes, its auth socket in a
private base_dir) checks the passwords of a real gateway's submission sessions.

swaks with AUTH PLAIN on 587 (STARTTLS) and AUTH LOGIN on 465 (implicit TLS): the messages
arrive at the next hop signed with both keys and verify against the records keygen printed;
Dovecot's spelling of the user name is the authenticated user. A wrong password is 535 with
exim's ``authenticator failed`` line; a dead Dovecot socket and a hung Dovecot are 454 4.7.0
with the reason in the log, and the mail is not accepted; a restarted Dovecot is used again."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from typing import Any

import pytest

from loopback.dnsserver import ZoneServer
from tests.conftest import NextHop, search, wait_for
from tests.dovecot import Dovecot
from tests.submission.conftest import USERS, Submission, TlsLine, b64, plain
from tests.submission.test_submission_e2e import (
    ALICE,
    FAILED_LINE,
    QUEUE_ID,
    check_signed,
    delivered,
    log_lines,
    swaks_auth,
)

BOB = "bob"


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    """Dovecot with the submission tests' users and passwords, hashed with SHA512-CRYPT."""
    server = Dovecot(imap=False, scheme="SHA512-CRYPT", users=dict(USERS))
    try:
        server.start()
        yield server
    finally:
        server.stop()


def dovecot_submission(make_submission: Any, dovecot: Dovecot, **settings: Any) -> Submission:
    sub: Submission = make_submission(
        auth="dovecot", dovecot_socket=str(dovecot.auth_socket), **settings
    )
    return sub


def test_swaks_plain_and_login_authenticated_by_dovecot_arrive_signed(
    make_submission: Any, dovecot: Dovecot, next_hop: NextHop, zones: ZoneServer
) -> None:
    sub = dovecot_submission(make_submission, dovecot)
    first = swaks_auth(sub, ALICE, USERS[ALICE])
    assert first.returncode == 0, first.stdout + first.stderr
    assert "<~  235 2.7.0 Authentication successful" in first.stdout
    assert search(r"<~  250 2\.0\.0 Ok: queued as " + QUEUE_ID, first.stdout)
    second = swaks_auth(sub, BOB, USERS[BOB], tlsc=True, mechanism="LOGIN",
                        sender="bob@example.org")  # fmt: skip
    assert second.returncode == 0, second.stdout + second.stderr
    assert "<~  334 VXNlcm5hbWU6" in second.stdout
    messages = delivered(next_hop, 2)
    assert [m[0] for m in messages] == [ALICE, "bob@example.org"]
    for _, rcpts, content in messages:
        assert rcpts == ["bob@remote.example"]
        check_signed(content, zones)
    arrivals = log_lines(sub.gateway.mainlog(), " <= ")
    assert len(arrivals) == 2
    assert " A=plain:alice@example.org " in arrivals[0]
    assert " A=login:bob " in arrivals[1]
    # Dovecot saw the SMTP service, the client's address and no penalty bookkeeping
    log = dovecot.log_text()
    assert "Password mismatch" not in log
    gateway_logs = sub.gateway.mainlog() + sub.gateway.rejectlog() + sub.gateway.paniclog()
    for password in USERS.values():
        assert password not in gateway_logs + log
        assert b64(password) not in gateway_logs + log


def test_dovecots_spelling_of_the_user_is_the_authenticated_user(
    make_submission: Any, dovecot: Dovecot, next_hop: NextHop
) -> None:
    """Dovecot finds ``ALICE@Example.org`` case-insensitively and answers ``alice@example.org``:
    that name, not the typed one, is what the sender rules and the log use."""
    sub = dovecot_submission(make_submission, dovecot)
    with smtplib.SMTP("127.0.0.1", sub.port, local_hostname="client.example.org",
                      timeout=15) as client:  # fmt: skip
        client.starttls(context=sub.context())
        client.ehlo()
        assert client.login("ALICE@Example.org", USERS[ALICE])[0] == 235
        client.sendmail(ALICE, ["bob@remote.example"], b"From: <alice@example.org>\r\n\r\nx\r\n")
    delivered(next_hop, 1)
    (arrival,) = log_lines(sub.gateway.mainlog(), " <= ")
    assert " A=plain:alice@example.org " in arrival  # smtplib prefers PLAIN


def test_wrong_password_is_535_with_exims_line(make_submission: Any, dovecot: Dovecot) -> None:
    sub = dovecot_submission(make_submission, dovecot)
    result = swaks_auth(sub, ALICE, "not the password")
    assert result.returncode != 0
    assert "<~* 535 5.7.8 Error: authentication failed" in result.stdout
    reject = sub.gateway.rejectlog()
    assert search(FAILED_LINE.format(user=r"alice@example\.org"), reject)
    wait_for(lambda: "passwd-file(alice@example.org,127.0.0.1): Password mismatch"
             in dovecot.log_text())  # fmt: skip


def test_dead_dovecot_socket_is_454_and_the_mail_is_not_accepted(
    make_submission: Any, dovecot: Dovecot, next_hop: NextHop
) -> None:
    sub = dovecot_submission(make_submission, dovecot)
    dovecot.halt()
    result = swaks_auth(sub, ALICE, USERS[ALICE])
    assert result.returncode != 0
    assert "<~* 454 4.7.0 Temporary authentication failure" in result.stdout
    line = TlsLine("127.0.0.1", sub.tls_port, sub.context(), starttls=False)
    line.send(b"EHLO client.example.org\r\n")
    line.reply()
    line.send(b"AUTH PLAIN " + plain(ALICE, USERS[ALICE]).encode() + b"\r\n")
    assert line.reply() == b"454 4.7.0 Temporary authentication failure\r\n"
    line.send(b"MAIL FROM:<alice@example.org>\r\n")
    assert line.reply() == b"530 5.7.0 Authentication required\r\n"
    line.close()
    panic = wait_for(lambda: log_lines(sub.gateway.paniclog(), "temporarily failed"))
    assert search(
        r"plain authenticator temporarily failed for \(client\.example\.org\) "
        r"\[127\.0\.0\.1\]:\d+: dovecot auth " + str(dovecot.auth_socket) + ": ",
        panic[0],
    )
    assert "535" not in sub.gateway.rejectlog()  # not counted as a wrong password
    assert not next_hop.handler.messages
    assert USERS[ALICE] not in sub.gateway.mainlog() + sub.gateway.paniclog()


def test_hung_dovecot_is_454_within_auth_timeout(make_submission: Any, dovecot: Dovecot) -> None:
    sub = dovecot_submission(make_submission, dovecot, auth_timeout=1.0)
    with dovecot.paused():
        result = swaks_auth(sub, ALICE, USERS[ALICE])
    assert "<~* 454 4.7.0 Temporary authentication failure" in result.stdout
    panic = wait_for(lambda: log_lines(sub.gateway.paniclog(), "temporarily failed"))
    assert panic[0].endswith(f"dovecot auth {dovecot.auth_socket}: no answer within 1s")


def test_dovecot_restarted_is_used_again(
    make_submission: Any, dovecot: Dovecot, next_hop: NextHop
) -> None:
    sub = dovecot_submission(make_submission, dovecot)
    assert swaks_auth(sub, ALICE, USERS[ALICE]).returncode == 0
    dovecot.restart()
    again = swaks_auth(sub, ALICE, USERS[ALICE])
    assert again.returncode == 0, again.stdout
    delivered(next_hop, 2)
