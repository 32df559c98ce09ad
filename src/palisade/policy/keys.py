"""The typed keys of the connection's results store (``Facts.results``).

Owns: the name and value type of everything a check or the conversation notes about a
connection for later checks, the log and ``check-host``. Per-transaction findings have their
keys beside their types (``checks.spf.SPF``, ``checks.dkim.DKIM``, ``checks.dmarc.DMARC``,
``checks.authres.IPREV``, ``checks.content.SPAM`` / ``VIRUS``).
Trust: values may hold remote text (PTR names, list zones); readers escape it as usual.
"""

from __future__ import annotations

from palisade.policy.rules import Key

__all__ = [
    "ACCEPT_ALL",
    "DBL_ERRORS",
    "DBL_LISTED",
    "DNSBL_ERRORS",
    "DNSBL_LISTED",
    "DNSBL_TIMINGS",
    "HISTORY_COUNT",
    "RATELIMIT_COUNT",
    "RATELIMIT_RATE",
    "RDNS_GENERIC",
    "RDNS_NAMES",
    "RDNS_VERIFIED",
    "RDNS_VERIFIED_NAMES",
    "RELAY_CLIENT",
]

RELAY_CLIENT: Key[bool] = Key("relay_client")  # relay_from_hosts: set by the conversation
ACCEPT_ALL: Key[bool] = Key("accept_all")  # an accept_all rule ended every further check
RDNS_NAMES: Key[tuple[str, ...]] = Key("rdns.names")  # the PTR names of the client
RDNS_VERIFIED_NAMES: Key[tuple[str, ...]] = Key("rdns.verified_names")  # those that resolve back
RDNS_VERIFIED: Key[bool] = Key("rdns.verified")
RDNS_GENERIC: Key[bool] = Key("rdns.generic")  # a PTR name looks dynamic (dyn, dsl, pool...)
DNSBL_LISTED: Key[list[str]] = Key("dnsbl.listed")  # zones (public names) that list the client
DNSBL_ERRORS: Key[list[str]] = Key("dnsbl.errors")
# (public zone name, seconds, failed) per zone asked, for the metrics; the conversation takes them
DNSBL_TIMINGS: Key[list[tuple[str, float, bool]]] = Key("dnsbl.timings")
DBL_LISTED: Key[list[str]] = Key("dbl.listed")  # domain names listed
DBL_ERRORS: Key[list[str]] = Key("dbl.errors")
RATELIMIT_RATE: Key[str] = Key("ratelimit.rate")  # "11/900s"
RATELIMIT_COUNT: Key[int] = Key("ratelimit.count")
HISTORY_COUNT: Key[int] = Key("history.count")  # incidents remembered for the client
