"""MTA-STS policies: real HTTPS on loopback (certificates from the test CA), real DNS (the loopback
zone server), the cache in memory and in its file. No mocks.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from loopback.dnsserver import ZoneServer, start_zone_server
from loopback.stsserver import StsServer, policy_text
from palisade.adapters.dns import DnsResolver
from palisade.adapters.mta_sts import (
    MAX_AGE_LIMIT,
    MtaStsPolicies,
    PolicyError,
    parse_policy,
    parse_txt_id,
)
from palisade.ports import DomainTlsPolicy, MtaStsSource, TlsLevel, TlsResult
from tests.adapters.conftest import SettableClock

DOMAINS = ("example.test", "other.test", "slow.test")


class Results:
    """A TlsResultSink that keeps what it is given (the file sink has its own tests)."""

    def __init__(self) -> None:
        self.results: list[TlsResult] = []

    def record(self, result: TlsResult) -> None:
        self.results.append(result)

    def types(self) -> list[str | None]:
        return [r.failure_type for r in self.results]


@dataclass
class World:
    dns: ZoneServer
    https: StsServer
    ca_file: Path
    tmp: Path
    clock: SettableClock
    results: Results

    def source(self, **kw: Any) -> MtaStsPolicies:
        kw.setdefault("cache_file", self.tmp / "mta-sts.json")
        kw.setdefault("clock", self.clock)
        return MtaStsPolicies(
            DnsResolver([self.dns.address], timeout=0.5, failure_ttl=0, cache_max_ttl=0),
            ca_file=self.ca_file,
            report=self.results,
            port=self.https.port,
            **kw,
        )

    def publish(self, domain: str, ident: str, body: str) -> None:
        self.dns.set(f"_mta-sts.{domain}", "TXT", [f"v=STSv1; id={ident};"], ttl=0)
        self.https.set(f"mta-sts.{domain}", body)


@pytest.fixture
def world(test_ca: Any, tmp_path: Path) -> Iterator[World]:
    leaf = test_ca.issue_cert(*(f"mta-sts.{d}" for d in DOMAINS))
    cert, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    ca = tmp_path / "ca.pem"
    test_ca.cert_pem.write_to_path(str(ca))
    dns = start_zone_server()
    for domain in (*DOMAINS, "wrongname.test"):
        dns.add_zone(domain)
        dns.set(f"mta-sts.{domain}", "A", ["127.0.0.1"], ttl=0)
    https = StsServer(cert, key).start()
    yield World(dns, https, ca, tmp_path, SettableClock(1_800_000_000.0), Results())
    https.stop()
    dns.stop()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# ---------------------------------------------------------------- parsing


def test_txt_id() -> None:
    assert parse_txt_id(("v=STSv1; id=20261202T1;",)) == "20261202T1"
    assert parse_txt_id(("v=STSv1;id=abc", "v=spf1 -all")) == "abc"
    assert parse_txt_id(("v=STSv1; id=a;", "v=STSv1; id=b;")) is None  # two: none
    assert parse_txt_id(("v=STSv2; id=a;",)) is None
    assert parse_txt_id(("v=STSv1; id=not-alnum;",)) is None
    assert parse_txt_id(("v=STSv1; id=" + "a" * 33,)) is None
    assert parse_txt_id(()) is None


def test_policy_parsing() -> None:
    body = b"version: STSv1\r\nmode: enforce\r\nmx: MX1.Example.test\nmx: *.example.test\r\n"
    body += b"max_age: 604800\r\nfuture: ignored\r\n\r\n"
    mode, max_age, mx, lines = parse_policy(body)
    assert (mode, max_age, mx) == ("enforce", 604800, ("mx1.example.test", "*.example.test"))
    assert lines == (
        "version: STSv1",
        "mode: enforce",
        "mx: MX1.Example.test",
        "mx: *.example.test",
        "max_age: 604800",
        "future: ignored",
    )


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"mode: enforce\nmx: a.test\nmax_age: 1\n", "version"),
        (b"version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n", "version"),
        (b"version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n", "mode"),
        (b"version: STSv1\nmode: enforce\nmx: a.test\n", "max_age"),
        (b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n", "max_age"),
        (b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 12345678901\n", "max_age"),
        (b"version: STSv1\nmode: enforce\nmax_age: 10\n", "without any mx"),
        (b"version: STSv1\nmode: enforce\nmx: *.*.a.test\nmax_age: 10\n", "mx"),
        (b"version: STSv1\nmode: enforce\nmx: a..test\nmax_age: 10\n", "mx"),
        (b"version: STSv1\nthis line has no colon\n", "key: value"),
        (b"version: STSv1\nmode: enforce\xff\n", "UTF-8"),
    ],
)
def test_invalid_policies(body: bytes, why: str) -> None:
    with pytest.raises(PolicyError, match=why):
        parse_policy(body)


def test_max_age_is_cut_to_a_year_and_none_needs_no_mx() -> None:
    assert parse_policy(b"version: STSv1\nmode: none\nmax_age: 9999999999\n")[:3] == (
        "none",
        MAX_AGE_LIMIT,
        (),
    )


# ---------------------------------------------------------------- fetching


def test_satisfies_the_port(world: World) -> None:
    assert isinstance(world.source(), MtaStsSource)


def test_enforce_policy_is_verify_with_the_mx_patterns(world: World) -> None:
    body = policy_text("enforce", "mx1.example.test", "*.example.test")
    world.publish("example.test", "1", body)
    got = run(world.source(on_failure="defer").policy("Example.TEST."))
    assert got == DomainTlsPolicy(
        level=TlsLevel.VERIFY,
        source="mta-sts",
        mx_patterns=("mx1.example.test", "*.example.test"),
        testing=False,
        on_failure="defer",
        policy_strings=tuple(body.strip().split("\r\n")),
    )
    assert world.results.results == []


def test_testing_and_none(world: World) -> None:
    world.publish("example.test", "1", policy_text("testing", "mx.example.test"))
    world.publish("other.test", "1", policy_text("none"))
    source = world.source()
    testing = run(source.policy("example.test"))
    assert testing is not None and testing.testing and testing.level is TlsLevel.VERIFY
    assert run(source.policy("other.test")) is None


def test_no_txt_record_no_policy_and_no_fetch(world: World) -> None:
    world.https.set("mta-sts.example.test", policy_text("enforce", "mx.example.test"))
    assert run(world.source().policy("example.test")) is None
    assert world.https.requests("mta-sts.example.test") == 0


def test_cached_until_the_id_changes_or_max_age_runs_out(world: World) -> None:
    world.publish("example.test", "1", policy_text("enforce", "mx.example.test", max_age=3600))
    source = world.source()

    async def twice() -> None:
        await source.policy("example.test")
        await source.policy("example.test")

    run(twice())
    assert world.https.requests("mta-sts.example.test") == 1
    # a new policy with a new id is fetched at once
    world.publish("example.test", "2", policy_text("testing", "mx.example.test", max_age=3600))
    got = run(source.policy("example.test"))
    assert got is not None and got.testing
    assert world.https.requests("mta-sts.example.test") == 2
    # the same id after max_age: fetched again
    world.clock.advance(3601)
    run(source.policy("example.test"))
    assert world.https.requests("mta-sts.example.test") == 3


def test_concurrent_calls_share_one_fetch(world: World) -> None:
    world.publish("example.test", "1", policy_text("enforce", "mx.example.test"))
    world.https.set("mta-sts.example.test", policy_text("enforce", "mx.example.test"), delay=0.3)
    source = world.source()

    async def many() -> list[DomainTlsPolicy | None]:
        return list(await asyncio.gather(*(source.policy("example.test") for _ in range(10))))

    got = run(many())
    assert all(p is not None and p.mx_patterns == ("mx.example.test",) for p in got)
    assert world.https.requests("mta-sts.example.test") == 1


def test_the_file_keeps_the_cache_across_a_restart(world: World) -> None:
    world.publish("example.test", "1", policy_text("enforce", "mx.example.test"))
    run(world.source().policy("example.test"))
    saved = json.loads((world.tmp / "mta-sts.json").read_text())
    assert saved["policies"]["example.test"]["id"] == "1"
    # a new process: the policy host is now down, but the cached policy is in force (5.1)
    world.https.set("mta-sts.example.test", "", status=500)
    again = run(world.source().policy("example.test"))
    assert again is not None and again.mx_patterns == ("mx.example.test",)
    assert world.https.requests("mta-sts.example.test") == 1


def test_fetch_failure_keeps_the_cached_policy_and_is_reported(world: World) -> None:
    world.publish("example.test", "1", policy_text("enforce", "mx.example.test"))
    source = world.source()
    run(source.policy("example.test"))
    world.publish("example.test", "2", policy_text("enforce", "mx.example.test"))
    world.https.set("mta-sts.example.test", "gone", status=503)
    kept = run(source.policy("example.test"))
    assert kept is not None and not kept.testing
    assert world.results.types() == ["sts-policy-fetch-error"]
    assert "HTTP 503" in world.results.results[0].detail
    # within retry_after it is not fetched again
    run(source.policy("example.test"))
    assert world.https.requests("mta-sts.example.test") == 2
    world.clock.advance(301)
    run(source.policy("example.test"))
    assert world.https.requests("mta-sts.example.test") == 3


def test_txt_lookup_failure_uses_the_cached_policy(world: World) -> None:
    world.publish("example.test", "1", policy_text("enforce", "mx.example.test"))
    source = world.source()
    run(source.policy("example.test"))
    world.dns.behave("_mta-sts.example.test", "servfail")
    assert run(source.policy("example.test")) is not None
    world.dns.remove("_mta-sts.example.test")
    world.dns.behave("_mta-sts.example.test", None)
    assert run(source.policy("example.test")) is not None  # TXT gone: cache still valid


def test_redirect_is_not_followed(world: World) -> None:
    world.publish("example.test", "1", "")
    world.https.set(
        "mta-sts.example.test",
        "",
        status=301,
        headers={"Location": f"https://mta-sts.other.test:{world.https.port}/x"},
    )
    world.https.set("mta-sts.other.test", policy_text("enforce", "mx.other.test"))
    assert run(world.source().policy("example.test")) is None
    assert world.https.requests("mta-sts.other.test") == 0
    assert world.results.types() == ["sts-policy-fetch-error"]
    assert "not followed" in world.results.results[0].detail


@pytest.mark.parametrize(
    ("kind", "failure"),
    [
        ("content-type", "sts-policy-invalid"),
        ("too-big", "sts-policy-invalid"),
        ("garbage", "sts-policy-invalid"),
        ("404", "sts-policy-fetch-error"),
        ("no-address", "sts-policy-fetch-error"),
    ],
)
def test_bad_policies_are_no_policy_and_reported(world: World, kind: str, failure: str) -> None:
    world.publish("example.test", "1", policy_text("enforce", "mx.example.test"))
    if kind == "content-type":
        world.https.set(
            "mta-sts.example.test",
            policy_text("enforce", "mx.example.test"),
            content_type="text/html",
        )
    elif kind == "too-big":
        world.https.set(
            "mta-sts.example.test",
            policy_text("enforce", "mx.example.test") + "x: " + "y" * 70_000 + "\n",
        )
    elif kind == "garbage":
        world.https.set("mta-sts.example.test", "<html>hello</html>")
    elif kind == "404":
        world.https.set("mta-sts.example.test", "", status=404)
    else:
        world.dns.remove("mta-sts.example.test")
    assert run(world.source().policy("example.test")) is None
    assert world.results.types() == [failure]
    assert world.results.results[0].domain == "example.test"
    assert world.results.results[0].policy_type == "sts"


def test_certificate_for_another_name_is_webpki_invalid(world: World) -> None:
    # wrongname.test's policy host answers with the certificate of the other names
    world.publish("wrongname.test", "1", policy_text("enforce", "mx.wrongname.test"))
    assert run(world.source().policy("wrongname.test")) is None
    assert world.results.types() == ["sts-webpki-invalid"]
    assert world.https.requests("mta-sts.wrongname.test") == 0  # refused before any request


def test_untrusted_ca_is_webpki_invalid(world: World) -> None:
    world.publish("example.test", "1", policy_text("enforce", "mx.example.test"))
    source = MtaStsPolicies(
        DnsResolver([world.dns.address], timeout=0.5),
        report=world.results,
        port=world.https.port,
        clock=world.clock,
    )  # the system CAs only: the test CA is not among them
    assert run(source.policy("example.test")) is None
    assert world.results.types() == ["sts-webpki-invalid"]


def test_slow_server_times_out(world: World) -> None:
    world.publish("slow.test", "1", "")
    world.https.set("mta-sts.slow.test", policy_text("enforce", "mx.slow.test"), delay=2.0)
    assert run(world.source(timeout=0.5).policy("slow.test")) is None
    assert world.results.types() == ["sts-policy-fetch-error"]
    assert "within 0.5s" in world.results.results[0].detail


def test_damaged_cache_file_is_an_empty_cache(world: World) -> None:
    (world.tmp / "mta-sts.json").write_text("{not json")
    world.publish("example.test", "1", policy_text("enforce", "mx.example.test"))
    assert run(world.source().policy("example.test")) is not None
    assert json.loads((world.tmp / "mta-sts.json").read_text())["version"] == 1
