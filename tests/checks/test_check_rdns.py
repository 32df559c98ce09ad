"""``rdns`` against a real DNS server on loopback: no PTR, FCrDNS, generic names, IPv4/IPv6."""

from __future__ import annotations

import ipaddress
from typing import Any

import dns.reversename
import pytest

from loopback.dnsserver import ZoneServer
from palisade.policy.checks.rdns import FACTORIES, generic_reason
from palisade.policy.keys import RDNS_GENERIC, RDNS_NAMES, RDNS_VERIFIED
from palisade.policy.rules import Stage
from tests.checks.harness import build, make_facts, make_ports, run, run_error

V4 = "192.0.2.1"
V6 = "2001:db8::25"


def rev(ip: str) -> str:
    return dns.reversename.from_address(ip).to_text().rstrip(".")


def check(**options: object) -> Any:
    return build(FACTORIES, "rdns", **options)


def test_stages() -> None:
    assert check().stages == frozenset({Stage.CONNECT, Stage.HELO, Stage.MAIL, Stage.RCPT})


# ---------------------------------------------------------------- PTR present or not


@pytest.mark.parametrize("ip", [V4, V6])
def test_ptr_present_passes_and_is_noted(dns: ZoneServer, ip: str) -> None:
    dns.set(rev(ip), "PTR", ["Mail.Example.NET."])
    facts = make_facts(ip)
    result = run(check(), facts, make_ports(dns))
    assert not result.matched
    assert facts.results[RDNS_NAMES] == ("mail.example.net",)
    assert "rdns.verified" not in facts.results


@pytest.mark.parametrize("ip", [V4, V6])
def test_no_ptr_nxdomain_matches(dns: ZoneServer, ip: str) -> None:
    facts = make_facts(ip)
    result = run(check(), facts, make_ports(dns))
    assert result.matched
    assert result.reason == f"no PTR record for {ip}"
    assert result.values == {"ptr": ""}
    assert facts.results[RDNS_NAMES] == ()


def test_no_ptr_nodata_matches(dns: ZoneServer) -> None:
    dns.set(rev(V4), "TXT", ["not a PTR"])
    assert run(check(), make_facts(), make_ports(dns)).matched


def test_ipv4_mapped_client_is_looked_up_as_ipv4(dns: ZoneServer) -> None:
    dns.set(rev(V4), "PTR", ["mail.example.net."])
    facts = make_facts(f"::ffff:{V4}")
    assert not run(check(), facts, make_ports(dns)).matched
    assert dns.queries(rev(V4), "PTR") == 1


@pytest.mark.parametrize("behaviour", ["servfail", "timeout"])
def test_ptr_temporary_failure_is_a_check_error(dns: ZoneServer, behaviour: str) -> None:
    dns.behave(rev(V4), behaviour)
    error = run_error(check(), make_facts(), make_ports(dns, timeout=0.2))
    assert "PTR lookup for 192.0.2.1 failed" in str(error)
    facts = make_facts()
    run_error(check(), facts, make_ports(dns, timeout=0.2))
    assert "rdns.names" not in facts.results  # a failure is never taken for "no PTR"


def test_names_are_reused_within_the_connection(dns: ZoneServer) -> None:
    dns.set(rev(V4), "PTR", ["mail.example.net."])
    dns.set("mail.example.net", "A", [V4])
    facts = make_facts()
    ports = make_ports(dns)
    assert not run(check(), facts, ports).matched
    assert not run(check(fcrdns=True), facts, make_ports(dns)).matched  # fresh resolver cache
    assert not run(check(fcrdns=True), facts, make_ports(dns)).matched
    assert dns.queries(rev(V4), "PTR") == 1
    assert dns.queries("mail.example.net", "A") == 1


# ---------------------------------------------------------------- FCrDNS


def test_fcrdns_pass_ipv4(dns: ZoneServer) -> None:
    dns.set(rev(V4), "PTR", ["mail.example.net."])
    dns.set("mail.example.net", "A", ["192.0.2.99", V4])
    facts = make_facts()
    assert not run(check(fcrdns=True), facts, make_ports(dns)).matched
    assert facts.results[RDNS_VERIFIED] is True


def test_fcrdns_pass_ipv6(dns: ZoneServer) -> None:
    dns.set(rev(V6), "PTR", ["mail6.example.net."])
    dns.set("mail6.example.net", "AAAA", ["2001:DB8:0::25"])
    dns.set("mail6.example.net", "A", ["192.0.2.1"])
    facts = make_facts(V6)
    assert not run(check(fcrdns=True), facts, make_ports(dns)).matched
    assert facts.results[RDNS_VERIFIED] is True
    assert dns.queries("mail6.example.net", "A") == 0


def test_fcrdns_any_of_several_names_is_enough(dns: ZoneServer) -> None:
    dns.set(rev(V4), "PTR", ["bogus.example.net.", "mail.example.net."])
    dns.set("mail.example.net", "A", [V4])
    assert not run(check(fcrdns=True), make_facts(), make_ports(dns)).matched


@pytest.mark.parametrize("forward", [["192.0.2.99"], None])
def test_fcrdns_fail(dns: ZoneServer, forward: list[str] | None) -> None:
    dns.set(rev(V4), "PTR", ["mail.example.net."])
    if forward:
        dns.set("mail.example.net", "A", forward)
    facts = make_facts()
    result = run(check(fcrdns=True), facts, make_ports(dns))
    assert result.matched
    assert result.reason == "PTR name mail.example.net does not resolve back to 192.0.2.1"
    assert result.values == {"ptr": "mail.example.net"}
    assert facts.results[RDNS_VERIFIED] is False


def test_fcrdns_fail_ipv6_with_only_an_ipv4_forward(dns: ZoneServer) -> None:
    dns.set(rev(V6), "PTR", ["mail6.example.net."])
    dns.set("mail6.example.net", "A", [V4])
    result = run(check(fcrdns=True), make_facts(V6), make_ports(dns))
    assert result.matched
    assert "does not resolve back to 2001:db8::25" in result.reason


def test_fcrdns_forward_failure_is_a_check_error(dns: ZoneServer) -> None:
    dns.set(rev(V4), "PTR", ["mail.example.net."])
    dns.behave("mail.example.net", "servfail")
    error = run_error(check(fcrdns=True), make_facts(), make_ports(dns))
    assert "forward lookup" in str(error)


def test_fcrdns_forward_failure_of_one_name_is_fine_when_another_verifies(
    dns: ZoneServer,
) -> None:
    dns.set(rev(V4), "PTR", ["broken.example.net.", "mail.example.net."])
    dns.set("mail.example.net", "A", [V4])
    dns.behave("broken.example.net", "servfail")
    assert not run(check(fcrdns=True), make_facts(), make_ports(dns)).matched


# ---------------------------------------------------------------- generic names

GENERIC = [
    (V4, "192-0-2-1.dyn.example.net"),
    (V4, "192-0-2-1.example.net"),
    (V4, "host-1-2-0-192.isp.example.net"),
    (V4, "192.0.2.1.example.net"),
    (V4, "1.2.0.192.example.net"),
    (V4, "192_0_2_1.example.net"),
    (V4, "ip192-000-002-001.example.net"),
    (V4, "a192000002001.example.net"),
    (V4, "c0000201.example.net"),
    (V4, "xc0000201x.example.net"),  # hex between letters that are not hex digits
    (V4, "dyn123.example.net"),
    (V4, "x.dynamic.example.net"),
    (V4, "adsl-77-12.example.net"),
    (V4, "dsl.customer.example.net"),
    (V4, "pool-45-12.isp.example.net"),
    (V4, "dhcp-12.example.net"),
    (V4, "cable-77.example.net"),
    (V4, "ppp12.example.net"),
    (V4, "client-12.example.net"),
    (V4, "dialup12.example.net"),
    (V4, "broadband-1.example.net"),
    (V4, "customer.77.example.co.uk"),
    (V4, "static-192-0-2-1.dsl.example.net"),  # static first label, but a pool word
    (V6, "2001-db8--25.example.net"),
    (V6, "20010db8000000000000000000000025.example.net"),
    (V6, "x.pool.example.net"),
]

NOT_GENERIC = [
    (V4, "mail.example.net"),
    (V4, "smtp1.provider.net"),
    (V4, "mx-1.example.net"),
    (V4, "example.net"),
    (V4, "static.example.net"),
    (V4, "mail-192-0-2-1.example.net"),  # a mail host named after its address (as Haraka)
    (V4, "static-192-0-2-1.example.net"),
    (V4, "192-0-2-9.example.net"),  # some other address
    (V4, "192-0-2-10.example.net"),
    (V4, "2192-0-2-1.example.net"),
    (V4, "carpool.example.net"),
    (V4, "mail.dsl-provider.net"),  # the pool word is in the domain, not the host part
    (V4, "mail.dyn.net"),
    (V4, "c00002011.example.net"),
    (V6, "mail6.example.net"),
]


@pytest.mark.parametrize(("ip", "name"), GENERIC)
def test_generic_names(ip: str, name: str) -> None:
    assert generic_reason(name, ipaddress.ip_address(ip)) is not None, name


@pytest.mark.parametrize(("ip", "name"), NOT_GENERIC)
def test_not_generic_names(ip: str, name: str) -> None:
    assert generic_reason(name, ipaddress.ip_address(ip)) is None, name


def test_generic_option_matches(dns: ZoneServer) -> None:
    dns.set(rev(V4), "PTR", ["192-0-2-1.dyn.example.net."])
    facts = make_facts()
    result = run(check(generic=True), facts, make_ports(dns))
    assert result.matched
    assert (
        result.reason
        == "PTR name 192-0-2-1.dyn.example.net looks generic (dynamic-pool word 'dyn')"
    )
    assert result.values == {"ptr": "192-0-2-1.dyn.example.net"}
    assert facts.results[RDNS_GENERIC] is True
    assert not run(check(), make_facts(), make_ports(dns)).matched  # generic is opt-in


def test_generic_option_embedded_ipv6(dns: ZoneServer) -> None:
    dns.set(rev(V6), "PTR", ["2001-db8--25.example.net."])
    result = run(check(generic=True), make_facts(V6), make_ports(dns))
    assert result.matched
    assert "embeds the client address" in result.reason


def test_generic_one_proper_name_is_enough(dns: ZoneServer) -> None:
    dns.set(rev(V4), "PTR", ["192-0-2-1.dyn.example.net.", "mail.example.net."])
    facts = make_facts()
    assert not run(check(generic=True), facts, make_ports(dns)).matched
    assert facts.results[RDNS_GENERIC] is False


def test_generic_with_fcrdns_looks_at_verified_names(dns: ZoneServer) -> None:
    dns.set(rev(V4), "PTR", ["192-0-2-1.dyn.example.net.", "mail.example.net."])
    dns.set("192-0-2-1.dyn.example.net", "A", [V4])
    result = run(check(generic=True, fcrdns=True), make_facts(), make_ports(dns))
    assert result.matched  # the only name that resolves back is the generic one


def test_proper_name_passes_everything(dns: ZoneServer) -> None:
    dns.set(rev(V4), "PTR", ["smtp1.example.net."])
    dns.set("smtp1.example.net", "A", [V4])
    assert not run(check(generic=True, fcrdns=True), make_facts(), make_ports(dns)).matched


def test_ptr_text_is_cleaned(dns: ZoneServer) -> None:
    dns.set(rev(V4), "PTR", ["evil\\010name.example.net."])  # a PTR with an escaped byte
    result = run(check(fcrdns=True), make_facts(), make_ports(dns))
    assert result.matched
    assert "\n" not in result.reason and "\r" not in result.reason


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"fcrdns": "yes"}, "fcrdns"),
        ({"generic": 1}, "generic"),
        ({"fcrdsn": True}, "fcrdsn"),
    ],
)
def test_option_errors(options: dict[str, object], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        check(**options)
