"""Findings: what a stage works out for every message whatever the rules say.

Owns: the always-on work of the DATA stage -- SPF, DKIM and DMARC when ``[authentication]`` is
on, the spam scanner's report when spamd or rspamd is configured, the virus scan when clamd is.
The engine starts a stage's findings together (their latencies overlap) before its rules run
(:func:`palisade.policy.engine.evaluate_stage`), so every DATA-stage finding reaches the rules,
the added headers and the log the same way: through the memoised per-transaction store
(``policy.rules.memo``). A finding decides nothing: a failure stays in the memo as the
``CheckError`` the rule that reads it gets (its ``on_error``), and only a header says
``unchecked``.
Trust: the message is the client's; the checks that read it say how far they trust it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

from palisade.policy.checks import authres, content
from palisade.policy.rules import Facts, Ports

__all__ = ["Authentication", "Finding", "SpamScan", "VirusScan"]


class Finding(Protocol):
    """One piece of always-on work of a stage; its result lands in ``facts.tx``."""

    name: ClassVar[str]

    async def compute(self, facts: Facts, ports: Ports) -> None: ...


@dataclass(frozen=True, slots=True)
class Authentication:
    """SPF, DKIM and DMARC of the message (``[authentication]``)."""

    name: ClassVar[str] = "authentication"
    spf: bool = True
    dkim: bool = True
    dmarc: bool = True

    async def compute(self, facts: Facts, ports: Ports) -> None:
        await authres.authenticate(facts, ports, spf=self.spf, dkim=self.dkim, dmarc=self.dmarc)


@dataclass(frozen=True, slots=True)
class SpamScan:
    """The spam scanner's report (spamd or rspamd)."""

    name: ClassVar[str] = "spam"

    async def compute(self, facts: Facts, ports: Ports) -> None:
        if ports.spam is not None:
            await content.spam_report(facts, ports)


@dataclass(frozen=True, slots=True)
class VirusScan:
    """clamd's report."""

    name: ClassVar[str] = "virus"

    async def compute(self, facts: Facts, ports: Ports) -> None:
        if ports.virus is not None:
            await content.virus_report(facts, ports)
