"""The RFC 7208 test suite (``tests/data/spf/rfc7208-tests.yml``) through Palisade's DNS path.

Each scenario's ``zonedata`` is served by the real loopback DNS server (``loopback/dnsserver.py``);
each case builds a fresh ``DnsResolver`` (the production adapter) pointed at it and runs
``spf_outcome`` on facts made from the case's ``host``, ``helo`` and ``mailfrom``. So what is
tested is the whole path: pyspf's evaluation, our DNS bridge, the adapter's wire handling and the
rendering of answers. Every case of the suite is one test.

How the suite's zone data is served (the conventions of the suite's own driver, see the YAML
header): records of type ``SPF`` are also served as ``TXT`` unless the name lists ``TXT`` records
itself (``TXT: NONE`` lists none but still stops that copy); ``TIMEOUT`` makes every query for
that name time out except for the types listed before it; a TXT/SPF value that is a list is one
record of several character-strings; MX values are ``[preference, exchange]``. The suite's
expected explanation ``DEFAULT`` stands for the implementation's default text (its driver sets
that text to ``DEFAULT``); here it is pyspf's default explanation for the result.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import spf as pyspf
import yaml

from loopback.dnsserver import ZoneServer, start_zone_server
from palisade.adapters.dns import DnsResolver
from palisade.policy.checks.spf import SpfOutcome, spf_outcome
from palisade.policy.rules import Facts, Ports
from tests.adapters.conftest import SettableClock
from tests.unused_ports import NoState

SUITE = Path(__file__).resolve().parent.parent / "data" / "spf" / "rfc7208-tests.yml"
TIMEOUT = 0.5  # seconds per DNS try; TIMEOUT names are never answered
SERVED_TYPES = ("A", "AAAA", "MX", "PTR", "TXT", "SPF", "CNAME")


@dataclass(frozen=True)
class Scenario:
    index: int
    description: str
    zonedata: dict[str, list[Any]]


@dataclass(frozen=True)
class Case:
    name: str
    scenario: Scenario
    data: dict[str, Any]

    @property
    def expected(self) -> list[str]:
        result = self.data["result"]
        return [result] if isinstance(result, str) else list(result)


def load_cases() -> list[Case]:
    cases: list[Case] = []
    with SUITE.open("rb") as fh:
        documents = [doc for doc in yaml.safe_load_all(fh) if doc]
    for index, doc in enumerate(documents):
        scenario = Scenario(index, str(doc.get("description", "")), doc.get("zonedata") or {})
        for name, data in doc["tests"].items():
            cases.append(Case(name, scenario, data))
    names = [case.name for case in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases


CASES = load_cases()


# ---------------------------------------------------------------- zone data -> ZoneServer


def _record(rdtype: str, value: Any) -> Any:
    """One suite value as ``ZoneServer.set`` takes it."""
    if rdtype in ("TXT", "SPF"):
        if isinstance(value, list):
            # RFC 1035 3.3.14: TXT-DATA is *one* or more character-strings; a record of none
            # cannot be sent (dnspython refuses the whole answer, zone files cannot write it).
            # The closest record that can exist is one empty string. (What a zero-string record
            # does on our path is pinned in test_spf_check.py.)
            return [str(v) for v in value] or [""]
        return [str(value)]  # one character-string per value, as the suite means
    if rdtype == "MX":
        preference, exchange = value
        return f"{int(preference)} {str(exchange).rstrip('.') or ''}."
    return str(value)


def serve(server: ZoneServer, zonedata: dict[str, list[Any]]) -> None:
    for raw_name, entries in zonedata.items():
        name = str(raw_name).lower()
        records: dict[str, list[Any]] = {}
        explicit_txt = False
        answered: set[str] | None = None  # types listed before TIMEOUT, once TIMEOUT is seen
        for entry in entries:
            if entry == "TIMEOUT":
                answered = set(records)
                continue
            ((rdtype, value),) = entry.items()
            if rdtype == "TXT":
                explicit_txt = True
            if value == "NONE":
                continue
            records.setdefault(rdtype, []).append(_record(rdtype, value))
        if not explicit_txt and "SPF" in records:
            records["TXT"] = list(records["SPF"])  # the copy the suite's driver makes
        for rdtype, values in records.items():
            if answered is None or rdtype in answered:
                server.set(name, rdtype, values, ttl=300)
        if answered is not None:
            for rdtype in SERVED_TYPES:
                if rdtype not in answered:
                    server.behave(name, "timeout", rdtype=rdtype)


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[int, ZoneServer]]:
    """One loopback DNS server per scenario, started when a case of it first runs."""
    started: dict[int, ZoneServer] = {}
    yield started
    for server in started.values():
        server.stop()


def server_for(servers: dict[int, ZoneServer], scenario: Scenario) -> ZoneServer:
    server = servers.get(scenario.index)
    if server is None:
        server = start_zone_server()
        serve(server, scenario.zonedata)
        servers[scenario.index] = server
    return server


# ---------------------------------------------------------------- running a case


def run_case(server: ZoneServer, case: Case) -> SpfOutcome:
    resolver = DnsResolver([server.address], timeout=TIMEOUT, retries=0, clock=SettableClock())
    ports = Ports(resolver=resolver, state=NoState(), clock=SettableClock())
    facts = Facts(
        client_ip=ipaddress.ip_address(str(case.data["host"])),
        client_port=25,
        helo=str(case.data["helo"]) if case.data.get("helo") is not None else None,
        sender=str(case.data.get("mailfrom", "")),
    )

    async def main() -> SpfOutcome:
        return await spf_outcome(facts, ports)

    return asyncio.run(main())


# Cases our path cannot pass for a reason of principle (each must fail: strict xfail).
KNOWN_DEVIATIONS: dict[str, str] = {}  # case name: the reason


def _params() -> list[Any]:
    params = []
    for case in CASES:
        reason = KNOWN_DEVIATIONS.get(case.name)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(case, id=case.name, marks=marks))
    return params


@pytest.mark.parametrize("case", _params())
def test_rfc7208(servers: dict[int, ZoneServer], case: Case) -> None:
    server = server_for(servers, case.scenario)
    started = time.monotonic()
    outcome = run_case(server, case)
    elapsed = time.monotonic() - started
    where = f"{case.scenario.description} / {case.name} (RFC 7208 {case.data.get('spec')})"
    assert outcome.result in case.expected, (
        f"{where}: got {outcome.result} ({outcome.explanation!r}), expected {case.expected}"
    )
    expected_exp = case.data.get("explanation")
    if expected_exp is not None:
        if expected_exp == "DEFAULT":
            expected_exp = pyspf.EXPLANATIONS[outcome.result]
        assert outcome.explanation == expected_exp, where
    assert outcome.identity == ("mailfrom" if case.data.get("mailfrom") else "helo")
    assert elapsed < 10, f"{where}: took {elapsed:.1f}s"


def test_every_case_is_collected() -> None:
    """The suite file holds 203 cases (tests/data/spf/README.md)."""
    assert len(CASES) == 203
    assert set(KNOWN_DEVIATIONS) <= {case.name for case in CASES}
