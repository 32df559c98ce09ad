"""Our DMARC aggregate reports: a finished day's evaluations into RFC 7489 section 7.2 reports.

Owns: reading ``<[dmarc] state>/records/<day>.jsonl`` (:func:`load_day`; a damaged line, such as
one cut by a crash, is counted and skipped), grouping per policy domain (the domain whose DMARC
record was applied) and per row (source IP, identifiers, results, disposition) into the
appendix C XML (:func:`report_xml`), the destinations (the record's rua ``mailto:`` URIs; one in
another organisational domain only when ``<domain>._report._dmarc.<its domain>`` has a
``v=DMARC1`` TXT record, section 7.1; ``!size`` and ``[dmarc] max_report_size`` limits), the
mail (section 7.2.1.1: Subject ``Report Domain: ... Submitter: ... Report-ID: <...>``, the
attachment ``<receiver>!<domain>!<begin>!<end>.xml.gz`` as ``application/gzip``), and
``<state>/sent/<day>.json``, which names the domains whose report was queued (never twice).
The policy published is the record seen at the day's last evaluation; so are the rua URIs.
Must not touch: the SMTP conversation; the records are appended by
``palisade.adapters.dmarc_records``.
Trust: the records were written by the gateway but are read back from disk: every line is
checked for its types; DNS answers (rua verification) are anybody's and only compared.
"""

from __future__ import annotations

import calendar
import functools
import gzip
import hashlib
import json
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from palisade.policy.checks.dmarc import organisational_domain
from palisade.ports import DnsTempError, Resolver
from palisade.reports.mailout import Destination, Outbox, mailto_destinations, report_message

__all__ = ["DayRecords", "load_day", "report_xml", "send_day", "verified_destinations"]

_SPF = frozenset({"none", "neutral", "pass", "fail", "softfail", "temperror", "permerror"})
_DKIM = frozenset({"none", "pass", "fail", "policy", "neutral", "temperror", "permerror"})


@dataclass(slots=True)
class DayRecords:
    """One day's evaluations per policy domain, and how many lines were unusable."""

    by_domain: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    damaged: int = 0


_FIELDS: dict[str, type | tuple[type, ...]] = {
    "time": (int, float),
    "source_ip": str,
    "header_from": str,
    "envelope_from": str,
    "result": str,
    "spf_aligned": bool,
    "dkim_aligned": bool,
    "spf_domain": str,
    "spf_result": str,
    "spf_scope": str,
    "dkim": list,
    "policy_domain": str,
    "p": str,
    "sp": str,
    "adkim": str,
    "aspf": str,
    "pct": int,
    "requested": str,
    "disposition": str,
    "sampled": bool,
    "rua": list,
}


def _valid(line: Any) -> bool:
    if not isinstance(line, dict):
        return False
    for name, kind in _FIELDS.items():
        if not isinstance(line.get(name), kind):
            return False
    return bool(line["policy_domain"]) and all(
        isinstance(s, list) and len(s) == 3 and all(isinstance(v, str) for v in s)
        for s in line["dkim"]
    )


def load_day(records: Path, day: str) -> DayRecords:
    """The evaluations of ``day`` (YYYY-MM-DD) from ``records``/<day>.jsonl."""
    found = DayRecords()
    path = records / f"{day}.jsonl"
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        return found
    with f:
        for raw in f:
            try:
                line = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                found.damaged += 1
                continue
            if not _valid(line):
                found.damaged += 1
                continue
            found.by_domain.setdefault(line["policy_domain"].lower(), []).append(line)
    return found


def day_range(day: str) -> tuple[int, int]:
    """(first second, last second) of a UTC day (YYYY-MM-DD)."""
    begin = calendar.timegm(time.strptime(day, "%Y-%m-%d"))
    return begin, begin + 86399


def _sub(parent: ET.Element, tag: str, text: str | None = None) -> ET.Element:
    element = ET.SubElement(parent, tag)
    if text is not None:
        element.text = text
    return element


def _row_key(e: dict[str, Any]) -> tuple[Any, ...]:
    reasons = []
    if not e["sampled"] and e["result"] == "fail":
        reasons.append("sampled_out")
    if e["disposition"] != e["requested"]:
        reasons.append("local_policy")
    return (
        e["source_ip"],
        e["header_from"],
        e["envelope_from"],
        e["disposition"],
        "pass" if e["dkim_aligned"] else "fail",
        "pass" if e["spf_aligned"] else "fail",
        tuple(reasons),
        tuple(tuple(s) for s in e["dkim"]),
        (e["spf_domain"], e["spf_scope"], e["spf_result"]),
    )


def report_xml(
    domain: str,
    evaluations: list[dict[str, Any]],
    *,
    org_name: str,
    email: str,
    report_id: str,
    begin: int,
    end: int,
) -> bytes:
    """The aggregate report (RFC 7489 appendix C) of one domain's evaluations."""
    root = ET.Element("feedback")
    _sub(root, "version", "1.0")
    meta = _sub(root, "report_metadata")
    _sub(meta, "org_name", org_name)
    _sub(meta, "email", email)
    _sub(meta, "report_id", report_id)
    dates = _sub(meta, "date_range")
    _sub(dates, "begin", str(begin))
    _sub(dates, "end", str(end))
    last = max(evaluations, key=lambda e: e["time"])
    policy = _sub(root, "policy_published")
    _sub(policy, "domain", domain)
    _sub(policy, "adkim", last["adkim"])
    _sub(policy, "aspf", last["aspf"])
    _sub(policy, "p", last["p"])
    _sub(policy, "sp", last["sp"])
    _sub(policy, "pct", str(last["pct"]))
    rows: dict[tuple[Any, ...], int] = {}
    for evaluation in evaluations:
        key = _row_key(evaluation)
        rows[key] = rows.get(key, 0) + 1
    for key, count in sorted(rows.items(), key=lambda kv: (-kv[1], kv[0])):
        ip, header_from, envelope_from, disposition, dkim, spf, reasons, sigs, spf_auth = key
        record = _sub(root, "record")
        row = _sub(record, "row")
        _sub(row, "source_ip", ip)
        _sub(row, "count", str(count))
        evaluated = _sub(row, "policy_evaluated")
        _sub(evaluated, "disposition", disposition)
        _sub(evaluated, "dkim", dkim)
        _sub(evaluated, "spf", spf)
        for reason in reasons:
            _sub(_sub(evaluated, "reason"), "type", reason)
        identifiers = _sub(record, "identifiers")
        if envelope_from:
            _sub(identifiers, "envelope_from", envelope_from)
        _sub(identifiers, "header_from", header_from)
        auth = _sub(record, "auth_results")
        for sig_domain, selector, result in sigs:
            dkim_element = _sub(auth, "dkim")
            _sub(dkim_element, "domain", sig_domain)
            if selector:
                _sub(dkim_element, "selector", selector)
            _sub(dkim_element, "result", result if result in _DKIM else "neutral")
        spf_domain, scope, spf_result = spf_auth
        spf_element = _sub(auth, "spf")
        _sub(spf_element, "domain", spf_domain or envelope_from or header_from)
        _sub(spf_element, "scope", scope)
        _sub(spf_element, "result", spf_result if spf_result in _SPF else "none")
    ET.indent(root)
    body: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + body


async def verified_destinations(
    resolver: Resolver, domain: str, destinations: Iterable[Destination]
) -> tuple[list[Destination], list[str]]:
    """RFC 7489 section 7.1: a destination outside ``domain``'s organisational domain only when
    ``<domain>._report._dmarc.<destination domain>`` has a TXT record starting ``v=DMARC1``.
    Returns (verified, refused with why); raises DnsTempError when a lookup failed."""
    org = organisational_domain(domain)
    verified: list[Destination] = []
    refused: list[str] = []
    for destination in destinations:
        if organisational_domain(destination.domain) == org:
            verified.append(destination)
            continue
        name = f"{domain}._report._dmarc.{destination.domain}"
        answer = await resolver.query(name, "TXT")
        if any(r.replace(" ", "").upper().startswith("V=DMARC1") for r in answer.records):
            verified.append(destination)
        else:
            refused.append(
                f"{destination.address}: outside {org} and {name} has no v=DMARC1 record "
                "(RFC 7489 section 7.1)"
            )
    return verified, refused


@dataclass(slots=True)
class Sent:
    """What ``send_day`` did, for the operator."""

    queued: dict[str, str] = field(default_factory=dict)  # domain -> queue id
    lines: list[str] = field(default_factory=list)  # one per domain: what happened
    failures: int = 0


def sent_path(state: Path, day: str) -> Path:
    return state / "sent" / f"{day}.json"


def read_sent(state: Path, day: str) -> dict[str, str]:
    try:
        data = json.loads(sent_path(state, day).read_text())
    except (OSError, ValueError):
        return {}
    domains = data.get("domains", {}) if isinstance(data, dict) else {}
    return {str(k): str(v) for k, v in domains.items()} if isinstance(domains, dict) else {}


def write_sent(state: Path, day: str, domains: dict[str, str]) -> None:
    """Atomically replace the day's sent file (tmp, fsync, rename)."""
    path = sent_path(state, day)
    os.makedirs(path.parent, 0o700, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump({"day": day, "domains": domains}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


async def send_day(
    day: str,
    *,
    state: Path,
    records: Path,
    resolver: Resolver,
    outbox: Outbox | None,
    org_name: str,
    from_address: str,
    max_size: int,
    force: bool = False,
    show: Callable[[str], None] | None = None,
) -> Sent:
    """Makes and queues the reports of ``day``; ``outbox`` None is a dry run (``show`` gets
    each report's XML). Domains already sent that day are skipped unless ``force``."""
    result = Sent()
    loaded = load_day(records, day)
    if loaded.damaged:
        result.lines.append(f"{loaded.damaged} damaged record line(s) skipped")
    already = {} if force else read_sent(state, day)
    begin, end = day_range(day)
    receiver = from_address.rpartition("@")[2].lower()
    for domain, evaluations in sorted(loaded.by_domain.items()):
        if domain in already:
            result.lines.append(f"{domain}: already sent ({already[domain]})")
            continue
        last = max(evaluations, key=lambda e: e["time"])
        destinations, skipped = mailto_destinations(last["rua"])
        try:
            destinations, refused = await verified_destinations(resolver, domain, destinations)
        except DnsTempError as exc:
            result.failures += 1
            result.lines.append(f"{domain}: not sent, rua verification failed: {exc.reason}")
            continue
        skipped += refused
        digest = hashlib.sha256(f"{receiver}|{domain}|{day}".encode()).hexdigest()[:16]
        report_id = f"{day}.{domain}.{digest}"
        xml = report_xml(
            domain,
            evaluations,
            org_name=org_name,
            email=from_address,
            report_id=report_id,
            begin=begin,
            end=end,
        )
        compressed = gzip.compress(xml, mtime=0)
        filename = f"{receiver}!{domain}!{begin}!{end}.xml.gz"
        message_id = f"<{report_id}@{receiver}>"

        mail_to = functools.partial(
            report_message,
            sender=from_address,
            subject=f"Report Domain: {domain} Submitter: {receiver} Report-ID: <{report_id}>",
            text=(
                f"This is a DMARC aggregate report (RFC 7489) from {org_name} for "
                f"{domain}, {day} (UTC): {len(evaluations)} message(s).\r\n"
            ),
            attachment=compressed,
            content_type="application/gzip",
            filename=filename,
            message_id=message_id,
        )
        mail = mail_to(recipients=[d.address for d in destinations] or [from_address])
        fitting = [d for d in destinations if len(mail) <= min(d.limit or max_size, max_size)]
        for d in destinations:
            if d not in fitting:
                skipped.append(f"{d.address}: report of {len(mail)} bytes is over its size limit")
        notes = "; ".join(skipped)
        if show is not None:
            show(xml.decode())
        if not fitting:
            result.lines.append(
                f"{domain}: {len(evaluations)} message(s), no destination"
                + (f" ({notes})" if notes else " (no rua)")
            )
            result.queued[domain] = "no destination"
            continue
        to = [d.address for d in fitting]
        if outbox is None:
            result.lines.append(
                f"{domain}: {len(evaluations)} message(s), {len(mail)} bytes, would go to "
                f"{', '.join(to)}" + (f" (skipped: {notes})" if notes else "")
            )
            continue
        mail = mail_to(recipients=to)
        signed, how = outbox.sign(mail, from_address)
        queue_id = await outbox.queue(
            signed, sender=from_address, recipients=to, message_id=message_id, kind="dmarc"
        )
        result.queued[domain] = queue_id
        result.lines.append(
            f"{domain}: {len(evaluations)} message(s), queued as {queue_id} to {', '.join(to)}, "
            f"{how}" + (f" (skipped: {notes})" if notes else "")
        )
    return result
