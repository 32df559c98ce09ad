"""End to end: relay_from_hosts mail is DKIM-signed at the end of DATA and arrives at the next hop
signed twice (RSA and Ed25519) with keys made by ``palisade dkim keygen``; both signatures
verify with dkimpy against the records keygen printed, served by the loopback DNS server. An
unusable key defers (451, paniclog), a From domain without a key goes unsigned (log line), and
a reload brings in a new selector."""

from __future__ import annotations

import shutil
import signal
import smtplib
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from loopback.dnsserver import ZoneServer, start_zone_server
from tests.conftest import GatewayProcess, NextHop, palisade, search, wait_for, write_config
from tests.outbound.dkimkit import keygen, publish, verify_all

QUEUE_ID = r"[0-9A-Za-z]{6}-[0-9A-Za-z]{6}-[0-9A-Za-z]{2}"
KEYS = [
    {"domain": "example.org", "selector": "r2026", "file": "example.org.r2026.rsa.key"},
    {"domain": "example.org", "selector": "e2026", "file": "example.org.e2026.ed25519.key"},
]


def message(sender: str = "alice@example.org", subject: str = "Quarterly report") -> bytes:
    return (
        f"From: Alice <{sender}>\r\nTo: Bob <bob@remote.example>\r\nSubject: {subject}\r\n"
        "Date: Wed, 02 Dec 2026 07:00:00 +0000\r\nMessage-ID: <q1@example.org>\r\n\r\n"
        "The figures are attached.\r\n.leading dot\r\n"
    ).encode()


@pytest.fixture
def zones() -> Iterator[ZoneServer]:
    server = start_zone_server()
    server.add_zone("example.org")
    server.add_zone("other.example")
    try:
        yield server
    finally:
        server.stop()


def signing_gateway(
    make_gateway: Any, next_hop: NextHop, zones: ZoneServer, keys: list[dict[str, str]]
) -> tuple[GatewayProcess, str]:
    """A gateway relaying for 127.0.0.1 to ``next_hop`` with ``keys`` (made by keygen, and
    published, before it starts); the keygen output."""
    next_hop.start()
    gateway: GatewayProcess = make_gateway(
        start=False,
        relay={"relay_from_hosts": ["127.0.0.1/32"]},
        delivery={"next_hop": f"127.0.0.1:{next_hop.port}"},
        dns={"nameservers": [f"127.0.0.1:{zones.port}"]},
        dkim={"keys_dir": "keys", "keys": keys},
    )
    output = ""
    for key in keys:
        extra = ("--ed25519",) if key["file"].endswith(".ed25519.key") else ()
        output += keygen(gateway.base, key["domain"], key["selector"], *extra)
    publish(zones, output)
    return gateway.start(), output


def delivered(next_hop: NextHop, count: int) -> list[bytes]:
    wait_for(lambda: len(next_hop.handler.messages) >= count)
    return [content for _, _, content in next_hop.handler.messages]


def check_signed(content: bytes, zones: ZoneServer) -> None:
    tags = verify_all(content, zones)
    assert sorted(t[b"a"] for t in tags) == [b"ed25519-sha256", b"rsa-sha256"]
    for t in tags:
        assert t[b"d"] == b"example.org" and t[b"c"] == b"relaxed/relaxed"
        signed = [h.strip() for h in t[b"h"].split(b":")]
        for name in (b"from", b"to", b"subject", b"date"):  # oversigned: once more than present
            assert signed.count(name) == 2, (name, signed)
        assert signed.count(b"message-id") == 1
    assert content.startswith(b"DKIM-Signature: ")  # on top, before our Received header
    assert content.index(b"DKIM-Signature") < content.index(b"Received: ")


def test_relay_mail_is_signed_twice_and_verifies(
    make_gateway: Any, next_hop: NextHop, zones: ZoneServer
) -> None:
    gateway, output = signing_gateway(make_gateway, next_hop, zones, KEYS)
    assert "t=y; p=" in output
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as client:
        client.ehlo("app.example.org")
        client.sendmail("alice@example.org", ["bob@remote.example"], message())
    swaks = shutil.which("swaks")
    if swaks is None:
        raise AssertionError("swaks is needed (make test installs it)")
    result = subprocess.run(
        [
            swaks, "--server", f"127.0.0.1:{gateway.port}", "--from", "carol@example.org",
            "--to", "dave@remote.example", "--h-From", "Carol <carol@example.org>",
            "--h-Subject", "from swaks", "--body", "Sent with swaks.",
        ],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert search(r"<-  250 2\.0\.0 Ok: queued as " + QUEUE_ID, result.stdout)
    contents = delivered(next_hop, 2)
    for content in contents:
        check_signed(content, zones)
    assert b"Sent with swaks." in contents[1]
    log = gateway.mainlog()
    assert log.count("DKIM=example.org:r2026,e2026") == 2


def test_subdomain_from_is_signed_by_the_parent_domain(
    make_gateway: Any, next_hop: NextHop, zones: ZoneServer
) -> None:
    gateway, _ = signing_gateway(make_gateway, next_hop, zones, KEYS)
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as client:
        client.sendmail("alerts@news.example.org", ["bob@remote.example"],
                        message(sender="alerts@news.example.org"))  # fmt: skip
    (content,) = delivered(next_hop, 1)
    tags = verify_all(content, zones)
    assert [t[b"d"] for t in tags] == [b"example.org", b"example.org"]


def test_from_domain_without_key_is_delivered_unsigned_with_a_log_line(
    make_gateway: Any, next_hop: NextHop, zones: ZoneServer
) -> None:
    gateway, _ = signing_gateway(make_gateway, next_hop, zones, KEYS)
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as client:
        client.sendmail("eve@other.example", ["bob@remote.example"],
                        message(sender="eve@other.example"))  # fmt: skip
    (content,) = delivered(next_hop, 1)
    assert b"DKIM-Signature" not in content
    line = wait_for(lambda: [x for x in gateway.mainlog().splitlines() if "not DKIM-signed" in x])
    assert len(line) == 1
    assert search(QUEUE_ID + r" H=\(\S+\) \[127\.0\.0\.1\]:\d+ not DKIM-signed: no key for the "
                  r"From domain other\.example", line[0])  # fmt: skip


def test_message_dkimpy_cannot_parse_goes_unsigned_with_a_log_line(
    make_gateway: Any, next_hop: NextHop, zones: ZoneServer
) -> None:
    gateway, _ = signing_gateway(make_gateway, next_hop, zones, KEYS)
    broken = message().replace(b"Subject:", b"Bad Header: x\r\nSubject:")
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as client:
        client.sendmail("alice@example.org", ["bob@remote.example"], broken)
    (content,) = delivered(next_hop, 1)
    assert b"DKIM-Signature" not in content and b"Bad Header: x" in content
    (line,) = wait_for(lambda: [x for x in gateway.mainlog().splitlines() if "not DKIM" in x])
    assert line.endswith(
        "not DKIM-signed: Unexpected characters in RFC822 header: b'Bad Header: x'"
    )


def test_mail_from_a_client_that_may_not_relay_is_not_signed(
    make_gateway: Any, next_hop: NextHop, zones: ZoneServer
) -> None:
    gateway, _ = signing_gateway(make_gateway, next_hop, zones, KEYS)
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10,
                      source_address=("127.0.0.2", 0)) as client:  # fmt: skip
        client.sendmail("alice@example.org", ["user@example.test"], message())
    (mail,) = wait_for(lambda: gateway.maildir_messages("user"))
    assert b"DKIM-Signature" not in mail
    assert "not DKIM-signed" not in gateway.mainlog()


@pytest.mark.parametrize("damage", ["missing", "directory", "corrupt"])
def test_unusable_key_defers_with_451_and_a_paniclog_line(
    make_gateway: Any, next_hop: NextHop, zones: ZoneServer, damage: str
) -> None:
    gateway, _ = signing_gateway(make_gateway, next_hop, zones, KEYS[:1])
    gateway.stop()
    key = gateway.base / "keys" / KEYS[0]["file"]
    key.unlink()
    if damage == "directory":
        key.mkdir()
    elif damage == "corrupt":
        key.write_text(
            "-----BEGIN RSA PRIVATE KEY-----\nnot a key\n-----END RSA PRIVATE KEY-----\n"
        )
    gateway.start()
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as client:
        client.ehlo("app.example.org")
        client.mail("alice@example.org")
        client.rcpt("bob@remote.example")
        code, reply = client.data(message())
    assert (code, reply) == (451, b"4.3.5 Temporary local problem, please try again later")
    result = subprocess.run(
        [
            "swaks", "--server", f"127.0.0.1:{gateway.port}", "--from", "carol@example.org",
            "--to", "dave@remote.example", "--h-From", "carol@example.org",
        ],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert "<** 451 4.3.5 Temporary local problem, please try again later" in result.stdout
    panic = [x for x in gateway.paniclog().splitlines() if "DKIM signing" in x]
    assert len(panic) == 2
    assert search(QUEUE_ID + r" DKIM signing for example\.org failed, message deferred: key "
                  r"file keys/example\.org\.r2026\.rsa\.key ", panic[0])  # fmt: skip
    assert "temporarily rejected after DATA: DKIM key for example.org unusable" in (
        gateway.rejectlog()
    )
    assert next_hop.handler.messages == []
    assert not list((gateway.spool_dir / "queue").iterdir())
    assert " <= " not in gateway.mainlog()


def test_reload_brings_in_a_new_selector(
    make_gateway: Any, next_hop: NextHop, zones: ZoneServer
) -> None:
    gateway, _ = signing_gateway(make_gateway, next_hop, zones, KEYS[:1])
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as client:
        client.sendmail("alice@example.org", ["bob@remote.example"], message())
    new = {"domain": "example.org", "selector": "r2027", "file": "example.org.r2027.rsa.key"}
    publish(zones, keygen(gateway.base, "example.org", "r2027"))
    gateway.sections["dkim"]["keys"] = [new]
    write_config(gateway.config_path, gateway.sections)
    gateway.signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in gateway.mainlog())
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as client:
        client.sendmail("alice@example.org", ["bob@remote.example"], message())
    first, second = delivered(next_hop, 2)
    assert [t[b"s"] for t in verify_all(first, zones)] == [b"r2026"]
    assert [t[b"s"] for t in verify_all(second, zones)] == [b"r2027"]


def test_config_check_reports_each_key_and_an_unusable_one_as_a_warning(
    make_gateway: Any, next_hop: NextHop, zones: ZoneServer
) -> None:
    gateway, _ = signing_gateway(make_gateway, next_hop, zones, KEYS)
    gateway.stop()
    (gateway.base / "keys" / KEYS[1]["file"]).unlink()
    result = palisade("config", "check", "--no-dns", "--config", "palisade.toml", cwd=gateway.base)
    assert result.returncode == 0, result.stderr
    assert (
        "ok: [dkim] key r2026 of example.org: RSA 2048 key keys/example.org.r2026.rsa.key "
        "is usable" in result.stderr
    )
    assert (
        "warning: [dkim] key e2026 of example.org: key file keys/example.org.e2026.ed25519.key "
        "cannot be read: No such file or directory; mail from example.org is deferred (451) "
        "until it can be used" in result.stderr
    )
