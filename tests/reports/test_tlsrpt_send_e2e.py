"""Our TLS reports end to end: TLS results as the MX delivery records them (written here in
its format, one ``dataclasses.asdict(TlsResult)`` per line), ``palisade tlsrpt send-reports``
finds each policy domain's rua in the test DNS (``_smtp._tls.<domain>``), queues the RFC 8460
report in a running gateway's spool, the gateway delivers it to a real SMTP server, and
``palisade tlsrpt report`` reads it back to the counts written."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loopback.dnsserver import ZoneServer, start_zone_server
from palisade.ports import TlsResult
from tests.conftest import GatewayProcess, NextHop, palisade, wait_for

STS = ("version: STSv1", "mode: enforce", "mx: mx1.dest.example", "max_age: 86400")


@pytest.fixture
def dns() -> Iterator[ZoneServer]:
    server = start_zone_server()
    for zone in ("dest.example", "plain.example", "reports.example"):
        server.add_zone(zone)
    server.set("_smtp._tls.dest.example", "TXT", ["v=TLSRPTv1; rua=mailto:tls@reports.example"])
    yield server
    server.stop()


def _results(now: float) -> list[TlsResult]:
    ok = TlsResult("dest.example", "sts", STS, "mx1.dest.example", "127.0.0.21", True, time=now)
    bad = dataclasses.replace(
        ok, success=False, failure_type="certificate-host-mismatch", detail="name mismatch"
    )
    none = TlsResult("plain.example", "no-policy-found", (), "mx.plain.example", "127.0.0.22", True)
    return [ok, ok, ok, bad, bad, none]


def test_tls_report_is_queued_delivered_and_reads_back(
    make_gateway: Any, dns: ZoneServer, next_hop: NextHop, tmp_path: Path
) -> None:
    next_hop.start()
    gateway: GatewayProcess = make_gateway(
        dns={"nameservers": [f"127.0.0.1:{dns.port}"], "timeout": 5},
        delivery={"next_hop": f"127.0.0.1:{next_hop.port}"},
        dmarc={"org_name": "Palisade Test", "from_address": "tls-reports@example.test"},
    )
    yesterday = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400))
    results = gateway.base / "var" / "tlsrpt"
    results.mkdir(parents=True)
    written = _results(time.time() - 86400)
    lines = [json.dumps(dataclasses.asdict(r)) for r in written]
    (results / f"{yesterday}.jsonl").write_text("\n".join(lines) + "\n{broken\n")

    config = str(gateway.config_path)
    sent = palisade("tlsrpt", "send-reports", "--config", config, cwd=gateway.base)
    assert sent.returncode == 0, sent.stderr
    assert "1 damaged result line(s) skipped" in sent.stdout
    assert "plain.example: 1 session(s), no destination (no v=TLSRPTv1 record" in sent.stdout
    assert "dest.example: 5 session(s), queued as" in sent.stdout
    wait_for(lambda: next_hop.handler.messages, timeout=40)
    mail_from, rcpts, data = next_hop.handler.messages[0]
    assert (mail_from, rcpts) == ("tls-reports@example.test", ["tls@reports.example"])
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "tlsrpt"
    assert message["TLS-Report-Domain"] == "dest.example"
    assert message["Subject"].startswith("Report Domain: dest.example Submitter: example.test")

    received = tmp_path / "received.eml"
    received.write_bytes(data)
    read = palisade("tlsrpt", "report", "--json", str(received), cwd=tmp_path)
    assert read.returncode == 0, read.stderr
    (domain,) = json.loads(read.stdout)["domains"]
    ok = sum(1 for r in written if r.domain == "dest.example" and r.success)
    failed = [r for r in written if r.domain == "dest.example" and not r.success]
    assert (domain["domain"], domain["successful"], domain["failed"]) == (
        "dest.example",
        ok,
        len(failed),
    )
    assert domain["policy_types"] == ["sts"]
    assert [
        (f["result_type"], f["receiving_mx_hostname"], f["count"]) for f in domain["failures"]
    ] == [("certificate-host-mismatch", "mx1.dest.example", len(failed))]
    again = palisade("tlsrpt", "send-reports", "--config", config, cwd=gateway.base)
    assert "dest.example: already sent" in again.stdout


def test_bad_dmarc_settings_are_refused_by_config_check(tmp_path: Path) -> None:
    (tmp_path / "palisade.toml").write_text('[dmarc]\nfrom_address = "not an address"\n')
    done = palisade("config", "check", "--no-dns", "--config", "palisade.toml", cwd=tmp_path)
    assert done.returncode == 2
    assert "dmarc.from_address" in done.stderr and "expected a mail address" in done.stderr
    (tmp_path / "palisade.toml").write_text("[dmarc]\nreport = true\n")
    done = palisade("config", "check", "--no-dns", "--config", "palisade.toml", cwd=tmp_path)
    assert done.returncode == 2 and "dmarc.report" in done.stderr and "unknown key" in done.stderr
    (tmp_path / "palisade.toml").write_text(
        '[dmarc]\nreports = true\norg_name = "Example"\nfrom_address = "dmarc@example.org"\n'
    )
    done = palisade("config", "check", "--no-dns", "--config", "palisade.toml", cwd=tmp_path)
    assert "[dmarc]\nreports = true" in done.stdout, done.stderr


def test_config_check_warns_when_reports_cannot_work(tmp_path: Path) -> None:
    (tmp_path / "palisade.toml").write_text('[dmarc]\nreports = true\nstate = "taken/dmarc"\n')
    (tmp_path / "taken").write_text("a file\n")
    done = palisade("config", "check", "--no-dns", "--config", "palisade.toml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "[authentication] does not check DMARC" in done.stderr
    assert "DMARC evaluations will not be kept" in done.stderr
    assert "reports will be sent unsigned" in done.stderr
