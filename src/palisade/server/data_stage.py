"""What happens between the final dot and the DATA rules: authentication, scans, added headers.

Owns: which DATA-stage findings the session computes for every message whatever the rules say
(SPF, DKIM and DMARC when ``[authentication]`` is on; a spam score when spamd or rspamd is
configured; a virus scan when clamd is), started together so their latencies overlap; the
header lines those findings add to the stored message (Authentication-Results, Received-SPF,
X-Spam-*); the inbound Authentication-Results headers that must be removed (RFC 8601 section 5:
those claiming our authserv-id); and the fields the arrival log line gets (``spam=``).

The checks compute and memoise (``policy.rules.memo``), so a rule that asks again gets the same
answer without a second lookup or scan. Failures are not decided here: a scan that failed is a
``CheckError`` for the rule that reads it (the scanner sections' ``on_failure``), and only the
header says ``unchecked``.
Trust: every value placed into a header came from the network: the builders quote or clean it,
and the lines are folded below the RFC 5322 limit here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from palisade.config import Config
from palisade.policy.checks import authres, content, spf
from palisade.policy.rules import Facts, Ports, known
from palisade.ports import SpamReport

__all__ = ["added_headers", "configured", "examine", "forged_header_filter", "log_fields"]


def authserv_id(config: Config) -> str:
    return config.authentication.authserv_id or config.server.hostname


_SPAM_FIELDS = frozenset({"x-spam-flag", "x-spam-score", "x-spam-status", "x-spam-checker-version"})


def forged_header_filter(config: Config) -> Callable[[str, str], bool] | None:
    """The predicate for inbound headers to drop, or None when nothing is dropped.

    Dropped: Authentication-Results claiming our authserv-id (with ``[authentication]`` on),
    and X-Spam-* verdict fields (with a spam scanner on): downstream filters trust both as ours.
    """
    ours = authserv_id(config) if config.authentication.enabled else None
    scanning = config.spam_scanner is not None
    if ours is None and not scanning:
        return None

    def forged(name: str, value: str) -> bool:
        lowered = name.lower()
        if scanning and lowered in _SPAM_FIELDS:
            return True
        return (
            ours is not None
            and lowered == "authentication-results"
            and authres.claims_authserv_id(value, ours)
        )

    return forged


def configured(config: Config) -> bool:
    """Authentication or a scanner is on (the DATA stage has work whatever the rules say)."""
    return (
        config.authentication.enabled
        or config.spam_scanner is not None
        or bool(config.clamd.address)
    )


async def examine(config: Config, facts: Facts, ports: Ports) -> None:
    """Starts every always-on finding for the message in ``facts.message`` and waits for them.

    Errors are kept in the memoised futures (the rules see them); nothing is raised here.
    """
    work: list[Awaitable[Any]] = []
    auth = config.authentication
    if auth.enabled:
        work.append(
            authres.authenticate(facts, ports, spf=auth.spf, dkim=auth.dkim, dmarc=auth.dmarc)
        )
    if ports.spam is not None:
        work.append(content.spam_report(facts, ports))
    if ports.virus is not None:
        work.append(content.virus_report(facts, ports))
    if work:
        await asyncio.gather(*work, return_exceptions=True)


def _spam_state(facts: Facts) -> tuple[SpamReport | None, bool]:
    """(the SpamReport or None, whether the scan failed); (None, False) when not scanned."""
    future = facts.tx.get("spam")
    if future is None or not future.done():
        return None, False
    if future.cancelled() or future.exception() is not None:
        return None, True
    return future.result(), False


def fold(line: str, width: int = 78) -> str:
    """Folds a header line at spaces so no line passes ``width`` where it can be helped."""
    words = line.split(" ")
    lines: list[str] = []
    current = ""
    for word in words:
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = "\t" + word
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    return "\r\n".join(lines)


def _clean(line: str) -> str:
    """No CR, LF or NUL survives into a header line, whatever the builders missed."""
    return "".join(c if c >= " " or c == "\t" else " " for c in line)


def added_headers(config: Config, facts: Facts) -> bytes:
    """The header lines to add before the message, folded, CRLF-terminated."""
    lines: list[str] = []
    auth = config.authentication
    if auth.enabled:
        header = authres.authentication_results(authserv_id(config), facts)
        if header:
            lines.append(header)
        if auth.spf and auth.received_spf:
            outcome = known(facts, "spf")
            if outcome is not None:
                lines.append(spf.received_spf_header(outcome, config.server.hostname))
    scanner = config.spam_scanner
    if scanner is not None:
        report, failed = _spam_state(facts)
        hostname = config.server.hostname
        lines.extend(
            content.spam_headers(report, scanner.tag_level, failed=failed, hostname=hostname)
        )
    folded = ("\r\n".join(fold(_clean(part)) for part in line.split("\r\n")) for line in lines)
    return b"".join((text + "\r\n").encode("utf-8", "replace") for text in folded)


def log_fields(config: Config, facts: Facts) -> list[str]:
    """``spam=<score>`` (or ``spam=unchecked`` / ``spam=skipped``) when a scanner is on."""
    if config.spam_scanner is None:
        return []
    report, failed = _spam_state(facts)
    if failed:
        return ["spam=unchecked"]
    if report is None:
        return ["spam=skipped"]
    return [f"spam={report.score:.1f}"]
