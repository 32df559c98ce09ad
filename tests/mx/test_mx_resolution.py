"""MX resolution (RFC 5321 section 5) against the loopback DNS server, through the real
DnsResolver: preference order, equal preferences shuffled, implicit MX only without any MX,
null MX, a domain that does not exist, and DNS failures that defer instead of meaning "no MX".
And RFC 8461's MX pattern matching."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import pytest

from loopback.dnsserver import ZoneServer, start_zone_server
from palisade.adapters.dns import DnsResolver
from palisade.delivery.mx import MxResolver, MxVerdict, parse_mx
from palisade.delivery.mxdelivery import mx_matches


@pytest.fixture
def zones() -> Iterator[ZoneServer]:
    server = start_zone_server()
    server.add_zone("dest.test")
    yield server
    server.stop()


def resolve(zones: ZoneServer, domain: str, seed: int = 0) -> MxVerdict:
    resolver = DnsResolver([zones.address], timeout=0.5, retries=0, failure_ttl=0.0)
    return asyncio.run(MxResolver(resolver, rng=random.Random(seed)).hosts(domain))


def test_preference_order_and_addresses(zones: ZoneServer) -> None:
    zones.set("dest.test", "MX", ["30 c.dest.test.", "10 a.dest.test.", "20 b.dest.test."])
    zones.set("a.dest.test", "A", ["127.0.0.21"])
    zones.set("a.dest.test", "AAAA", ["::1"])
    zones.set("b.dest.test", "A", ["127.0.0.22", "127.0.0.23"])
    zones.set("c.dest.test", "AAAA", ["::1"])
    verdict = resolve(zones, "DEST.test.")
    assert verdict.outcome == "ok" and not verdict.implicit
    assert [(h.name, h.preference) for h in verdict.hosts] == [
        ("a.dest.test", 10), ("b.dest.test", 20), ("c.dest.test", 30),
    ]  # fmt: skip
    assert verdict.hosts[0].addresses == ("127.0.0.21", "::1")  # IPv4 first
    assert verdict.hosts[1].addresses == ("127.0.0.22", "127.0.0.23")


def test_equal_preferences_are_shuffled(zones: ZoneServer) -> None:
    zones.set("dest.test", "MX", ["10 a.dest.test.", "10 b.dest.test.", "5 first.dest.test."])
    for name in ("a", "b", "first"):
        zones.set(f"{name}.dest.test", "A", ["127.0.0.21"])
    orders = {tuple(h.name for h in resolve(zones, "dest.test", seed).hosts) for seed in range(12)}
    assert orders == {
        ("first.dest.test", "a.dest.test", "b.dest.test"),
        ("first.dest.test", "b.dest.test", "a.dest.test"),
    }


def test_implicit_mx_only_without_any_mx(zones: ZoneServer) -> None:
    zones.set("dest.test", "A", ["127.0.0.25"])
    verdict = resolve(zones, "dest.test")
    assert verdict.outcome == "ok" and verdict.implicit
    assert [(h.name, h.addresses) for h in verdict.hosts] == [("dest.test", ("127.0.0.25",))]
    # with an MX whose host has no address, the domain's own A is NOT used
    zones.set("dest.test", "MX", ["10 noaddr.dest.test."])
    zones.set("noaddr.dest.test", "TXT", ["exists"])
    verdict = resolve(zones, "dest.test")
    assert (verdict.outcome, verdict.status) == ("failed", "5.1.2")
    assert verdict.reason == "no address for the MX hosts of dest.test"


def test_null_mx_and_missing_domain(zones: ZoneServer) -> None:
    zones.set("dest.test", "MX", ["0 ."])
    zones.set("dest.test", "A", ["127.0.0.25"])  # never used: a null MX says "no mail"
    verdict = resolve(zones, "dest.test")
    assert (verdict.outcome, verdict.status) == ("failed", "5.1.10")
    assert "null MX" in verdict.reason
    missing = resolve(zones, "nowhere.dest.test")
    assert (missing.outcome, missing.status) == ("failed", "5.1.2")
    assert missing.reason == "domain nowhere.dest.test does not exist"
    # a "." among real MX records is not a null MX (RFC 7505 section 3): it is skipped
    zones.set("dest.test", "MX", ["0 .", "10 a.dest.test."])
    zones.set("a.dest.test", "A", ["127.0.0.21"])
    assert [h.name for h in resolve(zones, "dest.test").hosts] == ["a.dest.test"]


def test_dns_failures_defer(zones: ZoneServer) -> None:
    zones.set("dest.test", "MX", ["10 a.dest.test.", "20 b.dest.test."])
    zones.set("a.dest.test", "A", ["127.0.0.21"])
    zones.set("b.dest.test", "A", ["127.0.0.22"])
    zones.behave("dest.test", "servfail", rdtype="MX")
    verdict = resolve(zones, "dest.test")
    assert (verdict.outcome, verdict.status) == ("deferred", "4.4.3")
    assert verdict.reason.startswith("MX lookup for dest.test failed")
    zones.behave("dest.test", None, rdtype="MX")
    zones.behave("a.dest.test", "servfail")  # one host's address lookup fails: the other goes
    assert [h.name for h in resolve(zones, "dest.test").hosts] == ["b.dest.test"]
    zones.behave("b.dest.test", "servfail")  # every host's: deferred, not failed
    verdict = resolve(zones, "dest.test")
    assert (verdict.outcome, verdict.status) == ("deferred", "4.4.3")


def test_parse_mx() -> None:
    assert parse_mx("10 MX.Example.COM.") == (10, "mx.example.com")
    assert parse_mx("0 .") == (0, "")
    assert parse_mx("x mx.example.com.") is None
    assert parse_mx("10 bad name.") is None


def test_mta_sts_mx_patterns() -> None:
    assert mx_matches("mx.example.com", "MX.example.com.")
    assert mx_matches("*.example.com", "mx1.example.com")
    assert not mx_matches("*.example.com", "a.b.example.com")
    assert not mx_matches("*.example.com", "example.com")
    assert not mx_matches("mx.example.com", "mx.example.com.evil.test")
