"""Fixtures for adapter tests: a real DNS server on loopback (see ``loopback/dnsserver.py``).

Other test folders reuse it with ``from loopback.dnsserver import start_zone_server`` (or copy the
two fixtures below into their own conftest).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from loopback.dnsserver import ZoneServer, start_zone_server


@pytest.fixture
def dns_server() -> Iterator[ZoneServer]:
    """An empty, started ZoneServer with the zone ``example.test`` (negative TTL 60)."""
    server = start_zone_server()
    server.add_zone("example.test", negative_ttl=60)
    yield server
    server.stop()


class SettableClock:
    """A clock tests move by hand; both readings advance together."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.value = start

    def now(self) -> float:
        return self.value

    def monotonic(self) -> float:
        return self.value

    def advance(self, seconds: float) -> None:
        self.value += seconds


@pytest.fixture
def clock() -> SettableClock:
    return SettableClock()
