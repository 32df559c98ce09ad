"""``palisade tlsrpt report`` on the RFC 8460 samples (parsedmarc's: the RFC's example, Google's
report mail, Mail.ru's); expected counts worked out here from the JSON."""

from __future__ import annotations

import email
import email.policy
import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Any

from tests.conftest import palisade

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "dmarc-reports" / "samples" / "smtp_tls"


def _reports() -> list[dict[str, Any]]:
    out = []
    for path in sorted(SAMPLES.iterdir()):
        if path.suffix == ".json":
            out.append(json.loads(path.read_text()))
        else:
            message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            for part in message.walk():
                if part.get_content_type() == "application/tlsrpt+gzip":
                    payload = part.get_payload(decode=True)
                    assert isinstance(payload, bytes)
                    out.append(json.loads(gzip.decompress(payload)))
    return out


def test_sessions_and_failures_per_policy_domain(tmp_path: Path) -> None:
    ok: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    details: Counter[tuple[str, str]] = Counter()
    for report in _reports():
        for policy in report["policies"]:
            domain = policy["policy"]["policy-domain"]
            ok[domain] += policy["summary"]["total-successful-session-count"]
            failed[domain] += policy["summary"]["total-failure-session-count"]
            for detail in policy.get("failure-details", []):
                details[(domain, detail["result-type"])] += detail["failed-session-count"]
    result = palisade("tlsrpt", "report", "--json", str(SAMPLES), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert {d["domain"]: d["successful"] for d in document["domains"]} == dict(ok)
    assert {d["domain"]: d["failed"] for d in document["domains"]} == dict(failed)
    got: Counter[tuple[str, str]] = Counter()
    for domain in document["domains"]:
        for failure in domain["failures"]:
            got[(domain["domain"], failure["result_type"])] += failure["count"]
    assert got == details
    assert len(ok) == 3


def test_table_and_broken_json(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(
        '{"policies": [{"policy": {"policy-domain": "x.example"}, "summary": '
        '{"total-successful-session-count": -1, "total-failure-session-count": 0}}]}'
    )
    result = palisade("tlsrpt", "report", str(SAMPLES / "rfc8460.json"), str(bad), cwd=tmp_path)
    assert result.returncode == 1
    assert (
        "bad.json: broken: policies[1] successful count is not a non-negative integer"
        in result.stderr
    )
    assert "company-y.example: policy sts" in result.stdout
    assert "sessions successful 5326, failed 303" in result.stdout
    row = next(line for line in result.stdout.splitlines() if "starttls-not-supported" in line)
    assert row.split() == [
        "starttls-not-supported",
        "2001:db8:abcd:0013::1",
        "mx2.mail.company-y.example",
        "203.0.113.56",
        "200",
    ]
