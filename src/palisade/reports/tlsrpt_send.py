"""Our SMTP TLS reports (RFC 8460): a finished day's TLS results into one report per policy
domain, mailed to the domain's ``rua``.

Owns: reading ``<[outbound] tls_reports>/<day>.jsonl`` (each line ``dataclasses.asdict`` of
``ports.TlsResult``, written by the MX delivery's recorder; a damaged line is counted and
skipped), :func:`report_json` (section 4: per policy, the policy type and strings, the
successful and failed session counts, failure details grouped by result type, receiving MX and
IP and reason), the destinations (the ``rua`` ``mailto:`` URIs of the one ``v=TLSRPTv1`` TXT
record at ``_smtp._tls.<domain>``, section 3; no record: no report), the mail (section 5.3:
``multipart/report; report-type="tlsrpt"``, ``TLS-Report-Domain`` and
``TLS-Report-Submitter`` fields, the attachment ``application/tlsrpt+gzip`` named
``<submitter>!<domain>!<begin>!<end>!<id>.json.gz``) and the day's sent file, as for DMARC.
Must not touch: recording results (the delivery's), DMARC.
Trust: the result lines are read back from disk and checked for their types; DNS text is
anybody's and only parsed.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from palisade.ports import DnsTempError, Resolver
from palisade.reports.dmarc_send import Sent, day_range, read_sent
from palisade.reports.mailout import Outbox, mailto_destinations, report_message

__all__ = ["load_day", "report_json", "rua_of", "send_day"]

_FIELDS: dict[str, type | tuple[type, ...]] = {
    "domain": str,
    "policy_type": str,
    "policy_strings": list,
    "mx_host": str,
    "ip": str,
    "success": bool,
    "time": (int, float),
}


def load_day(results: Path, day: str) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """(policy domain -> its results, damaged lines) of ``day``."""
    found: dict[str, list[dict[str, Any]]] = {}
    damaged = 0
    try:
        f = open(results / f"{day}.jsonl", "rb")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        return found, 0
    with f:
        for raw in f:
            try:
                line = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                damaged += 1
                continue
            if not isinstance(line, dict) or not all(
                isinstance(line.get(k), t) for k, t in _FIELDS.items()
            ):
                damaged += 1
                continue
            if not line["domain"] or not all(isinstance(s, str) for s in line["policy_strings"]):
                damaged += 1
                continue
            found.setdefault(line["domain"].lower().rstrip("."), []).append(line)
    return found, damaged


def report_json(
    domain: str,
    results: list[dict[str, Any]],
    *,
    org_name: str,
    contact: str,
    report_id: str,
    day: str,
) -> dict[str, Any]:
    """The RFC 8460 report of one policy domain's results."""
    policies: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {}
    for result in results:
        key = (result["policy_type"], tuple(result["policy_strings"]))
        entry = policies.setdefault(key, {"ok": 0, "failed": 0, "details": {}})
        if result["success"]:
            entry["ok"] += 1
            continue
        entry["failed"] += 1
        failure = result.get("failure_type") or "validation-failure"
        reason = str(result.get("detail") or "")[:200]
        detail_key = (str(failure), result["mx_host"], result["ip"], reason)
        entry["details"][detail_key] = entry["details"].get(detail_key, 0) + 1
    out = []
    for (policy_type, strings), entry in sorted(policies.items()):
        policy: dict[str, Any] = {"policy-type": policy_type, "policy-domain": domain}
        if strings:
            policy["policy-string"] = list(strings)
        details = []
        for (failure, mx_host, ip, reason), count in sorted(entry["details"].items()):
            detail: dict[str, Any] = {"result-type": failure, "failed-session-count": count}
            if mx_host:
                detail["receiving-mx-hostname"] = mx_host
            if ip:
                detail["receiving-ip"] = ip
            if reason:
                detail["failure-reason-code"] = reason
            details.append(detail)
        item: dict[str, Any] = {
            "policy": policy,
            "summary": {
                "total-successful-session-count": entry["ok"],
                "total-failure-session-count": entry["failed"],
            },
        }
        if details:
            item["failure-details"] = details
        out.append(item)
    return {
        "organization-name": org_name,
        "date-range": {
            "start-datetime": f"{day}T00:00:00Z",
            "end-datetime": f"{day}T23:59:59Z",
        },
        "contact-info": contact,
        "report-id": report_id,
        "policies": out,
    }


async def rua_of(resolver: Resolver, domain: str) -> list[str] | str:
    """The rua URIs of ``_smtp._tls.<domain>``, or why there are none. Raises DnsTempError."""
    answer = await resolver.query(f"_smtp._tls.{domain}", "TXT")
    records = [r for r in answer.records if r.replace(" ", "").startswith("v=TLSRPTv1")]
    if not records:
        return f"no v=TLSRPTv1 record at _smtp._tls.{domain}"
    if len(records) > 1:
        return f"several v=TLSRPTv1 records at _smtp._tls.{domain} (RFC 8460 section 3)"
    for part in records[0].split(";"):
        key, _, value = part.strip().partition("=")
        if key.strip().lower() == "rua":
            return [u.strip() for u in value.split(",") if u.strip()]
    return f"no rua= in the record at _smtp._tls.{domain}"


async def send_day(
    day: str,
    *,
    state: Path,
    results: Path,
    resolver: Resolver,
    outbox: Outbox | None,
    org_name: str,
    from_address: str,
    max_size: int,
    force: bool = False,
    show: Callable[[str], None] | None = None,
) -> Sent:
    """Makes and queues the TLS reports of ``day`` (``outbox`` None: a dry run)."""
    sent = Sent()
    by_domain, damaged = load_day(results, day)
    if damaged:
        sent.lines.append(f"{damaged} damaged result line(s) skipped")
    already = {} if force else read_sent(state, day)
    begin, end = day_range(day)
    submitter = from_address.rpartition("@")[2].lower()
    for domain, results_of in sorted(by_domain.items()):
        if domain in already:
            sent.lines.append(f"{domain}: already sent ({already[domain]})")
            continue
        try:
            uris = await rua_of(resolver, domain)
        except DnsTempError as exc:
            sent.failures += 1
            sent.lines.append(f"{domain}: not sent, _smtp._tls lookup failed: {exc.reason}")
            continue
        if isinstance(uris, str):
            sent.queued[domain] = "no destination"
            sent.lines.append(f"{domain}: {len(results_of)} session(s), no destination ({uris})")
            continue
        destinations, skipped = mailto_destinations(uris)
        digest = hashlib.sha256(f"{submitter}|{domain}|{day}".encode()).hexdigest()[:16]
        report_id = f"{day}T00:00:00Z_{domain}_{digest}@{submitter}"
        document = report_json(
            domain,
            results_of,
            org_name=org_name,
            contact=from_address,
            report_id=report_id,
            day=day,
        )
        text = json.dumps(document, indent=1)
        if show is not None:
            show(text)
        compressed = gzip.compress(text.encode(), mtime=0)
        message_id = f"<{report_id}>"
        mail_to = functools.partial(
            report_message,
            sender=from_address,
            subject=f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{report_id}>",
            text=(
                f"This is an SMTP TLS report (RFC 8460) from {org_name} for {domain}, {day} "
                f"(UTC): {len(results_of)} session(s).\r\n"
            ),
            attachment=compressed,
            content_type="application/tlsrpt+gzip",
            filename=f"{submitter}!{domain}!{begin}!{end}!{digest}.json.gz",
            message_id=message_id,
            extra_headers=[("TLS-Report-Domain", domain), ("TLS-Report-Submitter", submitter)],
            report_type="tlsrpt",
        )
        mail = mail_to(recipients=[d.address for d in destinations] or [from_address])
        fitting = [d for d in destinations if len(mail) <= min(d.limit or max_size, max_size)]
        skipped += [f"{d.address}: over its size limit" for d in destinations if d not in fitting]
        notes = f" (skipped: {'; '.join(skipped)})" if skipped else ""
        if not fitting:
            sent.queued[domain] = "no destination"
            sent.lines.append(f"{domain}: {len(results_of)} session(s), no destination{notes}")
            continue
        to = [d.address for d in fitting]
        if outbox is None:
            sent.lines.append(
                f"{domain}: {len(results_of)} session(s), {len(mail)} bytes, would go to "
                f"{', '.join(to)}{notes}"
            )
            continue
        signed, how = outbox.sign(mail_to(recipients=to), from_address)
        queue_id = await outbox.queue(
            signed, sender=from_address, recipients=to, message_id=message_id, kind="tlsrpt"
        )
        sent.queued[domain] = queue_id
        sent.lines.append(
            f"{domain}: {len(results_of)} session(s), queued as {queue_id} to "
            f"{', '.join(to)}, {how}{notes}"
        )
    return sent
