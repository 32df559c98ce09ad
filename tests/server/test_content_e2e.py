"""End to end through the real gateway: SPF, DKIM, DMARC (a loopback DNS server), spamd and
clamd (private instances), header_sender, and what each adds to or refuses of a message.

Pins the operator-visible contract of the DATA stage: the Authentication-Results and X-Spam
headers on delivered mail, forged inbound verdict headers removed, the kill level and a virus
refused with 550 after the final dot (nothing kept), the score in the main log line, and the
documented behaviour when spamd or clamd is down.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from typing import Any

import pytest

from loopback.dnsserver import ZoneServer
from tests.client_example import HAM, client_example_zones, signed
from tests.conftest import GatewayProcess, free_port, wait_for
from tests.scanners.clamd import EICAR, REPORTED, ClamdProcess, start_clamd
from tests.scanners.conftest import GTUBE
from tests.scanners.spamd import SpamdProcess, start_spamd


@pytest.fixture(scope="module")
def spamd() -> Iterator[SpamdProcess]:
    process = start_spamd()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def clamd() -> Iterator[ClamdProcess]:
    process = start_clamd()
    yield process
    process.stop()


@pytest.fixture
def dns() -> Iterator[ZoneServer]:
    server = client_example_zones()
    yield server
    server.stop()


def gateway_for(
    make_gateway: Any,
    dns: ZoneServer,
    spamd: str | None,
    clamd: str | None,
    scanner_timeout: str = "20s",
) -> GatewayProcess:
    sections: dict[str, Any] = {
        "dns": {"nameservers": [f"127.0.0.1:{dns.port}"], "timeout": 1, "retries": 0},
        "authentication": {"enabled": True},
        "rules": {
            "data": [
                {
                    "name": "header sender",
                    "check": "header_sender",
                    "verb": "deny",
                    "message": "No valid sender in the headers",
                },
                {
                    "name": "dmarc reject",
                    "check": "dmarc",
                    "policy": ["reject"],
                    "verb": "deny",
                    "message": "Rejected by the DMARC policy of $domain",
                    "log_message": "DMARC $result for $domain ($disposition)",
                },
            ]
        },
    }
    if spamd:
        sections["spamd"] = {"address": spamd, "timeout": scanner_timeout}
    if clamd:
        sections["clamd"] = {"address": clamd, "timeout": "10s"}
    gateway: GatewayProcess = make_gateway(**sections)
    return gateway


def send(gateway: GatewayProcess, message: bytes, sender: str = "alice@client.example") -> Any:
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=60) as client:
        client.ehlo("mx.client.example")
        try:
            client.sendmail(sender, ["postmaster@example.test"], message)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error
        return 250, b""


def delivered(gateway: GatewayProcess) -> bytes:
    messages: list[bytes] = wait_for(lambda: gateway.maildir_messages("postmaster"))
    return messages[0]


def header_block(message: bytes) -> str:
    """The header section as Maildir stores it (LF line ends), unfolded, one field a line,
    without the delivery's own Return-Path and Delivered-To."""
    head = message.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode()
    lines = head.replace("\n\t", " ").replace("\n ", " ").split("\n")
    return "\n".join(ln for ln in lines if not ln.startswith(("Return-Path:", "Delivered-To:")))


def test_authenticated_ham_gets_one_result_header_and_spam_status(
    make_gateway: Any, dns: ZoneServer, spamd: SpamdProcess, clamd: ClamdProcess
) -> None:
    gateway = gateway_for(make_gateway, dns, spamd.address, clamd.address)
    forged = "Authentication-Results: mx.example.test; dmarc=pass header.from=client.example\r\n"
    forged += "X-Spam-Flag: NO\r\n"
    assert send(gateway, signed(HAM, extra=forged)) == (250, b"")
    unfolded = header_block(delivered(gateway))
    assert unfolded.startswith("Authentication-Results: mx.example.test;")
    assert "spf=pass smtp.mailfrom=alice@client.example" in unfolded
    assert "dkim=pass header.d=client.example header.s=test" in unfolded
    assert "dmarc=pass" in unfolded and "header.from=client.example" in unfolded
    assert "Received-SPF: pass" in unfolded
    assert "X-Spam-Status: No, score=" in unfolded
    # the forged verdicts the client sent are gone; only ours remain
    assert unfolded.count("Authentication-Results:") == 1
    assert "X-Spam-Flag: NO" not in unfolded
    line = wait_for(lambda: [ln for ln in gateway.mainlog().splitlines() if " <= " in ln])[0]
    assert " spam=" in line and "spam=unchecked" not in line
    assert (
        "removed 2 inbound verdict header(s) that only we may write: "
        "Authentication-Results, X-Spam-Flag" in gateway.mainlog()
    )


def test_gtube_is_refused_at_the_kill_level_and_nothing_is_kept(
    make_gateway: Any, dns: ZoneServer, spamd: SpamdProcess
) -> None:
    gateway = gateway_for(make_gateway, dns, spamd.address, None)
    code, text = send(gateway, signed(f"{GTUBE}\r\n"))
    assert (code, text) == (550, b"5.7.1 Message rejected as spam")
    assert "rejected after DATA: spam score" in gateway.rejectlog()
    assert "GTUBE" in gateway.rejectlog()
    assert gateway.maildir_messages("postmaster") == []
    assert list((gateway.spool_dir / "queue").iterdir()) == []


def test_a_virus_is_refused_with_its_name(
    make_gateway: Any, dns: ZoneServer, clamd: ClamdProcess
) -> None:
    gateway = gateway_for(make_gateway, dns, None, clamd.address)
    code, text = send(gateway, signed(HAM + EICAR.decode() + "\r\n"))
    assert code == 550
    assert text == f"5.7.1 This message contains a virus ({REPORTED})".encode()
    assert f"virus found: {REPORTED}" in gateway.rejectlog()


def test_dmarc_reject_policy_refuses_an_unaligned_message(
    make_gateway: Any, dns: ZoneServer
) -> None:
    gateway = gateway_for(make_gateway, dns, None, None)
    message = (
        b"From: Alice <alice@client.example>\r\nTo: postmaster@example.test\r\n"
        b"Subject: not really Alice\r\n\r\nhi\r\n"
    )
    code, text = send(gateway, message, sender="bounce@other.example")
    assert (code, text) == (550, b"5.7.1 Rejected by the DMARC policy of client.example")
    assert "DMARC fail for client.example (reject)" in gateway.rejectlog()


def test_a_message_without_from_is_refused(make_gateway: Any, dns: ZoneServer) -> None:
    gateway = gateway_for(make_gateway, dns, None, None)
    code, text = send(gateway, b"Subject: no from\r\n\r\nhi\r\n")
    assert (code, text) == (550, b"5.7.1 No valid sender in the headers")


def test_spamd_down_accepts_unchecked_and_clamd_down_defers(
    make_gateway: Any, dns: ZoneServer
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    gateway = gateway_for(make_gateway, dns, dead, None)
    assert send(gateway, signed(HAM)) == (250, b"")
    assert "X-Spam-Status: unchecked" in header_block(delivered(gateway))
    assert wait_for(lambda: "spam=unchecked" in gateway.mainlog())
    assert "temporary failure" in gateway.mainlog()

    gateway = gateway_for(make_gateway, dns, None, dead)
    code, text = send(gateway, signed(HAM))
    assert code == 451 and text.startswith(b"4.4.3")
    assert "temporarily rejected after DATA" in gateway.rejectlog()


def test_hanging_spamd_costs_its_timeout_then_the_message_is_accepted_unchecked(
    make_gateway: Any, dns: ZoneServer, spamd: SpamdProcess
) -> None:
    gateway = gateway_for(make_gateway, dns, spamd.address, None, scanner_timeout="1s")
    with spamd.paused():
        assert send(gateway, signed(HAM)) == (250, b"")
    assert "X-Spam-Status: unchecked" in header_block(delivered(gateway))
    log = wait_for(lambda: gateway.mainlog() if "spam=unchecked" in gateway.mainlog() else "")
    assert "spam kill level" in log and "temporary failure" in log
