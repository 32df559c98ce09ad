"""Where mail for a domain goes: its MX hosts in the order RFC 5321 section 5 gives.

Owns: turning a recipient domain into the list of hosts (name, addresses) to try, or a final
verdict. The MX records sorted by preference, hosts of equal preference shuffled (section 5.1:
"randomize them to spread the load"); the domain's own A/AAAA records as an implicit MX only
when it has no MX record at all (NODATA for MX); a null MX (RFC 7505: the single record
``0 .``) means the domain accepts no mail: failed at once with 5.1.10. A domain that does not
exist is failed (5.1.2); a lookup the DNS could not answer (:class:`DnsTempError`) is deferred,
never taken for "no MX". Each host's addresses: IPv4 first, then IPv6 (a host's AAAA failing
does not lose its A). A host whose address lookup fails temporarily is left out; when no host
has an address and some lookup failed temporarily, the verdict is "deferred", else "failed".
Must not touch: sockets other than the resolver's, the spool, the log.
Trust: DNS answers are remote data: an exchange name that is not a host name is skipped.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from palisade.ports import DnsTempError, Resolver

_HOST = re.compile(
    r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?)*$"
)


@dataclass(frozen=True, slots=True)
class MxHost:
    """One host to try: its name (the MX exchange, or the domain for an implicit MX), its
    preference and its addresses in the order to try them."""

    name: str
    preference: int
    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class MxVerdict:
    """The hosts to try, in order, or why there are none.

    ``outcome`` "ok" (``hosts`` not empty), "failed" or "deferred"; ``status`` the enhanced
    status code of a failure (5.1.10 null MX, 5.1.2 no such domain / no address, 4.4.3 DNS
    failure); ``reason`` the text for the log and the DSN. ``implicit``: no MX record, the
    domain's own addresses are used."""

    outcome: str
    hosts: tuple[MxHost, ...] = ()
    status: str = ""
    reason: str = ""
    implicit: bool = False


def parse_mx(record: str) -> tuple[int, str] | None:
    """``"10 mx.example.com."`` -> (10, "mx.example.com"); "." stays "" (null MX); None for
    anything else."""
    pref, _, exchange = record.strip().partition(" ")
    if not pref.isdigit():
        return None
    name = exchange.strip().lower().rstrip(".")
    if name and not _HOST.match(name):
        return None
    return int(pref), name


def order(
    records: list[tuple[int, str]], rng: random.Random | None = None
) -> list[tuple[int, str]]:
    """Sorted by preference, equal preferences in random order (RFC 5321 section 5.1)."""
    rng = rng or random.Random()
    shuffled = list(records)
    rng.shuffle(shuffled)
    return sorted(shuffled, key=lambda item: item[0])  # sort is stable: shuffles ties only


class MxResolver:
    """MX resolution over the :class:`palisade.ports.Resolver` port."""

    def __init__(self, resolver: Resolver, *, rng: random.Random | None = None) -> None:
        self.resolver = resolver
        self.rng = rng or random.Random()

    async def hosts(self, domain: str) -> MxVerdict:
        """The verdict for ``domain`` (see :class:`MxVerdict`)."""
        domain = domain.lower().rstrip(".")
        try:
            answer = await self.resolver.query(domain, "MX")
        except DnsTempError as exc:
            return MxVerdict(
                "deferred", status="4.4.3", reason=f"MX lookup for {domain} failed: {exc.reason}"
            )
        if answer.nxdomain:
            return MxVerdict("failed", status="5.1.2", reason=f"domain {domain} does not exist")
        parsed = [p for p in (parse_mx(r) for r in answer.records) if p is not None]
        if answer.records and any(name == "" for _, name in parsed):
            if len(answer.records) == 1:
                return MxVerdict(
                    "failed",
                    status="5.1.10",
                    reason=f"domain {domain} accepts no mail (null MX, RFC 7505)",
                )
            parsed = [p for p in parsed if p[1]]  # a "." among real MX records is ignored
        implicit = not answer.records
        if implicit:
            parsed = [(0, domain)]
        if not parsed:
            return MxVerdict("failed", status="5.1.2", reason=f"no usable MX record for {domain}")
        hosts: list[MxHost] = []
        temp_errors: list[str] = []
        for preference, name in order(parsed, self.rng):
            addresses, error = await self._addresses(name)
            if error:
                temp_errors.append(error)
            if addresses:
                hosts.append(MxHost(name, preference, addresses))
        if hosts:
            return MxVerdict("ok", tuple(hosts), implicit=implicit)
        if temp_errors:
            return MxVerdict("deferred", status="4.4.3", reason="; ".join(temp_errors))
        what = (
            f"domain {domain} has no MX and no address"
            if implicit
            else (f"no address for the MX hosts of {domain}")
        )
        return MxVerdict("failed", status="5.1.2", reason=what, implicit=implicit)

    async def _addresses(self, name: str) -> tuple[tuple[str, ...], str]:
        found: list[str] = []
        errors: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self.resolver.query(name, rdtype)
            except DnsTempError as exc:
                errors.append(f"{rdtype} lookup for {name} failed: {exc.reason}")
                continue
            found.extend(answer.records)
        return tuple(dict.fromkeys(found)), ("; ".join(errors) if not found else "")
