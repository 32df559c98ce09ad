"""``spam_score`` and ``virus``: what the content scanners say about the message (DATA stage).

The scans themselves are per-transaction findings, run at most once per message however many
rules (and the session, for the X-Spam headers and the log line) ask:

* :func:`spam_report` -- the spam scanner's report (``ports.spam``: spamd or rspamd), memoised
  under ``facts.tx["spam"]``. None when no scanner is configured, before the message is known,
  or when the message is larger than the scanner's ``max_size`` (not scanned, as spamc ``-s``).
* :func:`virus_report` -- clamd's report (``ports.virus``), memoised under ``facts.tx["virus"]``;
  None when no scanner is configured or the message is larger than the scanner's ``max_size``
  (when it has one).

A scanner failure (:class:`palisade.ports.ServiceTempError`: down, slow, nonsense) is turned into
``CheckError`` here -- the engine converts only DNS and state-store errors itself -- and, through
the memo, every later caller of the same transaction sees the same ``CheckError``. A rule's
``on_error`` decides what that means (default: defer with 451 4.4.3).

Checks:

* ``spam_score``, option ``min`` (a number, required): matched when the score is at or above
  ``min``. ``deny if spam_score min = 16`` is the kill level. Values ``$spam_score`` (one
  decimal, ``12.3``), ``$spam_rules`` (rule names joined with ``,``), ``$scanner``.
* ``virus``, no option: matched when the virus scanner found something. Value ``$virus``: the
  signature name, made safe for a log line and a reply.

Neither matches when its scanner is not configured or the message was too big to scan.

:func:`spam_headers` renders the X-Spam-* header fields the server adds after the final dot.

Must not touch: the reply, logs, globals. The engine's per-rule ``timeout`` (default 5 s) bounds
how long a rule waits for a scan: give scanner rules a timeout at least the scanner's own
(spamd 30 s by default), or the rule gives up (CheckError) while the memoised scan goes on.
Trust: rule names and signature names come from the scanners (which got the message from the
client): names are filtered to ``[A-Za-z0-9_.:-]`` before they reach a header, and signatures
pass through ``safe_text`` before they reach ``$virus``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol, TypeVar

from palisade.policy.checks.dnsnames import safe_text
from palisade.policy.checks.options import Options
from palisade.policy.rules import (
    NO_MATCH,
    Check,
    CheckError,
    CheckFactory,
    CheckResult,
    Facts,
    Key,
    ListLookup,
    Ports,
    Stage,
    memo,
)
from palisade.ports import MessageSource, ServiceTempError, SpamReport, VirusReport

_Report = TypeVar("_Report", covariant=True)

__all__ = [
    "FACTORIES",
    "SpamScoreCheck",
    "VirusCheck",
    "format_score",
    "spam_headers",
    "spam_report",
    "virus_report",
]

SPAM: Key[SpamReport | None] = Key("spam")  # the spam scanner's report (None: not scanned)
VIRUS: Key[VirusReport | None] = Key("virus")  # clamd's report (None: not scanned)
_RULE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
_FOLD_AT = 76  # SpamAssassin folds its X-Spam-Status near here


class _Scanner(Protocol[_Report]):
    """What spam_report and virus_report need of a scanner port (SpamScanner, VirusScanner)."""

    name: str
    max_size: int

    async def scan(self, message: MessageSource) -> _Report: ...


async def _report_once(
    facts: Facts, scanner: _Scanner[_Report] | None, key: Key[_Report | None]
) -> _Report | None:
    """The scanner's report on the message, memoised under ``facts.tx[key]``; None when there is
    no scanner or no message yet, or the message is over the scanner's ``max_size``."""
    message = facts.message
    if scanner is None or message is None or message.source.size > scanner.max_size:
        return None

    async def scan() -> _Report:
        try:
            return await scanner.scan(message.source)
        except ServiceTempError as exc:
            raise CheckError(f"{scanner.name}: {safe_text(exc.reason)}") from None

    return await memo(facts, key, scan)


async def spam_report(facts: Facts, ports: Ports) -> SpamReport | None:
    """The spam scanner's report on the message, once per transaction (see the module doc).

    Raises ``CheckError`` when the scanner failed (now or for an earlier caller).
    """
    return await _report_once(facts, ports.spam, SPAM)


async def virus_report(facts: Facts, ports: Ports) -> VirusReport | None:
    """The virus scanner's report on the message, once per transaction.

    Raises ``CheckError`` when the scanner failed (now or for an earlier caller).
    """
    return await _report_once(facts, ports.virus, VIRUS)


def format_score(score: float) -> str:
    """One decimal, as SpamAssassin writes it (``12.3``, ``-0.1``, ``1003.3``)."""
    if not math.isfinite(score):
        return "0.0"
    text = f"{score:.1f}"
    return "0.0" if text == "-0.0" else text


def _rule_names(rules: Sequence[str]) -> list[str]:
    return [r for r in rules if _RULE_NAME.fullmatch(r)]


class SpamScoreCheck:
    name: ClassVar[str] = "spam_score"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.DATA})

    def __init__(self, minimum: float) -> None:
        self.minimum = minimum

    async def evaluate(self, facts: Facts, ports: Ports) -> CheckResult:
        report = await spam_report(facts, ports)
        if report is None or report.score < self.minimum:
            return NO_MATCH
        score = format_score(report.score)
        rules = ",".join(_rule_names(report.rules))
        values = {"spam_score": score, "spam_rules": rules, "scanner": safe_text(report.scanner)}
        reason = f"spam score {score} >= {self.minimum:g} ({rules or 'no rules'})"
        return CheckResult(True, safe_text(reason, 900), values)


class VirusCheck:
    name: ClassVar[str] = "virus"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.DATA})

    async def evaluate(self, facts: Facts, ports: Ports) -> CheckResult:
        report = await virus_report(facts, ports)
        if report is None or report.signature is None:
            return NO_MATCH
        signature = safe_text(report.signature, 200)
        return CheckResult(True, f"virus found: {signature}", {"virus": signature})


def spam_headers(
    report: SpamReport | None, tag_level: float, *, failed: bool, hostname: str
) -> list[str]:
    """The X-Spam-* header fields to add to a message, in order.

    Each item is one complete header field, folded with CRLF + TAB where long, *without* the
    final CRLF; the text is plain ASCII (rule names are filtered, the hostname is the operator's)
    and must be written as is (not escaped again, which would undo the folding).

    * ``failed`` (the scanner was down or slow and the operator chose to accept)::

        X-Spam-Checker-Version: Palisade on <hostname>
        X-Spam-Status: unchecked (scanner unavailable)

    * ``report`` None and not ``failed`` (no scanner, or the message was larger than
      ``max_size``): no headers at all, as spamc passes a too-big message through untouched;
    * otherwise, as SpamAssassin does: ``X-Spam-Checker-Version``, then at or above the tag level
      ``X-Spam-Flag: YES``, and always ``X-Spam-Score: 12.3`` and
      ``X-Spam-Status: Yes, score=12.3 required=4.5 tests=GTUBE,MISSING_DATE,...``
      (``No, ...`` under the tag level), the test list folded near 76 characters.
    """
    if failed:
        return [
            f"X-Spam-Checker-Version: Palisade on {hostname}",
            "X-Spam-Status: unchecked (scanner unavailable)",
        ]
    if report is None:
        return []
    score = format_score(report.score)
    spam = report.score >= tag_level
    scanner = report.scanner if _RULE_NAME.fullmatch(report.scanner) else "scanner"
    lines = [f"X-Spam-Checker-Version: Palisade ({scanner}) on {hostname}"]
    if spam:
        lines.append("X-Spam-Flag: YES")
    lines.append(f"X-Spam-Score: {score}")
    tests = ",".join(_rule_names(report.rules)) or "none"
    status = (
        f"X-Spam-Status: {'Yes' if spam else 'No'}, score={score} "
        f"required={format_score(tag_level)} tests={tests}"
    )
    lines.append(_fold(status))
    return lines


def _fold(field: str) -> str:
    """Folds ``field`` after commas and before spaces so that no line exceeds ``_FOLD_AT``
    (a single rule name longer than a line stays whole)."""
    if len(field) <= _FOLD_AT:
        return field
    pieces = re.findall(r"[^ ,]+,?| ", field)
    lines: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + len(piece) > _FOLD_AT and current.strip():
            lines.append(current.rstrip())
            current = "\t" + piece.lstrip()
        else:
            current += piece
    lines.append(current.rstrip())
    return "\r\n".join(line for line in lines if line.strip())


def build_spam_score(options: Mapping[str, Any], lists: ListLookup) -> Check:
    opts = Options(options, "spam_score")
    minimum = float(opts.number("min", minimum=-1000))
    opts.done()
    return SpamScoreCheck(minimum)


def build_virus(options: Mapping[str, Any], lists: ListLookup) -> Check:
    Options(options, "virus").done()
    return VirusCheck()


FACTORIES: dict[str, CheckFactory] = {
    "spam_score": build_spam_score,
    "virus": build_virus,
}
