"""End to end: a real gateway delivers OUTBOUND mail (authenticated submissions, driven by
smtplib and swaks, and relay_from_hosts mail) to the MX hosts the loopback DNS server names,
receiving servers on 127.0.0.2x. Each case of issue 15's "Delivery to the world": MX order,
the next MX when the first refuses connections, null MX (failed, DSN 5.1.10), implicit MX,
``require`` with a plaintext-only server (failed at once with a DSN saying why; deferred with
``on_tls_failure = "defer"``), ``verify`` with a certificate for another name and with STARTTLS
not offered, a 4xx then success on the retry, a 5xx and its DSN, connection reuse, and the
delivered message DKIM-signed and received over TLS. DSNs go to the sender's own MX
(example.org's, 127.0.0.29), as OUTBOUND mail."""

from __future__ import annotations

import re
import shutil
import smtplib
import ssl
import subprocess
from email import message_from_bytes
from typing import Any

from tests.conftest import GatewayProcess, wait_for
from tests.mx.conftest import SENDER_MX_IP, World
from tests.outbound.dkimkit import verify_all
from tests.submission.conftest import USERS

ALICE = "alice@example.org"


def message(to: str, subject: str = "Outbound") -> bytes:
    return (
        f"From: Alice <{ALICE}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
        "Date: Wed, 02 Dec 2026 13:00:00 +0000\r\nMessage-ID: <"
        f"{subject.replace(' ', '.')}@example.org>\r\n\r\nTo the world.\r\n"
    ).encode()


def submit(world: World, to: str, subject: str = "Outbound") -> None:
    """smtplib: STARTTLS, AUTH PLAIN as alice, one message."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", world.submission_port, timeout=20) as client:
        client.ehlo("client.example.org")
        client.starttls(context=context)
        client.ehlo("client.example.org")
        client.login(ALICE, USERS[ALICE])
        client.sendmail(ALICE, [to], message(to, subject))


def relay(gateway: GatewayProcess, to: str, subject: str = "Relayed") -> None:
    """smtplib on port 25 from 127.0.0.1, a relay_from_hosts network: no AUTH."""
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=20) as client:
        client.ehlo("app.example.org")
        client.sendmail(ALICE, [to], message(to, subject))


def swaks_submit(world: World, to: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("swaks")
    assert path is not None, "swaks is needed (make test installs it)"
    return subprocess.run(
        [path, "--server", f"127.0.0.1:{world.submission_port}", "--tls",
         "--ehlo", "client.example.org", "--auth", "PLAIN", "--auth-user", ALICE,
         "--auth-password", USERS[ALICE], "--from", ALICE, "--to", to,
         "--h-From", f"<{ALICE}>", "--h-Subject", "via swaks", "--body", "Sent with swaks."],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def log_wait(gateway: GatewayProcess, pattern: str, timeout: float = 20) -> re.Match[str]:
    found: re.Match[str] | None = wait_for(
        lambda: re.search(pattern, gateway.mainlog(), re.MULTILINE), timeout=timeout
    )
    assert found, (pattern, gateway.mainlog(), gateway.paniclog())
    return found


def dsn(world: World, count: int = 1) -> tuple[str, str]:
    """The DSN that reached the sender's MX: (its human-readable text, its status part)."""
    sender_mx = world.servers[SENDER_MX_IP]
    mail_from, rcpts, content = sender_mx.wait(count)[count - 1]
    assert mail_from in ("", "<>") and rcpts == [ALICE]
    report = message_from_bytes(content)
    parts = list(report.walk())
    human = next(p for p in parts if p.get_content_type() == "text/plain").get_payload(decode=True)
    status = next(p for p in parts if p.get_content_type() == "message/delivery-status")
    return human.decode(), str(status)


def signed_by_example_org(content: bytes, world: World) -> None:
    tags = verify_all(content, world.zones)
    assert {t[b"d"] for t in tags} == {b"example.org"}
    assert sorted(t[b"a"] for t in tags) == [b"ed25519-sha256", b"rsa-sha256"]


def test_mx_order_tls_dkim_and_reuse(world: World, make_world_gateway: Any) -> None:
    world.domain("dest.test", (20, "mx2.dest.test"), (10, "mx1.dest.test"))
    world.host("mx1.dest.test", "127.0.0.21")
    world.host("mx2.dest.test", "127.0.0.22")
    first = world.mx("127.0.0.21", "mx1.dest.test")
    second = world.mx("127.0.0.22", "mx2.dest.test")
    gateway = make_world_gateway(tls="verify")
    submit(world, "bob@dest.test", "first")
    mail_from, rcpts, content = first.wait(1)[0]
    assert (mail_from, rcpts) == (ALICE, ["bob@dest.test"])
    assert first.handler.tls_seen == [True]
    signed_by_example_org(content, world)
    line = log_wait(gateway, r"=> bob@dest\.test R=dnslookup T=smtp H=mx1\.dest\.test "
                             r"\[127\.0\.0\.21\]:\d+ X=TLS1\.[23]:\S+")  # fmt: skip
    assert line
    assert second.handler.messages == []
    # a second message to the same MX goes over the connection kept from the first
    submit(world, "carol@dest.test", "second")
    first.wait(2)
    assert first.handler.tls_seen == [True, True]
    assert len(first.handler.peers) == 1


def test_next_mx_when_the_first_refuses_connections_swaks(
    world: World, make_world_gateway: Any
) -> None:
    world.domain("fallback.test", (10, "down.fallback.test"), (20, "up.fallback.test"))
    world.host("down.fallback.test", "127.0.0.23")  # nothing listens there
    world.host("up.fallback.test", "127.0.0.24")
    up = world.mx("127.0.0.24", "up.fallback.test")
    gateway = make_world_gateway()
    result = swaks_submit(world, "dave@fallback.test")
    assert result.returncode == 0, result.stdout + result.stderr
    _, rcpts, content = up.wait(1)[0]
    assert rcpts == ["dave@fallback.test"] and up.handler.tls_seen == [True]
    signed_by_example_org(content, world)
    log_wait(gateway, r"=> dave@fallback\.test R=dnslookup T=smtp H=up\.fallback\.test ")


def test_null_mx_fails_at_once_with_a_dsn(world: World, make_world_gateway: Any) -> None:
    world.domain("nomail.test")
    world.zones.set("nomail.test", "MX", ["0 ."])
    gateway = make_world_gateway()
    submit(world, "erin@nomail.test")
    log_wait(gateway, r"\*\* erin@nomail\.test R=dnslookup T=smtp: domain nomail\.test accepts"
                      r" no mail \(null MX")  # fmt: skip
    human, status = dsn(world)
    assert "erin@nomail.test" in human and "null MX" in human
    assert "Status: 5.1.10" in status


def test_implicit_mx_relay_from_hosts(world: World, make_world_gateway: Any) -> None:
    world.domain("aonly.test")
    world.host("aonly.test", "127.0.0.25")  # an A record, no MX
    server = world.mx("127.0.0.25", "aonly.test")
    gateway = make_world_gateway()
    relay(gateway, "frank@aonly.test")
    _, rcpts, _ = server.wait(1)[0]
    assert rcpts == ["frank@aonly.test"] and server.handler.tls_seen == [True]
    log_wait(gateway, r"=> frank@aonly\.test R=dnslookup T=smtp H=aonly\.test \[127\.0\.0\.25\]")


def test_require_with_a_plaintext_only_server_fails_with_a_dsn(
    world: World, make_world_gateway: Any
) -> None:
    world.domain("plain.test", (10, "mx.plain.test"))
    world.host("mx.plain.test", "127.0.0.26")
    server = world.mx("127.0.0.26", tls=False)
    gateway = make_world_gateway(domains={"plain.test": "require"})
    submit(world, "gina@plain.test")
    log_wait(gateway, r"\*\* gina@plain\.test R=dnslookup T=smtp: TLS require required by "
                      r"\[outbound\.domains\] but no MX host could provide it: mx\.plain\.test "
                      r"\[127\.0\.0\.26\]: starttls-not-supported")  # fmt: skip
    human, status = dsn(world)
    assert "starttls-not-supported" in human and "does not offer STARTTLS" in human
    assert "Status: 5.7.10" in status
    assert server.handler.messages == []  # never sent in cleartext
    assert "== gina@plain.test" not in gateway.mainlog()  # failed at once, not retried


def test_require_with_on_tls_failure_defer_defers(world: World, make_world_gateway: Any) -> None:
    world.domain("plain.test", (10, "mx.plain.test"))
    world.host("mx.plain.test", "127.0.0.26")
    server = world.mx("127.0.0.26", tls=False)
    gateway = make_world_gateway(tls="require", on_tls_failure="defer")
    submit(world, "hank@plain.test")
    log_wait(gateway, r"== hank@plain\.test R=dnslookup T=smtp defer \(-1\): TLS require "
                      r"required by \[outbound\] tls but no MX host could provide it")  # fmt: skip
    # retried (retry_initial 1s), still deferred, never a DSN nor a cleartext delivery
    wait_for(lambda: gateway.mainlog().count("== hank@plain.test") >= 2, timeout=20)
    assert server.handler.messages == []
    assert world.servers[SENDER_MX_IP].handler.messages == []
    assert "** hank@plain.test" not in gateway.mainlog()


def test_verify_with_a_certificate_for_another_name_fails(
    world: World, make_world_gateway: Any
) -> None:
    world.domain("wrongname.test", (10, "mx.wrongname.test"))
    world.host("mx.wrongname.test", "127.0.0.27")
    server = world.mx("127.0.0.27", "other.example.net")
    gateway = make_world_gateway(tls="verify")
    submit(world, "ivan@wrongname.test")
    log_wait(gateway, r"\*\* ivan@wrongname\.test R=dnslookup T=smtp: TLS verify required by "
                      r"\[outbound\] tls .*certificate-host-mismatch")  # fmt: skip
    human, status = dsn(world)  # the DSN itself went out under verify to a good certificate
    assert "certificate-host-mismatch" in human and "mx.wrongname.test" in human
    assert "Status: 5.7.5" in status
    assert server.handler.messages == []
    assert world.servers[SENDER_MX_IP].handler.tls_seen == [True]


def test_verify_with_starttls_stripped_fails(world: World, make_world_gateway: Any) -> None:
    world.domain("stripped.test", (10, "mx.stripped.test"))
    world.host("mx.stripped.test", "127.0.0.28")
    server = world.mx("127.0.0.28", tls=False)  # does not offer STARTTLS
    gateway = make_world_gateway(domains={"stripped.test": "verify"})
    submit(world, "judy@stripped.test")
    log_wait(gateway, r"\*\* judy@stripped\.test R=dnslookup T=smtp: TLS verify .*"
                      r"starttls-not-supported")  # fmt: skip
    human, _ = dsn(world)
    assert "does not offer STARTTLS" in human
    assert server.handler.messages == []


def test_4xx_then_success_on_the_retry(world: World, make_world_gateway: Any) -> None:
    world.domain("busy.test", (10, "mx.busy.test"))
    world.host("mx.busy.test", "127.0.0.21")
    server = world.mx("127.0.0.21", "mx.busy.test")
    server.handler.rcpt_replies = ["451 4.3.0 try again later"]
    gateway = make_world_gateway()
    submit(world, "kate@busy.test")
    log_wait(gateway, r"== kate@busy\.test R=dnslookup T=smtp defer \(-44\) H=mx\.busy\.test "
                      r"\[127\.0\.0\.21\]:\d+ X=\S+: SMTP error from remote mail server after "
                      r"RCPT TO:<kate@busy\.test>: 451 4\.3\.0 try again later")  # fmt: skip
    _, rcpts, _ = server.wait(1)[0]
    assert rcpts == ["kate@busy.test"]
    log_wait(gateway, r"=> kate@busy\.test R=dnslookup T=smtp H=mx\.busy\.test")
    assert world.servers[SENDER_MX_IP].handler.messages == []


def test_5xx_fails_with_its_dsn(world: World, make_world_gateway: Any) -> None:
    world.domain("strict.test", (10, "mx.strict.test"))
    world.host("mx.strict.test", "127.0.0.22")
    server = world.mx("127.0.0.22", "mx.strict.test")
    server.handler.rcpt_replies = ["550 5.1.1 no such user here"]
    gateway = make_world_gateway()
    submit(world, "liam@strict.test")
    log_wait(gateway, r"\*\* liam@strict\.test R=dnslookup T=smtp H=mx\.strict\.test "
                      r"\[127\.0\.0\.22\]:\d+ X=\S+: SMTP error from remote mail server after "
                      r"RCPT TO:<liam@strict\.test>: 550 5\.1\.1 no such user here")  # fmt: skip
    human, status = dsn(world)
    assert "550 5.1.1 no such user here" in human
    assert "Status: 5.1.1" in status
    assert "Remote-MTA: dns; mx.strict.test" in status
    assert "Diagnostic-Code: smtp; 550 5.1.1 no such user here" in status
    assert server.handler.messages == []


def test_config_check_accepts_and_refuses_outbound(tmp_path: Any) -> None:
    from tests.conftest import palisade

    good = tmp_path / "good.toml"
    good.write_text(
        '[outbound]\ndelivery = "mx"\ntls = "verify"\non_tls_failure = "defer"\n'
        'tls_ca_file = ""\nconcurrency_per_destination = 2\n'
        '[outbound.domains]\n"Example.COM" = "require"\n'
    )
    result = palisade("config", "check", "--config", str(good), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    cases = {
        '[outbound]\ndelivery = "smarthost"\n': (
            "outbound.delivery: expected one of 'next_hop', 'mx', got 'smarthost'"
        ),
        '[outbound]\ntls = "dane"\n': (
            "outbound.tls: expected one of 'opportunistic', 'require', 'verify', got 'dane'"
        ),
        '[outbound]\non_tls_failure = "retry"\n': (
            "outbound.on_tls_failure: expected one of 'fail', 'defer', got 'retry'"
        ),
        "[outbound]\nconcurrency_per_destination = 0\n": (
            "outbound.concurrency_per_destination: expected a number of at least 1, got 0"
        ),
        "[outbound]\nport = 70000\n": "outbound.port: expected a TCP port number (1-65535)",
        '[outbound]\ntls_ca_file = "/nonexistent/ca.pem"\n': (
            "outbound.tls_ca_file: no such file: /nonexistent/ca.pem"
        ),
        '[outbound.domains]\n"example.com" = "dane"\n': (
            ":1: outbound.domains: example.com: expected one of 'opportunistic', 'require', "
            "'verify', got 'dane'"
        ),
        '[outbound.domains]\n"not a domain" = "verify"\n': (
            "outbound.domains: expected domain names as keys, got 'not a domain'"
        ),
        '[outbound]\nnexthop = "x"\n': "outbound.nexthop: unknown key",
    }
    for number, (text, expected) in enumerate(cases.items()):
        path = tmp_path / f"bad{number}.toml"
        path.write_text(text)
        result = palisade("config", "check", "--config", str(path), cwd=tmp_path)
        assert result.returncode == 2, (text, result.stdout, result.stderr)
        assert expected in result.stderr, (text, result.stderr)
        assert str(path) in result.stderr
