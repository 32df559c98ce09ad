"""The incident key of a client address, shared by every state store (SQLite, Redis) and the
fall-back wrapper, so that a key written by one is the key read by the other.

Owns: the mapping only (IPv4 as is, IPv4-mapped IPv6 as IPv4, other IPv6 by its /64). Must not
touch: anything else; it imports nothing of the project.
"""

from __future__ import annotations

import ipaddress

__all__ = ["incident_key"]


def incident_key(ip: str) -> str:
    """The incident key of an address: ``"192.0.2.1"`` or ``"2001:db8:1:2::/64"``.

    IPv4-mapped IPv6 (``::ffff:192.0.2.1``) is the IPv4 address; any other IPv6 address is its
    /64 network; an IPv6 zone (``%eth0``) is ignored. A network is accepted too when it is one
    key (an IPv4 /32, an IPv6 /64; host bits are ignored), so that a key printed by ``list`` can
    be given back. Anything else raises ``ValueError``.
    """
    text = ip.strip()
    if "/" in text:
        net = ipaddress.ip_network(text, strict=False)
        if isinstance(net, ipaddress.IPv4Network) and net.prefixlen == 32:
            return str(net.network_address)
        if isinstance(net, ipaddress.IPv6Network) and net.prefixlen == 64:
            mapped = net.network_address.ipv4_mapped
            if mapped is None:
                return str(net)
        raise ValueError(f"{ip!r} is not one address, an IPv4 /32 or an IPv6 /64")
    addr = ipaddress.ip_address(text.partition("%")[0])
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)
