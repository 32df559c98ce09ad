"""Our DMARC aggregate reports end to end: a real gateway checks DMARC of mail from the test
DNS world (loopback DNS server), keeps the evaluations (``[dmarc] reports = true``);
``palisade dmarc send-reports`` makes the report, DKIM-signs it and queues it in the gateway's
spool; the running gateway delivers it to a real SMTP server (the next hop, aiosmtpd); the report
received there is read back with ``palisade dmarc report`` and gives the counts sent.

One shortcut, said here: send-reports only reports finished UTC days, so the test renames
today's record file to yesterday's name (the lines inside are untouched) instead of waiting a day.
"""

from __future__ import annotations

import email
import email.policy
import gzip
import json
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import pytest

from loopback.dnsserver import ZoneServer
from tests.client_example import DATA, HAM, client_example_zones, signed
from tests.conftest import GatewayProcess, NextHop, palisade, wait_for

UNALIGNED = (
    b"From: Alice <alice@client.example>\r\nTo: postmaster@example.test\r\n"
    b"Subject: not really Alice\r\n\r\nhi\r\n"
)


@pytest.fixture
def dns() -> Iterator[ZoneServer]:
    server = client_example_zones()
    server.set(
        "_dmarc.client.example",
        "TXT",
        ["v=DMARC1; p=reject; rua=mailto:dmarc@reports.example!10m,mailto:x@unverified.example"],
    )
    server.add_zone("reports.example")
    server.add_zone("unverified.example")
    server.add_zone("example.test")
    server.set("client.example._report._dmarc.reports.example", "TXT", ["v=DMARC1"])
    server.set("test._domainkey.example.test", "TXT", [(DATA / "test.txt").read_text().strip()])
    yield server
    server.stop()


def _gateway(make_gateway: Any, dns: ZoneServer, next_hop: NextHop) -> GatewayProcess:
    gateway: GatewayProcess = make_gateway(
        dns={"nameservers": [f"127.0.0.1:{dns.port}"], "timeout": 5, "retries": 1},
        authentication={"enabled": True},
        delivery={"next_hop": f"127.0.0.1:{next_hop.port}"},
        dkim={
            "keys_dir": str(DATA),
            "keys": [{"domain": "example.test", "selector": "test", "file": "test.private"}],
        },
        dmarc={
            "reports": True,
            "org_name": "Palisade Test",
            "from_address": "dmarc-reports@example.test",
            "state": "var/dmarc",
        },
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
    return gateway


def _send(gateway: GatewayProcess, message: bytes, sender: str) -> int:
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=60) as client:
        client.ehlo("mx.client.example")
        try:
            client.sendmail(sender, ["postmaster@example.test"], message)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code
    return 250


def test_a_report_of_what_the_gateway_saw_is_queued_signed_delivered_and_reads_back(
    make_gateway: Any, dns: ZoneServer, next_hop: NextHop, tmp_path: Path
) -> None:
    next_hop.start()
    gateway = _gateway(make_gateway, dns, next_hop)
    assert _send(gateway, signed(HAM), "alice@client.example") == 250
    assert _send(gateway, signed(HAM), "alice@client.example") == 250
    assert _send(gateway, UNALIGNED, "bounce@other.example") == 550
    wait_for(lambda: len(gateway.maildir_messages("postmaster")) == 2)

    records = gateway.base / "var" / "dmarc" / "records"
    today = time.strftime("%Y-%m-%d", time.gmtime())
    lines = [json.loads(x) for x in (records / f"{today}.jsonl").read_text().splitlines()]
    assert [(x["result"], x["disposition"]) for x in lines] == [
        ("pass", "none"),
        ("pass", "none"),
        ("fail", "reject"),
    ]
    assert lines[0]["dkim"] == [["client.example", "test", "pass"]]
    assert lines[2]["envelope_from"] == "other.example" and lines[2]["spf_result"] == "fail"
    yesterday = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400))
    (records / f"{today}.jsonl").rename(records / f"{yesterday}.jsonl")

    config = str(gateway.config_path)
    dry = palisade("dmarc", "send-reports", "--dry-run", "--config", config, cwd=gateway.base)
    assert dry.returncode == 0, dry.stderr
    assert "would go to dmarc@reports.example" in dry.stdout
    assert "x@unverified.example: outside client.example" in dry.stdout
    assert list((gateway.spool_dir / "queue").iterdir()) == []

    sent = palisade("dmarc", "send-reports", "--config", config, cwd=gateway.base)
    assert sent.returncode == 0, sent.stderr
    assert "client.example: 3 message(s), queued as" in sent.stdout
    assert "DKIM-signed d=example.test" in sent.stdout
    # the running gateway finds it at its next spool scan and delivers it to the next hop
    wait_for(lambda: next_hop.handler.messages, timeout=40)
    mail_from, rcpts, data = next_hop.handler.messages[0]
    assert (mail_from, rcpts) == ("dmarc-reports@example.test", ["dmarc@reports.example"])

    message = email.message_from_bytes(data, policy=email.policy.default)
    assert message["Subject"].startswith(
        "Report Domain: client.example Submitter: example.test Report-ID: <"
    )
    txt = (DATA / "test.txt").read_text().strip().encode()
    assert dkim.verify(data, dnsfunc=lambda name, timeout=5: txt)
    attachment = next(p for p in message.walk() if p.get_content_type() == "application/gzip")
    filename = attachment.get_filename() or ""
    assert filename.startswith("example.test!client.example!")
    assert filename.endswith(".xml.gz")
    payload = attachment.get_payload(decode=True)
    assert isinstance(payload, bytes)
    assert b"<org_name>Palisade Test</org_name>" in gzip.decompress(payload)
    received = tmp_path / "received.eml"
    received.write_bytes(data)
    read = palisade("dmarc", "report", "--json", str(received), cwd=tmp_path)
    assert read.returncode == 0, read.stderr
    (domain,) = json.loads(read.stdout)["domains"]
    assert (domain["domain"], domain["total"], domain["pass"], domain["fail"]) == (
        "client.example",
        3,
        2,
        1,
    )
    rows: dict[tuple[str, str], int] = {}
    for row in domain["rows"]:
        key = (row["dmarc"], row["disposition"])
        rows[key] = rows.get(key, 0) + row["count"]
    assert rows == {("pass", "none"): 2, ("fail", "reject"): 1}, json.dumps(domain["rows"])
    assert {r["source_ip"] for r in domain["rows"]} == {"127.0.0.1"}

    again = palisade("dmarc", "send-reports", "--config", config, cwd=gateway.base)
    assert again.returncode == 0 and "client.example: already sent" in again.stdout
    not_over = palisade(
        "dmarc", "send-reports", "--day", today, "--config", config, cwd=gateway.base
    )
    assert not_over.returncode == 2 and "not over yet" in not_over.stderr


def test_records_that_cannot_be_written_cost_the_report_not_the_reply(
    make_gateway: Any, dns: ZoneServer, next_hop: NextHop
) -> None:
    gateway: GatewayProcess = make_gateway(
        start=False,
        dns={"nameservers": [f"127.0.0.1:{dns.port}"], "timeout": 5, "retries": 1},
        authentication={"enabled": True},
        dmarc={"reports": True, "state": "blocked/dmarc"},
    )
    (gateway.base / "blocked").write_text("a file where the directory should be\n")
    gateway.start()
    assert _send(gateway, signed(HAM), "alice@client.example") == 250
    assert _send(gateway, signed(HAM), "alice@client.example") == 250
    panic = wait_for(lambda: gateway.paniclog())
    assert "DMARC report records: cannot write under blocked/dmarc/records" in panic
    assert panic.count("DMARC report records") == 1  # once a minute at most
    wait_for(lambda: len(gateway.maildir_messages("postmaster")) == 2)


def _append(args: tuple[str, int, int]) -> None:
    from palisade.adapters.dmarc_records import DmarcRecordFile
    from palisade.ports import DmarcEvaluation

    directory, worker, count = args
    sink = DmarcRecordFile(Path(directory))
    for n in range(count):
        sink.record(
            DmarcEvaluation(
                time=1767225600.0 + n,
                source_ip=f"192.0.2.{worker}",
                header_from="client.example",
                envelope_from="client.example",
                result="pass",
                spf_aligned=True,
                dkim_aligned=True,
                spf_domain="client.example",
                spf_result="pass",
                spf_scope="mfrom",
                dkim=(("client.example", "s" * 200, "pass"),) * 8,
                policy_domain="client.example",
                p="reject",
                sp="reject",
                adkim="r",
                aspf="r",
                pct=100,
                requested="none",
                disposition="none",
                sampled=True,
                rua=("mailto:" + "r" * 240 + "@reports.example",) * 8,
            )
        )
    sink.close()


def test_processes_appending_at_once_never_interleave_lines(tmp_path: Path) -> None:
    """Each line is one write on an O_APPEND descriptor: four processes writing long lines
    (about 4 KiB, more than a pipe's atomic size) at once leave every line whole."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_append, [(str(tmp_path), worker, 400) for worker in range(4)])
    lines = (tmp_path / "2026-01-01.jsonl").read_bytes().splitlines()
    assert len(lines) == 1600
    decoded = [json.loads(line) for line in lines]
    assert len(lines[0]) > 4096
    assert sorted({d["source_ip"] for d in decoded}) == [f"192.0.2.{w}" for w in range(4)]
    assert oct((tmp_path / "2026-01-01.jsonl").stat().st_mode & 0o777) == "0o600"
