"""``sender`` (patterns, domain verification against a real DNS server) and ``local_sender``."""

from __future__ import annotations

import re
from typing import Any, TypedDict

import pytest

from loopback.dnsserver import ZoneServer
from palisade.policy.checks.sender import FACTORIES
from palisade.policy.keys import RELAY_CLIENT
from palisade.policy.rules import Key, Stage
from tests.checks.harness import build, make_facts, make_ports, run, run_error


def check(**options: Any) -> Any:
    return build(FACTORIES, "sender", **options)


def local_sender() -> Any:
    return build(FACTORIES, "local_sender")


def test_stages() -> None:
    assert Stage.MAIL in check(verify=True).stages and Stage.RCPT in check(verify=True).stages
    assert Stage.MAIL in local_sender().stages


# ---------------------------------------------------------------- patterns


@pytest.mark.parametrize("sender", ["anastasiaXYZ@example.net", "AnastasiaAB@example.org"])
def test_pattern_matches(dns: ZoneServer, sender: str) -> None:
    result = run(check(patterns=["^Anastasia.{2,5}@"]), make_facts(sender=sender), make_ports(dns))
    assert result.matched
    assert result.reason == f"sender {sender} matches /^Anastasia.{{2,5}}@/"
    assert result.values["pattern"] == "^Anastasia.{2,5}@"
    assert result.values["condition"] == "pattern"


@pytest.mark.parametrize("sender", ["anastasia@example.net", "anastasiaABCDEF@example.net", ""])
def test_pattern_no_match(dns: ZoneServer, sender: str) -> None:
    facts = make_facts(sender=sender)
    assert not run(check(patterns=["^Anastasia.{2,5}@"]), facts, make_ports(dns)).matched


def test_no_sender_yet(dns: ZoneServer) -> None:
    assert not run(check(patterns=["."], verify=True), make_facts(), make_ports(dns)).matched


# ---------------------------------------------------------------- verify


def verify(dns: ZoneServer, sender: str, timeout: float = 0.3) -> Any:
    return run(check(verify=True), make_facts(sender=sender), make_ports(dns, timeout))


def test_verify_mx(dns: ZoneServer) -> None:
    dns.set("example.net", "MX", ["10 mx.example.net."])
    assert not verify(dns, "bob@Example.NET").matched
    assert dns.queries("example.net", "A") == 0


def test_verify_a_only(dns: ZoneServer) -> None:
    dns.set("host.example.net", "A", ["192.0.2.7"])
    assert not verify(dns, "bob@host.example.net").matched
    assert dns.queries("host.example.net", "MX") == 1


def test_verify_aaaa_only(dns: ZoneServer) -> None:
    dns.set("host6.example.net", "AAAA", ["2001:db8::7"])
    assert not verify(dns, "bob@host6.example.net").matched


def test_verify_null_mx(dns: ZoneServer) -> None:
    dns.set("nomail.example.net", "MX", ["0 ."])
    dns.set("nomail.example.net", "A", ["192.0.2.7"])
    result = verify(dns, "bob@nomail.example.net")
    assert result.matched
    assert result.reason == "sender domain nomail.example.net does not accept mail (null MX)"
    assert result.values["condition"] == "null_mx"
    assert result.values["domain"] == "nomail.example.net"


def test_verify_nxdomain(dns: ZoneServer) -> None:
    result = verify(dns, "bob@nowhere.example.net")
    assert result.matched
    assert result.reason == "sender domain nowhere.example.net does not exist"
    assert result.values["condition"] == "nxdomain"


def test_verify_nxdomain_outside_any_zone(dns: ZoneServer) -> None:
    assert verify(dns, "bob@nowhere.invalid").matched


def test_verify_no_mx_no_a(dns: ZoneServer) -> None:
    dns.set("txtonly.example.net", "TXT", ["v=spf1 -all"])
    result = verify(dns, "bob@txtonly.example.net")
    assert result.matched
    assert result.reason == "sender domain txtonly.example.net has no MX or A record"
    assert result.values["condition"] == "no_mx"


@pytest.mark.parametrize("behaviour", ["servfail", "timeout"])
def test_verify_mx_failure_is_a_check_error(dns: ZoneServer, behaviour: str) -> None:
    dns.behave("broken.example.net", behaviour)
    error = run_error(
        check(verify=True), make_facts(sender="a@broken.example.net"), make_ports(dns, 0.2)
    )
    assert "sender domain broken.example.net: MX lookup failed" in str(error)


def test_verify_a_failure_after_no_mx_is_a_check_error(dns: ZoneServer) -> None:
    dns.set("half.example.net", "TXT", ["x"])
    dns.behave("half.example.net", "servfail", rdtype="A")
    error = run_error(check(verify=True), make_facts(sender="a@half.example.net"), make_ports(dns))
    assert "A lookup failed" in str(error)


def test_verify_a_failure_is_fine_when_aaaa_answers(dns: ZoneServer) -> None:
    dns.set("half.example.net", "AAAA", ["2001:db8::7"])
    dns.behave("half.example.net", "servfail", rdtype="A")
    assert not verify(dns, "a@half.example.net").matched


def test_null_sender_is_never_verified(dns: ZoneServer) -> None:
    assert not verify(dns, "").matched
    assert dns.total_queries == 0


def test_domain_literal_is_not_looked_up(dns: ZoneServer) -> None:
    assert not verify(dns, "bob@[192.0.2.1]").matched
    assert dns.total_queries == 0


def test_sender_without_domain(dns: ZoneServer) -> None:
    result = verify(dns, "postmaster")
    assert result.matched and result.values["condition"] == "no_domain"


def test_patterns_before_verify(dns: ZoneServer) -> None:
    built = check(patterns=["^spam@"], verify=True)
    result = run(built, make_facts(sender="spam@nowhere.example.net"), make_ports(dns))
    assert result.values["condition"] == "pattern"
    assert dns.total_queries == 0


# ---------------------------------------------------------------- local_sender


class Local(TypedDict):
    """The ``Facts`` field naming our domains (typed, so ``**LOCAL`` is checked)."""

    local_domains: frozenset[str]


LOCAL: Local = {"local_domains": frozenset({"example.test"})}


def test_local_sender_from_relay_client(dns: ZoneServer) -> None:
    facts = make_facts(sender="alice@Example.Test", **LOCAL)
    facts.results[RELAY_CLIENT] = True
    result = run(local_sender(), facts, make_ports(dns))
    assert result.matched
    assert result.values == {"sender": "alice@Example.Test", "domain": "example.test"}
    assert "accept_all" not in facts.results  # the operator's verb decides that


@pytest.mark.parametrize(
    ("sender", "relay"),
    [
        ("alice@example.test", None),
        ("alice@example.test", "yes"),
        ("alice@other.example", True),
        ("", True),
        (None, True),
    ],
)
def test_local_sender_not_matched(dns: ZoneServer, sender: str | None, relay: object) -> None:
    facts = make_facts(sender=sender, **LOCAL)
    if relay is not None:
        # the same name with the value type left open: this test stores a non-bool on purpose
        facts.results[Key[object](RELAY_CLIENT)] = relay
    assert not run(local_sender(), facts, make_ports(dns)).matched


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("name", "options", "named"),
    [
        ("sender", {}, "verify"),
        ("sender", {"verify": "yes"}, "verify"),
        ("sender", {"patterns": ["[unclosed"]}, "patterns"),
        ("sender", {"patterns": {"a": 1}}, "patterns"),
        ("sender", {"verify": True, "skip_local_from_relay": True}, "skip_local_from_relay"),
        ("local_sender", {"verify": True}, "verify"),
    ],
)
def test_option_errors(name: str, options: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):
        build(FACTORIES, name, **options)
