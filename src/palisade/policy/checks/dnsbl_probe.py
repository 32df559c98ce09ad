"""DNSBL answer classification and the RFC 5782 section 5 zone health probe.

Owns: the meaning of an A record returned by a DNS blocklist (listed / error / bogus), the
Spamhaus error codes in 127.255.255.0/24, the query name for an address in a zone, and the probe
that tells whether a zone answers sanely through our resolver (127.0.0.2 listed, 127.0.0.1 not).

Must not touch: policy verdicts (a check decides what "listed" means for the session), logging,
configuration, the network directly (it only uses a ``palisade.ports.Resolver``). It lives
beside the ``dnsbl`` check because it is DNSBL semantics, not a client of anything; the server's
periodic probe and the start-up self-check use it.

Trust: DNSBL answers are network input. Only addresses in 127.0.0.0/8 are taken as listings;
127.255.255.0/24 are error codes (the zone refuses to answer us honestly), anything else -- a
resolver that rewrites NXDOMAIN into an advertising page, a hijacked zone -- is "bogus" and must
be treated as an error too, never as a listing. A name the resolver cannot resolve is reported
as a failed probe with the resolver's reason.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from palisade.policy.checks.dnsnames import address_labels
from palisade.ports import DnsTempError, Resolver

__all__ = [
    "REFUSED_BY_LIST",
    "SPAMHAUS_ERROR_CODES",
    "DnsblClass",
    "classify_dnsbl_answer",
    "describe_dnsbl_answer",
    "dnsbl_query_name",
    "probe_dnsbl_zone",
]

DnsblClass = Literal["listed", "error", "bogus"]

_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
_ERROR_RANGE = ipaddress.ip_network("127.255.255.0/24")

SPAMHAUS_ERROR_CODES: dict[str, str] = {
    "127.255.255.252": "Spamhaus: typo in the zone name or DQS key",
    "127.255.255.254": "Spamhaus: query via public/open resolver",
    "127.255.255.255": "Spamhaus: excessive number of queries",
}


# What a 127.255.255.x answer to a probe means for the operator, said plainly.
REFUSED_BY_LIST = "your resolver is refused by this list (public resolver or missing DQS key)"


def classify_dnsbl_answer(address: str) -> DnsblClass:
    """``listed`` for 127.0.0.0/8 except 127.255.255.0/24, ``error`` for 127.255.255.0/24,
    ``bogus`` for anything else (other addresses, IPv6, text that is not an address)."""
    try:
        addr = ipaddress.ip_address(address.strip())
    except ValueError:
        return "bogus"
    if addr.version != 4 or addr not in _LOOPBACK:
        return "bogus"
    if addr in _ERROR_RANGE:
        return "error"
    return "listed"


def describe_dnsbl_answer(address: str) -> str:
    """An operator-facing explanation of an ``error`` or ``bogus`` answer."""
    kind = classify_dnsbl_answer(address)
    if kind == "listed":
        return f"answer {address} (listed)"
    if kind == "error":
        meaning = SPAMHAUS_ERROR_CODES.get(address.strip(), "DNSBL error code")
        return f"answer {address} ({meaning})"
    return f"answer {address!r} is outside 127.0.0.0/8 (resolver or zone rewriting answers)"


def dnsbl_query_name(ip: str, zone: str) -> str:
    """The name to look up for ``ip`` in ``zone``: ``1.2.3.4``, ``zen.example`` ->
    ``4.3.2.1.zen.example``. An IPv4-mapped IPv6 client address (dual-stack socket) is looked up
    as the IPv4 address it carries. Raises ``ValueError`` if ``ip`` is not an address."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return f"{address_labels(addr)}.{_zone(zone)}"


def _zone(zone: str) -> str:
    return zone.strip().rstrip(".").lower()


async def _lookup_point(resolver: Resolver, ip: str, zone: str, shown: str) -> tuple[str, str]:
    """Looks up a test point; returns (state, detail), state one of listed / not-listed / failed.
    ``shown`` replaces ``zone`` in the detail (the zone name may contain a secret key)."""
    name = f"{address_labels(ipaddress.ip_address(ip))}.{zone}"
    try:
        answer = await resolver.query(name, "A")
    except DnsTempError as exc:
        reason = exc.reason.replace(zone, shown) if shown != zone else exc.reason
        return (
            "failed",
            f"lookup of {address_labels(ipaddress.ip_address(ip))}.{shown} failed: {reason}",
        )
    if not answer.records:
        return "not-listed", ""
    for record in answer.records:
        kind = classify_dnsbl_answer(record)
        if kind == "error":
            return "failed", f"{describe_dnsbl_answer(record)}: {REFUSED_BY_LIST}"
        if kind != "listed":
            return "failed", describe_dnsbl_answer(record)
    return "listed", ", ".join(answer.records)


async def probe_dnsbl_zone(
    resolver: Resolver, zone: str, *, ipv6: bool = False, display_zone: str | None = None
) -> tuple[bool, str]:
    """RFC 5782 section 5: the zone must list 127.0.0.2 and must not list 127.0.0.1.

    With ``ipv6`` the IPv6 test points ::FFFF:7F00:2 (listed) and ::FFFF:7F00:1 (not listed) are
    checked as well. Returns (healthy, reason). Never raises for DNS trouble. ``display_zone`` is
    the name used for the zone in the reason (e.g. ``"<key>.zen.dq.spamhaus.net"`` so that a
    Spamhaus DQS key never reaches a log).
    """
    zone = _zone(zone)
    shown = display_zone if display_zone is not None else zone
    points = [("127.0.0.2", "127.0.0.1")]
    if ipv6:
        points.append(("::ffff:7f00:2", "::ffff:7f00:1"))
    for must_list, must_not_list in points:
        state, detail = await _lookup_point(resolver, must_list, zone, shown)
        if state == "failed":
            return False, detail
        if state == "not-listed":
            return False, f"{must_list} not listed (zone dead or blocking our resolver)"
        state, detail = await _lookup_point(resolver, must_not_list, zone, shown)
        if state == "failed":
            return False, detail
        if state == "listed":
            return False, f"{must_not_list} listed (zone lists everything)"
    tested = " and ".join(f"{a} listed, {b} not" for a, b in points)
    return True, f"{shown}: {tested}"
