"""``header_sender``: the message names a sender that can be verified (exim's
``verify = header_sender``, the seed's header-sender check).

Matched (the verb applies) when:

* the message has no From: header, or more than one (RFC 5322 section 3.6 requires exactly
  one) — condition ``no_from`` / ``several_from``; or
* none of the addresses in Sender:, Reply-To: and From: is verifiable — condition
  ``unverifiable``. An address is verifiable when its syntax is ``local@domain`` with a host
  name as domain and the domain can receive mail (MX, else A/AAAA; no null MX), the test of
  the ``sender`` check's ``verify``.

Exceptions (the seed's ``sender_local_deny_exceptions`` and ``host_local_deny_exceptions``):
``except_sender_domains`` names a domain list; when the envelope sender's domain is in it the
check does not match; ``except_hosts`` names an IP list of clients the check skips.

A temporary DNS failure that leaves no address verified raises ``CheckError`` (the rule's
``on_error``, by default 451). At most ``max_addresses`` (default 10) addresses are looked up.

Must not touch: the reply, logs, globals.
Trust: header values are client text, parsed with the standard library's address parser and
only placed into DNS questions after the domain passed the host-name test; shown cleaned.
Values: ``$condition``, ``$addresses`` (what was tried, cleaned).
"""

from __future__ import annotations

from collections.abc import Mapping
from email.utils import getaddresses
from typing import Any, ClassVar

from palisade.policy.checks.dnsnames import is_hostname, normalise_name, safe_text
from palisade.policy.checks.options import Options, current, current_ips, named_list
from palisade.policy.checks.sender import mail_domain_problem
from palisade.policy.lists import DomainSet, ListKind
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

SENDER_FIELDS = ("Sender", "Reply-To", "From")


def header_addresses(facts: Facts, limit: int) -> list[str]:
    """Addresses of Sender:, Reply-To: and From:, in that order, without duplicates."""
    assert facts.message is not None
    found: list[str] = []
    for field in SENDER_FIELDS:
        for _, address in getaddresses(facts.message.get_all(field)):
            address = address.strip()
            if address and address.lower() not in (a.lower() for a in found):
                found.append(address)
            if len(found) >= limit:
                return found
    return found


def _domain(address: str) -> str | None:
    local, at, domain = address.rpartition("@")
    if not at or not local or not is_hostname(domain):
        return None
    return normalise_name(domain)


class HeaderSenderCheck:
    name: ClassVar[str] = "header_sender"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.DATA})
    uses_dns: ClassVar[bool] = True

    def __init__(self, except_domains: Any, except_hosts: Any, max_addresses: int) -> None:
        self.except_domains = except_domains
        self.except_hosts = except_hosts
        self.max_addresses = max_addresses

    async def evaluate(self, facts: Facts, ports: Ports) -> CheckResult:
        if facts.message is None:
            return NO_MATCH
        if self.except_hosts is not None and facts.client_ip in current_ips(self.except_hosts):
            return NO_MATCH
        if self.except_domains is not None:
            domains = current(self.except_domains)
            assert isinstance(domains, DomainSet)
            if domains.matches(facts.sender_domain):
                return NO_MATCH
        froms = facts.message.get_all("From")
        if len(froms) != 1:
            condition = "no_from" if not froms else "several_from"
            reason = "no From: header" if not froms else f"{len(froms)} From: headers"
            return CheckResult(True, reason, {"condition": condition, "addresses": ""})
        addresses = header_addresses(facts, self.max_addresses)
        shown = safe_text(", ".join(addresses))
        temporary: str | None = None
        for address in addresses:
            domain = _domain(address)
            if domain is None:
                continue
            try:
                if await mail_domain_problem(ports, domain, safe_text(domain)) is None:
                    return NO_MATCH
            except CheckError as exc:
                temporary = str(exc)
        if temporary is not None:
            raise CheckError(f"header sender: {temporary}")
        return CheckResult(
            True,
            f"no verifiable sender address in the headers ({shown or 'none'})",
            {"condition": "unverifiable", "addresses": shown},
        )


def build_header_sender(options: Mapping[str, Any], lists: ListLookup) -> Check:
    opts = Options(options, "header_sender")
    domains = hosts = None
    if "except_sender_domains" in options:
        domains, _ = named_list(opts, lists, ListKind.DOMAIN, "except_sender_domains")
    if "except_hosts" in options:
        hosts, _ = named_list(opts, lists, ListKind.IP, "except_hosts")
    limit = int(opts.number("max_addresses", 10, minimum=1))
    opts.done()
    return HeaderSenderCheck(domains, hosts, limit)


FACTORIES: dict[str, CheckFactory] = {"header_sender": build_header_sender}
