"""``helo``: patterns, exact names, missing, syntax and "claims to be us" (no DNS involved)."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import pytest

from palisade.policy.checks.helo import FACTORIES
from palisade.policy.rules import Stage
from tests.checks.harness import build, make_facts, make_ports, run
from tests.dnsserver import ZoneServer

OURS = {
    "our_names": frozenset({"mx.example.test"}),
    "local_domains": frozenset({"example.test"}),
    "our_ips": frozenset(
        {ipaddress.ip_address("198.51.100.1"), ipaddress.ip_address("2001:db8::1")}
    ),
}


def check(**options: Any) -> Any:
    return build(FACTORIES, "helo", **options)


def test_stages() -> None:
    assert Stage.HELO in check(missing=True).stages
    assert Stage.MAIL in check(missing=True).stages


@pytest.mark.parametrize("helo", ["ylmf-pc", "YLMF-PC"])
def test_pattern(dns: ZoneServer, helo: str) -> None:
    result = run(check(patterns=["^ylmf-pc$"]), make_facts(helo=helo), make_ports(dns))
    assert result.matched
    assert result.reason == f"HELO {helo} matches /^ylmf-pc$/"
    assert result.values == {"helo": helo, "pattern": "^ylmf-pc$", "condition": "pattern"}


def test_pattern_no_match(dns: ZoneServer) -> None:
    facts = make_facts(helo="ylmf-pc.example.net")
    assert not run(check(patterns=["^ylmf-pc$"]), facts, make_ports(dns)).matched


def test_exact(dns: ZoneServer) -> None:
    built = check(exact=["Bad.Example.NET", "worse"])
    result = run(built, make_facts(helo="bad.example.net."), make_ports(dns))
    assert result.matched and result.values["condition"] == "exact"
    assert result.values["pattern"] == "bad.example.net"
    assert not run(built, make_facts(helo="good.example.net"), make_ports(dns)).matched


def test_missing(dns: ZoneServer) -> None:
    result = run(check(missing=True), make_facts(), make_ports(dns))
    assert result.matched and result.reason == "no HELO/EHLO given"
    assert result.values["condition"] == "missing"
    assert not run(check(missing=True), make_facts(helo="a.example"), make_ports(dns)).matched
    assert not run(check(syntax=True), make_facts(), make_ports(dns)).matched


VALID = [
    "mail.example.net",
    "mail.example.net.",
    "MX-1.Example.Net",
    "host_1.example.net",
    "[192.0.2.1]",
    "[IPv6:2001:db8::1]",
    "[ipv6:2001:DB8::1]",
]
INVALID = [
    "192.0.2.1",
    "2001:db8::1",
    "localhost",
    "ylmf-pc",
    "-bad.example.net",
    "bad-.example.net",
    "bad..example.net",
    "exa mple.net",
    "example.123",
    "[999.1.1.1]",
    "[192.0.2.1",
    "[IPv6:zz::1]",
    "[2001:db8::1]",
    "[IPv6:192.0.2.1]",
    "caf\u00e9.example.net",
    "a" * 64 + ".example.net",
    ".example.net",
]


@pytest.mark.parametrize("helo", VALID)
def test_syntax_valid(dns: ZoneServer, helo: str) -> None:
    assert not run(check(syntax=True), make_facts(helo=helo), make_ports(dns)).matched


@pytest.mark.parametrize("helo", INVALID)
def test_syntax_invalid(dns: ZoneServer, helo: str) -> None:
    result = run(check(syntax=True), make_facts(helo=helo), make_ports(dns))
    assert result.matched and result.values["condition"] == "syntax"
    assert "is not a valid hostname" in result.reason


@pytest.mark.parametrize(
    ("helo", "why"),
    [
        ("mx.example.test", "our host name"),
        ("MX.EXAMPLE.TEST.", "our host name"),
        ("example.test", "one of our domains"),
        ("[198.51.100.1]", "our address"),
        ("198.51.100.1", "our address"),
        ("[IPv6:2001:db8::1]", "our address"),
    ],
)
def test_ours(dns: ZoneServer, helo: str, why: str) -> None:
    result = run(check(ours=True), make_facts(helo=helo, **OURS), make_ports(dns))
    assert result.matched
    assert result.reason == f"HELO {helo} claims to be us ({why})"
    assert result.values["condition"] == "ours"


@pytest.mark.parametrize("helo", ["other.example.net", "[192.0.2.1]", "sub.example.test"])
def test_not_ours(dns: ZoneServer, helo: str) -> None:
    assert not run(check(ours=True), make_facts(helo=helo, **OURS), make_ports(dns)).matched


def test_ours_from_our_own_address_is_fine(dns: ZoneServer) -> None:
    for ip in ("198.51.100.1", "::ffff:198.51.100.1", "2001:db8::1"):
        facts = make_facts(ip, helo="mx.example.test", **OURS)
        assert not run(check(ours=True), facts, make_ports(dns)).matched


def test_several_conditions_say_which_hit(dns: ZoneServer) -> None:
    built = check(patterns=["^ylmf"], syntax=True, ours=True, missing=True)
    cases = {
        None: "missing",
        "ylmf-pc": "syntax",
        "ylmf-pc.example.net": "pattern",
        "mx.example.test": "ours",
    }
    for helo, condition in cases.items():
        result = run(built, make_facts(helo=helo, **OURS), make_ports(dns))
        assert result.values["condition"] == condition, helo
    assert not run(built, make_facts(helo="mail.example.net", **OURS), make_ports(dns)).matched


def test_hostile_helo_is_cleaned(dns: ZoneServer) -> None:
    result = run(check(syntax=True), make_facts(helo="a\r\nb"), make_ports(dns))
    assert result.matched and "\n" not in result.reason and "\r" not in result.values["helo"]


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({}, "patterns"),
        ({"patterns": ["("]}, "patterns"),
        ({"patterns": 5}, "patterns"),
        ({"exact": [1]}, "exact"),
        ({"missing": "yes"}, "missing"),
        ({"syntax": 1}, "syntax"),
        ({"ours": None}, "ours"),
        ({"ours": True, "our": True}, "our"),
    ],
)
def test_option_errors(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):
        check(**options)
