"""DANE (RFC 7672): TLSA matching against real certificates, the chain read from a real TLS
connection on loopback, and the TLSA source over the real resolver and the loopback DNS server
(a zone marked signed stands for what a validating resolver would say; see loopback/dnsserver.py).
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from loopback.dnsserver import ZoneServer, start_zone_server
from palisade.adapters.dns import DnsResolver
from palisade.delivery.dane import DaneTlsaSource, matches, parse_tlsa, usable
from palisade.delivery.nexthop import peer_chain
from palisade.ports import TlsaRecord, TlsaSource
from tests.tls.certs import NOW, Issued, Pki, issue


def der(issued: Issued) -> bytes:
    return issued.cert.public_bytes(serialization.Encoding.DER)


def spki(issued: Issued) -> bytes:
    return issued.cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def record(usage: int, selector: int, mtype: int, issued: Issued) -> TlsaRecord:
    data = der(issued) if selector == 0 else spki(issued)
    if mtype == 1:
        data = hashlib.sha256(data).digest()
    elif mtype == 2:
        data = hashlib.sha512(data).digest()
    return TlsaRecord(usage, selector, mtype, data)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.make("mx.example.test")


def chain(pki: Pki) -> list[bytes]:
    return [der(pki.leaf), der(pki.intermediate)]


# ---------------------------------------------------------------- matching


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("mtype", [0, 1, 2])
def test_dane_ee_matches_the_leaf_in_every_form(pki: Pki, selector: int, mtype: int) -> None:
    assert matches([record(3, selector, mtype, pki.leaf)], chain(pki))


def test_dane_ee_mismatch(pki: Pki) -> None:
    other = issue("mx.example.test", pki.intermediate, names=("mx.example.test",))
    assert not matches([record(3, 1, 1, other)], chain(pki))
    # the intermediate is not the end entity: a 3 x x record of it does not match
    assert not matches([record(3, 1, 1, pki.intermediate)], chain(pki))


def test_dane_ee_ignores_names_and_dates() -> None:
    # RFC 7672 section 3.1.1: a self-signed, expired certificate for another name is fine
    old = issue(
        "somebody-else.test",
        not_before=NOW - datetime.timedelta(days=30),
        not_after=NOW - datetime.timedelta(days=1),
    )
    assert matches([record(3, 1, 1, old)], [der(old)], "mx.example.test")


def test_one_matching_record_among_several_suffices(pki: Pki) -> None:
    stranger = issue("x.test")
    records = [record(3, 1, 1, stranger), record(3, 0, 2, pki.leaf)]
    assert matches(records, chain(pki))


def test_dane_ta_matches_the_intermediate_with_the_host_name(pki: Pki) -> None:
    ta = record(2, 1, 1, pki.intermediate)
    assert matches([ta], chain(pki), "mx.example.test")
    assert matches([ta], chain(pki), "MX.example.test.")  # case and the root dot


def test_dane_ta_needs_the_name_to_match(pki: Pki) -> None:
    ta = record(2, 1, 1, pki.intermediate)
    assert not matches([ta], chain(pki), "other.example.test")
    assert not matches([ta], chain(pki))  # no host name given: usage 2 cannot be checked


def test_dane_ta_needs_the_anchor_in_the_chain(pki: Pki) -> None:
    # the root was not sent: its digest cannot be checked against anything
    assert not matches([record(2, 1, 1, pki.root)], chain(pki), "mx.example.test")
    full = [*chain(pki), der(pki.root)]
    assert matches([record(2, 1, 1, pki.root)], full, "mx.example.test")


def test_dane_ta_refuses_a_leaf_not_signed_by_the_anchor(pki: Pki) -> None:
    forged = issue("mx.example.test", names=("mx.example.test",))  # self-signed, same name
    ta = record(2, 1, 1, pki.intermediate)
    assert not matches([ta], [der(forged), der(pki.intermediate)], "mx.example.test")


def test_dane_ta_refuses_an_expired_leaf() -> None:
    expired = Pki.make(
        "mx.example.test",
        not_before=NOW - datetime.timedelta(days=30),
        not_after=NOW - datetime.timedelta(days=1),
    )
    ta = record(2, 1, 1, expired.intermediate)
    assert not matches([ta], chain(expired), "mx.example.test")


def test_unusable_records_never_match(pki: Pki) -> None:
    for usage in (0, 1):  # PKIX-TA and PKIX-EE are not for SMTP (RFC 7672 section 3.1.3)
        assert not matches([record(usage, 1, 1, pki.leaf)], chain(pki), "mx.example.test")
    assert not matches([TlsaRecord(3, 1, 1, b"short")], chain(pki))
    assert not matches([TlsaRecord(3, 2, 1, record(3, 1, 1, pki.leaf).data)], chain(pki))


def test_garbage_chain_never_matches(pki: Pki) -> None:
    assert not matches([record(3, 1, 1, pki.leaf)], [])
    assert not matches([record(3, 1, 1, pki.leaf)], [b"not a certificate"])
    assert not matches([TlsaRecord(3, 0, 0, b"junk")], [b"junk"])


def test_parse_and_usable() -> None:
    parsed = parse_tlsa("3 1 1 ABCD" + "ab" * 30 + " " + "cd" * 0)
    assert parsed == TlsaRecord(3, 1, 1, bytes.fromhex("abcd" + "ab" * 30))
    assert usable(parsed)
    assert parse_tlsa("3 1 1 " + "ab" * 16 + " " + "ab" * 16) == TlsaRecord(
        3, 1, 1, bytes.fromhex("ab" * 32)
    )
    assert parse_tlsa("3 1") is None
    assert parse_tlsa("3 1 1 zz") is None
    assert parse_tlsa("300 1 1 ab") is None
    assert not usable(TlsaRecord(1, 1, 1, b"x" * 32))
    assert not usable(TlsaRecord(3, 1, 3, b"x" * 32))


# ---------------------------------------------------------------- the chain off a real connection


def test_peer_chain_from_a_real_tls_connection(pki: Pki, tmp_path: Path) -> None:
    cert_path, key_path = pki.write(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert_path, key_path)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE  # DANE does its own checking

    async def go() -> list[bytes]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1)
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        async with server:
            _, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname="mx.example.test"
            )
            got = peer_chain(writer.get_extra_info("ssl_object"))
            writer.close()
            return got

    got = asyncio.run(go())
    assert got == chain(pki)
    assert matches([record(2, 1, 1, pki.intermediate)], got, "mx.example.test")
    assert matches([record(3, 1, 1, pki.leaf)], got)


# ---------------------------------------------------------------- the TLSA source


@pytest.fixture
def zone() -> Iterator[ZoneServer]:
    server = start_zone_server()
    server.add_zone("signed.test")
    server.add_zone("plain.test")
    server.sign("signed.test")
    yield server
    server.stop()


def source(zone: ZoneServer) -> DaneTlsaSource:
    return DaneTlsaSource(DnsResolver([zone.address], timeout=0.5))


def test_tlsa_source_satisfies_the_port(zone: ZoneServer) -> None:
    assert isinstance(source(zone), TlsaSource)


def test_authenticated_usable_records_are_returned(zone: ZoneServer) -> None:
    digest = "ab" * 32
    zone.set(
        "_25._tcp.mx.signed.test",
        "TLSA",
        # (a digest of the wrong length is not served: dnspython refuses the whole answer)
        [f"3 1 1 {digest}", f"2 0 1 {'cd' * 32}", f"1 1 1 {digest}", f"3 0 0 {'ef' * 3}"],
    )
    got = asyncio.run(source(zone).tlsa("mx.signed.test.", 25))
    assert got is not None
    assert set(got) == {
        TlsaRecord(3, 1, 1, bytes.fromhex(digest)),
        TlsaRecord(2, 0, 1, bytes.fromhex("cd" * 32)),
        TlsaRecord(3, 0, 0, bytes.fromhex("ef" * 3)),  # usable; it will match nothing
    }
    assert zone.queries("_25._tcp.mx.signed.test", "TLSA") == 1


def test_unauthenticated_records_are_not_used(zone: ZoneServer) -> None:
    zone.set("_25._tcp.mx.plain.test", "TLSA", ["3 1 1 " + "ab" * 32])
    assert asyncio.run(source(zone).tlsa("mx.plain.test", 25)) is None


def test_no_usable_record_or_no_record_means_no_dane(zone: ZoneServer) -> None:
    zone.set("_25._tcp.mx.signed.test", "TLSA", ["0 0 1 " + "ab" * 32])
    assert asyncio.run(source(zone).tlsa("mx.signed.test", 25)) is None
    assert asyncio.run(source(zone).tlsa("none.signed.test", 25)) is None  # NXDOMAIN


def test_lookup_failure_raises(zone: ZoneServer) -> None:
    from palisade.ports import DnsTempError

    zone.behave("_25._tcp.mx.signed.test", "servfail")
    with pytest.raises(DnsTempError):
        asyncio.run(source(zone).tlsa("mx.signed.test", 25))
