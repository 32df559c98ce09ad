"""Operator lists: IP/CIDR sets, domain sets, address sets and regex lists, parsed from text.

Owns: the file format (one entry per line, ``#`` starts a comment, blank lines ignored) and fast
membership tests. Reading files and noticing changes is the config layer's job
(``palisade.config.lists``); this module is pure so that checks can use the sets directly.
Trust: list files are operator input; a bad line is a ValueError naming the line, never skipped
silently. Regex entries are compiled once here and matched against untrusted text only.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ListKind(enum.Enum):
    IP = "ip"  # addresses and CIDR networks, IPv4 and IPv6
    DOMAIN = "domain"  # example.org (exact) or .example.org (any subdomain)
    ADDRESS = "address"  # user@example.org, or @example.org for the whole domain
    REGEX = "regex"  # Python regular expressions, case-insensitive


def entries(text: str) -> Iterator[tuple[int, str]]:
    """(line number, entry) for every non-blank, non-comment line."""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if line:
            yield number, line


@dataclass(frozen=True)
class IpSet:
    """Networks grouped by prefix length: a lookup costs one set probe per distinct length."""

    v4: dict[int, frozenset[int]] = field(default_factory=dict)
    v6: dict[int, frozenset[int]] = field(default_factory=dict)
    size: int = 0

    @classmethod
    def of(cls, networks: Iterable[IPNetwork]) -> IpSet:
        v4: dict[int, set[int]] = {}
        v6: dict[int, set[int]] = {}
        count = 0
        for net in networks:
            table = v4 if net.version == 4 else v6
            table.setdefault(net.prefixlen, set()).add(int(net.network_address))
            count += 1
        return cls(
            {k: frozenset(v) for k, v in v4.items()},
            {k: frozenset(v) for k, v in v6.items()},
            count,
        )

    def __contains__(self, ip: object) -> bool:
        if isinstance(ip, str):
            ip = ipaddress.ip_address(ip)
        if not isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        table, bits = (self.v4, 32) if ip.version == 4 else (self.v6, 128)
        value = int(ip)
        for prefix, networks in table.items():
            if (value >> (bits - prefix) << (bits - prefix) if prefix else 0) in networks:
                return True
        return False

    def overlaps(self, net: IPNetwork) -> bool:
        """Whether any listed network shares an address with ``net`` (contains it or lies in
        it): a block of ``net`` would shut out a listed address."""
        if isinstance(net, ipaddress.IPv6Network) and net.prefixlen == 128:
            mapped = net.network_address.ipv4_mapped
            if mapped is not None:
                net = ipaddress.IPv4Network(mapped)
        table, bits = (self.v4, 32) if net.version == 4 else (self.v6, 128)
        start = int(net.network_address)
        end = int(net.broadcast_address)
        for prefix, networks in table.items():
            shift = bits - prefix
            if prefix <= net.prefixlen:  # a listed network as large or larger: contains net?
                if (start >> shift << shift if prefix else 0) in networks:
                    return True
            elif any(start <= value <= end for value in networks):  # smaller: inside net?
                return True
        return False

    def __len__(self) -> int:
        return self.size


PRIVATE_NETWORKS = IpSet.of(
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
        "100.64.0.0/10", "::1/128", "fc00::/7", "fe80::/10",
    )
)  # fmt: skip


@dataclass(frozen=True)
class DomainSet:
    exact: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()  # ".example.org": any subdomain

    def matches(self, domain: str | None) -> bool:
        if not domain:
            return False
        domain = domain.lower().rstrip(".")
        if domain in self.exact:
            return True
        return any(domain.endswith(suffix) for suffix in self.suffixes)

    def __len__(self) -> int:
        return len(self.exact) + len(self.suffixes)


@dataclass(frozen=True)
class AddressSet:
    addresses: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()  # from "@example.org" lines

    def matches(self, address: str | None) -> bool:
        if not address:
            return False
        address = address.lower()
        return address in self.addresses or address.rpartition("@")[2] in self.domains

    def __len__(self) -> int:
        return len(self.addresses) + len(self.domains)


@dataclass(frozen=True)
class PatternSet:
    patterns: tuple[re.Pattern[str], ...] = ()

    def search(self, text: str | None) -> re.Pattern[str] | None:
        """The first pattern found in ``text``, or None."""
        if text is None:
            return None
        for pattern in self.patterns:
            if pattern.search(text):
                return pattern
        return None

    def __len__(self) -> int:
        return len(self.patterns)


OperatorList = IpSet | DomainSet | AddressSet | PatternSet
_DOMAIN_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")


def parse_list(text: str, kind: ListKind) -> OperatorList:
    """Parses list text; ValueError("line N: ...") on the first bad entry."""
    if kind is ListKind.IP:
        networks = []
        for number, entry in entries(text):
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise ValueError(
                    f"line {number}: not an IP address or network: {entry!r}"
                ) from None
        return IpSet.of(networks)
    if kind is ListKind.DOMAIN:
        exact, suffixes = set(), []
        for number, entry in entries(text):
            domain = entry.lower().rstrip(".")
            wildcard = domain.startswith((".", "*."))
            bare = domain.lstrip("*").lstrip(".")
            if not _DOMAIN_RE.match(bare):
                raise ValueError(f"line {number}: not a domain name: {entry!r}")
            if wildcard:
                suffixes.append("." + bare)
            else:
                exact.add(bare)
        return DomainSet(frozenset(exact), tuple(suffixes))
    if kind is ListKind.ADDRESS:
        addresses, domains = set(), set()
        for number, entry in entries(text):
            value = entry.lower().strip("<>")
            local, at, domain = value.rpartition("@")
            if not at or not _DOMAIN_RE.match(domain):
                raise ValueError(f"line {number}: not an address or @domain: {entry!r}")
            (domains.add(domain) if not local else addresses.add(value))
        return AddressSet(frozenset(addresses), frozenset(domains))
    patterns = []
    for number, entry in entries(text):
        try:
            patterns.append(re.compile(entry, re.IGNORECASE))
        except re.error as exc:
            raise ValueError(f"line {number}: bad regular expression {entry!r}: {exc}") from None
    return PatternSet(tuple(patterns))
