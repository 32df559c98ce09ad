"""End to end: MTA-STS and DANE decide how a real gateway delivers to loopback MX hosts, and the
TLS-RPT files record what happened.

MTA-STS policies are served over real HTTPS (loopback/stsserver.py, a certificate of the test
CA, the gateway's test-only ``[outbound] mta_sts_port``); TLSA records come from the loopback
DNS server with the zone marked signed, which sets AD as a validating resolver on loopback does;
one test runs the documented set-up for real: the gateway's resolver is unbound on loopback,
validating zones signed here (loopback/unbound.py). The receiving
servers and the DSN checks are those of tests/mx (the sender's MX, example.org, gets the DSNs).
"""

from __future__ import annotations

import hashlib
import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from loopback.stsserver import StsServer, policy_text
from loopback.unbound import Unbound
from tests.conftest import GatewayProcess, wait_for
from tests.mx.conftest import MxServer, World
from tests.mx.test_mx_delivery_e2e import dsn, log_wait, submit
from tests.services import need_program

STS_DOMAINS = ("enforce.test", "onlybad.test", "wrongcert.test", "testing.test")


@pytest.fixture
def https(world: World, tmp_path: Path) -> Iterator[StsServer]:
    """The policy hosts mta-sts.<domain> of STS_DOMAINS, all on 127.0.0.1."""
    leaf = world.test_ca.issue_cert(*(f"mta-sts.{d}" for d in STS_DOMAINS))
    cert, key = tmp_path / "sts-chain.pem", tmp_path / "sts-key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    server = StsServer(cert, key).start()
    yield server
    server.stop()


def publish_policy(world: World, https: StsServer, domain: str, body: str) -> None:
    world.zones.set(f"_mta-sts.{domain}", "TXT", ["v=STSv1; id=20261202;"])
    world.host(f"mta-sts.{domain}", "127.0.0.1")
    https.set(f"mta-sts.{domain}", body)


def tls_results(gateway: GatewayProcess) -> list[dict[str, Any]]:
    directory = gateway.base / "var" / "tlsrpt"
    if not directory.is_dir():
        return []
    return [
        json.loads(line)
        for path in sorted(directory.glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def wait_results(gateway: GatewayProcess, domain: str, count: int = 1) -> list[dict[str, Any]]:
    """The TLS-RPT results of ``domain`` once there are ``count`` of them."""

    def found() -> list[dict[str, Any]] | None:
        got = [r for r in tls_results(gateway) if r["domain"] == domain]
        return got if len(got) >= count else None

    result: list[dict[str, Any]] = wait_for(found, timeout=30)
    return result


# ---------------------------------------------------------------- MTA-STS


def test_enforce_uses_only_the_listed_mx_and_fails_when_none_is(
    world: World, make_world_gateway: Any, https: StsServer
) -> None:
    # enforce.test: the preferred MX is not in the policy; the second is
    world.domain("enforce.test", (10, "mx1.enforce.test"), (20, "mx2.enforce.test"))
    world.host("mx1.enforce.test", "127.0.0.21")
    world.host("mx2.enforce.test", "127.0.0.22")
    unlisted = world.mx("127.0.0.21", "mx1.enforce.test")
    listed = world.mx("127.0.0.22", "mx2.enforce.test")
    publish_policy(world, https, "enforce.test", policy_text("enforce", "mx2.enforce.test"))
    # onlybad.test: its only MX is not in the policy
    world.domain("onlybad.test", (10, "mx.onlybad.test"))
    world.host("mx.onlybad.test", "127.0.0.23")
    stray = world.mx("127.0.0.23", "mx.onlybad.test")
    publish_policy(world, https, "onlybad.test", policy_text("enforce", "mx.elsewhere.test"))
    gateway = make_world_gateway(mta_sts_port=https.port)

    submit(world, "bob@enforce.test", "listed")
    _, rcpts, _ = listed.wait(1)[0]
    assert rcpts == ["bob@enforce.test"] and listed.handler.tls_seen == [True]
    assert unlisted.handler.messages == [] and unlisted.handler.peers == set()

    submit(world, "carl@onlybad.test", "unlisted")
    log_wait(gateway, r"\*\* carl@onlybad\.test R=dnslookup T=smtp: .*no MX host of onlybad\.test "
                      r"\(mx\.onlybad\.test\) matches its MTA-STS policy")  # fmt: skip
    human, status = dsn(world)
    assert "MTA-STS" in human and "Status: 5.7.5" in status
    assert stray.handler.messages == [] and stray.handler.peers == set()

    # the policy was fetched once per domain and kept (the file beside [paths] state)
    assert https.requests("mta-sts.enforce.test") == 1
    cache = json.loads((gateway.base / "var" / "mta-sts.json").read_text())
    assert cache["policies"]["enforce.test"]["mx"] == ["mx2.enforce.test"]
    results = tls_results(gateway)
    by_host = {(r["domain"], r["mx_host"]): r for r in results}
    assert by_host[("enforce.test", "mx1.enforce.test")]["success"] is False
    assert by_host[("enforce.test", "mx2.enforce.test")]["success"] is True
    assert by_host[("enforce.test", "mx2.enforce.test")]["policy_type"] == "sts"
    assert "mode: enforce" in by_host[("enforce.test", "mx2.enforce.test")]["policy_strings"]
    assert by_host[("onlybad.test", "mx.onlybad.test")]["failure_type"] == "validation-failure"


def test_enforce_with_a_certificate_for_another_name_fails(
    world: World, make_world_gateway: Any, https: StsServer
) -> None:
    world.domain("wrongcert.test", (10, "mx.wrongcert.test"))
    world.host("mx.wrongcert.test", "127.0.0.24")
    server = world.mx("127.0.0.24", "other.example.net")  # trusted CA, wrong name
    publish_policy(world, https, "wrongcert.test", policy_text("enforce", "mx.wrongcert.test"))
    gateway = make_world_gateway(mta_sts_port=https.port)  # [outbound] tls: opportunistic
    submit(world, "dora@wrongcert.test")
    log_wait(gateway, r"\*\* dora@wrongcert\.test R=dnslookup T=smtp: TLS verify required by "
                      r"MTA-STS .*certificate-host-mismatch")  # fmt: skip
    human, status = dsn(world)
    assert "certificate-host-mismatch" in human and "Status: 5.7.5" in status
    assert server.handler.messages == []  # never delivered, in clear or otherwise
    (result,) = wait_results(gateway, "wrongcert.test")
    assert (result["policy_type"], result["success"], result["failure_type"]) == (
        "sts",
        False,
        "certificate-host-mismatch",
    )


def test_testing_mode_delivers_and_records_the_failure(
    world: World, make_world_gateway: Any, https: StsServer
) -> None:
    world.domain("testing.test", (10, "mx.testing.test"))
    world.host("mx.testing.test", "127.0.0.25")
    server = world.mx("127.0.0.25", "other.example.net")  # would fail verify
    publish_policy(world, https, "testing.test", policy_text("testing", "mx.testing.test"))
    gateway = make_world_gateway(mta_sts_port=https.port)
    submit(world, "erin@testing.test")
    _, rcpts, _ = server.wait(1)[0]
    assert rcpts == ["erin@testing.test"]
    assert server.handler.tls_seen == [True]  # opportunistic TLS, the default level
    results = wait_results(gateway, "testing.test")
    assert any(
        r["policy_type"] == "sts"
        and r["failure_type"] == "certificate-host-mismatch"
        and "mode: testing" in r["policy_strings"]
        for r in results
    ), results
    assert "** erin@testing.test" not in gateway.mainlog()


def test_policy_host_with_a_bad_certificate_is_no_policy_and_recorded(
    world: World, make_world_gateway: Any, https: StsServer
) -> None:
    # the policy host of badsts.test answers with a certificate without its name: no policy,
    # delivery as without one, and sts-webpki-invalid for the report
    world.domain("badsts.test", (10, "mx.badsts.test"))
    world.host("mx.badsts.test", "127.0.0.26")
    server = world.mx("127.0.0.26", "other.example.net")
    publish_policy(world, https, "badsts.test", policy_text("enforce", "mx.badsts.test"))
    gateway = make_world_gateway(mta_sts_port=https.port)
    submit(world, "fay@badsts.test")
    server.wait(1)
    results = wait_results(gateway, "badsts.test")
    assert results[0]["failure_type"] == "sts-webpki-invalid"
    assert results[0]["mx_host"] == "mta-sts.badsts.test"
    assert https.requests("mta-sts.badsts.test") == 0


# ---------------------------------------------------------------- DANE


def tlsa_name(world: World, host: str) -> str:
    """Where the TLSA records of ``host`` are: ``_PORT._tcp.host`` with the port delivery uses
    (the test-only ``[outbound] port``; 25 in real life)."""
    return f"_{world.port}._tcp.{host}"


def dane_server(world: World, ip: str, *names: str) -> tuple[MxServer, str]:
    """A receiving server with a certificate of the test CA for ``names``; returns it and the
    ``3 1 1`` TLSA data of its key (SHA-256 of the SubjectPublicKeyInfo)."""
    cert = world.test_ca.issue_cert(*names)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    leaf = x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes())
    spki = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    server = MxServer(ip, world.port, context).start()
    world.servers[ip] = server
    return server, hashlib.sha256(spki).hexdigest()


def test_dane_match_delivers_over_tls(world: World, make_world_gateway: Any) -> None:
    world.domain("dane.test", (10, "mx.dane.test"))
    world.host("mx.dane.test", "127.0.0.27")
    # a certificate naming somebody else: verify would refuse it, DANE-EE does not look
    server, digest = dane_server(world, "127.0.0.27", "unrelated.example.net")
    world.zones.set(tlsa_name(world, "mx.dane.test"), "TLSA", [f"3 1 1 {digest}"])
    world.zones.sign("dane.test")
    gateway = make_world_gateway(tls="verify")
    submit(world, "gus@dane.test")
    _, rcpts, _ = server.wait(1)[0]
    assert rcpts == ["gus@dane.test"] and server.handler.tls_seen == [True]
    (result,) = wait_results(gateway, "dane.test")
    assert (result["policy_type"], result["success"], result["mx_host"]) == (
        "tlsa",
        True,
        "mx.dane.test",
    )


def test_dane_mismatch_fails_and_never_delivers(world: World, make_world_gateway: Any) -> None:
    world.domain("dane.test", (10, "mx.dane.test"))
    world.host("mx.dane.test", "127.0.0.27")
    server, _ = dane_server(world, "127.0.0.27", "mx.dane.test")
    wrong = hashlib.sha256(b"another key").hexdigest()
    world.zones.set(tlsa_name(world, "mx.dane.test"), "TLSA", [f"3 1 1 {wrong}"])
    world.zones.sign("dane.test")
    gateway = make_world_gateway()  # opportunistic by default: DANE still allows no fallback
    submit(world, "hal@dane.test")
    log_wait(gateway, r"\*\* hal@dane\.test R=dnslookup T=smtp: TLS dane required .*\(DANE\).*"
                      r"matches none of its TLSA records")  # fmt: skip
    human, status = dsn(world)
    assert "TLSA" in human and status
    assert server.handler.messages == []
    (result,) = wait_results(gateway, "dane.test")
    assert result["policy_type"] == "tlsa" and result["success"] is False


def test_dane_mismatch_with_defer_is_retried_never_sent_in_clear(
    world: World, make_world_gateway: Any
) -> None:
    world.domain("dane.test", (10, "mx.dane.test"))
    world.host("mx.dane.test", "127.0.0.27")
    server, _ = dane_server(world, "127.0.0.27", "mx.dane.test")
    world.zones.set(tlsa_name(world, "mx.dane.test"), "TLSA", ["3 1 1 " + "00" * 32])
    world.zones.sign("dane.test")
    gateway = make_world_gateway(on_tls_failure="defer")
    submit(world, "ida@dane.test")
    wait_for(lambda: gateway.mainlog().count("== ida@dane.test") >= 2, timeout=40)
    assert server.handler.messages == []
    assert "** ida@dane.test" not in gateway.mainlog()


def test_unsigned_tlsa_is_ignored(world: World, make_world_gateway: Any) -> None:
    # the same mismatching record in a zone without AD: no DANE, opportunistic delivery
    world.domain("nodane.test", (10, "mx.nodane.test"))
    world.host("mx.nodane.test", "127.0.0.28")
    server, _ = dane_server(world, "127.0.0.28", "mx.nodane.test")
    world.zones.set(tlsa_name(world, "mx.nodane.test"), "TLSA", ["3 1 1 " + "00" * 32])
    make_world_gateway()
    submit(world, "jo@nodane.test")
    server.wait(1)
    assert server.handler.tls_seen == [True]


def test_failed_tlsa_lookup_defers_never_downgrades(world: World, make_world_gateway: Any) -> None:
    # SERVFAIL is what a validating resolver answers for a zone whose signatures are wrong
    world.domain("dane.test", (10, "mx.dane.test"))
    world.host("mx.dane.test", "127.0.0.27")
    server, digest = dane_server(world, "127.0.0.27", "mx.dane.test")
    world.zones.set(tlsa_name(world, "mx.dane.test"), "TLSA", [f"3 1 1 {digest}"])
    world.zones.sign("dane.test")
    world.zones.behave(tlsa_name(world, "mx.dane.test"), "servfail")
    gateway = make_world_gateway()
    submit(world, "kim@dane.test")
    log_wait(gateway, r"== kim@dane\.test R=dnslookup T=smtp defer \(-1\): TLSA lookup for "
                      r"mx\.dane\.test failed")  # fmt: skip
    assert server.handler.messages == [] and server.handler.peers == set()
    (result,) = wait_results(gateway, "dane.test")
    assert (result["policy_type"], result["failure_type"]) == ("tlsa", "dnssec-invalid")
    # the resolver recovers: the next attempt delivers, under DANE
    world.zones.behave(tlsa_name(world, "mx.dane.test"), None)
    server.wait(1, timeout=30)
    assert server.handler.tls_seen == [True]


def test_dane_ta_matches_the_intermediate_and_checks_the_name(
    world: World, make_world_gateway: Any
) -> None:
    # 2 1 1 of an intermediate CA the server sends: the leaf must name the MX host
    intermediate = world.test_ca.create_child_ca()
    digest = hashlib.sha256(
        x509.load_pem_x509_certificate(intermediate.cert_pem.bytes())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ).hexdigest()
    servers = {}
    for domain, ip, name in (
        ("ta.test", "127.0.0.27", "mx.ta.test"),
        ("taname.test", "127.0.0.28", "somebody-else.test"),
    ):
        world.domain(domain, (10, f"mx.{domain}"))
        world.host(f"mx.{domain}", ip)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        intermediate.issue_cert(name).configure_cert(context)  # sends leaf + intermediate
        servers[domain] = MxServer(ip, world.port, context).start()
        world.servers[ip] = servers[domain]
        world.zones.set(tlsa_name(world, f"mx.{domain}"), "TLSA", [f"2 1 1 {digest}"])
        world.zones.sign(domain)
    gateway = make_world_gateway()
    submit(world, "lee@ta.test", "ta")
    _, rcpts, _ = servers["ta.test"].wait(1)[0]
    assert rcpts == ["lee@ta.test"] and servers["ta.test"].handler.tls_seen == [True]
    submit(world, "max@taname.test", "taname")
    log_wait(gateway, r"\*\* max@taname\.test R=dnslookup T=smtp: TLS dane required .*"
                      r"matches none of its TLSA records")  # fmt: skip
    assert servers["taname.test"].handler.messages == []


def test_dane_through_a_real_validating_unbound(
    world: World, make_world_gateway: Any, tmp_path: Path
) -> None:
    """The documented set-up, for real: the gateway's resolver is unbound on loopback, which
    validates realdane.test and realbad.test (signed here, their keys its trust anchors) and
    finds bogus.test's signatures wrong; example.org (the DSNs' way) comes from the loopback
    DNS server, insecure."""
    program = need_program("unbound", "unbound")
    good, digest = dane_server(world, "127.0.0.27", "unrelated.example.net")
    bad, _ = dane_server(world, "127.0.0.28", "mx.realbad.test")
    never, _ = dane_server(world, "127.0.0.26", "mx.bogus.test")

    def zone(ip: str, tlsa: str) -> dict[str, dict[str, list[str]]]:
        return {
            "@": {"MX": ["10 mx"]},
            "mx": {"A": [ip]},
            f"_{world.port}._tcp.mx": {"TLSA": [tlsa]},
        }

    zones = {
        "realdane.test": ("signed", zone("127.0.0.27", f"3 1 1 {digest}")),
        "realbad.test": ("signed", zone("127.0.0.28", "3 1 1 " + "00" * 32)),
        "bogus.test": ("bogus", zone("127.0.0.26", f"3 1 1 {digest}")),
    }
    stubs = {"example.org": world.zones.address}
    with Unbound(tmp_path / "unbound", zones, unbound=program, stubs=stubs) as unbound:
        gateway = make_world_gateway({"dns": {"nameservers": [f"127.0.0.1:{unbound.port}"]}})
        submit(world, "ned@realdane.test", "realdane")
        _, rcpts, _ = good.wait(1)[0]
        assert rcpts == ["ned@realdane.test"] and good.handler.tls_seen == [True]
        (result,) = wait_results(gateway, "realdane.test")
        assert (result["policy_type"], result["success"]) == ("tlsa", True)

        submit(world, "oda@realbad.test", "realbad")
        log_wait(gateway, r"\*\* oda@realbad\.test R=dnslookup T=smtp: TLS dane required .*"
                          r"matches none of its TLSA records")  # fmt: skip
        human, _ = dsn(world)  # the DSN found example.org's MX through unbound as well
        assert "realbad.test" in human
        assert bad.handler.messages == []

        submit(world, "pia@bogus.test", "bogus")
        log_wait(gateway, r"== pia@bogus\.test R=dnslookup T=smtp defer")
        assert never.handler.messages == [] and never.handler.peers == set()
    assert "validation failure" in unbound.log()
