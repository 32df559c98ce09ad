"""``helo``: patterns, exact names, missing, syntax and "claims to be us" (no DNS involved), and
``resolvable`` against a real DNS server on loopback."""

from __future__ import annotations

import ipaddress
import re
from typing import Any, TypedDict

import pytest

from loopback.dnsserver import ZoneServer
from palisade.policy.checks.helo import FACTORIES
from palisade.policy.rules import IPAddress, Stage
from tests.checks.harness import build, make_facts, make_ports, run, run_error


class Ours(TypedDict):
    """The ``Facts`` fields that say who we are (typed, so ``**OURS`` is checked field by field)."""

    our_names: frozenset[str]
    local_domains: frozenset[str]
    our_ips: frozenset[IPAddress]


OURS: Ours = {
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
        ({"resolvable": "yes"}, "resolvable"),
    ],
)
def test_option_errors(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):
        check(**options)


# ---------------------------------------------------------------- resolvable (A or AAAA)


def test_resolvable_name_with_an_a_or_only_an_aaaa_record(dns: ZoneServer) -> None:
    dns.set("mail.example.net", "A", ["192.0.2.25"])
    dns.set("v6only.example.net", "AAAA", ["2001:db8::25"])
    for helo in ("mail.example.net", "MAIL.example.net.", "v6only.example.net"):
        result = run(check(resolvable=True), make_facts(helo=helo), make_ports(dns))
        assert not result.matched, helo
    assert dns.queries("v6only.example.net", "AAAA") == 1


@pytest.mark.parametrize(
    ("helo", "reason"),
    [
        ("nowhere.example.net", "has no A or AAAA record"),  # NXDOMAIN
        ("mx-only.example.net", "has no A or AAAA record"),  # exists, no address (NODATA)
        ("ylmf-pc", "is not a resolvable hostname"),  # not a hostname: nothing to ask
    ],
)
def test_unresolvable_helo_matches(dns: ZoneServer, helo: str, reason: str) -> None:
    dns.set("mx-only.example.net", "MX", ["10 mail.example.net."])
    result = run(check(resolvable=True), make_facts(helo=helo), make_ports(dns))
    assert result.matched
    assert result.reason == f"HELO {helo} {reason}"
    assert result.values == {"helo": helo, "pattern": "", "condition": "unresolvable"}


def test_resolvable_asks_nothing_for_address_literals(dns: ZoneServer) -> None:
    for helo in ("[192.0.2.1]", "[IPv6:2001:db8::1]", "192.0.2.1"):
        assert not run(check(resolvable=True), make_facts(helo=helo), make_ports(dns)).matched
    assert not run(check(resolvable=True), make_facts(), make_ports(dns)).matched  # no HELO
    assert dns.total_queries == 0


@pytest.mark.parametrize("behaviour", ["timeout", "servfail"])
def test_resolvable_dns_trouble_is_a_check_error(dns: ZoneServer, behaviour: str) -> None:
    dns.behave("flaky.example.net", behaviour)
    facts = make_facts(helo="flaky.example.net")
    error = run_error(check(resolvable=True), facts, make_ports(dns, timeout=0.2))
    assert str(error).startswith("HELO flaky.example.net: address lookup failed: ")


def test_resolvable_one_answer_is_enough_when_the_other_type_fails(dns: ZoneServer) -> None:
    dns.set("half.example.net", "A", ["192.0.2.25"])
    dns.behave("half.example.net", "servfail", rdtype="AAAA")
    result = run(check(resolvable=True), make_facts(helo="half.example.net"), make_ports(dns))
    assert not result.matched


def test_resolvable_comes_after_the_cheap_conditions(dns: ZoneServer) -> None:
    built = check(patterns=["^ylmf"], resolvable=True)
    result = run(built, make_facts(helo="ylmf.example.net"), make_ports(dns))
    assert result.values["condition"] == "pattern"
    assert dns.total_queries == 0


def test_resolvable_failure_follows_on_error_defer_by_default(dns: ZoneServer) -> None:
    import asyncio

    from palisade.policy.engine import TEMPFAIL_REPLY, Rule, evaluate_stage
    from palisade.policy.verdict import Verb

    dns.behave("flaky.example.net", "servfail")
    rule = Rule("helo resolvable", Stage.HELO, check(resolvable=True), Verb.DENY)
    outcome = asyncio.run(
        evaluate_stage(Stage.HELO, [rule], make_facts(helo="flaky.example.net"), make_ports(dns))
    )
    assert outcome.verdict is not None and outcome.verdict.reply == TEMPFAIL_REPLY
    assert outcome.verdict.log_message.startswith(
        "DEFER - helo lookup failed: HELO flaky.example.net: address lookup failed: "
    )
