"""End to end: submission on a 587 (STARTTLS) and a 465 (implicit TLS) listener of a real
gateway, with users made by ``palisade passwd``; swaks, smtplib, openssl s_client and a raw
TCP_NODELAY socket as clients. Each case of the issue's "Done when" with its reply and its log
line: a submitted message arrives at the next hop signed with both keys and verifies against
the records keygen printed; a wrong password (535, exim's line that fail2ban's stock filter
counts, a growing delay); a sender not in the user's map (553); a user over its rate (450);
AUTH before STARTTLS (530); too many failures (421 and the connection closed)."""

from __future__ import annotations

import shutil
import smtplib
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from loopback.dnsserver import ZoneServer
from tests.conftest import NextHop, search, wait_for
from tests.outbound.dkimkit import verify_all
from tests.submission.conftest import USERS, Submission, TlsLine, b64, plain

QUEUE_ID = r"[0-9A-Za-z]{6}-[0-9A-Za-z]{6}-[0-9A-Za-z]{2}"
ALICE = "alice@example.org"
FAILED_LINE = (
    r"(plain|login) authenticator failed for \(client\.example\.org\) \[127\.0\.0\.1\]:\d+: 535 "
    r"Incorrect authentication data \(set_id={user}\)"
)


def message(sender: str = ALICE, subject: str = "Submitted") -> bytes:
    return (
        f"From: Alice <{sender}>\r\nTo: Bob <bob@remote.example>\r\nSubject: {subject}\r\n"
        "Date: Wed, 02 Dec 2026 07:00:00 +0000\r\nMessage-ID: <s1@example.org>\r\n\r\n"
        "Sent through submission.\r\n"
    ).encode()


def swaks(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("swaks")
    if path is None:
        raise AssertionError("swaks is needed (make test installs it)")
    return subprocess.run(
        [path, "--ehlo", "client.example.org", *args], capture_output=True, text=True, timeout=60
    )


def swaks_auth(
    sub: Submission,
    user: str,
    password: str,
    *extra: str,
    tlsc: bool = False,
    mechanism: str = "PLAIN",
    sender: str = ALICE,
) -> subprocess.CompletedProcess[str]:
    port = sub.tls_port if tlsc else sub.port
    return swaks(
        "--server", f"127.0.0.1:{port}", "--tlsc" if tlsc else "--tls",
        "--auth", mechanism, "--auth-user", user, "--auth-password", password,
        "--from", sender, "--to", "bob@remote.example", "--h-From", f"<{sender}>",
        "--h-Subject", "via swaks", "--body", "Sent with swaks.", *extra,
    )  # fmt: skip


def check_signed(content: bytes, zones: ZoneServer) -> None:
    tags = verify_all(content, zones)
    assert sorted(t[b"a"] for t in tags) == [b"ed25519-sha256", b"rsa-sha256"]
    assert {t[b"d"] for t in tags} == {b"example.org"}
    assert {t[b"s"] for t in tags} == {b"r2026", b"e2026"}


def delivered(next_hop: NextHop, count: int) -> list[tuple[str, list[str], bytes]]:
    wait_for(lambda: len(next_hop.handler.messages) >= count)
    return next_hop.handler.messages


def log_lines(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


# -- the message arrives signed ------------------------------------------------------------


def test_swaks_plain_on_587_and_login_on_465_arrive_signed_and_verify(
    make_submission: Any, next_hop: NextHop, zones: ZoneServer
) -> None:
    sub: Submission = make_submission()
    assert "t=y; p=" in sub.keygen_output
    first = swaks_auth(sub, ALICE, USERS[ALICE])
    assert first.returncode == 0, first.stdout + first.stderr
    assert "<~  235 2.7.0 Authentication successful" in first.stdout
    assert search(r"<~  250 2\.0\.0 Ok: queued as " + QUEUE_ID, first.stdout)
    second = swaks_auth(sub, "bob", USERS["bob"], tlsc=True, mechanism="LOGIN",
                        sender="bob@example.org")  # fmt: skip
    assert second.returncode == 0, second.stdout + second.stderr
    assert "<~  334 VXNlcm5hbWU6" in second.stdout and "<~  334 UGFzc3dvcmQ6" in second.stdout
    messages = delivered(next_hop, 2)
    assert [m[0] for m in messages] == [ALICE, "bob@example.org"]
    for _, rcpts, content in messages:
        assert rcpts == ["bob@remote.example"]
        check_signed(content, zones)
        assert b"with ESMTPSA" in content
    log = sub.gateway.mainlog()
    arrivals = log_lines(log, " <= ")
    assert len(arrivals) == 2
    assert search(r" P=esmtpsa X=TLS\S+ A=plain:alice@example\.org S=\d+ DKIM=example\.org:"
                  r"r2026,e2026", arrivals[0])  # fmt: skip
    assert " A=login:bob " in arrivals[1]
    # the passwords are nowhere in the logs
    logs = log + sub.gateway.rejectlog() + sub.gateway.paniclog()
    for password in USERS.values():
        assert password not in logs
        assert b64(password) not in logs


def test_smtplib_starttls_and_login(make_submission: Any, next_hop: NextHop,
                                    zones: ZoneServer) -> None:  # fmt: skip
    sub: Submission = make_submission()
    with smtplib.SMTP("127.0.0.1", sub.port, local_hostname="client.example.org",
                      timeout=15) as client:  # fmt: skip
        client.ehlo()
        assert "auth" not in client.esmtp_features  # not before TLS
        client.starttls(context=sub.context())
        client.ehlo()
        assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        assert client.login(ALICE, USERS[ALICE]) == (235, b"2.7.0 Authentication successful")
        client.sendmail(ALICE, ["carol@remote.example", "user@example.test"], message())
    ((_, rcpts, content),) = delivered(next_hop, 1)
    assert rcpts == ["carol@remote.example"]
    check_signed(content, zones)
    (local,) = wait_for(lambda: sub.gateway.maildir_messages("user"))  # a local domain too
    assert b"DKIM-Signature" in local


def test_openssl_s_client_sees_auth_only_under_tls(make_submission: Any) -> None:
    sub: Submission = make_submission()
    for args in (["-starttls", "smtp", "-connect", f"127.0.0.1:{sub.port}"],
                 ["-connect", f"127.0.0.1:{sub.tls_port}"]):  # fmt: skip
        proc = subprocess.Popen(
            ["openssl", "s_client", "-quiet", "-CAfile", str(sub.ca), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        try:
            if "-starttls" not in args:
                assert proc.stdout.readline().startswith("220 ")
            proc.stdin.write("EHLO client.example.org\r\n")  # one command, then its reply
            proc.stdin.flush()
            ehlo = [proc.stdout.readline()]
            while not ehlo[-1].startswith("250 "):
                ehlo.append(proc.stdout.readline())
            proc.stdin.write("QUIT\r\n")
            proc.stdin.flush()
            assert proc.stdout.readline().startswith("221 ")
        finally:
            proc.kill()
            proc.wait()
        assert "250-AUTH PLAIN LOGIN\n" in ehlo, ehlo
        assert not [x for x in ehlo if "STARTTLS" in x]


# -- AUTH where it must not be -------------------------------------------------------------


def test_auth_before_starttls_is_530_and_not_offered(make_submission: Any) -> None:
    sub: Submission = make_submission()
    result = swaks(
        "--server", f"127.0.0.1:{sub.port}", "--auth", "PLAIN", "--auth-user", ALICE,
        "--auth-password", USERS[ALICE], "--from", ALICE, "--to", "bob@remote.example",
    )  # fmt: skip
    assert result.returncode != 0
    assert "<-  250-STARTTLS" in result.stdout and "250-AUTH" not in result.stdout
    with smtplib.SMTP("127.0.0.1", sub.port, local_hostname="client.example.org",
                      timeout=15) as client:  # fmt: skip
        client.ehlo()
        assert "auth" not in client.esmtp_features
        assert client.docmd("AUTH", "PLAIN " + plain(ALICE, USERS[ALICE])) == (
            530, b"5.7.0 Must issue a STARTTLS command first")  # fmt: skip
        assert client.docmd("MAIL", f"FROM:<{ALICE}>") == (
            530, b"5.7.0 Must issue a STARTTLS command first")  # fmt: skip
    reject = sub.gateway.rejectlog()
    assert search(r"SMTP protocol error in auth: H=\(client\.example\.org\) \[127\.0\.0\.1\]:\d+ "
                  r"AUTH refused: Must issue a STARTTLS command first", reject)  # fmt: skip


def test_mail_before_auth_under_tls_is_530(make_submission: Any) -> None:
    sub: Submission = make_submission()
    line = TlsLine("127.0.0.1", sub.tls_port, sub.context(), starttls=False)
    line.send(b"EHLO client.example.org\r\n")
    assert b"250-AUTH PLAIN LOGIN\r\n" in line.reply()
    line.send(b"MAIL FROM:<alice@example.org>\r\n")
    assert line.reply() == b"530 5.7.0 Authentication required\r\n"
    line.close()


def test_port_25_never_offers_auth(make_submission: Any) -> None:
    sub: Submission = make_submission()
    with smtplib.SMTP("127.0.0.1", sub.gateway.port, local_hostname="client.example.org",
                      timeout=15) as client:  # fmt: skip
        client.ehlo()
        client.starttls(context=sub.context())
        client.ehlo()
        assert "auth" not in client.esmtp_features
        assert client.docmd("AUTH", "PLAIN " + plain(ALICE, USERS[ALICE])) == (
            503, b"5.5.1 Error: authentication not enabled")  # fmt: skip
    assert "AUTH command used when not advertised" in sub.gateway.rejectlog()


# -- wrong passwords -------------------------------------------------------------------------


def test_wrong_password_is_535_after_a_growing_delay_and_logged_for_fail2ban(
    make_submission: Any, tmp_path: Path
) -> None:
    sub: Submission = make_submission()
    waits = []
    for mechanism in ("PLAIN", "LOGIN"):
        started = time.monotonic()
        result = swaks_auth(sub, ALICE, "not the password", mechanism=mechanism)
        waits.append(time.monotonic() - started)
        assert result.returncode != 0
        assert "<~* 535 5.7.8 Error: authentication failed" in result.stdout
    # the second failure of the address waited twice as long: never before its delay
    assert waits[0] >= 0.2 and waits[1] >= 0.4
    for text in (sub.gateway.rejectlog(), sub.gateway.mainlog()):
        lines = log_lines(text, "authenticator failed")
        assert len(lines) == 2
        search(FAILED_LINE.format(user=r"alice@example\.org"), lines[0])
        assert lines[0].split(" ")[2] == "plain" and lines[1].split(" ")[2] == "login"
        assert "not the password" not in text
    fail2ban = shutil.which("fail2ban-regex")
    if fail2ban is None:
        raise AssertionError("fail2ban-regex is needed (make test installs fail2ban)")
    result = subprocess.run(
        [fail2ban, str(sub.gateway.log_dir / "rejectlog"), "/etc/fail2ban/filter.d/exim.conf"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert search(r"Failregex: (\d+) total", result.stdout).group(1) == "2", result.stdout
    assert "Lines: 2 lines, 0 ignored, 2 matched, 0 missed" in result.stdout, result.stdout


def test_unknown_user_is_535_like_a_wrong_password(make_submission: Any) -> None:
    sub: Submission = make_submission()
    result = swaks_auth(sub, "mallory@example.org", "guess")
    assert "<~* 535 5.7.8 Error: authentication failed" in result.stdout
    (line,) = log_lines(sub.gateway.rejectlog(), "authenticator failed")
    search(FAILED_LINE.format(user=r"mallory@example\.org"), line)


def test_max_auth_failures_gets_421_and_the_connection_closed(make_submission: Any) -> None:
    sub: Submission = make_submission(max_auth_failures=2)
    with smtplib.SMTP("127.0.0.1", sub.port, local_hostname="client.example.org",
                      timeout=15) as client:  # fmt: skip
        client.starttls(context=sub.context())
        client.ehlo()
        assert client.docmd("AUTH", "PLAIN " + plain(ALICE, "wrong one")) == (
            535, b"5.7.8 Error: authentication failed")  # fmt: skip
        assert client.docmd("AUTH", "PLAIN " + plain(ALICE, "wrong two")) == (
            535, b"5.7.8 Error: authentication failed")  # fmt: skip
        assert client.getreply() == (
            421,
            b"4.7.0 mx.example.test Too many authentication failures, closing connection",
        )
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
    reject = sub.gateway.rejectlog()
    assert len(log_lines(reject, "authenticator failed")) == 2
    assert search(r"SMTP call from H=\(client\.example\.org\) \[127\.0\.0\.1\]:\d+ dropped: too "
                  r"many authentication failures \(2, max_auth_failures=2\)", reject)  # fmt: skip


def test_back_end_down_is_454(make_submission: Any) -> None:
    """The password file unreadable: the back end cannot answer (454), paniclog says why."""
    sub: Submission = make_submission()
    (sub.gateway.base / "passwd").unlink()
    result = swaks_auth(sub, ALICE, USERS[ALICE])
    assert "<~* 454 4.7.0 Temporary authentication failure" in result.stdout
    panic = wait_for(lambda: log_lines(sub.gateway.paniclog(), "temporarily failed"))
    assert search(r"plain authenticator temporarily failed for \(client\.example\.org\) "
                  r"\[127\.0\.0\.1\]:\d+: password file \S*passwd: No such file or directory",
                  panic[0])  # fmt: skip
    assert "authenticator failed for" not in sub.gateway.rejectlog()  # not a wrong password


# -- senders and rates ---------------------------------------------------------------------


def test_sender_not_in_the_users_map_is_553(make_submission: Any, next_hop: NextHop) -> None:
    sub: Submission = make_submission()
    result = swaks_auth(sub, "bob", USERS["bob"], sender="alice@example.org")
    assert ("<~* 553 5.7.1 <alice@example.org>: Sender address rejected: not owned by user bob"
            in result.stdout)  # fmt: skip
    for sender in ("bob@example.org", "anyone@bob.example", "BOB@Example.ORG"):
        ok = swaks_auth(sub, "bob", USERS["bob"], sender=sender)
        assert ok.returncode == 0, ok.stdout
    result = swaks_auth(sub, ALICE, USERS[ALICE], sender="bob@example.org")  # alice: own name
    assert (
        "<~* 553 5.7.1 <bob@example.org>: Sender address rejected: not owned by user "
        "alice@example.org" in result.stdout
    )
    reject = sub.gateway.rejectlog()
    assert search(r"H=\(client\.example\.org\) \[127\.0\.0\.1\]:\d+ F=<alice@example\.org> "
                  r"rejected MAIL <alice@example\.org>: sender address not owned by user bob",
                  reject)  # fmt: skip
    assert len(delivered(next_hop, 3)) == 3


def test_user_over_its_message_and_recipient_rates_is_450(make_submission: Any) -> None:
    sub: Submission = make_submission(max_messages=2, max_recipients=3)
    with smtplib.SMTP_SSL("127.0.0.1", sub.tls_port, local_hostname="client.example.org",
                          context=sub.context(), timeout=15) as client:  # fmt: skip
        client.login(ALICE, USERS[ALICE])
        client.sendmail(ALICE, ["a@remote.example", "b@remote.example"], message())
        client.mail(ALICE)
        assert client.rcpt("c@remote.example") == (250, b"2.1.5 Ok")
        assert client.rcpt("d@remote.example") == (
            450, b"4.7.1 <d@remote.example>: Recipient address rejected: too many recipients "
            b"from alice@example.org, try again later")  # fmt: skip
        client.rset()
        assert client.mail(ALICE) == (
            450,
            b"4.7.1 Error: too many messages from alice@example.org, try again later",
        )
    reject = sub.gateway.rejectlog()
    assert search(r"temporarily rejected RCPT <d@remote\.example>: user alice@example\.org over "
                  r"its recipient rate \(4 in 3600s, max_recipients=3\)", reject)  # fmt: skip
    assert search(r"F=<alice@example\.org> temporarily rejected MAIL <alice@example\.org>: user "
                  r"alice@example\.org over its message rate \(3 in 3600s, max_messages=2\)",
                  reject)  # fmt: skip


# -- the SASL exchange over a raw socket ------------------------------------------------------


def test_sasl_exchange_edges_over_a_raw_socket(make_submission: Any) -> None:
    sub: Submission = make_submission()
    line = TlsLine("127.0.0.1", sub.port, sub.context(), starttls=True)
    line.send(b"EHLO client.example.org\r\n")
    assert b"250-AUTH PLAIN LOGIN\r\n" in line.reply()
    line.send(b"AUTH PLAIN\r\n")
    assert line.reply() == b"334 \r\n"
    line.send(b"*\r\n")
    assert line.reply() == b"501 5.0.0 Authentication aborted\r\n"
    line.send(b"AUTH LOGIN\r\n")
    assert line.reply() == b"334 VXNlcm5hbWU6\r\n"
    line.send(b"not base64!\r\n")
    assert line.reply() == b"501 5.5.2 Cannot decode response\r\n"
    line.send(b"AUTH CRAM-MD5\r\n")
    assert line.reply() == b"504 5.5.4 Unrecognized authentication type\r\n"
    line.send(b"AUTH LOGIN " + b64(ALICE).encode() + b"\r\n")  # LOGIN with the user at once
    assert line.reply() == b"334 UGFzc3dvcmQ6\r\n"
    line.send(b64(USERS[ALICE]).encode() + b"\r\n")
    assert line.reply() == b"235 2.7.0 Authentication successful\r\n"
    line.send(b"AUTH PLAIN " + plain(ALICE, USERS[ALICE]).encode() + b"\r\n")
    assert line.reply() == b"503 5.5.1 Error: already authenticated\r\n"
    line.send(b"QUIT\r\n")
    line.close()


def test_auth_plain_with_initial_response_may_lead_a_pipelined_group(
    make_submission: Any, next_hop: NextHop
) -> None:
    """RFC 4954 section 4: AUTH PLAIN with its initial response completes in one round trip, so
    MAIL, RCPT and DATA may follow it in the same write; AUTH LOGIN may not be followed."""
    sub: Submission = make_submission()
    line = TlsLine("127.0.0.1", sub.tls_port, sub.context(), starttls=False)
    line.send(b"EHLO client.example.org\r\n")
    line.reply()
    line.send(
        b"AUTH PLAIN " + plain(ALICE, USERS[ALICE]).encode() + b"\r\n"
        b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@remote.example>\r\nDATA\r\n"
    )
    assert [line.reply() for _ in range(4)] == [
        b"235 2.7.0 Authentication successful\r\n", b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n",
        b"354 End data with <CR><LF>.<CR><LF>\r\n",
    ]  # fmt: skip
    line.send(message() + b".\r\nQUIT\r\n")
    assert line.reply().startswith(b"250 2.0.0 Ok: queued as ")
    line.close()
    delivered(next_hop, 1)
    other = TlsLine("127.0.0.1", sub.tls_port, sub.context(), starttls=False)
    other.send(b"EHLO client.example.org\r\n")
    other.reply()
    other.send(b"AUTH LOGIN\r\n" + b64(ALICE).encode() + b"\r\n")
    assert other.reply() == b"554 5.5.0 Error: SMTP protocol synchronization\r\n"
    assert other.closed()


def test_implicit_tls_handshake_succeeds_on_every_connection(make_submission: Any) -> None:
    """The ClientHello comes with the connection: under uvloop it may be read before the
    session starts the handshake, and must reach the TLS layer, never be dropped."""
    sub: Submission = make_submission()
    for _ in range(12):
        line = TlsLine("127.0.0.1", sub.tls_port, sub.context(), starttls=False)
        assert line.banner == b"220 mx.example.test ESMTP Palisade\r\n"
        line.send(b"QUIT\r\n")
        assert line.reply().startswith(b"221 ")
        line.close()
    assert "TLS error" not in sub.gateway.mainlog()


def test_perimeter_rules_and_the_banner_wait_do_not_apply_on_submission(
    make_submission: Any, next_hop: NextHop
) -> None:
    deny_all = {"check": "ip_list", "list": "everyone", "verb": "deny",
                "message": "Go away", "log_message": "DENY - everyone"}  # fmt: skip
    sub: Submission = make_submission(
        files={"lists/everyone": "127.0.0.0/8\n"},
        sections={
            "server": {"greeting_delay": 30},
            "lists": {"everyone": {"type": "ip", "file": "lists/everyone"}},
            "rules": {"connect": [deny_all], "helo": [deny_all], "mail": [deny_all],
                      "rcpt": [deny_all]},
        },
    )  # fmt: skip
    with pytest.raises(smtplib.SMTPConnectError) as refused:  # the perimeter refuses
        smtplib.SMTP("127.0.0.1", sub.gateway.port, timeout=15)
    assert refused.value.smtp_code == 554
    started = time.monotonic()
    result = swaks_auth(sub, ALICE, USERS[ALICE])
    assert result.returncode == 0, result.stdout
    assert time.monotonic() - started < 30  # no banner wait
    assert len(delivered(next_hop, 1)) == 1
