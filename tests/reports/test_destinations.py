"""Report destinations: rua ``mailto:`` URIs with their size limits (RFC 7489 section 6.2), the
external destination verification (section 7.1) against a real DNS server on loopback, and the
XML our reports are made of, read back by the reader."""

from __future__ import annotations

import asyncio
import gzip
import xml.etree.ElementTree as ET

from loopback.dnsserver import start_zone_server
from palisade.adapters.dns import DnsResolver
from palisade.reports import dmarc_aggregate
from palisade.reports.dmarc_send import report_xml, verified_destinations
from palisade.reports.mailout import Destination, mailto_destinations


def test_mailto_uris_and_size_limits() -> None:
    found, skipped = mailto_destinations(
        [
            "mailto:dmarc@example.com!10m",
            "mailto:Big@Reports.Example!2k",
            "mailto:plain@example.net",
            "https://reports.example/dmarc",
            "mailto:a@b.example?subject=x",
            "mailto:two@a.example,three@b.example",
            "mailto:not an address",
        ]
    )
    assert found == [
        Destination("dmarc@example.com", 10 * 1024 * 1024),
        Destination("Big@reports.example", 2048),
        Destination("plain@example.net", None),
        Destination("a@b.example", None),
    ]
    assert [s.split(":")[0] for s in skipped] == ["https", "mailto", "mailto"]
    assert "not a mailto: URI" in skipped[0]


def test_external_destinations_need_the_report_record() -> None:
    server = start_zone_server()
    try:
        for zone in ("reports.example", "other.example", "example.com"):
            server.add_zone(zone)
        server.set("example.com._report._dmarc.reports.example", "TXT", ["v=DMARC1"])
        server.set("example.com._report._dmarc.other.example", "TXT", ["v=spf1 -all"])
        resolver = DnsResolver([("127.0.0.1", server.port)], timeout=3)
        wanted = [
            Destination("d@mail.example.com"),  # same organisational domain: no check
            Destination("d@reports.example"),
            Destination("d@other.example"),
        ]
        ok, refused = asyncio.run(verified_destinations(resolver, "example.com", wanted))
    finally:
        server.stop()
    assert [d.address for d in ok] == ["d@mail.example.com", "d@reports.example"]
    assert len(refused) == 1 and refused[0].startswith("d@other.example: outside example.com")


def _evaluation(ip: str, result: str, disposition: str, **extra: object) -> dict[str, object]:
    base: dict[str, object] = {
        "time": 1.0,
        "source_ip": ip,
        "header_from": "example.com",
        "envelope_from": "example.com",
        "result": result,
        "spf_aligned": result == "pass",
        "dkim_aligned": False,
        "spf_domain": "example.com",
        "spf_result": "pass" if result == "pass" else "fail",
        "spf_scope": "mfrom",
        "dkim": [["example.com", "s1", "fail"]],
        "policy_domain": "example.com",
        "p": "reject",
        "sp": "quarantine",
        "adkim": "r",
        "aspf": "s",
        "pct": 50,
        "requested": disposition,
        "disposition": disposition,
        "sampled": True,
        "rua": [],
    }
    base.update(extra)
    return base


def test_our_report_xml_reads_back_with_its_counts() -> None:
    evaluations = [
        _evaluation("192.0.2.1", "pass", "none"),
        _evaluation("192.0.2.1", "pass", "none"),
        _evaluation("2001:db8::1", "fail", "reject"),
        _evaluation("198.51.100.7", "fail", "none", requested="reject"),
        _evaluation("198.51.100.8", "fail", "quarantine", sampled=False, requested="quarantine"),
    ]
    xml = report_xml(
        "example.com",
        evaluations,
        org_name="Org & <Co>",
        email="r@example.org",
        report_id="id-1",
        begin=100,
        end=200,
    )
    root = ET.fromstring(xml)
    assert root.findtext("report_metadata/org_name") == "Org & <Co>"
    assert root.findtext("policy_published/pct") == "50"
    assert root.findtext("policy_published/aspf") == "s"
    reasons = [r.text or "" for r in root.iter("type")]
    assert sorted(reasons) == ["local_policy", "sampled_out"]
    report = dmarc_aggregate.parse_report(gzip.decompress(gzip.compress(xml)))
    assert report.total == 5
    (summary,) = dmarc_aggregate.summarise([report])
    assert (summary.count("pass"), summary.count("fail")) == (2, 3)
    counts = {(row.key.source_ip, row.key.disposition): row.count for row in summary.rows.values()}
    assert counts == {
        ("192.0.2.1", "none"): 2,
        ("2001:db8::1", "reject"): 1,
        ("198.51.100.7", "none"): 1,
        ("198.51.100.8", "quarantine"): 1,
    }
