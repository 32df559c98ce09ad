"""``rdns``: the client's reverse DNS -- no PTR record, forward-confirmed rDNS, generic names.

Owns: the PTR lookup of the client address, the forward confirmation of the PTR names (FCrDNS:
a name's A/AAAA records must include the client address), and the "generic end-user host"
heuristic (a name that embeds the client address, or carries a dynamic-pool word such as
``dyn``, ``dsl``, ``pool``, ``dhcp``). It notes what it learnt in ``facts.results``:
``rdns.names`` (tuple of PTR names, lower case), ``rdns.verified`` (bool; only once ``fcrdns``
ran) and ``rdns.generic`` (bool; only once ``generic`` ran). A later rule of the same connection
reuses them instead of asking again.
Must not touch: the reply, logs, globals; it only reads facts and the resolver port.
Trust: PTR names and forward answers are whatever the client's DNS operator chose to publish:
names are only compared and tokenised, never used as patterns; they are cleaned of control
characters before they reach ``reason`` or ``$ptr``. A temporary DNS failure is never taken for
"no PTR": it raises ``CheckError`` so the rule's ``on_error`` decides (the seed's exim denies).

Generic-name heuristic (in the spirit of Haraka's fcrdns ``is_generic_rdns`` and rspamd's
hfilter, not their code): only the host part of the name is looked at -- the name without its
last two labels (a stand-in for the registrable domain; no public suffix list here) -- so
``1-2-3-4.example.net`` has host part ``1-2-3-4``. A name is generic when

* the host part embeds the client's IPv4 address: its four octets in forward or reverse order,
  separated by ``.``, ``-`` or ``_`` (optionally zero-padded), or all four zero-padded to 12
  digits, or as 8 hex digits (``c0000201``); unless the first label says ``static``,
  ``business``, ``mail``, ``smtp``, ``mx`` or ``mta`` (as Haraka, an operator-named static or
  mail host is let through); for IPv6 the full 32-nibble form or the compressed form with ``-``
  for ``:``;
* or a token of the host part (split at dots, hyphens, underscores and digits) is a
  dynamic-pool word (``dyn``, ``dynamic``, ``dsl``, ``adsl``, ``pool``, ``dhcp``, ``cable``,
  ``ppp``, ``client``, ``dialup``, ``broadband``, ``customer`` and a few siblings, see
  ``DYNAMIC_WORDS``). ``static`` is deliberately not such a word: hosting providers name servers
  ``static.x.x.x.x...`` and static end-user ranges are still caught by the address test.

With several PTR names the client is generic only when every name considered is (the verified
ones when ``fcrdns`` is on): one proper name is enough to be a proper host.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from palisade.policy import keys
from palisade.policy.checks.dnsnames import IPAddress, normalise_name, safe_text, unmapped
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
from palisade.ports import DnsTempError

MAX_NAMES = 10  # PTR names forward-checked at most (a hostile PTR set may be large)

DYNAMIC_WORDS = frozenset(
    {
        "dyn",
        "dynamic",
        "dynip",
        "dip",
        "dsl",
        "adsl",
        "vdsl",
        "xdsl",
        "sdsl",
        "pool",
        "dhcp",
        "cable",
        "ppp",
        "pppoe",
        "client",
        "clients",
        "dialup",
        "dialin",
        "dial",
        "broadband",
        "customer",
        "customers",
        "cust",
        "cpe",
        "gprs",
        "resnet",
        "residential",
        "unassigned",
    }
)
_EXEMPT_FIRST = frozenset({"static", "business", "mail", "smtp", "mx", "mta"})
_TOKEN_SPLIT = re.compile(r"[^a-z]+")


def _host_part(name: str) -> str:
    labels = name.split(".")
    return ".".join(labels[:-2]) if len(labels) > 2 else ""


def _embeds_address(host: str, ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv4Address):
        octets = str(ip).split(".")
        for order in (octets, octets[::-1]):
            sep = r"[._-]"
            body = sep.join(f"0{{0,{3 - len(o)}}}{o}" for o in order)
            if re.search(rf"(?<![0-9]){body}(?![0-9])", host):
                return True
            padded = "".join(o.zfill(3) for o in order)
            if re.search(rf"(?<![0-9]){padded}(?![0-9])", host):
                return True
        hexed = f"{int(ip):08x}"
        return re.search(rf"(?<![0-9a-f]){hexed}(?![0-9a-f])", host) is not None
    full = ip.exploded.replace(":", "")
    dashed = ip.compressed.replace(":", "-")
    flat = host.replace("-", "").replace(".", "").replace("_", "")
    return full in flat or dashed in host


def generic_reason(name: str, ip: IPAddress) -> str | None:
    """Why ``name`` looks like a generic end-user host name for ``ip``, or None."""
    host = _host_part(normalise_name(name))
    if not host:
        return None
    tokens = [t for t in _TOKEN_SPLIT.split(host) if t]
    for token in tokens:
        if token in DYNAMIC_WORDS:
            return f"dynamic-pool word {token!r}"
    first = {t for t in _TOKEN_SPLIT.split(host.split(".")[0]) if t}
    if _embeds_address(host, unmapped(ip)) and not first & _EXEMPT_FIRST:
        return "embeds the client address"
    return None


class RdnsCheck:
    name: ClassVar[str] = "rdns"
    stages: ClassVar[frozenset[Stage]] = frozenset(
        {Stage.CONNECT, Stage.HELO, Stage.MAIL, Stage.RCPT}
    )
    uses_dns: ClassVar[bool] = True

    def __init__(self, fcrdns: bool, generic: bool) -> None:
        self.fcrdns = fcrdns
        self.generic = generic

    async def evaluate(self, facts: Facts, ports: Ports) -> CheckResult:
        ip = unmapped(facts.client_ip)
        names = await self._names(facts, ports, ip)
        if not names:
            return CheckResult(True, f"no PTR record for {ip}", {"ptr": ""})
        considered = names
        if self.fcrdns:
            verified = await self._verified(facts, ports, ip, names)
            if not verified:
                shown = safe_text(names[0])
                more = f" (nor {len(names) - 1} other name(s))" if len(names) > 1 else ""
                return CheckResult(
                    True, f"PTR name {shown}{more} does not resolve back to {ip}", {"ptr": shown}
                )
            considered = verified
        if self.generic:
            reasons = [(n, generic_reason(n, ip)) for n in considered]
            generic = all(why is not None for _, why in reasons)
            facts.results[keys.RDNS_GENERIC] = generic
            if generic:
                name, why = reasons[0]
                shown = safe_text(name)
                return CheckResult(True, f"PTR name {shown} looks generic ({why})", {"ptr": shown})
        return NO_MATCH

    @staticmethod
    async def _names(facts: Facts, ports: Ports, ip: IPAddress) -> tuple[str, ...]:
        known = facts.results.get(keys.RDNS_NAMES)
        if isinstance(known, tuple):
            return known
        try:
            answer = await ports.resolver.ptr(
                facts.client_ip_text if ip is facts.client_ip else str(ip)
            )
        except DnsTempError as exc:
            raise CheckError(f"PTR lookup for {ip} failed: {safe_text(exc.reason)}") from None
        names = _ptr_names(tuple(answer.records))
        facts.results[keys.RDNS_NAMES] = names
        return names

    async def _verified(
        self, facts: Facts, ports: Ports, ip: IPAddress, names: tuple[str, ...]
    ) -> tuple[str, ...]:
        known = facts.results.get(keys.RDNS_VERIFIED_NAMES)
        if isinstance(known, tuple):
            return known
        rdtype = "A" if ip.version == 4 else "AAAA"
        outcomes = await gather_eager(
            *(ports.resolver.query(n, rdtype) for n in names[:MAX_NAMES]),
        )
        verified: list[str] = []
        failures: list[str] = []
        for name, outcome in zip(names, outcomes, strict=False):
            if isinstance(outcome, DnsTempError):
                failures.append(f"{safe_text(name)}: {safe_text(outcome.reason)}")
            elif isinstance(outcome, BaseException):
                raise outcome
            elif any(_same_ip(record, ip) for record in outcome.records):
                verified.append(name)
        if not verified and failures:
            raise CheckError(f"forward lookup of PTR name failed: {'; '.join(failures)}")
        facts.results[keys.RDNS_VERIFIED] = bool(verified)
        facts.results[keys.RDNS_VERIFIED_NAMES] = tuple(verified)
        return tuple(verified)


@functools.lru_cache(maxsize=4096)
def _ptr_names(records: tuple[str, ...]) -> tuple[str, ...]:
    """The distinct PTR names of an answer, normalised (memoised: answers repeat)."""
    return tuple(dict.fromkeys(normalise_name(n) for n in records if n.strip(".")))


def _same_ip(record: str, ip: IPAddress) -> bool:
    try:
        return unmapped(ipaddress.ip_address(record.strip())) == ip
    except ValueError:
        return False


def build(options: Mapping[str, Any], lists: ListLookup) -> Check:
    opts = Options(options, "rdns")
    fcrdns = opts.flag("fcrdns", False)
    generic = opts.flag("generic", False)
    opts.done()
    return RdnsCheck(fcrdns, generic)


FACTORIES: dict[str, CheckFactory] = {"rdns": build}
