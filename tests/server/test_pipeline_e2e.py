"""End to end, the whole content pipeline the seed configuration runs: SPF, DKIM and DMARC (a
loopback DNS server), rspamd 3.4 (its normal worker, ``tests/scanners/rspamd.py``) and clamd
(``tests/scanners/clamd.py``) together, through the real gateway.

Pins what bench/run_pipeline.py measures: every message is scanned once by rspamd and once by
clamd (the scans run side by side, not one after the other: rspamd's ``/stat`` counts one scan
per message, however many rules and headers read the report), a signed message is delivered with
one Authentication-Results header and rspamd's X-Spam headers, and GTUBE and EICAR are refused
with 550 after the final dot, nothing kept.
"""

from __future__ import annotations

import json
import smtplib
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from loopback.dnsserver import ZoneServer
from tests.client_example import HAM, client_example_zones, signed
from tests.conftest import GatewayProcess, wait_for
from tests.scanners.clamd import EICAR, REPORTED, ClamdProcess, start_clamd
from tests.scanners.conftest import GTUBE
from tests.scanners.rspamd import RspamdProcess, start_rspamd


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RspamdProcess]:
    process = start_rspamd(tmp_path_factory.mktemp("rspamd"))
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


@pytest.fixture
def gateway(
    make_gateway: Any, dns: ZoneServer, rspamd: RspamdProcess, clamd: ClamdProcess
) -> GatewayProcess:
    gw: GatewayProcess = make_gateway(
        dns={"nameservers": [f"127.0.0.1:{dns.port}"], "timeout": 1, "retries": 0},
        authentication={"enabled": True},
        rspamd={"url": rspamd.url, "timeout": "20s", "on_failure": "defer"},
        clamd={"address": clamd.address, "timeout": "10s"},
        rules={
            "data": [
                {
                    "name": "dmarc reject",
                    "check": "dmarc",
                    "policy": ["reject"],
                    "verb": "deny",
                    "message": "Rejected by the DMARC policy of $domain",
                }
            ]
        },
    )
    return gw


def scanned(rspamd: RspamdProcess) -> int:
    """rspamd's count of scans so far (the controller's ``/stat``)."""
    with socket.create_connection(("127.0.0.1", rspamd.controller_port), timeout=10) as sock:
        sock.sendall(f"GET /stat HTTP/1.0\r\nPassword: {rspamd.password}\r\n\r\n".encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    count: int = json.loads(reply.split(b"\r\n\r\n", 1)[1])["scanned"]
    return count


def send(gateway: GatewayProcess, message: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=60) as client:
        client.ehlo("mx.client.example")
        try:
            client.sendmail("alice@client.example", ["postmaster@example.test"], message)
        except smtplib.SMTPDataError as exc:
            assert isinstance(exc.smtp_error, bytes)
            return exc.smtp_code, exc.smtp_error
        return 250, b""


def unfolded(message: bytes) -> str:
    head = message.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode()
    return head.replace("\n\t", " ").replace("\n ", " ")


def test_signed_ham_is_scanned_once_by_each_and_delivered_with_every_verdict(
    gateway: GatewayProcess, rspamd: RspamdProcess
) -> None:
    before = scanned(rspamd)
    assert send(gateway, signed(HAM)) == (250, b"")
    head = unfolded(wait_for(lambda: gateway.maildir_messages("postmaster"))[0])
    assert head.count("Authentication-Results:") == 1
    assert "dkim=pass header.d=client.example" in head
    assert "spf=pass smtp.mailfrom=alice@client.example" in head
    assert "dmarc=pass" in head
    assert "X-Spam-Checker-Version: Palisade (rspamd)" in head
    assert "X-Spam-Status: No, score=" in head
    # the report is read by the kill-level rule, the headers and the log line: one scan
    assert wait_for(lambda: scanned(rspamd) - before) == 1
    line = wait_for(lambda: [ln for ln in gateway.mainlog().splitlines() if " <= " in ln])[0]
    assert " spam=" in line and "spam=unchecked" not in line


def test_eicar_is_refused_by_clamd_and_gtube_by_rspamd(gateway: GatewayProcess) -> None:
    code, text = send(gateway, signed(HAM + EICAR.decode() + "\r\n"))
    assert (code, text) == (550, f"5.7.1 This message contains a virus ({REPORTED})".encode())
    code, text = send(gateway, signed(f"{GTUBE}\r\n"))
    assert (code, text) == (550, b"5.7.1 Message rejected as spam")
    assert gateway.maildir_messages("postmaster") == []
    assert list((gateway.spool_dir / "queue").iterdir()) == []
    log = gateway.rejectlog()
    assert f"virus found: {REPORTED}" in log and "GTUBE" in log
