"""The MX transport in process (MxDelivery) against real receiving servers on 127.0.0.2x and
the loopback DNS server: what the gateway tests cannot reach directly: MTA-STS enforce and
testing, DANE per MX host, the TLS-RPT results, the precedence of [outbound.domains], and the
per-destination concurrency limit.

Not mocks, stand-ins: the MTA-STS source, the TLSA source and the DANE matcher are the ports'
other side, built by the "sts" part of issue 15 (HTTPS fetching, DNSSEC). Here they are small
classes returning fixed policies and records, and a matcher that compares the SHA-256 of the
leaf certificate (TLSA 3 0 1): what this part must do with them is the subject."""

from __future__ import annotations

import asyncio
import hashlib
import random
import ssl
import threading
import time
from typing import Any

import pytest

from palisade.adapters.dns import DnsResolver
from palisade.delivery.mx import MxResolver
from palisade.delivery.mxdelivery import MxDelivery
from palisade.ports import DnsTempError, DomainTlsPolicy, TlsaRecord, TlsLevel, TlsResult
from tests.delivery.deliverykit import BODY, envelope
from tests.mx.conftest import MxServer, World

POLICY = ("version: STSv1", "mode: enforce", "mx: *.sts.test", "max_age: 86400")


class Policies:
    """Stands in for the MTA-STS source: a fixed policy per domain."""

    def __init__(self, **policies: DomainTlsPolicy) -> None:
        self.policies = {d.replace("_", "."): p for d, p in policies.items()}

    async def policy(self, domain: str) -> DomainTlsPolicy | None:
        return self.policies.get(domain)


class Tlsa:
    """Stands in for the TLSA source: fixed records per host (or a DNS failure)."""

    def __init__(self, records: dict[str, tuple[TlsaRecord, ...] | Exception]) -> None:
        self.records = records
        self.asked: list[tuple[str, int]] = []

    async def tlsa(self, host: str, port: int) -> tuple[TlsaRecord, ...] | None:
        self.asked.append((host, port))
        found = self.records.get(host)
        if isinstance(found, Exception):
            raise found
        return found


def leaf_sha256(records: tuple[TlsaRecord, ...], chain: list[bytes], host: str) -> bool:
    """DANE-EE(3) Cert(0) SHA2-256(1) only: enough to see that the transport passes the chain
    (``host``, the MX name, is for DANE-TA records; not needed here)."""
    digest = hashlib.sha256(chain[0]).digest()
    return any((r.usage, r.selector, r.mtype, r.data) == (3, 0, 1, digest) for r in records)


class Results:
    def __init__(self) -> None:
        self.results: list[TlsResult] = []

    def record(self, result: TlsResult) -> None:
        self.results.append(result)


def transport(world: World, **kw: Any) -> MxDelivery:
    resolver = DnsResolver([world.zones.address], timeout=1.0, retries=0)
    kw.setdefault("verify_context", ssl.create_default_context(cafile=str(world.ca_file)))
    return MxDelivery(
        resolver,
        helo_name="gw.example.org",
        port=world.port,
        mx=MxResolver(resolver, rng=random.Random(1)),
        connect_timeout=5,
        **{"command_timeout": 10, **kw},
    )


def deliver(mx: MxDelivery, *rcpts: str) -> list[Any]:
    async def run() -> list[Any]:
        try:
            return await mx.deliver(envelope("alice@example.org", rcpts), rcpts, BODY)
        finally:
            mx.close_idle()

    return asyncio.run(run())


def sts_domain(world: World) -> None:
    world.domain("sts.test", (10, "mx1.sts.test"), (20, "backup.other.test"))
    world.host("mx1.sts.test", "127.0.0.21")
    world.host("backup.other.test", "127.0.0.22")


def test_mta_sts_enforce_uses_only_matching_mx_and_verifies(world: World) -> None:
    sts_domain(world)
    good = world.mx("127.0.0.21", "mx1.sts.test")
    backup = world.mx("127.0.0.22", "backup.other.test")
    good.stop()  # the matching MX is down: the backup, not in the policy, must not be used
    sink = Results()
    policy = DomainTlsPolicy(TlsLevel.VERIFY, "mta-sts", ("*.sts.test",), policy_strings=POLICY)
    mx = transport(world, mta_sts=Policies(sts_test=policy), tls_results=sink)
    [res] = deliver(mx, "bob@sts.test")
    assert res.outcome == "deferred"  # connection refused: retry, not a TLS verdict
    assert backup.handler.messages == []
    assert [(r.mx_host, r.failure_type) for r in sink.results] == [
        ("backup.other.test", "validation-failure")
    ]
    assert sink.results[0].policy_type == "sts" and sink.results[0].policy_strings == POLICY
    good.start()
    [res] = deliver(mx, "bob@sts.test")
    assert res.outcome == "delivered", res
    assert good.handler.tls_seen == [True]
    assert (sink.results[-1].policy_type, sink.results[-1].success) == ("sts", True)


def test_mta_sts_enforce_with_a_wrong_certificate_fails(world: World) -> None:
    sts_domain(world)
    server = world.mx("127.0.0.21", "not-the-mx.sts.test")
    sink = Results()
    policy = DomainTlsPolicy(TlsLevel.VERIFY, "mta-sts", ("*.sts.test",), policy_strings=POLICY)
    mx = transport(world, mta_sts=Policies(sts_test=policy), tls_results=sink)
    [res] = deliver(mx, "bob@sts.test")
    assert (res.outcome, res.status) == ("failed", "5.7.5")
    assert res.detail.startswith("TLS verify required by MTA-STS but no MX host could provide")
    assert "certificate-host-mismatch" in res.detail
    assert server.handler.messages == []
    assert [(r.mx_host, r.failure_type) for r in sink.results] == [
        ("backup.other.test", "validation-failure"),
        ("mx1.sts.test", "certificate-host-mismatch"),
    ]


def test_mta_sts_testing_delivers_and_reports(world: World) -> None:
    sts_domain(world)
    server = world.mx("127.0.0.21", "not-the-mx.sts.test")
    sink = Results()
    policy = DomainTlsPolicy(
        TlsLevel.VERIFY, "mta-sts", ("*.sts.test",), testing=True, policy_strings=POLICY
    )
    mx = transport(world, mta_sts=Policies(sts_test=policy), tls_results=sink)
    [res] = deliver(mx, "bob@sts.test")
    assert res.outcome == "delivered", res
    assert server.handler.tls_seen == [True]  # opportunistic: encrypted, name not checked
    failures = [(r.mx_host, r.failure_type) for r in sink.results if not r.success]
    assert ("mx1.sts.test", "certificate-host-mismatch") in failures
    assert all(r.policy_type == "sts" for r in sink.results)


def test_dane_per_mx_host(world: World) -> None:
    world.domain("dane.test", (10, "mx.dane.test"))
    world.host("mx.dane.test", "127.0.0.23")
    # DANE-EE ignores the name: a certificate for another name still matches its TLSA record
    server = world.mx("127.0.0.23", "anything.example.net")
    good = (TlsaRecord(3, 0, 1, hashlib.sha256(server.leaf).digest()),)
    sink = Results()
    tlsa = Tlsa({"mx.dane.test": good})
    mx = transport(world, tlsa=tlsa, dane_match=leaf_sha256, tls_results=sink)
    [res] = deliver(mx, "bob@dane.test")
    assert res.outcome == "delivered", res
    assert tlsa.asked == [("mx.dane.test", world.port)]
    assert (sink.results[-1].policy_type, sink.results[-1].success) == ("tlsa", True)
    # a record that does not match: failed at once, never in cleartext
    tlsa.records["mx.dane.test"] = (TlsaRecord(3, 0, 1, b"\0" * 32),)
    [res] = deliver(mx, "bob@dane.test")
    assert (res.outcome, res.status) == ("failed", "5.7.5")
    assert "TLS dane required by [outbound] tls (DANE)" in res.detail
    assert "matches none of its TLSA records" in res.detail
    assert (sink.results[-1].policy_type, sink.results[-1].failure_type) == (
        "tlsa", "validation-failure",
    )  # fmt: skip
    assert len(server.handler.messages) == 1
    # a TLSA lookup that fails: deferred (a DNS failure must not downgrade DANE)
    tlsa.records["mx.dane.test"] = DnsTempError("SERVFAIL")
    [res] = deliver(mx, "bob@dane.test")
    assert res.outcome == "deferred" and "TLSA lookup for mx.dane.test failed" in res.detail
    # the operator's [outbound.domains] level wins over DANE: TLSA is not even asked
    asked = len(tlsa.asked)
    mx = transport(
        world,
        tlsa=tlsa,
        dane_match=leaf_sha256,
        domain_levels={"dane.test": TlsLevel.REQUIRE},
    )
    [res] = deliver(mx, "bob@dane.test")
    assert res.outcome == "delivered" and len(tlsa.asked) == asked


def test_no_policy_results_and_opportunistic_fallback(world: World) -> None:
    world.domain("plain.test", (10, "mx.plain.test"))
    world.host("mx.plain.test", "127.0.0.24")
    server = world.mx("127.0.0.24", tls=False)
    sink = Results()
    [res] = deliver(transport(world, tls_results=sink), "bob@plain.test")
    assert res.outcome == "delivered"  # opportunistic: cleartext when STARTTLS is not offered
    assert "X=" not in res.host and server.handler.tls_seen == [False]
    assert [(r.policy_type, r.success) for r in sink.results] == [("no-policy-found", True)]


def test_concurrency_per_destination(world: World) -> None:
    world.domain("slow.test", (10, "mx.slow.test"))
    world.host("mx.slow.test", "127.0.0.25")
    server = world.mx("127.0.0.25", "mx.slow.test")
    lock = threading.Lock()
    state = {"now": 0, "max": 0}
    original = server.handler.handle_DATA

    async def slow_data(srv: Any, session: Any, env: Any) -> str:
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        await asyncio.sleep(0.3)
        with lock:
            state["now"] -= 1
        return await original(srv, session, env)

    server.handler.handle_DATA = slow_data  # type: ignore[method-assign,assignment]

    def burst(limit: int) -> int:
        state["max"] = 0
        mx = transport(world, concurrency_per_destination=limit)

        async def run() -> None:
            sends = [
                mx.deliver(envelope("alice@example.org", (f"u{n}@slow.test",)),
                           [f"u{n}@slow.test"], BODY)
                for n in range(4)
            ]  # fmt: skip
            results = await asyncio.gather(*sends)
            assert all(r[0].outcome == "delivered" for r in results), results
            mx.close_idle()

        asyncio.run(run())
        return state["max"]

    assert burst(1) == 1
    assert burst(4) >= 2


@pytest.mark.parametrize("level", ["require", "verify"])
def test_no_cleartext_fallback_after_a_failed_handshake(world: World, level: str) -> None:
    """A server offering STARTTLS whose handshake fails: require/verify never go on in
    cleartext (opportunistic does, see nexthop's tests)."""
    world.domain("broken.test", (10, "mx.broken.test"))
    world.host("mx.broken.test", "127.0.0.26")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # no certificate: every handshake fails
    server = MxServer("127.0.0.26", world.port, context).start()
    world.servers["127.0.0.26"] = server
    mx = transport(world, default_level=TlsLevel(level), on_tls_failure="defer")
    started = time.monotonic()
    [res] = deliver(mx, "bob@broken.test")
    assert (res.outcome, res.status) == ("deferred", "4.7.5"), res
    assert "TLS negotiation failed" in res.detail
    assert server.handler.messages == []
    assert time.monotonic() - started < 10


def test_a_handshake_that_times_out_defers_and_tries_the_next_host(world: World) -> None:
    """A server that answers STARTTLS with 220 and then says nothing: not a TLS verdict (the
    message is not failed at once) but never cleartext; the next MX host gets it."""
    import socket

    listener = socket.create_server(("127.0.0.27", world.port))
    stop = threading.Event()

    def silent_after_starttls() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"220 hang.test ESMTP\r\n")
                conn.recv(1024)  # EHLO
                conn.sendall(b"250-hang.test\r\n250 STARTTLS\r\n")
                conn.recv(1024)  # STARTTLS
                conn.sendall(b"220 go ahead\r\n")
                stop.wait(5)  # the ClientHello is never answered

    thread = threading.Thread(target=silent_after_starttls, daemon=True)
    thread.start()
    try:
        world.domain("hang.test", (10, "mx1.hang.test"), (20, "mx2.hang.test"))
        world.host("mx1.hang.test", "127.0.0.27")
        world.host("mx2.hang.test", "127.0.0.28")
        mx = transport(world, default_level=TlsLevel.REQUIRE, command_timeout=1)
        [res] = deliver(mx, "bob@hang.test")
        assert res.outcome == "deferred" and res.status == "", res  # not a 5.7.x verdict
        assert "Connect call failed" in res.detail  # the last host's reason: mx2 is down
        backup = world.mx("127.0.0.28", "mx2.hang.test")
        [res] = deliver(mx, "bob@hang.test")
        assert res.outcome == "delivered" and backup.handler.tls_seen == [True]
    finally:
        stop.set()
        thread.join(timeout=10)
        listener.close()


def test_an_mx_naming_this_server_is_a_loop(world: World) -> None:
    """RFC 5321 section 5.1: this server (helo_name) and less preferred hosts are not used."""
    world.domain("loop.test", (10, "gw.example.org"), (20, "mx.loop.test"))
    world.host("gw.example.org", "127.0.0.21")
    world.host("mx.loop.test", "127.0.0.22")
    other = world.mx("127.0.0.22", "mx.loop.test")
    [res] = deliver(transport(world), "bob@loop.test")
    assert (res.outcome, res.status) == ("failed", "5.4.6")
    assert res.detail == "mail for loop.test loops back to myself (gw.example.org is its MX)"
    assert other.handler.messages == []
    world.zones.set("loop.test", "MX", ["5 mx.loop.test.", "10 gw.example.org."])
    [res] = deliver(transport(world), "bob@loop.test")
    assert res.outcome == "delivered" and len(other.handler.messages) == 1


def test_tls_failure_with_another_host_unreachable_defers(world: World) -> None:
    """``require``: mx1 refuses connections, mx2 does not offer STARTTLS. mx1 may do TLS when
    it is back, so this is a deferral, not the policy's failure; and then it is delivered."""
    world.domain("half.test", (10, "mx1.half.test"), (20, "mx2.half.test"))
    world.host("mx1.half.test", "127.0.0.23")
    world.host("mx2.half.test", "127.0.0.24")
    plain = world.mx("127.0.0.24", tls=False)
    mx = transport(world, default_level=TlsLevel.REQUIRE)
    [res] = deliver(mx, "bob@half.test")
    assert res.outcome == "deferred", res
    assert res.detail.endswith(
        "(TLS failed on mx2.half.test [127.0.0.24]: starttls-not-supported)"
    ), res.detail
    assert plain.handler.messages == []
    first = world.mx("127.0.0.23", "mx1.half.test")
    [res] = deliver(mx, "bob@half.test")
    assert res.outcome == "delivered" and first.handler.tls_seen == [True]
