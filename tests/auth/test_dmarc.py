"""DMARC (RFC 7489): policy discovery, alignment, pct, the ``dmarc`` check."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

import pytest

from loopback.dnsserver import ZoneServer
from palisade.policy.checks.dmarc import (
    FACTORIES,
    DmarcOutcome,
    DmarcRecord,
    dmarc_outcome,
    from_domain,
    is_aligned,
    organisational_domain,
    parse_record,
)
from palisade.policy.rules import CheckError, CheckResult, Facts, MessageFacts, Ports
from tests.auth.conftest import (
    Messages,
    make_facts,
    plain_message,
    publish_key,
    remember,
    run,
    sign,
)
from tests.checks.harness import NoLists


class FixedDraw(random.Random):
    """A random source whose pct draw is known."""

    def __init__(self, value: int) -> None:
        super().__init__(0)
        self.value = value

    def randrange(self, *args: Any, **kwargs: Any) -> int:
        return self.value


@dataclass(frozen=True)
class FakeSpf:
    result: str
    identity: str
    domain: str


def dmarc(facts: Facts, ports: Ports, rng: random.Random | None = None) -> DmarcOutcome:
    return run(lambda: dmarc_outcome(facts, ports, rng=rng))


def evaluate(facts: Facts, ports: Ports, **options: Any) -> CheckResult:
    check = FACTORIES["dmarc"](options, NoLists())
    return run(lambda: check.evaluate(facts, ports))


def signed(messages: Messages, domain: str, from_header: str = "alice@example.com") -> MessageFacts:
    return messages.facts(sign(plain_message(from_header), domain))


def record(dns: ZoneServer, domain: str, text: str) -> None:
    dns.set(f"_dmarc.{domain}", "TXT", [text])


# -------------------------------------------------------------------- pass and fail


def test_pass_via_aligned_dkim(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    publish_key(dns, "example.com")
    record(dns, "example.com", "v=DMARC1; p=reject")
    facts = make_facts(signed(messages, "example.com"), sender="bounce@other.example.net")
    result = dmarc(facts, ports)
    assert result.result == "pass"
    assert (result.dkim_aligned, result.spf_aligned) == (True, False)
    assert (result.from_domain, result.policy, result.disposition) == (
        "example.com",
        "reject",
        "none",
    )


def test_pass_via_aligned_spf(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    dns.set("example.com", "TXT", ["v=spf1 ip4:192.0.2.1 -all"])
    record(dns, "example.com", "v=DMARC1; p=reject")
    facts = make_facts(messages.facts(plain_message()), sender="bounce@example.com")
    result = dmarc(facts, ports)
    assert result.result == "pass"
    assert (result.spf_aligned, result.dkim_aligned) == (True, False)


def test_spf_pass_for_another_domain_is_not_aligned(
    dns: ZoneServer, ports: Ports, messages: Messages
) -> None:
    dns.set("example.net", "TXT", ["v=spf1 ip4:192.0.2.1 -all"])
    record(dns, "example.com", "v=DMARC1; p=quarantine")
    facts = make_facts(messages.facts(plain_message()), sender="bounce@example.net")
    result = dmarc(facts, ports)
    assert (result.result, result.disposition, result.spf_aligned) == ("fail", "quarantine", False)


def test_null_sender_uses_the_helo_identity(
    dns: ZoneServer, ports: Ports, messages: Messages
) -> None:
    dns.set("mail.example.com", "TXT", ["v=spf1 ip4:192.0.2.1 -all"])
    record(dns, "example.com", "v=DMARC1; p=reject")
    facts = make_facts(messages.facts(plain_message()), sender="", helo="mail.example.com")
    result = dmarc(facts, ports)
    assert (result.result, result.spf_aligned) == ("pass", True)


def test_helo_identity_does_not_count_for_a_real_sender(ports: Ports, dns: ZoneServer) -> None:
    record(dns, "example.com", "v=DMARC1; p=reject")

    async def main(facts: Facts) -> DmarcOutcome:
        await remember(facts, "spf", FakeSpf("pass", "helo", "mail.example.com"))
        return await dmarc_outcome(facts, ports)

    facts = make_facts(MessageFacts((("From", "a@example.com"),), _NoSource(), 10))
    assert run(lambda: main(facts)).result == "fail"


def test_relaxed_and_strict_dkim_alignment(
    dns: ZoneServer, ports: Ports, messages: Messages
) -> None:
    publish_key(dns, "mail.example.com")
    record(dns, "example.com", "v=DMARC1; p=reject")
    message = signed(messages, "mail.example.com")
    sender = "bounce@example.net"
    assert dmarc(make_facts(message, sender=sender), ports).result == "pass"
    record(dns, "example.com", "v=DMARC1; p=reject; adkim=s")
    strict = dmarc(make_facts(message, sender=sender), _fresh_ports(dns))  # no cached record
    assert (strict.result, strict.disposition, strict.dkim_aligned) == ("fail", "reject", False)


def test_strict_spf_alignment(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    dns.set("bounces.example.com", "TXT", ["v=spf1 ip4:192.0.2.1 -all"])
    record(dns, "example.com", "v=DMARC1; p=none; aspf=s")
    facts = make_facts(messages.facts(plain_message()), sender="x@bounces.example.com")
    assert dmarc(facts, ports).result == "fail"


def test_organisational_domain_record_with_sp(
    dns: ZoneServer, ports: Ports, messages: Messages
) -> None:
    record(dns, "example.org", "v=DMARC1; p=none; sp=reject")
    facts = make_facts(messages.facts(plain_message("bob@news.example.org")))
    result = dmarc(facts, ports)
    assert (result.result, result.record_domain, result.policy, result.disposition) == (
        "fail",
        "example.org",
        "reject",
        "reject",
    )
    assert dns.queries("_dmarc.news.example.org", "TXT") == 1


def test_org_domain_record_without_sp_uses_p(
    dns: ZoneServer, ports: Ports, messages: Messages
) -> None:
    record(dns, "example.org", "v=DMARC1; p=quarantine")
    facts = make_facts(messages.facts(plain_message("bob@a.b.example.org")))
    assert dmarc(facts, ports).policy == "quarantine"


def test_record_at_the_from_domain_uses_p_not_sp(
    dns: ZoneServer, ports: Ports, messages: Messages
) -> None:
    record(dns, "news.example.org", "v=DMARC1; p=none; sp=reject")
    facts = make_facts(messages.facts(plain_message("bob@news.example.org")))
    result = dmarc(facts, ports)
    assert (result.record_domain, result.policy, result.disposition) == (
        "news.example.org",
        "none",
        "none",
    )


# -------------------------------------------------------------------- pct


def test_pct_zero_lowers_the_disposition(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    message = messages.facts(plain_message())
    record(dns, "example.com", "v=DMARC1; p=reject; pct=0")
    result = dmarc(make_facts(message), ports)
    assert (result.result, result.sampled, result.disposition) == ("fail", False, "quarantine")
    record(dns, "example.com", "v=DMARC1; p=quarantine; pct=0")
    ports2 = _fresh_ports(dns)
    result = dmarc(make_facts(message), ports2)
    assert (result.sampled, result.disposition) == (False, "none")


@pytest.mark.parametrize(("draw", "sampled"), [(49, True), (50, False)])
def test_pct_sample_uses_the_given_random_source(
    dns: ZoneServer, ports: Ports, messages: Messages, draw: int, sampled: bool
) -> None:
    record(dns, "example.com", "v=DMARC1; p=reject; pct=50")
    result = dmarc(make_facts(messages.facts(plain_message())), ports, FixedDraw(draw))
    assert result.pct == 50
    assert result.sampled is sampled
    assert result.disposition == ("reject" if sampled else "quarantine")


def test_default_sample_is_deterministic_per_message(
    dns: ZoneServer, ports: Ports, messages: Messages
) -> None:
    record(dns, "example.com", "v=DMARC1; p=reject; pct=50")
    message = messages.facts(plain_message())
    first = dmarc(make_facts(message), ports).sampled
    assert all(dmarc(make_facts(message), ports).sampled == first for _ in range(5))


# -------------------------------------------------------------------- no DMARC, errors


def test_no_record_is_none(ports: Ports, messages: Messages) -> None:
    result = dmarc(make_facts(messages.facts(plain_message())), ports)
    assert (result.result, result.from_domain, result.disposition) == (
        "none",
        "example.com",
        "none",
    )


def test_several_records_is_none(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    dns.set("_dmarc.example.com", "TXT", ["v=DMARC1; p=reject", "v=DMARC1; p=none"])
    result = dmarc(make_facts(messages.facts(plain_message())), ports)
    assert result.result == "none"
    assert "several" in result.reason


def test_other_txt_records_are_ignored(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    dns.set("_dmarc.example.com", "TXT", ["hello", "v=spf1 -all", "v=DMARC1; p=reject"])
    assert dmarc(make_facts(messages.facts(plain_message())), ports).policy == "reject"


def test_invalid_record_is_permerror(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    record(dns, "example.com", "v=DMARC1; p=bogus")
    result = dmarc(make_facts(messages.facts(plain_message())), ports)
    assert (result.result, result.disposition) == ("permerror", "none")


def test_two_from_headers_is_permerror(ports: Ports, messages: Messages) -> None:
    raw = plain_message(extra="From: mallory@example.net\n")
    result = dmarc(make_facts(messages.facts(raw)), ports)
    assert (result.result, result.from_domain) == ("permerror", "")


def test_dns_failure_is_temperror(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    dns.behave("_dmarc.example.com", "servfail")
    facts = make_facts(messages.facts(plain_message()))
    assert dmarc(facts, ports).result == "temperror"


def test_spf_temperror_on_an_aligned_domain_is_temperror(
    dns: ZoneServer, ports: Ports, messages: Messages
) -> None:
    record(dns, "example.com", "v=DMARC1; p=reject")
    facts = make_facts(messages.facts(plain_message()))

    async def main() -> DmarcOutcome:
        await remember(facts, "spf", FakeSpf("temperror", "mailfrom", "example.com"))
        return await dmarc_outcome(facts, ports)

    result = run(main)
    assert (result.result, result.disposition) == ("temperror", "none")


def test_no_message_yet(ports: Ports) -> None:
    facts = make_facts()
    assert dmarc(facts, ports).result == "none"
    assert "dmarc" not in facts.tx


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], ("none", None)),
        (["a@example.com", "b@example.com"], ("permerror", None)),
        (["a@example.com, b@example.net"], ("permerror", None)),
        (["Alice <alice@Example.COM.>"], ("ok", "example.com")),
        (['"Bob, the <boss>" <bob@example.org>'], ("ok", "example.org")),
        (["undisclosed-recipients:;"], ("permerror", None)),
        (["no-domain"], ("permerror", None)),
        (["x@exa mple.com"], ("permerror", None)),
        (["x@bücher.example"], ("ok", "xn--bcher-kva.example")),
    ],
)
def test_from_domain(values: list[str], expected: tuple[str, str | None]) -> None:
    assert from_domain(values) == expected


# -------------------------------------------------------------------- the check


def test_check_matches_reject_policy(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    record(dns, "example.com", "v=DMARC1; p=reject")
    result = evaluate(make_facts(messages.facts(plain_message())), ports, policy=["reject"])
    assert result.matched
    assert result.values == {
        "result": "fail",
        "domain": "example.com",
        "policy": "reject",
        "disposition": "reject",
    }


def test_check_policy_follows_the_sampled_disposition(
    dns: ZoneServer, ports: Ports, messages: Messages
) -> None:
    record(dns, "example.com", "v=DMARC1; p=reject; pct=0")
    message = messages.facts(plain_message())
    assert not evaluate(make_facts(message), ports, policy=["reject"]).matched
    assert evaluate(make_facts(message), ports, policy=["quarantine", "reject"]).matched


def test_check_does_not_match_pass(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    publish_key(dns, "example.com")
    record(dns, "example.com", "v=DMARC1; p=reject")
    assert not evaluate(make_facts(signed(messages, "example.com")), ports).matched
    result = evaluate(make_facts(signed(messages, "example.com")), ports, result=["pass"])
    assert result.matched


def test_check_temperror_raises(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    dns.behave("_dmarc.example.com", "servfail")
    message = messages.facts(plain_message())
    with pytest.raises(CheckError):
        evaluate(make_facts(message), ports)
    assert evaluate(make_facts(message), _fresh_ports(dns), result=["temperror"]).matched


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"result": ["softfail"]}, "option 'result'"),
        ({"policy": ["drop"]}, "option 'policy'"),
        ({"policy": []}, "option 'policy'"),
        ({"sp": "x"}, "unknown option"),
    ],
)
def test_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        FACTORIES["dmarc"](options, NoLists())


# -------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("v=DMARC1; p=reject", DmarcRecord("reject", "reject")),
        (
            "v=DMARC1;p=Quarantine;sp=none;adkim=s;aspf=s;pct=20",
            DmarcRecord("quarantine", "none", "s", "s", 20),
        ),
        ("v = DMARC1 ; p = none ; pct=101 ; adkim=x", DmarcRecord("none", "none")),
        ("v=DMARC1; p=reject; pct=-5; fo=1; unknown=1", DmarcRecord("reject", "reject")),
        ("v=DMARC1; p=bogus; rua=mailto:d@example.com", DmarcRecord("none", "none")),
        ("v=DMARC1; rua=mailto:d@example.com", DmarcRecord("none", "none")),
        ("p=reject; v=DMARC1", None),
        ("v=dmarc1; p=reject", None),
        ("v=DMARC2; p=reject", None),
        ("v=spf1 -all", None),
    ],
)
def test_parse_record(text: str, expected: DmarcRecord | None) -> None:
    assert parse_record(text) == expected


@pytest.mark.parametrize("text", ["v=DMARC1", "v=DMARC1; p=reject; sp=bogus", "v=DMARC1; p="])
def test_parse_unusable_record(text: str) -> None:
    assert isinstance(parse_record(text), str)


@pytest.mark.parametrize(
    ("domain", "org"),
    [
        ("a.b.example.co.uk", "example.co.uk"),
        ("Mail.Example.COM.", "example.com"),
        ("example.com", "example.com"),
        ("co.uk", "co.uk"),
    ],
)
def test_organisational_domain(domain: str, org: str) -> None:
    assert organisational_domain(domain) == org


def test_alignment_modes() -> None:
    assert is_aligned("mail.example.com", "example.com", "r")
    assert not is_aligned("mail.example.com", "example.com", "s")
    assert is_aligned("EXAMPLE.com.", "example.com", "s")
    assert not is_aligned("example.co.uk", "other.co.uk", "r")
    assert not is_aligned("", "example.com", "r")


class _NoSource:
    size = 0

    def open(self) -> Any:
        raise AssertionError("not read")


def _fresh_ports(dns: ZoneServer) -> Ports:
    from tests.checks.harness import make_ports

    return make_ports(dns)
