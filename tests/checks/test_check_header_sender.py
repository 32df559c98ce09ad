"""``header_sender``: From: count and verifiable header addresses, against a real DNS server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loopback.dnsserver import ZoneServer
from palisade.config.lists import ListHandle
from palisade.policy.checks.header_sender import FACTORIES
from palisade.policy.lists import ListKind
from tests.checks.harness import build, make_facts, make_ports, run, run_error
from tests.messages import message_facts


class Lists:
    def __init__(self, **handles: ListHandle) -> None:
        self.handles = handles

    def get(self, name: str) -> Any:
        return self.handles.get(name)


def facts_for(tmp_path: Path, headers: str, **kw: Any) -> Any:
    raw = headers.replace("\n", "\r\n").encode() + b"\r\nbody\r\n"
    facts = make_facts(**kw)
    facts.message = message_facts(tmp_path / "m", raw)
    return facts


def zones(dns: ZoneServer) -> None:
    dns.set("good.example.test", "MX", ["10 mx.good.example.test."])
    dns.set("mx.good.example.test", "A", ["192.0.2.25"])
    dns.set("aonly.example.test", "A", ["192.0.2.26"])
    dns.set("nullmx.example.test", "MX", ["0 ."])


def test_verifiable_from_passes(dns: ZoneServer, tmp_path: Path) -> None:
    zones(dns)
    check = build(FACTORIES, "header_sender")
    facts = facts_for(tmp_path, "From: Alice <alice@good.example.test>\nSubject: x\n")
    assert not run(check, facts, make_ports(dns)).matched
    facts = facts_for(tmp_path, "From: bob@aonly.example.test\n")
    assert not run(check, facts, make_ports(dns)).matched


def test_reply_to_or_sender_can_be_the_verifiable_one(dns: ZoneServer, tmp_path: Path) -> None:
    zones(dns)
    check = build(FACTORIES, "header_sender")
    headers = "From: x@nowhere.example.test\nReply-To: ok@good.example.test\n"
    assert not run(check, facts_for(tmp_path, headers), make_ports(dns)).matched


def test_unverifiable_addresses_match(dns: ZoneServer, tmp_path: Path) -> None:
    zones(dns)
    check = build(FACTORIES, "header_sender")
    headers = (
        "From: x@nowhere.example.test\nSender: y@nullmx.example.test\nReply-To: not-an-address\n"
    )
    result = run(check, facts_for(tmp_path, headers), make_ports(dns))
    assert result.matched and result.values["condition"] == "unverifiable"
    assert "y@nullmx.example.test" in result.values["addresses"]


def test_missing_or_duplicate_from_is_refused(dns: ZoneServer, tmp_path: Path) -> None:
    zones(dns)
    check = build(FACTORIES, "header_sender")
    result = run(check, facts_for(tmp_path, "Subject: no from\n"), make_ports(dns))
    assert result.matched and result.values["condition"] == "no_from"
    two = "From: a@good.example.test\nFrom: b@good.example.test\n"
    result = run(check, facts_for(tmp_path, two), make_ports(dns))
    assert result.matched and result.values["condition"] == "several_from"


def test_dns_timeout_without_a_verified_address_is_a_temporary_failure(
    dns: ZoneServer, tmp_path: Path
) -> None:
    zones(dns)
    dns.behave("slow.example.test", "timeout")
    check = build(FACTORIES, "header_sender")
    error = run_error(check, facts_for(tmp_path, "From: a@slow.example.test\n"), make_ports(dns))
    assert "slow.example.test" in str(error)
    # ... but a verified address elsewhere decides at once
    headers = "From: a@slow.example.test\nReply-To: b@good.example.test\n"
    assert not run(check, facts_for(tmp_path, headers), make_ports(dns)).matched


def test_exceptions_by_sender_domain_and_host(dns: ZoneServer, tmp_path: Path) -> None:
    zones(dns)
    lists = Lists(
        trusted=ListHandle.inline("trusted", ListKind.DOMAIN, "partner.example"),
        hosts=ListHandle.inline("hosts", ListKind.IP, "198.51.100.0/24"),
    )
    check = FACTORIES["header_sender"](
        {"except_sender_domains": "trusted", "except_hosts": "hosts"}, lists
    )
    headers = "Subject: no from at all\n"
    assert not run(
        check, facts_for(tmp_path, headers, sender="a@partner.example"), make_ports(dns)
    ).matched
    assert not run(check, facts_for(tmp_path, headers, ip="198.51.100.7"), make_ports(dns)).matched
    assert run(
        check, facts_for(tmp_path, headers, sender="a@other.example"), make_ports(dns)
    ).matched
