"""Which envelope senders an authenticated user may use: the ``[submission] senders`` map.

Owns: the map's text format and the ownership test, with Postfix ``smtpd_sender_login_maps``
semantics seen from the user's side. One line per user: the user name, then the addresses it
may send as and ``@domain`` entries (any address of that domain), separated by blanks or commas;
``#`` starts a comment; a user named on several lines gets all of them. Addresses and domains
compare case-insensitively. A user the map does not name may send only as its own login name
when that is an address (``alice@example.com``); without a map, the same rule applies to every
user. The null sender ``<>`` is never an authenticated user's (bounces are the server's).

Trust: the file is the operator's; a malformed entry is a ValueError naming its line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["SenderMap", "parse_senders"]

_USER_RE = re.compile(r"[^\s:#,\x00-\x1f\x7f]{1,255}")
_DOMAIN_RE = re.compile(
    r"(?=.{1,253}\Z)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
)


@dataclass(frozen=True, slots=True)
class SenderMap:
    """user -> the addresses and domains it may send as (all lower-cased)."""

    addresses: dict[str, frozenset[str]] = field(default_factory=dict)
    domains: dict[str, frozenset[str]] = field(default_factory=dict)

    def owns(self, user: str, sender: str | None) -> bool:
        """Whether ``user`` may use the envelope sender ``sender`` (None or "": ``<>``)."""
        if not sender:
            return False
        address = sender.lower()
        if address == user.lower() and "@" in address:
            return True
        if address in self.addresses.get(user, ()):
            return True
        domain = address.rpartition("@")[2]
        return bool(domain) and domain in self.domains.get(user, ())


def parse_senders(text: str) -> SenderMap:
    """The map a senders file describes; ValueError ("line N: ...") for a malformed entry."""
    addresses: dict[str, set[str]] = {}
    domains: dict[str, set[str]] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].replace(",", " ").split()
        if not line:
            continue
        user, entries = line[0], line[1:]
        if not _USER_RE.fullmatch(user):
            raise ValueError(f"line {number}: expected a user name first, got {user[:60]!r}")
        if not entries:
            raise ValueError(f"line {number}: user {user!r} has no address or @domain")
        for entry in entries:
            entry = entry.lower()
            local, at, domain = entry.rpartition("@")
            if not at or not _DOMAIN_RE.fullmatch(domain.rstrip(".")):
                raise ValueError(
                    f"line {number}: expected an address or @domain, got {entry[:80]!r}"
                )
            if local:
                addresses.setdefault(user, set()).add(entry)
            else:
                domains.setdefault(user, set()).add(domain.rstrip("."))
    return SenderMap(
        {u: frozenset(a) for u, a in addresses.items()},
        {u: frozenset(d) for u, d in domains.items()},
    )
