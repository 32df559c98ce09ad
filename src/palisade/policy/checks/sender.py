"""``sender`` and ``local_sender``: the envelope sender (MAIL FROM).

``sender`` owns two conditions, either or both per rule (patterns are tried first):

* ``patterns``: a regular expression (case-insensitive, ``re.search``) finds the sender address,
  e.g. botnet local parts ``^Anastasia.{2,5}@``;
* ``verify``: the sender domain can receive mail (Postfix ``reject_unknown_sender_domain``):
  it has MX records, or else A/AAAA records (RFC 5321 5.1 implicit MX). Matched when the domain
  does not exist (NXDOMAIN), has neither MX nor A/AAAA, or publishes a null MX (``0 .``,
  RFC 7505). A temporary DNS failure (timeout, SERVFAIL) raises ``CheckError``: the rule's
  ``on_error`` decides, never a silent pass. A domain literal (``user@[192.0.2.1]``) is not
  looked up (as Postfix); a sender without a domain is matched.

The null sender ``<>`` (bounces) matches neither condition.

``local_sender`` owns one condition: the sender domain is one of ``facts.local_domains`` and the
session marked the client as allowed to relay (``facts.results["relay_client"] is True``). The
operator pairs it with the verb ``accept_all`` to skip the remaining checks for their own users
(the seed's "local sender domain skip"); the check itself never sets ``accept_all``.

Must not touch: the reply, logs, globals.
Trust: the sender is client text: searched by operator patterns (compiled at build time), and
its domain only placed in DNS questions; it is cleaned before it reaches ``reason``. DNS answers
are only tested for presence and for the null MX form.
Values: ``$sender``, ``$domain``, ``$pattern`` (the pattern that hit, else empty),
``$condition`` (``pattern``, ``nxdomain``, ``null_mx``, ``no_mx``, ``no_domain``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

from palisade.policy import keys
from palisade.policy.checks.dnsnames import address_literal, normalise_name, safe_text
from palisade.policy.checks.helo import compile_patterns
from palisade.policy.checks.options import Options
from palisade.policy.eager import gather_eager
from palisade.policy.rules import (
    NO_MATCH,
    Check,
    CheckError,
    CheckFactory,
    CheckResult,
    Facts,
    ListLookup,
    Ports,
    Stage,
)
from palisade.ports import DnsAnswer, DnsTempError


def is_null_mx(record: str) -> bool:
    """``0 .`` (RFC 7505); the port renders MX records as ``"<preference> <exchange>."``."""
    parts = record.split()
    return len(parts) == 2 and parts[1] in (".", "")


class SenderCheck:
    name: ClassVar[str] = "sender"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.MAIL, Stage.RCPT, Stage.DATA})

    def __init__(self, patterns: tuple[re.Pattern[str], ...], verify: bool) -> None:
        self.patterns = patterns
        self.verify = verify
        self.uses_dns = verify

    async def evaluate(self, facts: Facts, ports: Ports) -> CheckResult:
        sender = facts.sender
        if not sender:  # not yet given, or the null sender <>
            return NO_MATCH
        shown = safe_text(sender)
        for pattern in self.patterns:
            if pattern.search(sender):
                values = {
                    "sender": shown,
                    "domain": safe_text(facts.sender_domain or ""),
                    "pattern": pattern.pattern,
                    "condition": "pattern",
                }
                return CheckResult(True, f"sender {shown} matches /{pattern.pattern}/", values)
        if self.verify:
            return await self._verify(facts, ports, shown)
        return NO_MATCH

    async def _verify(self, facts: Facts, ports: Ports, shown: str) -> CheckResult:
        domain = facts.sender_domain
        if not domain:
            return _hit("no_domain", f"sender {shown} has no domain", shown, "")
        if address_literal(domain) is not None:
            return NO_MATCH
        name = normalise_name(domain)
        domain_shown = safe_text(name)
        problem = await mail_domain_problem(ports, name, domain_shown)
        if problem is None:
            return NO_MATCH
        return _hit(problem[0], problem[1], shown, domain_shown)


async def mail_domain_problem(ports: Ports, name: str, shown: str) -> tuple[str, str] | None:
    """Why mail to ``name`` could not be answered: (condition, reason), or None when it can.

    MX records, else A/AAAA (RFC 5321 5.1 implicit MX); a null MX (RFC 7505) refuses mail.
    A temporary DNS failure raises ``CheckError``.
    """
    mx = await _ask(ports, name, "MX", shown)
    if mx.nxdomain:
        return "nxdomain", f"sender domain {shown} does not exist"
    if any(is_null_mx(r) for r in mx.records):
        return "null_mx", f"sender domain {shown} does not accept mail (null MX)"
    if mx.records:
        return None
    outcomes = await gather_eager(
        _ask(ports, name, "A", shown),
        _ask(ports, name, "AAAA", shown),
    )
    if any(isinstance(o, DnsAnswer) and o.records for o in outcomes):
        return None
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return "no_mx", f"sender domain {shown} has no MX or A record"


async def _ask(ports: Ports, name: str, rdtype: str, shown: str) -> DnsAnswer:
    try:
        return await ports.resolver.query(name, rdtype)
    except DnsTempError as exc:
        raise CheckError(
            f"sender domain {shown}: {rdtype} lookup failed: {safe_text(exc.reason)}"
        ) from None


def _hit(condition: str, reason: str, sender: str, domain: str) -> CheckResult:
    values = {"sender": sender, "domain": domain, "pattern": "", "condition": condition}
    return CheckResult(True, reason, values)


class LocalSenderCheck:
    name: ClassVar[str] = "local_sender"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.MAIL, Stage.RCPT, Stage.DATA})

    async def evaluate(self, facts: Facts, ports: Ports) -> CheckResult:
        domain = facts.sender_domain
        if not domain or facts.results.get(keys.RELAY_CLIENT) is not True:
            return NO_MATCH
        if domain not in {normalise_name(d) for d in facts.local_domains}:
            return NO_MATCH
        shown = safe_text(domain)
        return CheckResult(
            True,
            f"sender domain {shown} is local and the client may relay",
            {"sender": safe_text(facts.sender or ""), "domain": shown},
        )


def build_sender(options: Mapping[str, Any], lists: ListLookup) -> Check:
    opts = Options(options, "sender")
    patterns = compile_patterns(opts.texts("patterns", []))
    verify = opts.flag("verify", False)
    opts.done()
    if not patterns and not verify:
        raise ValueError("check 'sender' needs 'patterns' or 'verify = true'")
    return SenderCheck(patterns, verify)


def build_local_sender(options: Mapping[str, Any], lists: ListLookup) -> Check:
    Options(options, "local_sender").done()
    return LocalSenderCheck()


FACTORIES: dict[str, CheckFactory] = {
    "sender": build_sender,
    "local_sender": build_local_sender,
}
