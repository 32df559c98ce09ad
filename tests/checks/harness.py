"""Helpers for the DNS-based check tests: facts, ports over a real ``DnsResolver`` pointed at the
loopback ``ZoneServer`` (short timeout, no retries), and running one check.

The checks under test use no state store: ``Ports.state`` is a bare placeholder object.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Mapping
from typing import Any

import pytest

from loopback.dnsserver import ZoneServer
from palisade.adapters.dns import DnsResolver
from palisade.policy.rules import Check, CheckError, CheckFactory, CheckResult, Facts, Ports
from tests.adapters.conftest import SettableClock
from tests.unused_ports import NoState


class NoLists:
    """Stands in for the ListLookup: these checks name no operator lists."""

    def get(self, name: str) -> Any:
        return None


def make_facts(ip: str = "192.0.2.1", **kw: Any) -> Facts:
    return Facts(client_ip=ipaddress.ip_address(ip), client_port=1, **kw)


def make_ports(server: ZoneServer, timeout: float = 0.3, **kw: Any) -> Ports:
    resolver = DnsResolver(
        [server.address], timeout=timeout, retries=0, clock=SettableClock(), **kw
    )
    return Ports(resolver=resolver, state=NoState(), clock=SettableClock())


def build(factories: Mapping[str, CheckFactory], name: str, **options: Any) -> Check:
    return factories[name](options, NoLists())


def run(check: Check, facts: Facts, ports: Ports) -> CheckResult:
    async def main() -> CheckResult:
        return await check.evaluate(facts, ports)

    return asyncio.run(main())


def run_error(check: Check, facts: Facts, ports: Ports) -> CheckError:
    with pytest.raises(CheckError) as info:
        run(check, facts, ports)
    return info.value
