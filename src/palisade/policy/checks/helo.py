"""``helo``: what the client said in HELO/EHLO -- patterns, exact names, missing, syntax, "us",
resolvable.

Owns: the HELO conditions of exim/Postfix hardening recipes, any number of which one rule may
switch on; they are tried in the order missing, syntax, ours, exact, patterns, resolvable, and
the first that holds is the match (``reason`` says which, ``$condition`` names it):

* ``missing``: no HELO/EHLO was given (useful at MAIL/RCPT; at the HELO stage there is one);
* ``syntax``: the HELO is neither a hostname with at least one dot (letters, digits, ``-``,
  ``_``; see ``dnsnames.is_hostname``) nor an address literal ``[192.0.2.1]`` /
  ``[IPv6:2001:db8::1]``; a bare address without brackets is invalid (RFC 5321 4.1.3);
* ``ours``: the HELO claims to be us -- one of ``facts.our_names``, one of
  ``facts.local_domains``, or one of ``facts.our_ips`` (as a literal or a bare address) --
  unless the client address itself is one of ours;
* ``exact``: the HELO equals one of the listed names (case-insensitive, trailing dot ignored);
* ``patterns``: a regular expression (case-insensitive, ``re.search``) finds the HELO;
* ``resolvable``: the HELO name has no A and no AAAA record (Postfix
  ``reject_unknown_helo_hostname``). Address literals and bare addresses are not names: never
  matched, never looked up. A HELO that is not a valid hostname cannot have records: matched
  without a query. A temporary DNS failure of a lookup that found nothing (timeout, SERVFAIL)
  raises ``CheckError``: the rule's ``on_error`` decides (``defer`` by default).

Must not touch: the reply, logs, globals; the network only through the resolver port, and only
for ``resolvable``.
Trust: the HELO is client text: it is only compared and searched, never compiled; it is cleaned
of control characters before it reaches ``reason``. The patterns are operator input, compiled
once at build time (a bad one is a ``ValueError`` naming ``patterns``).
Values: ``$helo``, ``$pattern`` (the pattern or exact name that hit, else empty),
``$condition`` (``missing``, ``syntax``, ``ours``, ``exact``, ``pattern``, ``unresolvable``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from palisade.policy.checks.dnsnames import (
    address_literal,
    is_hostname,
    normalise_name,
    safe_text,
    unmapped,
)
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


def compile_patterns(texts: Sequence[str], option: str = "patterns") -> tuple[re.Pattern[str], ...]:
    """Operator regexes, case-insensitive; a bad one is a ValueError naming ``option``."""
    compiled = []
    for text in texts:
        try:
            compiled.append(re.compile(text, re.IGNORECASE))
        except re.error as exc:
            raise ValueError(f"option {option!r}: bad regular expression {text!r}: {exc}") from None
    return tuple(compiled)


def _claimed_ip(helo: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    literal = address_literal(helo)
    if literal is not None:
        return unmapped(literal)
    try:
        return unmapped(ipaddress.ip_address(helo.strip()))
    except ValueError:
        return None


class HeloCheck:
    name: ClassVar[str] = "helo"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.HELO, Stage.MAIL, Stage.RCPT, Stage.DATA})

    def __init__(
        self,
        patterns: tuple[re.Pattern[str], ...],
        exact: frozenset[str],
        missing: bool,
        syntax: bool,
        ours: bool,
        resolvable: bool = False,
    ) -> None:
        self.patterns = patterns
        self.exact = exact
        self.missing = missing
        self.syntax = syntax
        self.ours = ours
        self.resolvable = resolvable
        self.uses_dns = resolvable

    async def evaluate(self, facts: Facts, ports: Ports) -> CheckResult:
        helo = (facts.helo or "").strip()
        if not helo:
            if self.missing:
                return self._hit("missing", "no HELO/EHLO given", "")
            return NO_MATCH
        shown = safe_text(helo)
        if self.syntax and not is_hostname(helo) and address_literal(helo) is None:
            return self._hit("syntax", f"HELO {shown} is not a valid hostname", shown)
        if self.ours:
            why = self._claims_us(helo, facts)
            if why is not None:
                return self._hit("ours", f"HELO {shown} claims to be us ({why})", shown)
        name = normalise_name(helo)
        if name in self.exact:
            return self._hit("exact", f"HELO {shown} is refused by name", shown, name)
        for pattern in self.patterns:
            if pattern.search(helo):
                reason = f"HELO {shown} matches /{pattern.pattern}/"
                return self._hit("pattern", reason, shown, pattern.pattern)
        if self.resolvable:
            return await self._resolvable(helo, shown, ports)
        return NO_MATCH

    async def _resolvable(self, helo: str, shown: str, ports: Ports) -> CheckResult:
        if _claimed_ip(helo) is not None:
            return NO_MATCH  # an address, not a name: nothing to resolve
        name = normalise_name(helo)
        if not is_hostname(name):
            return self._hit("unresolvable", f"HELO {shown} is not a resolvable hostname", shown)
        outcomes = await gather_eager(
            ports.resolver.query(name, "A"),
            ports.resolver.query(name, "AAAA"),
        )
        if any(isinstance(o, DnsAnswer) and o.records for o in outcomes):
            return NO_MATCH
        for outcome in outcomes:
            if isinstance(outcome, DnsTempError):
                raise CheckError(
                    f"HELO {shown}: address lookup failed: {safe_text(outcome.reason)}"
                )
            if isinstance(outcome, BaseException):
                raise outcome
        return self._hit("unresolvable", f"HELO {shown} has no A or AAAA record", shown)

    @staticmethod
    def _claims_us(helo: str, facts: Facts) -> str | None:
        ours = {unmapped(ip) for ip in facts.our_ips}
        if unmapped(facts.client_ip) in ours:
            return None
        claimed = _claimed_ip(helo)
        if claimed is not None:
            return "our address" if claimed in ours else None
        name = normalise_name(helo)
        if name in {normalise_name(n) for n in facts.our_names}:
            return "our host name"
        if name in {normalise_name(d) for d in facts.local_domains}:
            return "one of our domains"
        return None

    @staticmethod
    def _hit(condition: str, reason: str, helo: str, pattern: str = "") -> CheckResult:
        return CheckResult(True, reason, {"helo": helo, "pattern": pattern, "condition": condition})


def build(options: Mapping[str, Any], lists: ListLookup) -> Check:
    opts = Options(options, "helo")
    patterns = compile_patterns(opts.texts("patterns", []))
    exact = frozenset(normalise_name(n) for n in opts.texts("exact", []))
    missing = opts.flag("missing", False)
    syntax = opts.flag("syntax", False)
    ours = opts.flag("ours", False)
    resolvable = opts.flag("resolvable", False)
    opts.done()
    if not (patterns or exact or missing or syntax or ours or resolvable):
        raise ValueError(
            "check 'helo' needs at least one of 'patterns', 'exact', 'missing', 'syntax', "
            "'ours', 'resolvable'"
        )
    return HeloCheck(patterns, exact, missing, syntax, ours, resolvable)


FACTORIES: dict[str, CheckFactory] = {"helo": build}
