"""DANE's resolver requirement, for real: unbound on loopback validating zones signed here with
a fresh key (see loopback/unbound.py). The stub resolver reports AD from it, the TLSA source uses
the records of the validated zone only, and a zone that fails validation is a lookup failure
(SERVFAIL), never "no DANE".
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from loopback.unbound import Unbound
from palisade.adapters.dns import DnsResolver
from palisade.delivery.dane import DaneTlsaSource
from palisade.ports import DnsTempError, TlsaRecord
from tests.services import need_program

DIGEST = "ab" * 32
TLSA = {"_25._tcp.mx": {"TLSA": [f"3 1 1 {DIGEST}"]}, "mx": {"A": ["127.0.0.21"]}}


@pytest.fixture(scope="module")
def unbound(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Unbound]:
    program = need_program("unbound", "unbound")
    directory: Path = tmp_path_factory.mktemp("unbound")
    zones = {
        "signed.test": ("signed", TLSA),
        "plain.test": ("unsigned", TLSA),
        "bogus.test": ("bogus", TLSA),
    }
    with Unbound(directory, zones, unbound=program) as server:
        yield server


def resolver(unbound: Unbound) -> DnsResolver:
    return DnsResolver([unbound.address], timeout=2.0, retries=0, failure_ttl=0)


def test_validated_answers_carry_ad(unbound: Unbound) -> None:
    async def go() -> None:
        dns = resolver(unbound)
        signed = await dns.query("mx.signed.test", "A")
        assert signed.records == ("127.0.0.21",) and signed.authentic
        denial = await dns.query("nothing.signed.test", "TLSA")
        assert denial.nxdomain and denial.authentic  # NSEC-proven
        plain = await dns.query("mx.plain.test", "A")
        assert plain.records == ("127.0.0.21",) and not plain.authentic

    asyncio.run(go())


def test_tlsa_source_over_a_validating_resolver(unbound: Unbound) -> None:
    async def go() -> None:
        source = DaneTlsaSource(resolver(unbound))
        assert await source.tlsa("mx.signed.test", 25) == (
            TlsaRecord(3, 1, 1, bytes.fromhex(DIGEST)),
        )
        assert await source.tlsa("mx.plain.test", 25) is None  # insecure: no DANE
        with pytest.raises(DnsTempError, match="SERVFAIL"):
            await source.tlsa("mx.bogus.test", 25)  # bogus: defer, never downgrade

    asyncio.run(go())
    assert "validation failure" in unbound.log()  # unbound itself says why bogus.test failed
