"""Protection: the addresses that incidents never block, and the firewall never drops.

Owns: the decision "is this address (or incident key) protected", from three sources: loopback
(``127.0.0.0/8`` and ``::1``, unless the operator turns it off), ``[relay] relay_from_hosts``
(and a ``[lists] relay_from_hosts`` ip list) and the connect whitelists (the ip lists that
``accept`` / ``accept_all`` connect rules read). List sources are asked for their current
contents at each question, so a list file that changes (reloaded by its handle) protects at
once. Built by ``palisade.config.feedback.build_protection``; this module knows no config.

A key is protected when any protected address lies in it: an IPv6 client is blocked by its /64
(``sqlite_state.incident_key``), so a /64 holding one relay_from_hosts address is never blocked,
whichever of its addresses misbehaved.

Must not touch: the store, logs, the firewall. Trust: addresses come from the socket, a log
line (``palisade scan``) or the operator; a malformed one raises ``ValueError``.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable
from typing import Protocol

__all__ = ["LOOPBACK", "Membership", "Protection", "network_of"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK: tuple[Network, ...] = (
    ipaddress.IPv4Network("127.0.0.0/8"),
    ipaddress.IPv6Network("::1/128"),
)


class Membership(Protocol):
    """An ip list's current contents (``policy.lists.IpSet``)."""

    def __contains__(self, ip: object) -> bool: ...

    def overlaps(self, net: Network) -> bool: ...


@functools.lru_cache(maxsize=4096)
def _parsed(text: str) -> Network:
    """``network_of`` of a text, parsed once per address seen lately (a flood repeats them)."""
    text = text.strip()
    if "/" in text:
        return ipaddress.ip_network(text, strict=False)
    return network_of(ipaddress.ip_address(text.partition("%")[0]))


def network_of(ip: str | IPAddress | Network) -> Network:
    """What a block of ``ip`` covers: an IPv4 address (IPv4-mapped IPv6 too) as a /32, any other
    IPv6 address as its /64; an incident key (``"2001:db8:1:2::/64"``) or a network as given."""
    if isinstance(ip, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return ip
    if isinstance(ip, str):
        return _parsed(ip)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ipaddress.IPv4Network(ip.ipv4_mapped)
        return ipaddress.IPv6Network((ip, 64), strict=False)
    return ipaddress.IPv4Network(ip)


class Protection:
    """Who is never blocked (see the module docstring)."""

    def __init__(
        self,
        networks: Iterable[tuple[str, Network]] = (),
        lists: Iterable[tuple[str, Callable[[], Membership]]] = (),
        *,
        loopback: bool = True,
    ) -> None:
        """``networks``: (source, network) pairs, e.g. ``("relay_from_hosts", 192.0.2.0/24)``;
        ``lists``: (source, current contents) pairs, e.g. ``("list trusted", handle.current)``;
        ``loopback``: protect 127.0.0.0/8 and ::1 (the default)."""
        static = [(source, net) for source, net in networks]
        if loopback:
            static[:0] = [("loopback", net) for net in LOOPBACK]
        self.networks: tuple[tuple[str, Network], ...] = tuple(static)
        self.lists: tuple[tuple[str, Callable[[], Membership]], ...] = tuple(lists)
        self.loopback = loopback

    def why(self, ip: str | IPAddress | Network) -> str | None:
        """The source that protects ``ip`` (its block key: see the module docstring), e.g.
        ``"loopback"``, ``"relay_from_hosts"``, ``"list trusted"``; None: not protected."""
        net = network_of(ip)
        for source, protected in self.networks:
            if protected.version == net.version and protected.overlaps(net):
                return source
        for source, current in self.lists:
            contents = current()
            if net.num_addresses == 1:
                if net.network_address in contents:
                    return source
            elif contents.overlaps(net):
                return source
        return None

    def covers(self, ip: str | IPAddress | Network) -> bool:
        """Whether ``ip`` (its block key) must never be blocked."""
        return self.why(ip) is not None


NOBODY = Protection(loopback=False)
"""Protects nothing (tests, tools that decide protection elsewhere)."""
