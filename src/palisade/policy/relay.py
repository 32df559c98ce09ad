"""Relay control: which recipients a client may name. Palisade is never an open relay.

Owns: the decision, per RCPT, between a local domain (Maildir), a relay domain (next hop), a
trusted client's outbound mail, and refusal: the :class:`palisade.ports.Route` that is stored
with the recipient in the spool and that delivery follows without routing again. Kept apart
from spam policy, as Postfix keeps ``smtpd_relay_restrictions`` apart from the rest: spam rules
may be loosened, this one may not.
Refusals are permanent (550 5.7.1), never 4xx, so a relay prober learns nothing by retrying.

Trust: the address comes from the client and has only passed the SMTP grammar. Routing tricks
that older MTAs honoured are refused outright even for local domains: the percent hack
(``a%b@local``), bang paths (``b!a@local``), source routes (``@a:b@c``) and quoted local parts
that hide an ``@``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from palisade.policy.verdict import Verdict, deny
from palisade.ports import Route
from palisade.smtp.address import Address

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class RelayPolicy:
    """The operator's domains and trusted networks, normalised for fast lookups."""

    local_domains: frozenset[str]
    relay_domains: frozenset[str]
    relay_from_hosts: tuple[IPNetwork, ...]
    outbound_available: bool = False
    relay_list: Any = None  # a ``[lists] relay_from_hosts`` ip list handle (``.current()``)

    @classmethod
    def build(
        cls,
        local: Iterable[str],
        relay: Iterable[str],
        relay_from_hosts: Iterable[IPNetwork],
        outbound_available: bool = False,
        relay_list: Any = None,
    ) -> RelayPolicy:
        return cls(
            frozenset(d.lower().rstrip(".") for d in local),
            frozenset(d.lower().rstrip(".") for d in relay),
            tuple(relay_from_hosts),
            outbound_available,
            relay_list,
        )

    @property
    def postmaster_domain(self) -> str:
        """Where ``RCPT TO:<postmaster>`` goes: the alphabetically first local/relay domain."""
        return min(self.local_domains or self.relay_domains or frozenset({"localhost"}))

    def client_may_relay(self, client_ip: IPAddress) -> bool:
        if any(client_ip in net for net in self.relay_from_hosts):
            return True
        return self.relay_list is not None and client_ip in self.relay_list.current()

    def decide(
        self, address: Address, client_ip: IPAddress, *, authenticated: bool = False
    ) -> Route | Verdict:
        """A route for an acceptable recipient, or the refusal verdict. ``authenticated``: the
        client logged in (SMTP AUTH on a submission listener) and may relay like
        ``relay_from_hosts``.

        The route is decided here once: the session stores it with the recipient in the spool
        envelope and delivery follows it (:class:`palisade.ports.Route`).
        """
        trick = routing_trick(address)
        if trick is not None:
            return deny(550, "5.7.1", "Relay access denied", f"relay attempt refused: {trick}")
        domain = address.domain.lower().rstrip(".")
        if domain == "":
            return Route.LOCAL if self.local_domains else Route.RELAY
        if domain in self.local_domains:
            return Route.LOCAL
        if domain in self.relay_domains:
            return Route.RELAY
        if authenticated or self.client_may_relay(client_ip):
            if self.outbound_available:
                return Route.OUTBOUND
            return deny(
                550,
                "5.7.1",
                "Relay access denied",
                "relay refused: client may relay (relay_from_hosts or AUTH) but no next_hop is "
                'configured (nor [outbound] delivery = "mx")',
            )
        # exim's words for this refusal, which fail2ban's stock exim filter matches
        return deny(550, "5.7.1", "Relay access denied", "relay not permitted")


def routing_trick(address: Address) -> str | None:
    """Names the classic relay trick in ``address``, or None when it is a plain mailbox."""
    if address.source_route:
        return "source route"
    local = address.local_part
    if address.quoted and "@" in local:
        return "quoted local part containing @"
    if "%" in local:
        return "percent hack"
    if "!" in local:
        return "bang path"
    if "@" in local:
        return "local part containing @"
    return None
