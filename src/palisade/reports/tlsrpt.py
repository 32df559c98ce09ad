"""SMTP TLS reports (RFC 8460 section 4): parse and summarise the JSON.

Owns: :func:`parse_report` (JSON bytes -> :class:`TlsReport`, or ``ReportError``),
:func:`summarise` (per policy domain: policy types, successful and failed session counts summed
across reports, failure details grouped by result type, sending MTA, receiving MX and IP), and
the renderings. The field names are RFC 8460's (``policy-domain``,
``total-successful-session-count``, ``failure-details``...).
Must not touch: files, the terminal.
Trust: the JSON is anybody's: every value is checked for its type (a count is a non-negative
integer), text is cleaned of control characters and bounded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from palisade.reports.dmarc_aggregate import ReportError

__all__ = ["Failure", "PolicyResult", "TlsReport", "as_json", "parse_report", "render_table"]

MAX_POLICIES = 10_000
MAX_DETAILS = 100_000


@dataclass(frozen=True, slots=True)
class Failure:
    result_type: str
    sending_mta_ip: str
    receiving_mx_hostname: str
    receiving_ip: str
    count: int


@dataclass(frozen=True, slots=True)
class PolicyResult:
    policy_type: str
    policy_domain: str
    successful: int
    failed: int
    failures: tuple[Failure, ...] = ()


@dataclass(frozen=True, slots=True)
class TlsReport:
    organization: str
    report_id: str
    start: str
    end: str
    contact: str
    policies: tuple[PolicyResult, ...]


def _clean(value: Any, limit: int = 256) -> str:
    if not isinstance(value, str):
        return ""
    return "".join(c if c.isprintable() else " " for c in value.strip())[:limit]


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ReportError(f"{what} is not a non-negative integer: {str(value)[:40]!r}")
    return value


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ReportError(f"{what} is not a JSON object")
    return value


def parse_report(data: bytes) -> TlsReport:
    """The report in ``data``; raises :class:`ReportError` naming what is wrong."""
    try:
        document = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ReportError(f"not UTF-8: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ReportError(f"not JSON: {exc}") from None
    report = _object(document, "the report")
    dates = _object(report.get("date-range", {}), "date-range")
    policies = report.get("policies")
    if not isinstance(policies, list) or not policies:
        raise ReportError("no policies (not an RFC 8460 report)")
    if len(policies) > MAX_POLICIES:
        raise ReportError(f"more than {MAX_POLICIES} policies")
    return TlsReport(
        organization=_clean(report.get("organization-name")),
        report_id=_clean(report.get("report-id")),
        start=_clean(dates.get("start-datetime"), 40),
        end=_clean(dates.get("end-datetime"), 40),
        contact=_clean(report.get("contact-info")),
        policies=tuple(_policy(p, n) for n, p in enumerate(policies, 1)),
    )


def _policy(value: Any, number: int) -> PolicyResult:
    where = f"policies[{number}]"
    entry = _object(value, where)
    policy = _object(entry.get("policy"), f"{where}.policy")
    summary = _object(entry.get("summary"), f"{where}.summary")
    domain = _clean(policy.get("policy-domain")).lower().rstrip(".")
    if not domain:
        raise ReportError(f"{where}.policy has no policy-domain")
    details = entry.get("failure-details", [])
    if not isinstance(details, list):
        raise ReportError(f"{where}.failure-details is not a list")
    if len(details) > MAX_DETAILS:
        raise ReportError(f"{where}: more than {MAX_DETAILS} failure details")
    failures = []
    for index, raw in enumerate(details, 1):
        detail = _object(raw, f"{where}.failure-details[{index}]")
        failures.append(
            Failure(
                result_type=_clean(detail.get("result-type"), 64) or "?",
                sending_mta_ip=_clean(detail.get("sending-mta-ip"), 64),
                receiving_mx_hostname=_clean(detail.get("receiving-mx-hostname")).lower(),
                receiving_ip=_clean(detail.get("receiving-ip"), 64),
                count=_count(
                    detail.get("failed-session-count"),
                    f"{where}.failure-details[{index}].failed-session-count",
                ),
            )
        )
    return PolicyResult(
        policy_type=_clean(policy.get("policy-type"), 32) or "?",
        policy_domain=domain,
        successful=_count(
            summary.get("total-successful-session-count"), f"{where} successful count"
        ),
        failed=_count(summary.get("total-failure-session-count"), f"{where} failure count"),
        failures=tuple(failures),
    )


@dataclass(slots=True)
class DomainSummary:
    domain: str
    policy_types: set[str] = field(default_factory=set)
    reporters: set[str] = field(default_factory=set)
    reports: int = 0
    successful: int = 0
    failed: int = 0
    failures: dict[tuple[str, str, str, str], int] = field(default_factory=dict)


def summarise(reports: Iterable[TlsReport], domain: str | None = None) -> list[DomainSummary]:
    wanted = domain.lower().rstrip(".") if domain else None
    found: dict[str, DomainSummary] = {}
    for report in reports:
        for policy in report.policies:
            name = policy.policy_domain
            if wanted and name != wanted and not name.endswith("." + wanted):
                continue
            summary = found.setdefault(name, DomainSummary(name))
            summary.policy_types.add(policy.policy_type)
            summary.reporters.add(report.organization or "?")
            summary.reports += 1
            summary.successful += policy.successful
            summary.failed += policy.failed
            for f in policy.failures:
                key = (f.result_type, f.sending_mta_ip, f.receiving_mx_hostname, f.receiving_ip)
                summary.failures[key] = summary.failures.get(key, 0) + f.count
    return [found[name] for name in sorted(found)]


def render_table(summaries: list[DomainSummary]) -> str:
    out: list[str] = []
    for s in summaries:
        out.append(
            f"{s.domain}: policy {', '.join(sorted(s.policy_types))}; {s.reports} report(s) "
            f"from {', '.join(sorted(s.reporters))}; sessions successful {s.successful}, "
            f"failed {s.failed}"
        )
        if s.failures:
            table = [
                ["result-type", "sending-mta-ip", "receiving-mx-hostname", "receiving-ip", "count"]
            ]
            for key, count in sorted(s.failures.items(), key=lambda kv: (-kv[1], kv[0])):
                table.append([*(k or "-" for k in key), str(count)])
            widths = [max(len(line[i]) for line in table) for i in range(5)]
            for line in table:
                cells = [
                    c.rjust(w) if i == 4 else c.ljust(w)
                    for i, (c, w) in enumerate(zip(line, widths, strict=True))
                ]
                out.append("  " + "  ".join(cells).rstrip())
        out.append("")
    return "\n".join(out)


def as_json(summaries: list[DomainSummary], broken: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "domains": [
            {
                "domain": s.domain,
                "policy_types": sorted(s.policy_types),
                "reports": s.reports,
                "successful": s.successful,
                "failed": s.failed,
                "failures": [
                    {
                        "result_type": k[0],
                        "sending_mta_ip": k[1],
                        "receiving_mx_hostname": k[2],
                        "receiving_ip": k[3],
                        "count": c,
                    }
                    for k, c in sorted(s.failures.items(), key=lambda kv: (-kv[1], kv[0]))
                ],
            }
            for s in summaries
        ],
        "broken": broken,
    }
