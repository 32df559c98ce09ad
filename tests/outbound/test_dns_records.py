"""``palisade dns records`` and ``palisade dns check`` against the loopback DNS server: the
records the config implies, published as printed, pass the check (exit 0); each kind of broken
zone is named by the check (exit 1)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from loopback.dnsserver import ZoneServer, start_zone_server
from tests.conftest import palisade, write_config
from tests.outbound.dkimkit import keygen, publish, records

DOMAIN = "example.org"


@pytest.fixture
def zones() -> Iterator[ZoneServer]:
    server = start_zone_server()
    server.add_zone(DOMAIN)
    server.set("mx.example.org", "A", ["192.0.2.25"])
    server.set(DOMAIN, "MX", ["10 mx.example.org."])
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def base(tmp_path: Path, zones: ZoneServer) -> Path:
    write_config(
        tmp_path / "palisade.toml",
        {
            "server": {"hostname": "mx.example.org", "listen": ["127.0.0.1:2525"]},
            "dns": {"nameservers": [f"127.0.0.1:{zones.port}"]},
            "dkim": {
                "keys_dir": "keys",
                "keys": [
                    {"domain": DOMAIN, "selector": "r1", "file": "example.org.r1.rsa.key"},
                    {"domain": DOMAIN, "selector": "e1", "file": "example.org.e1.ed25519.key"},
                ],
            },
        },
    )
    keygen(tmp_path, DOMAIN, "r1")
    keygen(tmp_path, DOMAIN, "e1", "--ed25519")
    return tmp_path


def dns(base: Path, *args: str) -> tuple[int, str]:
    result = palisade("dns", *args, DOMAIN, "--config", "palisade.toml", cwd=base)
    assert result.stderr == ""
    return result.returncode, result.stdout


def published(base: Path, zones: ZoneServer) -> dict[str, list[str]]:
    status, output = dns(base, "records")
    assert status == 0
    return publish(zones, output)


def test_records_are_what_the_config_implies(base: Path) -> None:
    status, output = dns(base, "records", "--rua", "reports@example.net")
    assert status == 0
    found = {name: "".join(strings) for name, strings in records(output).items()}
    assert found["example.org"] == "v=spf1 mx a:mx.example.org ~all"
    assert found["r1._domainkey.example.org"].startswith("v=DKIM1; k=rsa; t=y; p=MIIB")
    assert found["e1._domainkey.example.org"].startswith("v=DKIM1; k=ed25519; t=y; p=")
    assert found["_dmarc.example.org"] == "v=DMARC1; p=none; rua=mailto:reports@example.net"
    assert found["_mta-sts.example.org"].startswith("v=STSv1; id=")
    assert found["_smtp._tls.example.org"] == "v=TLSRPTv1; rua=mailto:tls-reports@example.org"
    assert ";   mode: testing\n;   mx: mx.example.org\n" in output
    assert all(len(s) <= 255 for strings in records(output).values() for s in strings)
    strict = dict(records(dns(base, "records", "--strict")[1]))
    assert strict["example.org"] == ["v=spf1 mx a:mx.example.org -all"]


def test_published_records_pass_the_check(base: Path, zones: ZoneServer) -> None:
    published(base, zones)
    status, output = dns(base, "check")
    assert status == 0, output
    assert "ok: SPF gives pass to 192.0.2.25" in output
    assert "ok: DKIM record at r1._domainkey.example.org matches keys/example.org.r1.rsa.key" in (
        output
    )
    assert "ok: DKIM record at e1._domainkey.example.org matches" in output
    assert "problem" not in output and output.endswith("example.org: all good\n")


def _too_many_includes(zones: ZoneServer) -> None:
    zones.set(DOMAIN, "TXT", ["v=spf1 a:mx.example.org include:i1.example.org ~all"])
    for n in range(1, 11):
        zones.set(f"i{n}.example.org", "TXT", [f"v=spf1 include:i{n + 1}.example.org ~all"])
    zones.set("i11.example.org", "TXT", ["v=spf1 ip4:192.0.2.99 ~all"])


Break = Callable[[ZoneServer], None]
BROKEN: dict[str, tuple[Break, str]] = {
    "spf missing": (
        lambda z: z.remove(DOMAIN, "TXT"),
        "problem: no SPF record at example.org",
    ),
    "two spf records": (
        lambda z: z.set(DOMAIN, "TXT", ["v=spf1 a:mx.example.org ~all", "v=spf1 mx ~all"]),
        "problem: 2 SPF records at example.org: receivers treat that as an error",
    ),
    "spf not authorising": (
        lambda z: z.set(DOMAIN, "TXT", ["v=spf1 ip4:198.51.100.7 -all"]),
        "problem: SPF of example.org does not authorise this server's address 192.0.2.25: fail",
    ),
    "too many lookups": (
        _too_many_includes,
        "problem: the SPF record of example.org needs 12 DNS lookups: more than 10",
    ),
    "dkim mismatch": (
        lambda z: z.set("r1._domainkey.example.org", "TXT", ["v=DKIM1; k=rsa; p=MIIBIjANBgkq"]),
        "problem: DKIM record at r1._domainkey.example.org does not match the key in "
        "keys/example.org.r1.rsa.key",
    ),
    "dkim wrong algorithm": (
        lambda z: z.set("e1._domainkey.example.org", "TXT", ["v=DKIM1; k=rsa; p=MIIBIjANBgkq"]),
        "problem: DKIM record at e1._domainkey.example.org says k=rsa, the key is ed25519",
    ),
    "dkim missing": (
        lambda z: z.remove("e1._domainkey.example.org"),
        "problem: no DKIM record at e1._domainkey.example.org",
    ),
    "dmarc missing": (
        lambda z: z.remove("_dmarc.example.org"),
        "problem: no DMARC record at _dmarc.example.org",
    ),
    "dmarc without rua": (
        lambda z: z.set("_dmarc.example.org", "TXT", ["v=DMARC1; p=none"]),
        "problem: the DMARC record at _dmarc.example.org has no rua=: nobody gets the reports",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_each_broken_record_is_named(base: Path, zones: ZoneServer, case: str) -> None:
    published(base, zones)
    breaks, expected = BROKEN[case]
    breaks(zones)
    status, output = dns(base, "check")
    assert status == 1
    assert expected in output
    problems = [line for line in output.splitlines() if line.startswith("problem:")]
    assert len(problems) == 1, output
    assert output.endswith("example.org: 1 problem(s)\n")
