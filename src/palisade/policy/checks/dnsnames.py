"""Small, pure name helpers the DNS-based checks share (rdns, dnsbl, dbl, helo, sender).

Owns: reverse-lookup labels of an address (DNSBL query names), unwrapping IPv4-mapped IPv6
client addresses, hostname and SMTP address-literal syntax, and making remote text safe to
place in a log line, an SMTP reply or a header. These are re-implemented here (a few lines each)
because ``palisade.policy`` may not import ``palisade.adapters``.
Must not touch: the network, the facts, any verdict.
Trust: every input may come from an SMTP client or a DNS answer and is treated as data only:
nothing here compiles patterns from it or uses it as a path; functions never raise on odd text
(only ``reverse_labels`` raises ``ValueError``, and only for a non-address, a programming error).
"""

from __future__ import annotations

import functools
import ipaddress
import re

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def unmapped(ip: IPAddress) -> IPAddress:
    """The IPv4 address inside an IPv4-mapped IPv6 address (a dual-stack socket), else ``ip``."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def reverse_labels(ip: IPAddress | str) -> str:
    """``1.2.3.4`` -> ``4.3.2.1``; IPv6 -> its 32 nibbles reversed (RFC 5782 order).

    IPv4-mapped IPv6 addresses give the IPv4 labels (a dual-stack client is an IPv4 client).
    """
    if not isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
        ip = ipaddress.ip_address(ip)
    return address_labels(unmapped(ip))


@functools.lru_cache(maxsize=4096)
def address_labels(addr: IPAddress) -> str:
    """The labels of one address as it is, an IPv4-mapped one as IPv6 (RFC 5782's IPv6 test
    points are such addresses); memoised: the same clients come back."""
    if addr.version == 4:
        return ".".join(reversed(str(addr).split(".")))
    return ".".join(reversed(addr.exploded.replace(":", "")))


def normalise_name(name: str) -> str:
    """Lower case, without surrounding blanks and without the trailing dot."""
    return name.strip().lower().removesuffix(".")


def is_hostname(name: str, *, need_dot: bool = True) -> bool:
    """A syntactically valid host/domain name (``need_dot``: at least two labels).

    Labels are letters, digits, hyphens and underscores (Postfix ``valid_hostname`` accepts the
    underscore too), 1-63 octets, not starting or ending with a hyphen; at most 253 octets in
    all; the last label is not all digits, so a bare IPv4 address is not a hostname.
    """
    text = normalise_name(name)
    if not text or len(text) > 253 or not text.isascii():
        return False
    labels = text.split(".")
    if need_dot and len(labels) < 2:
        return False
    if not all(_LABEL.match(label) for label in labels):
        return False
    return not labels[-1].isdigit()


def address_literal(text: str) -> IPAddress | None:
    """The address of an SMTP address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``), else
    None. A bare address without brackets is not a literal."""
    text = text.strip()
    if len(text) < 3 or text[0] != "[" or text[-1] != "]":
        return None
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return ipaddress.IPv6Address(inner[5:])
        return ipaddress.IPv4Address(inner)
    except ValueError:
        return None


def is_ip_text(text: str) -> bool:
    """``text`` is a bare IPv4 or IPv6 address."""
    try:
        ipaddress.ip_address(text.strip())
    except ValueError:
        return False
    return True


def safe_text(text: str, limit: int = 255) -> str:
    """Remote text made fit for one log line, reply line or header: control characters (CR, LF,
    NUL...) become spaces, runs of blanks collapse, and the result is cut at ``limit``."""
    cleaned = " ".join(_CONTROL.sub(" ", text).split())
    if len(cleaned) > limit:
        cleaned = cleaned[: limit - 3] + "..."
    return cleaned


def header_text(text: str) -> str:
    """``safe_text`` for a ``CheckResult.header``: the engine fills ``$name`` placeholders in
    headers, so a ``$`` that came from the network is doubled to stay a literal ``$``."""
    return safe_text(text, 900).replace("$", "$$")
