"""``check-host --message``: the DATA stage of the server's own conversation on a message file.

Real parts: ``python -m palisade check-host`` in a subprocess, the DNS server on loopback
(``loopback/dnsserver.py``) serving SPF, DKIM and DMARC records, and a real spamd.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loopback.dnsserver import ZoneServer
from tests.client_example import HAM, client_example_zones, signed
from tests.conftest import GatewayProcess
from tests.scanners.conftest import GTUBE
from tests.scanners.spamd import SpamdProcess, start_spamd


@pytest.fixture(scope="module")
def spamd() -> Iterator[SpamdProcess]:
    process = start_spamd()
    yield process
    process.stop()


@pytest.fixture
def dns() -> Iterator[ZoneServer]:
    server = client_example_zones()
    yield server
    server.stop()


def configured(make_gateway: Any, dns: ZoneServer, spamd: str | None = None) -> GatewayProcess:
    sections: dict[str, Any] = {
        "dns": {"nameservers": [f"127.0.0.1:{dns.port}"], "timeout": 1, "retries": 0},
        "authentication": {"enabled": True},
        "rules": {
            "data": [
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
        sections["spamd"] = {"address": spamd, "timeout": "20s"}
    gateway: GatewayProcess = make_gateway(start=False, **sections)
    return gateway


def as_file(message: bytes) -> bytes:
    """A message with LF line ends, as a file on disk has them."""
    return message.replace(b"\r\n", b"\n")


def check_host(gw: GatewayProcess, message: Path, sender: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", "palisade", "check-host", "127.0.0.1",
            "--helo", "mx.client.example", "--from", sender, "--rcpt", "postmaster@example.test",
            "--message", str(message), "--config", str(gw.config_path),
        ],
        cwd=gw.base,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip


def test_a_signed_message_passes_and_shows_the_headers_the_server_would_add(
    make_gateway: Any, dns: ZoneServer, spamd: SpamdProcess, tmp_path: Path
) -> None:
    gw = configured(make_gateway, dns, spamd.address)
    forged = "Authentication-Results: mx.example.test; dmarc=pass header.from=client.example\n"
    message = tmp_path / "ham.eml"
    message.write_bytes(as_file(signed(HAM, extra=forged.replace("\n", "\r\n"))))
    result = check_host(gw, message, "alice@client.example")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "\ndata (" in out and "1. deny if dmarc: dmarc reject" in out
    lines = out.splitlines()
    start = lines.index("  headers added:") + 1
    added = list(itertools.takewhile(lambda line: line.startswith("    "), lines[start:]))
    assert added[0].startswith("    Authentication-Results: mx.example.test;")
    text = "\n".join(added)
    assert "spf=pass" in text and "dkim=pass" in text and "dmarc=pass" in text
    assert "Received-SPF: pass" in text
    assert "X-Spam-Status: No, score=" in text
    # the forged verdict is dropped, as the server drops it, and the log says so
    assert "removed 1 inbound verdict header(s) that only we may write" in out
    arrival = [line for line in out.splitlines() if " <= alice@client.example " in line]
    assert len(arrival) == 1 and " spam=" in arrival[0] and "spam=unchecked" not in arrival[0]
    assert "<<< 250 2.0.0 Ok: queued as " in out
    assert "nothing was queued" in out
    assert not (gw.base / "var" / "spool").exists()  # the server's spool is not touched


def test_spam_and_a_dmarc_failure_are_refused_as_the_server_refuses_them(
    make_gateway: Any, dns: ZoneServer, spamd: SpamdProcess, tmp_path: Path
) -> None:
    gw = configured(make_gateway, dns, spamd.address)
    spam = tmp_path / "spam.eml"
    spam.write_bytes(as_file(signed(f"{GTUBE}\r\n")))
    result = check_host(gw, spam, "alice@client.example")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "<<< 550 5.7.1 Message rejected as spam" in result.stdout
    assert "rejected after DATA: spam score" in result.stdout
    unaligned = tmp_path / "unaligned.eml"
    unaligned.write_bytes(
        b"From: Alice <alice@client.example>\nTo: postmaster@example.test\n"
        b"Subject: not really Alice\n\nhi\n"
    )
    result = check_host(gw, unaligned, "bounce@other.example")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "MATCH: DMARC fail for client.example (reject)" in result.stdout
    assert "<<< 550 5.7.1 Rejected by the DMARC policy of client.example" in result.stdout


def test_message_needs_an_envelope_and_a_readable_file(
    make_gateway: Any, dns: ZoneServer, tmp_path: Path
) -> None:
    gw = configured(make_gateway, dns)
    base = [sys.executable, "-m", "palisade", "check-host", "127.0.0.1"]
    config = ["--config", str(gw.config_path)]
    for args in (
        ["--message", str(tmp_path / "missing.eml"), "--from", "a@client.example"],
        ["--message", str(tmp_path / "missing.eml"), "--from", "a@b.example", "--rcpt", "x@y.test"],
    ):
        result = subprocess.run(
            [*base, *args, *config], cwd=gw.base, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("palisade check-host: --message"), lines
