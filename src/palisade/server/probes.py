"""DNSBL health probes (RFC 5782 section 5), at start-up and every ``dnsbl_probe_interval``.

Owns: deciding which configured DNSBL zones are usable. A zone that does not list 127.0.0.2, or
that lists 127.0.0.1 (it would list everybody), or that answers with an error code, is disabled
with a panic-log line until a later probe passes, when it is re-enabled with a main-log line.
The probe asks the zone as configured (a Spamhaus DQS zone with its key) but every text names
the public zone only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

from palisade.obs.log import EventLog, escape
from palisade.policy.checks.dnsbl import DnsblCheck
from palisade.policy.checks.dnsbl_probe import probe_dnsbl_zone
from palisade.policy.policy import Policy
from palisade.policy.rules import Ports


def dnsbl_checks(policy: Policy) -> Iterator[DnsblCheck]:
    seen: set[int] = set()
    for rules in policy.rules.values():
        for rule in rules:
            if isinstance(rule.check, DnsblCheck) and id(rule.check) not in seen:
                seen.add(id(rule.check))
                yield rule.check


async def probe_once(policy: Policy, ports: Ports, log: EventLog) -> None:
    """Probes every zone of every dnsbl rule once and enables or disables it."""
    for check in dnsbl_checks(policy):
        for zone in check.zones:
            healthy, reason = await probe_dnsbl_zone(
                ports.resolver, zone.query, display_zone=zone.shown
            )
            if not healthy and zone.shown not in check.disabled:
                check.disabled[zone.shown] = (time.time(), zone.scrub(reason))
                log.panic(
                    f"DNSBL zone {zone.shown} disabled: failed the RFC 5782 probe: "
                    f"{escape(zone.scrub(reason))}"
                )
            elif healthy and zone.shown in check.disabled:
                del check.disabled[zone.shown]
                log.main(f"DNSBL zone {zone.shown} enabled again: {escape(zone.scrub(reason))}")


async def probe_forever(
    current: Callable[[], tuple[Policy, Ports]], log: EventLog, interval: float
) -> None:
    """Probes now and then every ``interval`` seconds, with whatever policy is current."""
    while True:
        policy, ports = current()
        try:
            await probe_once(policy, ports, log)
        except Exception as exc:  # a probe must never take the server down
            log.panic(f"DNSBL probe failed: {escape(repr(exc))}")
        await asyncio.sleep(interval)
