"""Reports: what the DMARC recording costs the gateway per message, and how fast the readers
and the report maker go. Bounded (a few seconds); prints one line per measurement and the load
average. Run: ``.venv/bin/python bench/reports_bench.py``.

1. ``DmarcRecordFile.record`` (the only work added to an accepted message with ``[dmarc]
   reports = true``): microseconds per call, JSON encoding and one O_APPEND write included.
2. ``palisade dmarc report``'s parse and summary of the largest sample (2286 records).
3. ``dmarc_send.report_xml`` for one domain's day of 100,000 evaluations (1,000 source IPs).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from palisade.adapters.dmarc_records import DmarcRecordFile  # noqa: E402
from palisade.ports import DmarcEvaluation  # noqa: E402
from palisade.reports import dmarc_aggregate  # noqa: E402
from palisade.reports.dmarc_send import report_xml  # noqa: E402

SAMPLE = (
    REPO / "tests/data/dmarc-reports/samples/aggregate/!large-example.com!1711897200!1711983600.xml"
)


def evaluation(n: int) -> DmarcEvaluation:
    return DmarcEvaluation(
        time=time.time(),
        source_ip=f"192.0.{n % 250}.{n % 200}",
        header_from="client.example",
        envelope_from="client.example",
        result="pass" if n % 3 else "fail",
        spf_aligned=bool(n % 3),
        dkim_aligned=bool(n % 3),
        spf_domain="client.example",
        spf_result="pass",
        spf_scope="mfrom",
        dkim=(("client.example", "s2026", "pass"),),
        policy_domain="client.example",
        p="reject",
        sp="reject",
        adkim="r",
        aspf="r",
        pct=100,
        requested="none" if n % 3 else "reject",
        disposition="none" if n % 3 else "reject",
        sampled=True,
        rua=("mailto:dmarc@client.example",),
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sink = DmarcRecordFile(Path(tmp))
        items = [evaluation(n) for n in range(20_000)]
        start = time.perf_counter()
        for item in items:
            sink.record(item)
        spent = time.perf_counter() - start
        sink.close()
        print(f"record(): {spent / len(items) * 1e6:.1f} us per evaluation ({len(items)} calls)")
    data = SAMPLE.read_bytes()
    rounds = 5
    start = time.perf_counter()
    for _ in range(rounds):
        report = dmarc_aggregate.parse_report(data)
        dmarc_aggregate.summarise([report])
    spent = (time.perf_counter() - start) / rounds
    print(
        f"parse+summarise {len(report.records)} records: {spent * 1e3:.1f} ms "
        f"({len(report.records) / spent:,.0f} records/s)"
    )
    day = [dataclasses.asdict(evaluation(n)) for n in range(100_000)]
    for n, line in enumerate(day):
        line["source_ip"] = f"198.51.{n % 1000 // 250}.{n % 250}"
    start = time.perf_counter()
    xml = report_xml(
        "client.example",
        day,
        org_name="bench",
        email="r@example.org",
        report_id="x",
        begin=0,
        end=86399,
    )
    spent = time.perf_counter() - start
    print(f"report_xml of 100,000 evaluations: {spent:.2f} s, {len(xml):,} bytes of XML")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
