"""DMARC aggregate reports (RFC 7489 section 7.2, appendix C; RFC 9990): parse and summarise.

Owns: :func:`parse_report` (XML bytes -> :class:`AggregateReport`, or ``ReportError`` with the
reason), :func:`summarise` (reports -> per report domain, rows per source IP and results with
counts summed across reports), and the two renderings (:func:`render_table`, :func:`as_json`).
The DMARC result of a row is ``pass`` when either identifier was aligned and passed (the
``policy_evaluated`` dkim or spf is ``pass``), else ``fail``. Result words are compared in lower
case (reporters write ``Pass``). The draft schema (no ``version``), RFC 7489's and RFC 9990's
(namespace ``urn:ietf:params:xml:ns:dmarc-2.0``) read alike; unknown elements are ignored.
Must not touch: files (``sources`` reads them), the terminal (the CLI prints what this returns).
Trust: the XML is anybody's: parsed by :mod:`.safexml`; every value checked (an IP address, a
non-negative count) or cleaned of control characters; a record that breaks the schema makes the
whole report broken rather than half-read.
"""

from __future__ import annotations

import datetime
import ipaddress
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from palisade.reports.safexml import UnsafeXml, XmlError, local_name, parse

__all__ = [
    "AggregateReport",
    "AuthResult",
    "DomainSummary",
    "Record",
    "ReportError",
    "Row",
    "as_json",
    "parse_report",
    "render_table",
    "summarise",
]

MAX_RECORDS = 200_000  # rows of one report


class ReportError(ValueError):
    """The document is not a usable aggregate report; the message says why."""


@dataclass(frozen=True, slots=True)
class AuthResult:
    """One ``auth_results`` entry: DKIM (domain, selector) or SPF (domain, scope)."""

    domain: str
    result: str
    detail: str = ""  # DKIM selector or SPF scope


@dataclass(frozen=True, slots=True)
class Record:
    source_ip: str
    count: int
    disposition: str
    dkim: str  # policy_evaluated: aligned and passed
    spf: str
    header_from: str
    envelope_from: str = ""
    reasons: tuple[str, ...] = ()
    dkim_results: tuple[AuthResult, ...] = ()
    spf_results: tuple[AuthResult, ...] = ()

    @property
    def dmarc(self) -> str:
        return "pass" if "pass" in (self.dkim, self.spf) else "fail"


@dataclass(frozen=True, slots=True)
class AggregateReport:
    org_name: str
    email: str
    report_id: str
    begin: int
    end: int
    domain: str
    p: str
    sp: str = ""
    pct: str = ""
    adkim: str = ""
    aspf: str = ""
    records: tuple[Record, ...] = ()

    @property
    def total(self) -> int:
        return sum(r.count for r in self.records)


def _clean(text: str | None, limit: int = 256) -> str:
    """Control characters out, whitespace trimmed, bounded: the values reach a terminal."""
    if not text:
        return ""
    text = "".join(c if c.isprintable() else " " for c in text.strip())
    return text[:limit]


def _children(element: ET.Element, name: str) -> list[ET.Element]:
    return [child for child in element if local_name(child.tag) == name]


def _child(element: ET.Element | None, name: str) -> ET.Element | None:
    if element is None:
        return None
    found = _children(element, name)
    return found[0] if found else None


def _text(element: ET.Element | None, name: str, limit: int = 256) -> str:
    child = _child(element, name)
    return _clean(child.text if child is not None else None, limit)


def _word(element: ET.Element | None, name: str) -> str:
    return _text(element, name, 32).lower()


def _integer(text: str, what: str) -> int:
    if not text.isdigit():
        raise ReportError(f"{what} is not a non-negative integer: {text[:40]!r}")
    return int(text)


def parse_report(data: bytes) -> AggregateReport:
    """The report in ``data``. Raises :class:`ReportError` naming what is wrong."""
    try:
        root = parse(data)
    except UnsafeXml as exc:
        raise ReportError(str(exc)) from None
    except XmlError as exc:
        if not _is_utf8(data):  # a reporter's wrong byte in a name: read the rest anyway
            try:
                root = parse(data.decode("utf-8", "replace").encode("utf-8"))
            except XmlError:
                raise ReportError(f"not well-formed XML: {exc}") from None
        else:
            raise ReportError(f"not well-formed XML: {exc}") from None
    if local_name(root.tag) != "feedback":
        raise ReportError(f"not a DMARC aggregate report (root element <{local_name(root.tag)}>)")
    meta = _child(root, "report_metadata")
    policy = _child(root, "policy_published")
    if meta is None or policy is None:
        raise ReportError("no report_metadata or policy_published")
    domain = _text(policy, "domain").lower().rstrip(".")
    if not domain:
        raise ReportError("policy_published has no domain")
    dates = _child(meta, "date_range")
    begin = _integer(_text(dates, "begin"), "date_range begin")
    end = _integer(_text(dates, "end"), "date_range end")
    records = _children(root, "record")
    if len(records) > MAX_RECORDS:
        raise ReportError(f"more than {MAX_RECORDS} records")
    return AggregateReport(
        org_name=_text(meta, "org_name"),
        email=_text(meta, "email"),
        report_id=_text(meta, "report_id"),
        begin=begin,
        end=end,
        domain=domain,
        p=_word(policy, "p"),
        sp=_word(policy, "sp"),
        pct=_text(policy, "pct", 8),
        adkim=_word(policy, "adkim"),
        aspf=_word(policy, "aspf"),
        records=tuple(_record(r, n) for n, r in enumerate(records, 1)),
    )


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _record(element: ET.Element, number: int) -> Record:
    row = _child(element, "row")
    if row is None:
        raise ReportError(f"record {number} has no row")
    ip_text = _text(row, "source_ip", 64)
    try:
        source_ip = str(ipaddress.ip_address(ip_text))
    except ValueError:
        raise ReportError(f"record {number}: source_ip is not an IP address: {ip_text!r}") from None
    count = _integer(_text(row, "count", 20), f"record {number}: count")
    evaluated = _child(row, "policy_evaluated")
    reasons = tuple(
        _word(reason, "type")
        for reason in (_children(evaluated, "reason") if evaluated is not None else [])
    )
    identifiers = _child(element, "identifiers")
    auth = _child(element, "auth_results")
    dkim = tuple(
        AuthResult(_text(e, "domain").lower(), _word(e, "result"), _text(e, "selector", 64))
        for e in (_children(auth, "dkim") if auth is not None else [])
    )
    spf = tuple(
        AuthResult(_text(e, "domain").lower(), _word(e, "result"), _word(e, "scope"))
        for e in (_children(auth, "spf") if auth is not None else [])
    )
    return Record(
        source_ip=source_ip,
        count=count,
        disposition=_word(evaluated, "disposition") or "none",
        dkim=_word(evaluated, "dkim"),
        spf=_word(evaluated, "spf"),
        header_from=_text(identifiers, "header_from").lower(),
        envelope_from=_text(identifiers, "envelope_from").lower(),
        reasons=tuple(r for r in reasons if r),
        dkim_results=dkim,
        spf_results=spf,
    )


def _auth_text(results: Iterable[AuthResult]) -> str:
    """``example.com=pass,other.net=fail``; ``-`` for none."""
    parts = [f"{r.domain or '?'}={r.result or '?'}" for r in results]
    return ",".join(sorted(set(parts))) or "-"


@dataclass(frozen=True, slots=True, order=True)
class RowKey:
    source_ip: str
    header_from: str
    spf: str
    dkim: str
    dmarc: str
    disposition: str
    spf_auth: str
    dkim_auth: str


@dataclass(slots=True)
class Row:
    key: RowKey
    count: int = 0


@dataclass(slots=True)
class DomainSummary:
    domain: str
    reports: list[AggregateReport] = field(default_factory=list)
    rows: dict[RowKey, Row] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(row.count for row in self.rows.values())

    def count(self, dmarc: str) -> int:
        return sum(row.count for row in self.rows.values() if row.key.dmarc == dmarc)

    def sorted_rows(self) -> list[Row]:
        return sorted(self.rows.values(), key=lambda r: (-r.count, r.key))


def summarise(reports: Iterable[AggregateReport], domain: str | None = None) -> list[DomainSummary]:
    """Per report domain (sorted), the rows of all its reports, equal rows' counts summed.
    ``domain``: only that report domain (and its subdomains)."""
    wanted = domain.lower().rstrip(".") if domain else None
    found: dict[str, DomainSummary] = {}
    for report in reports:
        if wanted and report.domain != wanted and not report.domain.endswith("." + wanted):
            continue
        summary = found.setdefault(report.domain, DomainSummary(report.domain))
        summary.reports.append(report)
        for record in report.records:
            key = RowKey(
                source_ip=record.source_ip,
                header_from=record.header_from,
                spf=record.spf or "-",
                dkim=record.dkim or "-",
                dmarc=record.dmarc,
                disposition=record.disposition,
                spf_auth=_auth_text(record.spf_results),
                dkim_auth=_auth_text(record.dkim_results),
            )
            summary.rows.setdefault(key, Row(key)).count += record.count
    return [found[name] for name in sorted(found)]


def _day(stamp: int) -> str:
    try:
        return datetime.datetime.fromtimestamp(stamp, datetime.UTC).strftime("%Y-%m-%d %H:%M")
    except (OverflowError, OSError, ValueError):
        return str(stamp)


_COLUMNS = (
    ("source_ip", "source ip"),
    ("count", "count"),
    ("spf", "spf"),
    ("dkim", "dkim"),
    ("dmarc", "dmarc"),
    ("disposition", "disposition"),
    ("header_from", "header_from"),
    ("spf_auth", "spf (auth_results)"),
    ("dkim_auth", "dkim (auth_results)"),
)


def render_table(summaries: list[DomainSummary]) -> str:
    """One block per report domain: the reports it came in, a table, the total."""
    out: list[str] = []
    for summary in summaries:
        reporters = sorted({r.org_name or "?" for r in summary.reports})
        begin = min(r.begin for r in summary.reports)
        end = max(r.end for r in summary.reports)
        policies = sorted({f"p={r.p or '?'}" for r in summary.reports})
        out.append(
            f"{summary.domain}: {len(summary.reports)} report(s) from {', '.join(reporters)}, "
            f"{_day(begin)} to {_day(end)} UTC, {', '.join(policies)}"
        )
        table = [[title for _, title in _COLUMNS]]
        for row in summary.sorted_rows():
            values = asdict(row.key)
            values["count"] = str(row.count)
            table.append([values[name] for name, _ in _COLUMNS])
        widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
        for line in table:
            cells = [
                cell.rjust(w) if i == 1 else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(line, widths, strict=True))
            ]
            out.append("  " + "  ".join(cells).rstrip())
        out.append(
            f"  total {summary.total} message(s): dmarc pass {summary.count('pass')}, "
            f"fail {summary.count('fail')}"
        )
        out.append("")
    return "\n".join(out)


def as_json(summaries: list[DomainSummary], broken: list[dict[str, str]]) -> dict[str, Any]:
    """The same as a JSON document, plus the broken sources."""
    domains = []
    for summary in summaries:
        domains.append(
            {
                "domain": summary.domain,
                "total": summary.total,
                "pass": summary.count("pass"),
                "fail": summary.count("fail"),
                "reports": [
                    {
                        "org_name": r.org_name,
                        "email": r.email,
                        "report_id": r.report_id,
                        "begin": r.begin,
                        "end": r.end,
                        "p": r.p,
                        "sp": r.sp,
                        "pct": r.pct,
                        "messages": r.total,
                    }
                    for r in summary.reports
                ],
                "rows": [{**asdict(row.key), "count": row.count} for row in summary.sorted_rows()],
            }
        )
    return {"domains": domains, "broken": broken}
