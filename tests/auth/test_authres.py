"""The Authentication-Results header, iprev, ``authenticate`` and forged-header recognition."""

from __future__ import annotations

import pytest

from loopback.dnsserver import ZoneServer
from palisade.policy.checks.authres import (
    IprevOutcome,
    authenticate,
    authentication_results,
    claims_authserv_id,
    iprev_outcome,
    mailbox_value,
    pvalue,
)
from palisade.policy.checks.dkim import DkimOutcome, DkimSignatureResult
from palisade.policy.checks.dmarc import DmarcOutcome
from palisade.policy.keys import RDNS_NAMES, RDNS_VERIFIED_NAMES
from palisade.policy.rules import Facts, Ports
from tests.auth.conftest import (
    Messages,
    make_facts,
    plain_message,
    publish_key,
    remember,
    remember_failure,
    run,
    sign,
)

PTR = "1.2.0.192.in-addr.arpa"


def serve_everything(dns: ZoneServer) -> None:
    publish_key(dns, "example.com")
    dns.set("example.com", "TXT", ["v=spf1 ip4:192.0.2.1 -all"])
    dns.set("_dmarc.example.com", "TXT", ["v=DMARC1; p=reject"])
    dns.set(PTR, "PTR", ["mail.example.com."])
    dns.set("mail.example.com", "A", ["192.0.2.1"])


def header_after(facts: Facts, ports: Ports, **enabled: bool) -> str | None:
    async def main() -> str | None:
        await authenticate(facts, ports, **enabled)
        return authentication_results("mx.example.org", facts)

    return run(main)


def test_full_header_parts(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    serve_everything(dns)
    raw = sign(plain_message(), "example.com")
    facts = make_facts(messages.facts(raw), sender="bounce@example.com")
    header = header_after(facts, ports)
    assert header is not None
    name, _, value = header.partition(": ")
    assert name == "Authentication-Results"
    parts = value.split("; ")
    assert parts[0] == "mx.example.org"
    assert parts[1] == "spf=pass smtp.mailfrom=bounce@example.com"
    assert parts[2].startswith("dkim=pass header.d=example.com header.s=test header.b=")
    assert parts[3] == "dmarc=pass (p=reject dis=none) header.from=example.com"
    assert parts[4] == "iprev=pass policy.iprev=192.0.2.1 (mail.example.com)"
    assert "\r" not in header and "\n" not in header


def test_failures_in_the_header(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    dns.set("_dmarc.example.com", "TXT", ["v=DMARC1; p=quarantine; pct=0"])
    facts = make_facts(messages.facts(plain_message()), sender="", helo="helo.example.net")
    header = header_after(facts, ports)
    assert header == (
        "Authentication-Results: mx.example.org; spf=none smtp.helo=helo.example.net; "
        "dkim=none; dmarc=fail (p=quarantine dis=none) header.from=example.com; "
        "iprev=permerror policy.iprev=192.0.2.1"
    )


def test_disabled_methods_are_left_out(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    facts = make_facts(messages.facts(plain_message()))
    header = header_after(facts, ports, spf=False, dmarc=False, iprev=False)
    assert header == "Authentication-Results: mx.example.org; dkim=none"


def test_nothing_computed_gives_no_header() -> None:
    assert authentication_results("mx.example.org", make_facts()) is None


def test_failed_computation_is_temperror() -> None:
    facts = make_facts()

    async def main() -> str | None:
        await remember_failure(facts, "dkim")
        await remember_failure(facts, "dmarc")
        return authentication_results("mx.example.org", facts)

    assert run(main) == "Authentication-Results: mx.example.org; dkim=temperror; dmarc=temperror"


def test_hostile_values_are_quoted_and_cleaned() -> None:
    facts = make_facts(sender='evil"\\x;\r\nspf=pass@exa mple.com', helo="x")
    signature = DkimSignatureResult(
        "fail",
        domain="d.example; dkim=pass",
        selector="s(1)",
        b="ab/c+=",
        reason="bad (very) bad\r\nX-Injected: 1",
    )
    dmarc = DmarcOutcome("fail", from_domain="é.example", policy="none")

    class Spf:
        result = "pass\r\nX: y"
        identity = "mailfrom"
        domain = "example.com"
        mailbox = facts.sender

    async def main() -> str | None:
        await remember(facts, "spf", Spf())
        await remember(facts, "dkim", DkimOutcome((signature,)))
        await remember(facts, "dmarc", dmarc)
        await remember(facts, "iprev", IprevOutcome("pass", "192.0.2.1", ("a(b).example\r\n",)))
        return authentication_results("mx.example.org", facts)

    header = run(main)
    assert header is not None
    assert "\r" not in header and "\n" not in header
    assert header == (
        "Authentication-Results: mx.example.org; "
        'spf=temperror smtp.mailfrom="evil\\"\\\\x; spf=pass@exa mple.com"; '
        'dkim=fail (bad very bad X-Injected: 1) header.d="d.example; dkim=pass" '
        'header.s="s(1)" header.b="ab/c+="; '
        'dmarc=fail (p=none dis=none) header.from="?.example"; '
        "iprev=pass policy.iprev=192.0.2.1 (ab.example)"
    )


def test_authserv_id_is_quoted_when_not_a_token() -> None:
    facts = make_facts()

    async def main() -> str | None:
        await remember(facts, "dkim", DkimOutcome())
        return authentication_results("mx example;org", facts)

    assert run(main) == 'Authentication-Results: "mx example;org"; dkim=none'


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("example.com", "example.com"),
        ("a b", '"a b"'),
        ("", '""'),
        ('q"\\', '"q\\"\\\\"'),
        ("x\x00y\r\nz", '"x y z"'),
    ],
)
def test_pvalue(value: str, expected: str) -> None:
    assert pvalue(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("user@example.com", "user@example.com"),
        ("first.last+tag@sub.example.com", "first.last+tag@sub.example.com"),
        ("example.com", "example.com"),
        ('"odd user"@example.com', '"\\"odd user\\"@example.com"'),
        ("a;b@example.com", '"a;b@example.com"'),
    ],
)
def test_mailbox_value(value: str, expected: str) -> None:
    assert mailbox_value(value) == expected


# -------------------------------------------------------------------- iprev


def iprev(facts: Facts, ports: Ports) -> IprevOutcome:
    return run(lambda: iprev_outcome(facts, ports))


def test_iprev_pass_records_rdns_results(dns: ZoneServer, ports: Ports) -> None:
    dns.set(PTR, "PTR", ["other.example.net.", "mail.example.com."])
    dns.set("mail.example.com", "A", ["192.0.2.1"])
    dns.set("other.example.net", "A", ["192.0.2.99"])
    facts = make_facts()
    assert iprev(facts, ports) == IprevOutcome("pass", "192.0.2.1", ("mail.example.com",))
    assert facts.results[RDNS_NAMES] == ("other.example.net", "mail.example.com")
    assert facts.results[RDNS_VERIFIED_NAMES] == ("mail.example.com",)


def test_iprev_fail(dns: ZoneServer, ports: Ports) -> None:
    dns.set(PTR, "PTR", ["mail.example.com."])
    dns.set("mail.example.com", "A", ["192.0.2.99"])
    assert iprev(make_facts(), ports).result == "fail"


def test_iprev_no_ptr_is_permerror(ports: Ports) -> None:
    assert iprev(make_facts(), ports).result == "permerror"


def test_iprev_temperror(dns: ZoneServer, ports: Ports) -> None:
    dns.behave(PTR, "servfail")
    facts = make_facts()
    assert iprev(facts, ports).result == "temperror"
    assert "rdns.names" not in facts.results


def test_iprev_forward_temperror(dns: ZoneServer, ports: Ports) -> None:
    dns.set(PTR, "PTR", ["mail.example.com."])
    dns.behave("mail.example.com", "servfail")
    facts = make_facts()
    assert iprev(facts, ports).result == "temperror"
    assert "rdns.verified_names" not in facts.results


def test_iprev_reuses_the_rdns_check_findings(dns: ZoneServer, ports: Ports) -> None:
    facts = make_facts()
    facts.results[RDNS_NAMES] = ("mail.example.com",)
    facts.results[RDNS_VERIFIED_NAMES] = ("mail.example.com",)
    assert iprev(facts, ports).result == "pass"
    assert dns.total_queries == 0


def test_header_uses_rdns_findings_without_iprev() -> None:
    facts = make_facts()
    facts.results[RDNS_NAMES] = ("mail.example.com",)
    facts.results[RDNS_VERIFIED_NAMES] = ()
    header = authentication_results("mx.example.org", facts)
    assert header == "Authentication-Results: mx.example.org; iprev=fail policy.iprev=192.0.2.1"


# -------------------------------------------------------------------- forged headers


@pytest.mark.parametrize(
    ("value", "claims"),
    [
        ("mx.example.org; spf=pass smtp.mailfrom=example.com", True),
        ("MX.Example.ORG; dkim=pass", True),
        ("mx.example.org 1; spf=pass", True),
        ("mx.example.org (our gateway) 1 ; spf=pass", True),
        ("  (a (nested) comment) mx.example.org;spf=pass", True),
        ("\r\n\tmx.example.org;\r\n\tspf=pass", True),
        ('"mx.example.org"; spf=pass', True),
        ("mx.example.org;", True),
        ("mx.example.org", True),
        ("mx.example.org(comment);none", True),
        ("other.example.org; spf=pass", False),
        ("mx.example.org.evil; spf=pass", False),
        ("evil.mx.example.org; spf=pass", False),
        ("spf=pass; mx.example.org", False),
        ("(unterminated mx.example.org; spf=pass", False),
        ("", False),
        ("; mx.example.org", False),
    ],
)
def test_claims_authserv_id(value: str, claims: bool) -> None:
    assert claims_authserv_id(value, "mx.example.org") is claims


def test_empty_authserv_id_claims_nothing() -> None:
    assert not claims_authserv_id("; spf=pass", "")
