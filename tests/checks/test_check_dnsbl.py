"""``dnsbl`` against a real DNS server on loopback: listings, codes, error answers, failures,
IPv6 nibbles, weights, TXT in the header, and a Spamhaus DQS key that never shows."""

from __future__ import annotations

import re
from typing import Any

import pytest

from loopback.dnsserver import ZoneServer
from palisade.policy.checks.dnsbl import FACTORIES
from palisade.policy.keys import DNSBL_ERRORS, DNSBL_LISTED
from palisade.policy.rules import CheckResult, Facts, Stage
from tests.checks.harness import build, make_facts, make_ports, run, run_error

V4 = "192.0.2.1"
V6 = "2001:db8::25"
ZEN = "zen.spamhaus.org"
SPAMCOP = "bl.spamcop.net"
BARRACUDA = "b.barracudacentral.org"
KEY = "abcdefghijklmnopqrstuvwxyz0"
DQS_ZEN = f"{KEY}.zen.dq.spamhaus.net"


def check(**options: Any) -> Any:
    return build(FACTORIES, "dnsbl", **options)


def seed_zones(**zen: Any) -> list[dict[str, Any]]:
    return [
        {"zone": ZEN, "codes": ["127.0.0.2-127.0.0.11"], **zen},
        {"zone": SPAMCOP, "ipv6": False},
        {"zone": BARRACUDA},
    ]


def test_stages() -> None:
    assert check(zones=[ZEN]).stages == frozenset({Stage.CONNECT, Stage.RCPT})


def test_not_listed(dns: ZoneServer) -> None:
    facts = make_facts()
    assert run(check(zones=seed_zones()), facts, make_ports(dns)).matched is False
    assert facts.results[DNSBL_LISTED] == []
    assert "dnsbl.errors" not in facts.results
    for zone in (ZEN, SPAMCOP, BARRACUDA):
        assert dns.queries(f"1.2.0.192.{zone}", "A") == 1


def test_listed(dns: ZoneServer) -> None:
    dns.list_address(ZEN, V4, "127.0.0.11", "127.0.0.4")
    facts = make_facts()
    result = run(check(zones=seed_zones()), facts, make_ports(dns))
    assert result.matched
    assert result.reason == "192.0.2.1 is listed at zen.spamhaus.org (127.0.0.11, 127.0.0.4)"
    assert result.values == {
        "zone": ZEN,
        "codes": "127.0.0.11, 127.0.0.4",
        "txt": "",
        "zones": ZEN,
    }
    assert result.header == (
        "X-Warning: 192.0.2.1 is listed at zen.spamhaus.org (127.0.0.11, 127.0.0.4)"
    )
    assert facts.results[DNSBL_LISTED] == [ZEN]
    assert dns.queries(f"1.2.0.192.{ZEN}", "TXT") == 0  # txt is off by default


def test_txt_in_header(dns: ZoneServer) -> None:
    text = "https://www.spamhaus.org/query/ip/192.0.2.1"
    dns.list_address(ZEN, V4, "127.0.0.11", "127.0.0.4", txt=text)
    result = run(check(zones=seed_zones(txt=True)), make_facts(), make_ports(dns))
    assert result.header == (
        f"X-Warning: 192.0.2.1 is listed at zen.spamhaus.org (127.0.0.11, 127.0.0.4: {text})"
    )
    assert result.values["txt"] == text


def test_hostile_txt_is_cleaned(dns: ZoneServer) -> None:
    dns.list_address(ZEN, V4, txt="listed\r\nX-Injected: yes $ip " + "x" * 600)
    result = run(check(zones=[{"zone": ZEN, "txt": True}]), make_facts(), make_ports(dns))
    assert result.matched and result.header is not None
    for text in (result.reason, result.header, *result.values.values()):
        assert "\r" not in text and "\n" not in text
    assert "$$ip" in result.header  # the engine fills $names in headers: remote $ stays literal
    assert len(result.values["txt"]) <= 255


def test_second_listing_zone_is_in_zones(dns: ZoneServer) -> None:
    dns.list_address(SPAMCOP, V4)
    dns.list_address(BARRACUDA, V4)
    result = run(check(zones=seed_zones()), make_facts(), make_ports(dns))
    assert result.values["zone"] == SPAMCOP
    assert result.values["zones"] == f"{SPAMCOP}, {BARRACUDA}"
    assert result.header == (
        "X-Warning: 192.0.2.1 is listed at bl.spamcop.net (127.0.0.2), "
        "b.barracudacentral.org (127.0.0.2)"
    )


def test_code_outside_codes_is_not_a_listing(dns: ZoneServer) -> None:
    dns.list_address(ZEN, V4, "127.0.0.20")
    facts = make_facts()
    assert not run(check(zones=seed_zones()), facts, make_ports(dns)).matched
    assert "dnsbl.errors" not in facts.results


def test_default_codes_take_any_loopback_answer(dns: ZoneServer) -> None:
    dns.list_address(BARRACUDA, V4, "127.0.0.200")
    assert run(check(zones=[BARRACUDA]), make_facts(), make_ports(dns)).matched


@pytest.mark.parametrize(
    ("answer", "meaning"),
    [
        ("127.255.255.254", "public/open resolver"),
        ("127.255.255.252", "typo in the zone name"),
        ("127.255.255.255", "excessive number of queries"),
        ("127.255.255.1", "DNSBL error code"),
        ("10.0.0.1", "outside 127.0.0.0/8"),
    ],
)
def test_error_answers_are_check_errors(dns: ZoneServer, answer: str, meaning: str) -> None:
    dns.list_address(ZEN, V4, answer)
    facts = make_facts()
    error = run_error(check(zones=seed_zones()), facts, make_ports(dns))
    assert meaning in str(error)
    assert ZEN in str(error)
    assert any(meaning in text for text in facts.results[DNSBL_ERRORS])


def test_error_answer_with_a_listing_elsewhere_still_matches(dns: ZoneServer) -> None:
    dns.list_address(ZEN, V4, "127.255.255.254")
    dns.list_address(SPAMCOP, V4)
    facts = make_facts()
    result = run(check(zones=seed_zones()), facts, make_ports(dns))
    assert result.matched and result.values["zone"] == SPAMCOP
    assert len(facts.results[DNSBL_ERRORS]) == 1


@pytest.mark.parametrize("behaviour", ["timeout", "servfail"])
def test_zone_failure_is_a_check_error(dns: ZoneServer, behaviour: str) -> None:
    dns.behave(f"1.2.0.192.{ZEN}", behaviour)
    facts = make_facts()
    error = run_error(check(zones=seed_zones()), facts, make_ports(dns, timeout=0.2))
    assert f"{ZEN}: lookup failed" in str(error)
    assert facts.results[DNSBL_ERRORS]


# ---------------------------------------------------------------- IPv6


def test_ipv6_nibbles_and_ipv4_only_zones_skipped(dns: ZoneServer) -> None:
    name = dns.list_address(ZEN, V6, "127.0.0.3")
    assert name.startswith("5.2.0.0.0.0.0.0")
    facts = make_facts(V6)
    result = run(check(zones=seed_zones()), facts, make_ports(dns))
    assert result.matched and result.values["codes"] == "127.0.0.3"
    assert dns.queries(name, "A") == 1
    assert not any(qname.endswith(SPAMCOP) for _, qname, _ in dns.log)


def test_ipv6_not_listed(dns: ZoneServer) -> None:
    assert not run(check(zones=seed_zones()), make_facts(V6), make_ports(dns)).matched


def test_ipv6_client_with_only_ipv4_zones_is_not_matched(dns: ZoneServer) -> None:
    check_ = check(zones=[{"zone": SPAMCOP, "ipv6": False}])
    assert not run(check_, make_facts(V6), make_ports(dns)).matched
    assert dns.total_queries == 0


def test_ipv4_mapped_client_is_queried_as_ipv4(dns: ZoneServer) -> None:
    dns.list_address(SPAMCOP, V4)
    result = run(check(zones=seed_zones()), make_facts(f"::ffff:{V4}"), make_ports(dns))
    assert result.matched and result.values["zone"] == SPAMCOP
    assert result.reason.startswith("192.0.2.1 is listed")


# ---------------------------------------------------------------- weights


def test_threshold_with_weights(dns: ZoneServer) -> None:
    zones = [
        {"zone": ZEN, "weight": 2},
        {"zone": SPAMCOP, "weight": 1},
        {"zone": BARRACUDA, "weight": 1},
    ]
    dns.list_address(SPAMCOP, V4)
    assert not run(check(zones=zones, threshold=2), make_facts(), make_ports(dns)).matched
    dns.list_address(BARRACUDA, V4)
    result = run(check(zones=zones, threshold=2), make_facts(), make_ports(dns))
    assert result.matched and result.values["zones"] == f"{SPAMCOP}, {BARRACUDA}"
    dns.remove(f"1.2.0.192.{SPAMCOP}")
    dns.remove(f"1.2.0.192.{BARRACUDA}")
    dns.list_address(ZEN, V4)
    assert run(check(zones=zones, threshold=2), make_facts(), make_ports(dns)).matched


def test_below_threshold_with_a_failed_zone_is_a_check_error(dns: ZoneServer) -> None:
    dns.list_address(SPAMCOP, V4)
    dns.behave(f"1.2.0.192.{ZEN}", "servfail")
    error = run_error(check(zones=seed_zones(), threshold=2), make_facts(), make_ports(dns))
    assert "zen.spamhaus.org: lookup failed" in str(error)


# ---------------------------------------------------------------- Spamhaus DQS


def assert_no_key(result: CheckResult | None, facts: Facts, *texts: str) -> None:
    blobs = [*texts, repr(facts.results)]
    if result is not None:
        blobs += [result.reason, result.header or "", *result.values.values()]
    for blob in blobs:
        assert KEY not in blob.lower(), blob
        assert "dq.spamhaus.net" not in blob, blob


def test_dqs_listed_shows_the_public_zone(dns: ZoneServer) -> None:
    dns.list_address(DQS_ZEN, V4, "127.0.0.4", txt=f"see {KEY}.zen.dq.spamhaus.net")
    facts = make_facts()
    result = run(check(zones=seed_zones(txt=True), dqs_key=KEY), facts, make_ports(dns))
    assert result.matched
    assert result.values["zone"] == ZEN
    assert result.reason.startswith("192.0.2.1 is listed at zen.spamhaus.org (127.0.0.4")
    assert dns.queries(f"1.2.0.192.{DQS_ZEN}", "A") == 1
    assert dns.queries(f"1.2.0.192.{ZEN}", "A") == 0
    assert dns.queries(f"1.2.0.192.{SPAMCOP}", "A") == 1  # non-Spamhaus zones are unchanged
    assert_no_key(result, facts)


def test_dqs_zone_written_as_dq_name(dns: ZoneServer) -> None:
    dns.list_address(DQS_ZEN, V4)
    result = run(check(zones=["zen.dq.spamhaus.net"], dqs_key=KEY), make_facts(), make_ports(dns))
    assert result.matched and result.values["zone"] == ZEN


def test_dqs_ipv6(dns: ZoneServer) -> None:
    dns.list_address(DQS_ZEN, V6, "127.0.0.3")
    facts = make_facts(V6)
    result = run(check(zones=seed_zones(), dqs_key=KEY), facts, make_ports(dns))
    assert result.matched
    assert_no_key(result, facts)


@pytest.mark.parametrize("behaviour", ["timeout", "servfail", "garbage"])
def test_dqs_failure_never_shows_the_key(dns: ZoneServer, behaviour: str) -> None:
    dns.behave(f"1.2.0.192.{DQS_ZEN}", behaviour)
    facts = make_facts()
    error = run_error(check(zones=seed_zones(), dqs_key=KEY), facts, make_ports(dns, 0.2))
    assert "zen.spamhaus.org: lookup failed" in str(error)
    assert_no_key(None, facts, str(error), repr(error), *map(str, error.args))


def test_dqs_error_answer_never_shows_the_key(dns: ZoneServer) -> None:
    dns.list_address(DQS_ZEN, V4, "127.255.255.252")
    facts = make_facts()
    error = run_error(check(zones=seed_zones(), dqs_key=KEY), facts, make_ports(dns))
    assert "typo in the zone name or bad DQS key" in str(error)
    assert_no_key(None, facts, str(error))


def test_dqs_key_not_in_option_errors() -> None:
    with pytest.raises(ValueError) as info:
        check(zones=[ZEN], dqs_key=KEY + "!")
    assert KEY not in str(info.value) and "dqs_key" in str(info.value)
    built = check(zones=[ZEN], dqs_key=KEY)
    assert KEY not in repr(built.zones[0])


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({}, "zones"),
        ({"zones": []}, "zones"),
        ({"zones": 5}, "zones"),
        ({"zones": [ZEN], "treshold": 2}, "treshold"),
        ({"zones": [ZEN], "threshold": "two"}, "threshold"),
        ({"zones": [ZEN], "threshold": 0}, "threshold"),
        ({"zones": [{"zone": ZEN, "code": ["127.0.0.2"]}]}, "zones"),
        ({"zones": [{"zone": ZEN, "codes": ["127.0.0.x"]}]}, "zones.codes"),
        ({"zones": [{"zone": ZEN, "codes": ["127.0.0.9-127.0.0.2"]}]}, "zones.codes"),
        ({"zones": [{"zone": ZEN, "codes": 2}]}, "zones.codes"),
        ({"zones": [{"zone": ZEN, "ipv6": "no"}]}, "zones.ipv6"),
        ({"zones": [{"zone": ZEN, "txt": 1}]}, "zones.txt"),
        ({"zones": [{"zone": ZEN, "weight": -1}]}, "zones.weight"),
        ({"zones": [{"codes": ["127.0.0.2"]}]}, "zones"),
        ({"zones": ["not a zone"]}, "zones"),
        ({"zones": [ZEN], "dqs_key": 12345678}, "dqs_key"),
    ],
)
def test_option_errors(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):
        check(**options)


def test_codes_forms() -> None:
    built = check(
        zones=[{"zone": ZEN, "codes": ["127.0.0.2", "127.0.1.0/24", "127.0.0.4-127.0.0.7"]}]
    )
    assert built.zones[0].codes == (
        (2130706434, 2130706434),
        (2130706688, 2130706943),
        (2130706436, 2130706439),
    )


# ---------------------------------------------------------------- through the engine


def test_engine_warn_header_and_deny_texts(dns: ZoneServer) -> None:
    import asyncio

    from palisade.policy.engine import Rule, evaluate_stage
    from palisade.policy.rules import OnError
    from palisade.policy.verdict import Verb

    dns.list_address(DQS_ZEN, V4, "127.0.0.11", "127.0.0.4", txt="costs $5 at $ip")
    built = check(zones=seed_zones(txt=True), dqs_key=KEY)
    warn = Rule("zen-warn", Stage.CONNECT, built, Verb.WARN)
    deny = Rule(
        "zen",
        Stage.CONNECT,
        built,
        Verb.DENY,
        message="$ip is listed at $zone ($codes)",
        log_message="DNSBL: $reason",
        on_error=OnError.DENY,
    )
    outcome = asyncio.run(
        evaluate_stage(Stage.CONNECT, [warn, deny], make_facts(), make_ports(dns))
    )
    assert outcome.headers == [
        "X-Warning: 192.0.2.1 is listed at zen.spamhaus.org "
        "(127.0.0.11, 127.0.0.4: costs $5 at $ip)"
    ]
    assert outcome.verdict is not None
    reply_text = str(outcome.verdict.reply)
    assert "192.0.2.1 is listed at zen.spamhaus.org (127.0.0.11, 127.0.0.4)" in reply_text
    for decision in outcome.decisions:
        assert KEY not in decision.log_text and KEY not in decision.reason

    dns.behave(f"1.2.0.192.{DQS_ZEN}", "timeout")
    outcome = asyncio.run(
        evaluate_stage(Stage.CONNECT, [deny], make_facts(), make_ports(dns, timeout=0.2))
    )
    assert outcome.verdict is not None  # on_error = "deny", as the seed's exim
    decision = outcome.decisions[0]
    assert decision.error is not None and KEY not in decision.error
    assert KEY not in decision.log_text


# ---------------------------------------------------------------- a failed zone is "not listed"


def test_check_error_names_the_failed_zones(dns: ZoneServer) -> None:
    dns.list_address(ZEN, V4, "127.255.255.254")
    dns.behave(f"1.2.0.192.{BARRACUDA}", "servfail")
    error = run_error(check(zones=seed_zones()), make_facts(), make_ports(dns))
    assert set(error.zones) == {ZEN, BARRACUDA}
    assert "Spamhaus: query via a public/open resolver" in error.zones[ZEN]
    assert error.zones[BARRACUDA].startswith(f"{BARRACUDA}: lookup failed")


def test_dqs_failed_zone_is_named_by_its_public_name(dns: ZoneServer) -> None:
    dns.list_address(DQS_ZEN, V4, "127.255.255.252")
    error = run_error(check(zones=seed_zones(), dqs_key=KEY), make_facts(), make_ports(dns))
    assert list(error.zones) == [ZEN]
    assert_no_key(None, make_facts(), repr(error.zones))


@pytest.mark.parametrize("answer", ["127.255.255.254", "timeout"])
def test_a_rule_without_on_error_skips_a_failed_lookup(
    dns: ZoneServer, answer: str, tmp_path: Any
) -> None:
    """Spamhaus' "query refused" or a silent zone is "not listed" (as Postfix and exim): the
    rule goes on with a line of its own, not a deferral and not the match text."""
    import asyncio

    from palisade.config import load_config
    from palisade.config.policy import build_policy
    from palisade.policy.engine import evaluate_stage

    if answer == "timeout":
        dns.behave(f"1.2.0.192.{ZEN}", "timeout")
    else:
        dns.list_address(ZEN, V4, answer)
    path = tmp_path / "palisade.toml"
    path.write_text(
        f'[[rules.connect]]\nname = "zen"\ncheck = "dnsbl"\nzones = ["{ZEN}"]\nverb = "deny"\n'
        'message = "$ip is listed at $zone"\nlog_message = "DENY - listed at $zone ($codes)"\n'
    )
    rules = build_policy(load_config(path)).for_stage(Stage.CONNECT)
    outcome = asyncio.run(
        evaluate_stage(Stage.CONNECT, rules, make_facts(), make_ports(dns, timeout=0.2))
    )
    assert outcome.verdict is None
    decision = outcome.decisions[0]
    assert decision.log_text.startswith(f"dnsbl lookup failed, skipped: {ZEN}: ")
    assert "listed at" not in decision.log_text and "$" not in decision.log_text
    assert list(decision.error_zones) == [ZEN]
