"""What the conversation adds to a message after the final dot: headers and log fields.

Owns: the header lines the DATA stage's findings add to the stored message
(Authentication-Results, Received-SPF, X-Spam-*), the inbound headers that must be removed
because only we may write them (RFC 8601 section 5: Authentication-Results claiming our
authserv-id; X-Spam-* with a spam scanner on), and the fields the arrival log line gets
(``spam=``). The findings themselves (SPF, DKIM, DMARC, scans) are computed by the policy engine
(``policy.findings``) before the DATA rules; this module only renders what they left in the
per-transaction store, so a failed scan is ``unchecked`` here and a ``CheckError`` for a rule.
Trust: every value placed into a header came from the network: the builders quote or clean it,
and the lines are folded below the RFC 5322 limit here.
"""

from __future__ import annotations

from collections.abc import Callable

from palisade.config import Config
from palisade.policy.checks import authres, content, spf
from palisade.policy.rules import Facts, known
from palisade.ports import SpamReport

__all__ = ["added_headers", "forged_header_filter", "log_fields"]


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


def _spam_state(facts: Facts) -> tuple[SpamReport | None, bool]:
    """(the SpamReport or None, whether the scan failed); (None, False) when not scanned."""
    future = facts.tx.get(content.SPAM)
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
            outcome = known(facts, spf.SPF)
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


def spam_score(facts: Facts) -> float | None:
    """The spam scanner's score of the message, when it was scanned."""
    report, failed = _spam_state(facts)
    return None if failed or report is None else report.score


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
