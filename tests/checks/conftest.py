"""Fixtures for the DNS-based check tests: a real DNS server on loopback (``loopback/dnsserver.py``)
serving the zones the checks ask; helpers are in ``tests/checks/harness.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from loopback.dnsserver import ZoneServer, start_zone_server

ZONES = (
    "example.test",
    "example.net",
    "in-addr.arpa",
    "ip6.arpa",
    "zen.spamhaus.org",
    "bl.spamcop.net",
    "b.barracudacentral.org",
    "dbl.spamhaus.org",
    "dq.spamhaus.net",
)


@pytest.fixture
def dns() -> Iterator[ZoneServer]:
    """A started ZoneServer serving the zones the check tests use (negative TTL 60)."""
    server = start_zone_server()
    for apex in ZONES:
        server.add_zone(apex, negative_ttl=60)
    yield server
    server.stop()
