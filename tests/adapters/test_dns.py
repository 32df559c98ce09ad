"""DnsResolver and the DNSBL helpers against a real DNS server on loopback (no mocks).

Caching and merging are asserted by what the server received, not by the client's counters.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopback.dnsserver import ZoneServer, start_zone_server
from palisade.adapters.dns import DnsResolver
from palisade.policy.checks.dnsbl_probe import (
    classify_dnsbl_answer,
    dnsbl_query_name,
    probe_dnsbl_zone,
)
from palisade.policy.checks.dnsnames import address_labels
from palisade.ports import DnsAnswer, DnsTempError, Resolver
from tests.adapters.conftest import SettableClock

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def make(server: ZoneServer, clock: SettableClock | None = None, **kw: Any) -> DnsResolver:
    kw.setdefault("timeout", 0.5)
    return DnsResolver([server.address], clock=clock or SettableClock(), **kw)


# ---------------------------------------------------------------- record types


def test_resolver_satisfies_the_port(dns_server: ZoneServer) -> None:
    assert isinstance(make(dns_server), Resolver)


def test_a_aaaa_mx(dns_server: ZoneServer) -> None:
    dns_server.set("mx.example.test", "A", ["192.0.2.10", "192.0.2.11"])
    dns_server.set("mx.example.test", "AAAA", ["2001:db8:0:0::10"])
    dns_server.set("example.test", "MX", ["10 MX.Example.TEST.", "20 mx2.example.test."])
    resolver = make(dns_server)

    async def go() -> tuple[DnsAnswer, DnsAnswer, DnsAnswer]:
        return (
            await resolver.query("mx.example.test", "A"),
            await resolver.query("MX.example.test.", "aaaa"),
            await resolver.query("example.test", "MX"),
        )

    a, aaaa, mx = run(go())
    assert sorted(a.records) == ["192.0.2.10", "192.0.2.11"]
    assert a.ttl == 300 and not a.nxdomain and not a.nodata
    assert aaaa.records == ("2001:db8::10",)
    assert sorted(mx.records) == ["10 mx.example.test.", "20 mx2.example.test."]


def test_null_mx(dns_server: ZoneServer) -> None:
    dns_server.set("nomail.example.test", "MX", ["0 ."])
    assert run(make(dns_server).query("nomail.example.test", "MX")).records == ("0 .",)


def test_txt_multi_string_and_long(dns_server: ZoneServer) -> None:
    dns_server.set("multi.example.test", "TXT", [["v=spf1 ip4:192.0.2.0/24 ", "-all"]])
    long_text = "k=rsa; p=" + "A" * 700
    dns_server.set("long.example.test", "TXT", [long_text])  # served as three strings
    dns_server.set("latin.example.test", "TXT", [b"caf\xe9 \xff"])
    resolver = make(dns_server)
    assert run(resolver.query("multi.example.test", "TXT")).records == (
        "v=spf1 ip4:192.0.2.0/24 -all",
    )
    assert run(resolver.query("long.example.test", "TXT")).records == (long_text,)
    assert run(resolver.query("latin.example.test", "TXT")).records == ("caf\xe9 \xff",)


def test_ptr_ipv4_and_ipv6(dns_server: ZoneServer) -> None:
    dns_server.set("10.2.0.192.in-addr.arpa", "PTR", ["Mail.Example.TEST."])
    v6name = ".".join(reversed("20010db8000000000000000000000010")) + ".ip6.arpa"
    dns_server.set(v6name, "PTR", ["mx6.example.test."])
    resolver = make(dns_server)
    assert run(resolver.ptr("192.0.2.10")).records == ("mail.example.test",)
    assert run(resolver.ptr("2001:db8::10")).records == ("mx6.example.test",)
    # a dual-stack socket reports IPv4 peers as IPv4-mapped: looked up in in-addr.arpa (cached)
    assert run(resolver.ptr("::ffff:192.0.2.10")).records == ("mail.example.test",)
    assert dns_server.queries("10.2.0.192.in-addr.arpa", "PTR") == 1
    with pytest.raises(ValueError):
        run(resolver.ptr("not-an-ip"))


def test_cname_ns_and_chain(dns_server: ZoneServer) -> None:
    dns_server.set("www.example.test", "CNAME", ["Host.example.test."], ttl=50)
    dns_server.set("host.example.test", "A", ["192.0.2.20"], ttl=500)
    dns_server.set("example.test", "NS", ["NS1.example.test."])
    resolver = make(dns_server)
    a = run(resolver.query("www.example.test", "A"))
    assert a.records == ("192.0.2.20",)
    assert a.ttl == 50  # the smallest TTL along the chain
    assert run(resolver.query("www.example.test", "CNAME")).records == ("host.example.test",)
    assert run(resolver.query("example.test", "NS")).records == ("ns1.example.test",)


def test_cname_not_chased_by_server_is_chased_by_resolver(dns_server: ZoneServer) -> None:
    # the target is outside every zone the server has: it answers with the CNAME only, and the
    # resolver asks for the target itself
    dns_server.set("alias.example.test", "CNAME", ["target.other.test."], ttl=40)
    answer = run(make(dns_server).query("alias.example.test", "A"))
    assert answer.nxdomain  # target.other.test is unknown to this server
    assert answer.ttl == 40  # capped by the CNAME's TTL (the default negative TTL is 60)
    assert dns_server.queries("alias.example.test", "A") == 1
    assert dns_server.queries("target.other.test", "A") == 1


def test_cname_loop_is_a_temp_error(dns_server: ZoneServer) -> None:
    dns_server.set("loop1.example.test", "CNAME", ["loop2.example.test."])
    dns_server.set("loop2.example.test", "CNAME", ["loop1.example.test."])
    with pytest.raises(DnsTempError, match="CNAME loop"):
        run(make(dns_server).query("loop1.example.test", "A"))


# ---------------------------------------------------------------- negative answers


def test_nxdomain_vs_nodata(dns_server: ZoneServer) -> None:
    dns_server.set("host.example.test", "A", ["192.0.2.1"])
    dns_server.set("a.b.deep.example.test", "A", ["192.0.2.2"])
    resolver = make(dns_server)
    nx = run(resolver.query("missing.example.test", "A"))
    assert nx.nxdomain and nx.records == () and not nx.nodata
    assert nx.ttl == 60  # SOA minimum of the zone
    nodata = run(resolver.query("host.example.test", "MX"))
    assert not nodata.nxdomain and nodata.records == () and nodata.nodata
    ent = run(resolver.query("b.deep.example.test", "A"))  # empty non-terminal: NODATA
    assert ent.nodata


def test_invalid_names_answer_nxdomain_without_a_query(dns_server: ZoneServer) -> None:
    resolver = make(dns_server)
    for name in ["", ".", "a..b", "x" * 64 + ".example.test", "a\\.b.example.test", "a b\x00"]:
        assert run(resolver.query(name, "A")).nxdomain, name
    assert dns_server.total_queries == 0
    with pytest.raises(ValueError):
        run(resolver.query("example.test", "NOSUCHTYPE"))
    with pytest.raises(ValueError):
        run(resolver.query("example.test", "ANY"))


# ---------------------------------------------------------------- cache


def test_ttl_honoured(dns_server: ZoneServer, clock: SettableClock) -> None:
    dns_server.set("host.example.test", "A", ["192.0.2.1"], ttl=300)
    resolver = make(dns_server, clock)
    assert run(resolver.query("host.example.test", "A")).ttl == 300
    clock.advance(100.2)
    again = run(resolver.query("host.example.test", "A"))
    assert again.records == ("192.0.2.1",) and again.ttl == 200  # remaining, rounded up
    assert dns_server.queries("host.example.test", "A") == 1
    dns_server.set("host.example.test", "A", ["192.0.2.99"], ttl=300)
    clock.advance(199)
    assert run(resolver.query("host.example.test", "A")).records == ("192.0.2.1",)
    clock.advance(1)
    assert run(resolver.query("host.example.test", "A")).records == ("192.0.2.99",)
    assert dns_server.queries("host.example.test", "A") == 2
    assert resolver.stats.cache_hits == 2


def test_max_ttl_cap(dns_server: ZoneServer, clock: SettableClock) -> None:
    dns_server.set("host.example.test", "A", ["192.0.2.1"], ttl=86400)
    resolver = make(dns_server, clock, cache_max_ttl=10)
    assert run(resolver.query("host.example.test", "A")).ttl == 10
    clock.advance(9.5)
    run(resolver.query("host.example.test", "A"))
    assert dns_server.queries("host.example.test", "A") == 1
    clock.advance(1)
    run(resolver.query("host.example.test", "A"))
    assert dns_server.queries("host.example.test", "A") == 2


def test_negative_ttl_from_soa_and_cap(dns_server: ZoneServer, clock: SettableClock) -> None:
    dns_server.add_zone("neg.test", negative_ttl=600)
    resolver = make(dns_server, clock, negative_ttl_cap=30)
    assert run(resolver.query("gone.neg.test", "A")).ttl == 30
    clock.advance(29)
    run(resolver.query("gone.neg.test", "A"))
    assert dns_server.queries("gone.neg.test", "A") == 1
    clock.advance(2)
    run(resolver.query("gone.neg.test", "A"))
    assert dns_server.queries("gone.neg.test", "A") == 2


def test_no_soa_uses_default_negative_ttl(clock: SettableClock) -> None:
    with start_zone_server() as server:  # no zone at all: NXDOMAIN without SOA
        resolver = make(server, clock, negative_ttl_default=7)
        assert run(resolver.query("nothing.test", "A")) == DnsAnswer((), 7, True)


def test_ttl_zero_not_cached_unless_min_ttl(dns_server: ZoneServer, clock: SettableClock) -> None:
    dns_server.set("zero.example.test", "A", ["192.0.2.5"], ttl=0)
    plain = make(dns_server, clock)
    run(plain.query("zero.example.test", "A"))
    run(plain.query("zero.example.test", "A"))
    assert dns_server.queries("zero.example.test", "A") == 2
    floored = make(dns_server, clock, cache_min_ttl=30)
    assert run(floored.query("zero.example.test", "A")).ttl == 30
    run(floored.query("zero.example.test", "A"))
    assert dns_server.queries("zero.example.test", "A") == 3


def test_cache_is_bounded(dns_server: ZoneServer, clock: SettableClock) -> None:
    for i in range(3):
        dns_server.set(f"h{i}.example.test", "A", [f"192.0.2.{i}"])
    resolver = make(dns_server, clock, cache_size=2)

    async def go() -> None:
        for i in range(3):
            await resolver.query(f"h{i}.example.test", "A")
        await resolver.query("h2.example.test", "A")  # still cached
        await resolver.query("h0.example.test", "A")  # evicted (oldest): asked again

    run(go())
    assert resolver.cache_len() == 2
    assert dns_server.queries("h0.example.test", "A") == 2
    assert dns_server.queries("h2.example.test", "A") == 1
    assert resolver.stats.evictions >= 1


# ---------------------------------------------------------------- merging


def test_concurrent_identical_queries_are_merged(dns_server: ZoneServer) -> None:
    dns_server.set("busy.example.test", "A", ["192.0.2.7"])
    dns_server.behave("busy.example.test", "delay", delay=0.2)
    resolver = make(dns_server, timeout=2.0)

    async def go() -> list[DnsAnswer]:
        return await asyncio.gather(*(resolver.query("busy.example.test", "A") for _ in range(50)))

    answers = run(go())
    assert all(a.records == ("192.0.2.7",) for a in answers)
    assert dns_server.queries("busy.example.test", "A") == 1
    stats = resolver.stats
    assert (stats.lookups, stats.resolutions, stats.merged) == (50, 1, 49)
    assert stats.queries_sent == 1


def test_merged_failure_reaches_every_waiter(dns_server: ZoneServer) -> None:
    dns_server.behave("broken.example.test", "servfail", delay=0.1)
    resolver = make(dns_server)

    async def go() -> list[Any]:
        calls = (resolver.query("broken.example.test", "A") for _ in range(10))
        return await asyncio.gather(*calls, return_exceptions=True)

    results = run(go())
    assert all(isinstance(r, DnsTempError) for r in results)
    assert dns_server.queries("broken.example.test", "A") == 1


def test_cancelled_waiter_does_not_cancel_the_lookup(dns_server: ZoneServer) -> None:
    dns_server.set("slow.example.test", "A", ["192.0.2.8"])
    dns_server.behave("slow.example.test", "delay", delay=0.3)
    resolver = make(dns_server, timeout=2.0)

    async def go() -> DnsAnswer:
        first = asyncio.ensure_future(resolver.query("slow.example.test", "A"))
        second = asyncio.ensure_future(resolver.query("slow.example.test", "A"))
        await asyncio.sleep(0.05)
        first.cancel()
        return await second

    assert run(go()).records == ("192.0.2.8",)
    assert dns_server.queries("slow.example.test", "A") == 1


# ---------------------------------------------------------------- failures


def test_timeout_after_retries(dns_server: ZoneServer) -> None:
    dns_server.behave("blackhole.example.test", "timeout")
    resolver = make(dns_server, timeout=0.3, retries=2)
    started = time.monotonic()
    with pytest.raises(DnsTempError, match="timeout"):
        run(resolver.query("blackhole.example.test", "A"))
    assert time.monotonic() - started < 10  # generous: about 3 x 0.3 s
    assert dns_server.queries("blackhole.example.test", "A") == 3


@pytest.mark.parametrize(("behaviour", "text"), [("servfail", "SERVFAIL"), ("refused", "REFUSED")])
def test_servfail_and_refused(dns_server: ZoneServer, behaviour: str, text: str) -> None:
    dns_server.behave("bad.example.test", behaviour)
    resolver = make(dns_server, retries=3)
    with pytest.raises(DnsTempError, match=text) as info:
        run(resolver.query("bad.example.test", "MX"))
    assert "bad.example.test" in info.value.reason
    # an error rcode is not retried against the same (only) nameserver
    assert dns_server.queries("bad.example.test", "MX") == 1


def test_failure_remembered_briefly(dns_server: ZoneServer, clock: SettableClock) -> None:
    dns_server.behave("flaky.example.test", "servfail")
    resolver = make(dns_server, clock, failure_ttl=5)
    for _ in range(3):
        with pytest.raises(DnsTempError):
            run(resolver.query("flaky.example.test", "A"))
    assert dns_server.queries("flaky.example.test", "A") == 1
    dns_server.behave("flaky.example.test", None)
    dns_server.set("flaky.example.test", "A", ["192.0.2.9"])
    clock.advance(5)
    assert run(resolver.query("flaky.example.test", "A")).records == ("192.0.2.9",)
    assert dns_server.queries("flaky.example.test", "A") == 2


def test_failure_caching_can_be_disabled(dns_server: ZoneServer) -> None:
    dns_server.behave("flaky.example.test", "servfail")
    resolver = make(dns_server, failure_ttl=0)
    for _ in range(2):
        with pytest.raises(DnsTempError):
            run(resolver.query("flaky.example.test", "A"))
    assert dns_server.queries("flaky.example.test", "A") == 2


def test_garbage_answer_is_a_temp_error(dns_server: ZoneServer) -> None:
    dns_server.behave("junk.example.test", "garbage")
    resolver = make(dns_server, timeout=0.3, retries=0)
    with pytest.raises(DnsTempError):
        run(resolver.query("junk.example.test", "A"))
    assert dns_server.queries("junk.example.test", "A") == 1


def test_dead_nameserver_is_a_temp_error() -> None:
    server = start_zone_server()
    address = server.address
    server.stop()  # nothing listens there any more
    resolver = DnsResolver([address], timeout=0.3, retries=1)
    with pytest.raises(DnsTempError):
        run(resolver.query("example.test", "A"))


def test_second_nameserver_answers_when_first_is_silent(dns_server: ZoneServer) -> None:
    with start_zone_server({"host.example.test": {"A": ["192.0.2.77"]}}) as good:
        dns_server.behave("host.example.test", "timeout")
        resolver = DnsResolver([dns_server.address, good.address], timeout=0.3, retries=1)
        assert run(resolver.query("host.example.test", "A")).records == ("192.0.2.77",)
        assert dns_server.queries("host.example.test") == 1
        assert good.queries("host.example.test") == 1


# ---------------------------------------------------------------- truncation


def test_truncation_falls_back_to_tcp(dns_server: ZoneServer) -> None:
    dns_server.set("tc.example.test", "A", ["192.0.2.40", "192.0.2.41"])
    dns_server.behave("tc.example.test", "truncate")
    resolver = make(dns_server)
    assert sorted(run(resolver.query("tc.example.test", "A")).records) == [
        "192.0.2.40",
        "192.0.2.41",
    ]
    assert dns_server.transport_queries("udp") == 1
    assert dns_server.transport_queries("tcp") == 1
    assert resolver.stats.tcp_fallbacks == 1


def test_big_answer_truncated_by_size_comes_whole_over_tcp(dns_server: ZoneServer) -> None:
    records = [f"record {i} " + "x" * 200 for i in range(12)]  # > 1232 bytes
    dns_server.set("big.example.test", "TXT", records)
    answer = run(make(dns_server).query("big.example.test", "TXT"))
    assert sorted(answer.records) == sorted(records)
    assert dns_server.transport_queries("tcp") == 1


def test_truncation_without_tcp_fallback_is_a_temp_error(dns_server: ZoneServer) -> None:
    dns_server.set("tc.example.test", "A", ["192.0.2.40"])
    dns_server.behave("tc.example.test", "truncate")
    resolver = make(dns_server, use_tcp_fallback=False, retries=0)
    with pytest.raises(DnsTempError, match="truncated"):
        run(resolver.query("tc.example.test", "A"))
    assert dns_server.transport_queries("tcp") == 0


# ---------------------------------------------------------------- hostile names


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.text(max_size=300))
def test_any_name_gives_an_answer_or_a_temp_error(name: str) -> None:
    server = _shared_server()
    resolver = DnsResolver([server.address], timeout=0.5, retries=0)
    try:
        answer = run(resolver.query(name, "TXT"))
    except DnsTempError:
        return
    assert isinstance(answer, DnsAnswer)


_SHARED: list[ZoneServer] = []


def _shared_server() -> ZoneServer:
    if not _SHARED:
        server = start_zone_server()
        server.add_zone("example.test")
        _SHARED.append(server)
    return _SHARED[0]


@pytest.fixture(scope="module", autouse=True)
def _stop_shared_server() -> Any:
    yield
    while _SHARED:
        _SHARED.pop().stop()


# ---------------------------------------------------------------- helpers and DNSBL


@pytest.mark.parametrize(
    ("ip", "labels"),
    [
        ("1.2.3.4", "4.3.2.1"),
        ("192.0.2.10", "10.2.0.192"),
        (
            "2001:db8::1",
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2",
        ),
        ("::ffff:7f00:2", "2.0.0.0.0.0.f.7.f.f.f.f.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0"),
    ],
)
def test_address_labels(ip: str, labels: str) -> None:
    """The probe's labels: an IPv4-mapped address stays IPv6 (RFC 5782's IPv6 test points)."""
    assert address_labels(ipaddress.ip_address(ip)) == labels
    assert len(address_labels(ipaddress.ip_address("2001:db8::1")).split(".")) == 32


def test_dnsbl_query_name() -> None:
    assert dnsbl_query_name("192.0.2.1", "Zen.Example.") == "1.2.0.192.zen.example"
    assert dnsbl_query_name("::ffff:192.0.2.1", "zen.example") == "1.2.0.192.zen.example"


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.2", "listed"),
        ("127.0.0.4", "listed"),
        ("127.0.1.2", "listed"),
        ("127.0.0.10", "listed"),
        ("127.254.0.1", "listed"),
        ("127.255.255.252", "error"),
        ("127.255.255.254", "error"),
        ("127.255.255.255", "error"),
        ("127.255.255.0", "error"),
        ("192.0.2.1", "bogus"),
        ("10.0.0.1", "bogus"),
        ("0.0.0.0", "bogus"),
        ("::1", "bogus"),
        ("::ffff:127.0.0.2", "bogus"),
        ("not an address", "bogus"),
        ("", "bogus"),
    ],
)
def test_classify_dnsbl_answer(address: str, kind: str) -> None:
    assert classify_dnsbl_answer(address) == kind


def _dnsbl(server: ZoneServer, zone: str = "bl.test") -> None:
    server.add_zone(zone, negative_ttl=60)
    server.list_address(zone, "127.0.0.2", "127.0.0.2", txt="listed for testing")


def test_probe_healthy(dns_server: ZoneServer) -> None:
    _dnsbl(dns_server)
    ok, reason = run(probe_dnsbl_zone(make(dns_server), "bl.test"))
    assert ok, reason
    assert dns_server.queries("2.0.0.127.bl.test", "A") == 1
    assert dns_server.queries("1.0.0.127.bl.test", "A") == 1


def test_probe_dead_zone(dns_server: ZoneServer) -> None:
    dns_server.add_zone("bl.test")
    ok, reason = run(probe_dnsbl_zone(make(dns_server), "bl.test"))
    assert not ok
    assert reason == "127.0.0.2 not listed (zone dead or blocking our resolver)"


def test_probe_zone_listing_everything(dns_server: ZoneServer) -> None:
    _dnsbl(dns_server)
    dns_server.list_address("bl.test", "127.0.0.1", "127.0.0.2")
    ok, reason = run(probe_dnsbl_zone(make(dns_server), "bl.test"))
    assert not ok
    assert reason == "127.0.0.1 listed (zone lists everything)"


def test_probe_spamhaus_public_resolver_code(dns_server: ZoneServer) -> None:
    dns_server.add_zone("zen.test")
    dns_server.list_address("zen.test", "127.0.0.2", "127.255.255.254")
    ok, reason = run(probe_dnsbl_zone(make(dns_server), "zen.test"))
    assert not ok
    assert reason == (
        "answer 127.255.255.254 (Spamhaus: query via public/open resolver): "
        "your resolver is refused by this list (public resolver or missing DQS key)"
    )


def test_probe_bogus_answer(dns_server: ZoneServer) -> None:
    dns_server.add_zone("bl.test")
    dns_server.list_address("bl.test", "127.0.0.2", "198.51.100.1")  # a hijacking resolver
    ok, reason = run(probe_dnsbl_zone(make(dns_server), "bl.test"))
    assert not ok and "outside 127.0.0.0/8" in reason


def test_probe_unreachable_zone(dns_server: ZoneServer) -> None:
    _dnsbl(dns_server)
    dns_server.behave("2.0.0.127.bl.test", "servfail")
    ok, reason = run(probe_dnsbl_zone(make(dns_server), "bl.test"))
    assert not ok and "SERVFAIL" in reason and reason.startswith("lookup of 2.0.0.127.bl.test")


def test_probe_ipv6_test_points(dns_server: ZoneServer) -> None:
    _dnsbl(dns_server)
    resolver = make(dns_server)
    ok, reason = run(probe_dnsbl_zone(resolver, "bl.test", ipv6=True))
    assert not ok and reason.startswith("::ffff:7f00:2 not listed")
    dns_server.list_address("bl.test", "::ffff:7f00:2", "127.0.0.2")
    resolver.cache_clear()
    ok, reason = run(probe_dnsbl_zone(resolver, "bl.test", ipv6=True))
    assert ok, reason


def test_secret_key_never_in_reasons(dns_server: ZoneServer) -> None:
    zone = "s3cretkey.zen.dq.test"
    dns_server.add_zone(zone)
    dns_server.behave(f"2.0.0.127.{zone}", "servfail")
    resolver = make(dns_server, redact=["S3CRETKEY"])
    with pytest.raises(DnsTempError) as info:
        run(resolver.query(f"2.0.0.127.{zone}", "A"))
    assert "s3cretkey" not in info.value.reason.lower()
    assert "<redacted>.zen.dq.test" in info.value.reason
    plain = make(dns_server)  # no redaction configured: the probe still hides the zone
    ok, reason = run(probe_dnsbl_zone(plain, zone, display_zone="<key>.zen.dq.test"))
    assert not ok and "s3cretkey" not in reason and "<key>.zen.dq.test" in reason


def test_empty_nameserver_list_uses_the_system_configuration() -> None:
    servers = DnsResolver([]).nameservers
    assert servers and all(port == 53 for _, port in servers)
    with pytest.raises(ValueError):
        DnsResolver([("resolver.example", 53)])


# ---------------------------------------------------------------- DNSSEC: the AD bit (DANE)


def test_ad_bit_is_asked_for_and_copied_from_a_signed_zone(dns_server: ZoneServer) -> None:
    dns_server.add_zone("signed.test")
    dns_server.sign("signed.test")
    dns_server.set("_25._tcp.mx.signed.test", "TLSA", ["3 1 1 " + "ab" * 32])
    dns_server.set("mx.example.test", "A", ["192.0.2.10"])
    resolver = make(dns_server)
    assert resolver.trusts_ad  # the nameserver is on loopback
    tlsa = run(resolver.query("_25._tcp.mx.signed.test", "TLSA"))
    assert tlsa.authentic
    assert tlsa.records == ("3 1 1 " + "ab" * 32,)
    plain = run(resolver.query("mx.example.test", "A"))
    assert not plain.authentic  # example.test is not signed
    missing = run(resolver.query("nothing.signed.test", "TLSA"))
    assert missing.nxdomain and missing.authentic  # an authenticated denial
    assert dns_server.ad_queries == dns_server.total_queries == 3  # AD set in every query


def test_ad_bit_is_kept_in_the_cache(dns_server: ZoneServer) -> None:
    dns_server.add_zone("signed.test")
    dns_server.sign("signed.test")
    dns_server.set("mx.signed.test", "A", ["192.0.2.30"])
    resolver = make(dns_server)
    assert run(resolver.query("mx.signed.test", "A")).authentic
    assert run(resolver.query("mx.signed.test", "A")).authentic
    assert dns_server.queries("mx.signed.test", "A") == 1  # the second came from the cache


def test_cname_chain_is_authentic_only_when_every_link_is(dns_server: ZoneServer) -> None:
    dns_server.add_zone("signed.test")
    dns_server.sign("signed.test")
    dns_server.set("mx.signed.test", "A", ["192.0.2.30"])
    dns_server.set("alias.example.test", "CNAME", ["mx.signed.test."])
    dns_server.set("alias.signed.test", "CNAME", ["mx.signed.test."])
    resolver = make(dns_server)
    assert run(resolver.query("alias.signed.test", "A")).authentic
    unsigned_link = run(resolver.query("alias.example.test", "A"))
    assert unsigned_link.records == ("192.0.2.30",) and not unsigned_link.authentic


def test_ad_bit_not_believed_when_told_not_to(dns_server: ZoneServer) -> None:
    dns_server.add_zone("signed.test")
    dns_server.sign("signed.test")
    dns_server.set("mx.signed.test", "A", ["192.0.2.30"])
    resolver = make(dns_server, trust_ad=False)
    assert not resolver.trusts_ad
    assert not run(resolver.query("mx.signed.test", "A")).authentic


def test_ad_bit_not_believed_from_a_remote_resolver_by_default() -> None:
    # nothing is sent: only the decision made from the addresses is looked at
    assert not DnsResolver([("192.0.2.53", 53)]).trusts_ad
    assert not DnsResolver([("127.0.0.1", 53), ("192.0.2.53", 53)]).trusts_ad
    assert DnsResolver([("127.0.0.1", 53), ("::1", 53)]).trusts_ad
    assert DnsResolver([("192.0.2.53", 53)], trust_ad=True).trusts_ad
