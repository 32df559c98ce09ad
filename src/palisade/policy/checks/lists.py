"""List checks: the client IP, HELO, sender, recipient against the operator's list files.

``ip_list`` (client IP in an IP/CIDR list), ``private_ip`` (loopback and private ranges),
``domain_list`` (a domain fact in a domain list), ``address_list`` (sender or recipient in an
address list), ``regex`` (a fact matched by a regex list or inline patterns).
``domain_list`` with ``require_alignment`` (``"spf"``, ``"dkim"`` or ``"any"``; only with
``field = "sender_domain"``) is a DATA-only check: the listed sender domain counts only when the
header From domain is authenticated by that method under DMARC alignment and shares the sender
domain's organisational domain (``dmarc.aligned``).
Whitelists are these checks with ``verb = "accept"`` or ``"accept_all"`` early in a stage.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

from palisade.policy.checks.dmarc import METHODS, aligned
from palisade.policy.checks.options import Options, current, current_ips, named_list
from palisade.policy.lists import PRIVATE_NETWORKS, ListKind, PatternSet
from palisade.policy.rules import (
    NO_MATCH,
    Check,
    CheckFactory,
    CheckResult,
    Facts,
    ListLookup,
    Ports,
    Stage,
)

ALL_STAGES = frozenset(Stage)
_FIELDS = ("helo", "sender", "sender_domain", "recipient", "recipient_domain")


def _fact(facts: Facts, field: str) -> str | None:
    value: str | None = getattr(facts, field)
    return value


class IpListCheck:
    name: ClassVar[str] = "ip_list"
    stages: ClassVar[frozenset[Stage]] = ALL_STAGES

    def __init__(self, handle: Any, list_name: str) -> None:
        self.handle = handle
        self.list_name = list_name

    async def evaluate(self, facts: Facts, ports: Ports) -> CheckResult:
        if facts.client_ip in current_ips(self.handle):
            return CheckResult(True, f"{facts.client_ip} is in {self.list_name}")
        return NO_MATCH


class PrivateIpCheck:
    name: ClassVar[str] = "private_ip"
    stages: ClassVar[frozenset[Stage]] = ALL_STAGES

    async def evaluate(self, facts: Facts, ports: Ports) -> CheckResult:
        if facts.client_ip in PRIVATE_NETWORKS:
            return CheckResult(True, f"{facts.client_ip} is a private or loopback address")
        return NO_MATCH


class _Membership:
    """A fact (``field``) looked up in a named domain or address list."""

    stages: ClassVar[frozenset[Stage]] = ALL_STAGES

    def __init__(self, handle: Any, list_name: str, field: str) -> None:
        self.handle, self.list_name, self.field = handle, list_name, field

    async def evaluate(self, facts: Facts, ports: Ports) -> CheckResult:
        value = _fact(facts, self.field)
        if value and current(self.handle).matches(value):  # type: ignore[union-attr]
            return CheckResult(True, f"{self.field} {value} is in {self.list_name}")
        return NO_MATCH


class DomainListCheck(_Membership):
    name: ClassVar[str] = "domain_list"


class AlignedDomainListCheck(DomainListCheck):
    """A sender-domain whitelist that only trusts an authenticated header From domain."""

    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.DATA})

    def __init__(self, handle: Any, list_name: str, field: str, method: str) -> None:
        super().__init__(handle, list_name, field)
        self.method = method

    async def evaluate(self, facts: Facts, ports: Ports) -> CheckResult:
        found = await super().evaluate(facts, ports)
        if not found.matched:
            return found
        if not await aligned(facts, ports, self.method, _fact(facts, self.field)):
            return NO_MATCH
        return CheckResult(True, f"{found.reason}, {self.method}-aligned")


class AddressListCheck(_Membership):
    name: ClassVar[str] = "address_list"


class RegexCheck:
    name: ClassVar[str] = "regex"
    stages: ClassVar[frozenset[Stage]] = ALL_STAGES

    def __init__(self, handle: Any, inline: PatternSet, field: str) -> None:
        self.handle, self.inline, self.field = handle, inline, field

    async def evaluate(self, facts: Facts, ports: Ports) -> CheckResult:
        value = _fact(facts, self.field)
        sets = [self.inline] + ([current(self.handle)] if self.handle is not None else [])
        for patterns in sets:
            hit = patterns.search(value)  # type: ignore[union-attr]
            if hit is not None:
                return CheckResult(
                    True, f"{self.field} matches /{hit.pattern}/", {"pattern": hit.pattern}
                )
        return NO_MATCH


def _field(opts: Options, allowed: tuple[str, ...] = _FIELDS) -> str:
    field = opts.text("field")
    if field not in allowed:
        raise ValueError(f"option 'field': expected one of {', '.join(allowed)}, got {field!r}")
    return str(field)


def build_ip_list(options: Mapping[str, Any], lists: ListLookup) -> Check:
    opts = Options(options, "ip_list")
    handle, name = named_list(opts, lists, ListKind.IP)
    opts.done()
    return IpListCheck(handle, name)


def build_private_ip(options: Mapping[str, Any], lists: ListLookup) -> Check:
    Options(options, "private_ip").done()
    return PrivateIpCheck()


def build_domain_list(options: Mapping[str, Any], lists: ListLookup) -> Check:
    opts = Options(options, "domain_list")
    handle, name = named_list(opts, lists, ListKind.DOMAIN)
    field = _field(opts, ("helo", "sender_domain", "recipient_domain"))
    method = opts.text("require_alignment", None)
    opts.done()
    if method is None:
        return DomainListCheck(handle, name, field)
    if method not in METHODS:
        raise ValueError(f"option 'require_alignment': expected spf, dkim or any, got {method!r}")
    if field != "sender_domain":
        raise ValueError("option 'require_alignment' needs field = \"sender_domain\"")
    return AlignedDomainListCheck(handle, name, field, method)


def build_address_list(options: Mapping[str, Any], lists: ListLookup) -> Check:
    opts = Options(options, "address_list")
    handle, name = named_list(opts, lists, ListKind.ADDRESS)
    field = _field(opts, ("sender", "recipient"))
    opts.done()
    return AddressListCheck(handle, name, field)


def build_regex(options: Mapping[str, Any], lists: ListLookup) -> Check:
    opts = Options(options, "regex")
    field = _field(opts)
    patterns = []
    for text in opts.texts("patterns", []):
        try:
            patterns.append(re.compile(text, re.IGNORECASE))
        except re.error as exc:
            raise ValueError(f"option 'patterns': bad regular expression {text!r}: {exc}") from None
    handle = None
    if "list" in options:
        handle, _ = named_list(opts, lists, ListKind.REGEX)
    if not patterns and handle is None:
        raise ValueError("check 'regex' needs 'patterns' or 'list'")
    opts.done()
    return RegexCheck(handle, PatternSet(tuple(patterns)), field)


FACTORIES: dict[str, CheckFactory] = {
    "ip_list": build_ip_list,
    "private_ip": build_private_ip,
    "domain_list": build_domain_list,
    "address_list": build_address_list,
    "regex": build_regex,
}
