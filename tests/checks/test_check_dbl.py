"""``dbl`` against a real DNS server on loopback: sender domain and HELO, codes, errors, DQS."""

from __future__ import annotations

import re
from typing import Any

import pytest

from loopback.dnsserver import ZoneServer
from palisade.policy.checks.dbl import FACTORIES
from palisade.policy.keys import DBL_ERRORS, DBL_LISTED
from palisade.policy.rules import Stage
from tests.checks.harness import build, make_facts, make_ports, run, run_error

DBL = "dbl.spamhaus.org"
KEY = "abcdefghijklmnopqrstuvwxyz0"
DQS_DBL = f"{KEY}.dbl.dq.spamhaus.net"


def check(**options: Any) -> Any:
    return build(FACTORIES, "dbl", **options)


def test_stages() -> None:
    assert check().stages == frozenset({Stage.HELO, Stage.MAIL, Stage.RCPT})


def test_sender_domain_listed(dns: ZoneServer) -> None:
    dns.set(f"spam.example.net.{DBL}", "A", ["127.0.1.2"])
    facts = make_facts(sender="Bob@Spam.Example.NET")
    result = run(check(), facts, make_ports(dns))
    assert result.matched
    assert result.reason == "spam.example.net is listed at dbl.spamhaus.org (127.0.1.2)"
    assert result.values == {
        "domain": "spam.example.net",
        "field": "sender_domain",
        "zone": DBL,
        "codes": "127.0.1.2",
        "txt": "",
    }
    assert result.header == "X-Warning: " + result.reason
    assert facts.results[DBL_LISTED] == ["spam.example.net"]


def test_sender_domain_not_listed(dns: ZoneServer) -> None:
    facts = make_facts(sender="bob@good.example.net", helo="spam.example.net")
    dns.set(f"spam.example.net.{DBL}", "A", ["127.0.1.2"])
    assert not run(check(), facts, make_ports(dns)).matched  # the HELO is not asked by default
    assert dns.queries(f"good.example.net.{DBL}", "A") == 1


def test_helo_listed_with_txt(dns: ZoneServer) -> None:
    dns.set(f"spam.example.net.{DBL}", "A", ["127.0.1.4"])
    dns.set(f"spam.example.net.{DBL}", "TXT", ["https://www.spamhaus.org/query/domain/x"])
    facts = make_facts(helo="SPAM.example.net.")
    result = run(check(field="helo", txt=True), facts, make_ports(dns))
    assert result.matched and result.values["field"] == "helo"
    assert result.header == (
        "X-Warning: spam.example.net is listed at dbl.spamhaus.org "
        "(127.0.1.4: https://www.spamhaus.org/query/domain/x)"
    )


def test_both_fields_and_duplicates_asked_once(dns: ZoneServer) -> None:
    dns.set(f"spam.example.net.{DBL}", "A", ["127.0.1.2"])
    facts = make_facts(helo="spam.example.net", sender="a@spam.example.net")
    result = run(check(fields=["helo", "sender_domain"]), facts, make_ports(dns))
    assert result.matched and result.values["field"] == "helo"
    assert dns.queries(f"spam.example.net.{DBL}", "A") == 1
    facts = make_facts(helo="good.example.net", sender="a@spam.example.net")
    result = run(check(fields=["helo", "sender_domain"]), facts, make_ports(dns))
    assert result.matched and result.values["field"] == "sender_domain"


@pytest.mark.parametrize(
    "helo", ["[192.0.2.1]", "[IPv6:2001:db8::1]", "192.0.2.1", "localhost", "bad_label-.x", "a b"]
)
def test_literals_and_invalid_names_are_skipped(dns: ZoneServer, helo: str) -> None:
    assert not run(check(field="helo"), make_facts(helo=helo), make_ports(dns)).matched
    assert dns.total_queries == 0


def test_null_sender_and_no_helo_are_skipped(dns: ZoneServer) -> None:
    facts = make_facts(sender="")
    assert not run(check(fields=["helo", "sender_domain"]), facts, make_ports(dns)).matched
    assert dns.total_queries == 0


def test_code_outside_codes_is_not_a_listing(dns: ZoneServer) -> None:
    dns.set(f"spam.example.net.{DBL}", "A", ["127.0.0.2"])
    assert not run(check(), make_facts(sender="a@spam.example.net"), make_ports(dns)).matched


@pytest.mark.parametrize(
    ("answer", "meaning"),
    [
        ("127.0.1.255", "error code of this list"),
        ("127.255.255.254", "public/open resolver"),
        ("10.0.0.1", "outside 127.0.0.0/8"),
    ],
)
def test_error_answers(dns: ZoneServer, answer: str, meaning: str) -> None:
    dns.set(f"spam.example.net.{DBL}", "A", [answer])
    facts = make_facts(sender="a@spam.example.net")
    error = run_error(check(), facts, make_ports(dns))
    assert meaning in str(error)
    assert facts.results[DBL_ERRORS]


@pytest.mark.parametrize("behaviour", ["timeout", "servfail"])
def test_failures(dns: ZoneServer, behaviour: str) -> None:
    dns.behave(f"spam.example.net.{DBL}", behaviour)
    error = run_error(check(), make_facts(sender="a@spam.example.net"), make_ports(dns, 0.2))
    assert "dbl.spamhaus.org: lookup failed" in str(error)


def test_other_zone_and_codes(dns: ZoneServer) -> None:
    dns.add_zone("multi.uribl.test")
    dns.set("spam.example.net.multi.uribl.test", "A", ["127.0.0.4"])
    built = check(zone="multi.uribl.test", codes=["127.0.0.2-127.0.0.8"])
    result = run(built, make_facts(sender="a@spam.example.net"), make_ports(dns))
    assert result.matched and result.values["zone"] == "multi.uribl.test"


def test_dqs(dns: ZoneServer) -> None:
    dns.set(f"spam.example.net.{DQS_DBL}", "A", ["127.0.1.2"])
    facts = make_facts(sender="a@spam.example.net")
    result = run(check(dqs_key=KEY), facts, make_ports(dns))
    assert result.matched and result.values["zone"] == DBL
    for text in (result.reason, result.header or "", *result.values.values(), repr(facts.results)):
        assert KEY not in text and "dq.spamhaus.net" not in text


@pytest.mark.parametrize("behaviour", ["timeout", "servfail"])
def test_dqs_failure_never_shows_the_key(dns: ZoneServer, behaviour: str) -> None:
    dns.behave(f"spam.example.net.{DQS_DBL}", behaviour)
    facts = make_facts(sender="a@spam.example.net")
    error = run_error(check(dqs_key=KEY), facts, make_ports(dns, 0.2))
    for text in (str(error), repr(error), repr(facts.results)):
        assert KEY not in text and "dq.spamhaus.net" not in text


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"field": "recipient"}, "field"),
        ({"fields": ["helo", "sender"]}, "fields"),
        ({"fields": []}, "fields"),
        ({"field": "helo", "fields": ["helo"]}, "fields"),
        ({"field": 3}, "field"),
        ({"zone": 3}, "zone"),
        ({"zone": "not a zone"}, "zone"),
        ({"codes": ["x"]}, "codes"),
        ({"txt": "yes"}, "txt"),
        ({"dqs_key": "short"}, "dqs_key"),
        ({"zones": ["dbl.spamhaus.org"]}, "zones"),
    ],
)
def test_option_errors(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):
        check(**options)


def test_check_error_names_the_failed_zone(dns: ZoneServer) -> None:
    dns.set(f"spam.example.net.{DBL}", "A", ["127.255.255.254"])
    error = run_error(check(), make_facts(sender="a@spam.example.net"), make_ports(dns))
    assert list(error.zones) == [DBL]
    assert "public/open resolver" in error.zones[DBL]
