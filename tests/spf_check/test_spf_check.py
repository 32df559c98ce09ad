"""The ``spf`` check, ``spf_outcome`` and the ``Received-SPF`` header, against a real DNS server.

The DNS answers come from the loopback ``ZoneServer`` through the production ``DnsResolver``
(``tests/checks/harness.py``); pyspf's own resolver is made to fail loudly, so a pass proves that
every question went through the ``Resolver`` port.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from loopback.dnsserver import ZoneServer, start_zone_server
from palisade.policy.checks import REGISTRY
from palisade.policy.checks import spf as spf_check
from palisade.policy.checks.spf import (
    FACTORIES,
    SPF,
    SpfOutcome,
    received_spf_header,
    spf_helo_outcome,
    spf_outcome,
)
from palisade.policy.rules import Facts, Findings, Ports, Stage, known
from palisade.ports import DnsAnswer
from tests.adapters.conftest import SettableClock
from tests.checks.harness import build, make_facts, make_ports, run
from tests.unused_ports import NoState

CLIENT = "192.0.2.1"


@pytest.fixture
def dns() -> Iterator[ZoneServer]:
    server = start_zone_server()
    server.add_zone("example.net", negative_ttl=60)
    server.set("pass.example.net", "TXT", [f"v=spf1 ip4:{CLIENT} -all"])
    server.set("fail.example.net", "TXT", ["v=spf1 ip4:198.51.100.0/24 -all"])
    server.set("soft.example.net", "TXT", ["v=spf1 ~all"])
    server.set("mx.example.net", "TXT", ["v=spf1 a -all"])
    server.set("mx.example.net", "A", [CLIENT])
    server.set("exp.example.net", "TXT", ["v=spf1 -all exp=why.example.net"])
    server.set("why.example.net", "TXT", ["%{i} is not one of %{d}'s servers"])
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def no_pyspf_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """pyspf's own DNS must never be used by our evaluations."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"pyspf's own DNS was asked: {args!r}")

    monkeypatch.setattr(spf_check, "_PYSPF_LOOKUP", refuse)


def check(**options: Any) -> Any:
    return build(FACTORIES, "spf", **options)


def outcome_of(dns: ZoneServer, facts: Facts, **resolver: Any) -> SpfOutcome:
    ports = make_ports(dns, **resolver)

    async def main() -> SpfOutcome:
        return await spf_outcome(facts, ports)

    return asyncio.run(main())


# ---------------------------------------------------------------- building


def test_registered_and_stages() -> None:
    assert REGISTRY["spf"] is FACTORIES["spf"]
    assert check().stages == frozenset({Stage.MAIL, Stage.RCPT, Stage.DATA})
    assert check().results == frozenset({"fail"})
    assert check(result="SoftFail").results == frozenset({"softfail"})
    assert check(result=["fail", "temperror"], helo=True).helo


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"result": "bad"}, "unknown SPF result"),
        ({"result": []}, "at least one"),
        ({"result": 3}, "list of strings"),
        ({"helo": "yes"}, "true or false"),
        ({"results": "fail"}, "unknown option"),
    ],
)
def test_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check(**options)


# ---------------------------------------------------------------- the check at MAIL


def test_fail_matches_by_default(dns: ZoneServer) -> None:
    result = run(check(), make_facts(CLIENT, sender="bob@fail.example.net"), make_ports(dns))
    assert result.matched
    assert result.values["spf_result"] == "fail"
    assert result.values["spf_domain"] == "fail.example.net"
    assert result.values["spf_explanation"] == "SPF fail - not authorized"
    assert result.reason == (
        "SPF fail for mailfrom fail.example.net from 192.0.2.1: SPF fail - not authorized"
    )


def test_pass(dns: ZoneServer) -> None:
    facts = make_facts(CLIENT, sender="bob@pass.example.net", helo="client.example.org")
    assert not run(check(), facts, make_ports(dns)).matched
    result = run(
        check(result="pass"), make_facts(CLIENT, sender="bob@pass.example.net"), make_ports(dns)
    )
    assert result.matched and result.values["spf_result"] == "pass"
    assert result.reason == "SPF pass for mailfrom pass.example.net from 192.0.2.1"


def test_softfail(dns: ZoneServer) -> None:
    facts = make_facts(CLIENT, sender="bob@soft.example.net")
    assert not run(check(), facts, make_ports(dns)).matched
    result = run(check(result=["softfail", "fail"]), facts, make_ports(dns))
    assert result.matched and result.values["spf_result"] == "softfail"


def test_explanation_from_the_domain(dns: ZoneServer) -> None:
    result = run(check(), make_facts(CLIENT, sender="x@exp.example.net"), make_ports(dns))
    assert result.matched
    assert result.values["spf_explanation"] == "192.0.2.1 is not one of exp.example.net's servers"


def test_no_record_is_none(dns: ZoneServer) -> None:
    facts = make_facts(CLIENT, sender="bob@nothing.example.net")
    result = run(check(result="none"), facts, make_ports(dns))
    assert result.matched and result.values["spf_result"] == "none"


def test_ipv4_mapped_client_is_checked_as_ipv4(dns: ZoneServer) -> None:
    facts = make_facts(f"::ffff:{CLIENT}", sender="bob@pass.example.net")
    outcome = outcome_of(dns, facts)
    assert outcome.result == "pass" and outcome.client_ip == CLIENT


# ---------------------------------------------------------------- identities


def test_null_sender_uses_helo(dns: ZoneServer) -> None:
    facts = make_facts(CLIENT, sender="", helo="MX.example.net")
    outcome = outcome_of(dns, facts)
    assert outcome.result == "pass"
    assert outcome.identity == "helo"
    assert outcome.domain == "MX.example.net"
    assert outcome.mailbox == "postmaster@MX.example.net"
    assert outcome.sender == ""
    assert dns.queries("mx.example.net", "TXT") == 1


def test_null_sender_without_helo_is_none(dns: ZoneServer) -> None:
    outcome = outcome_of(dns, make_facts(CLIENT, sender=""))
    assert (outcome.result, outcome.identity) == ("none", "helo")
    assert dns.total_queries == 0


def test_no_sender_yet_is_none(dns: ZoneServer) -> None:
    outcome = outcome_of(dns, make_facts(CLIENT, helo="mx.example.net"))
    assert outcome.result == "none"
    assert dns.total_queries == 0


def test_helo_option_checks_helo_even_with_a_sender(dns: ZoneServer) -> None:
    facts = make_facts(CLIENT, sender="bob@fail.example.net", helo="mx.example.net")
    result = run(check(result="pass", helo=True), facts, make_ports(dns))
    assert result.matched
    assert result.reason == "SPF pass for helo mx.example.net from 192.0.2.1"
    assert dns.queries("fail.example.net", "TXT") == 0
    without_helo = make_facts(CLIENT, sender="bob@fail.example.net")
    assert run(check(result="none", helo=True), without_helo, make_ports(dns)).matched


def test_helo_option_with_null_sender_shares_the_evaluation(dns: ZoneServer) -> None:
    facts = make_facts(CLIENT, sender="", helo="mx.example.net")
    ports = make_ports(dns, cache_size=0)

    async def main() -> tuple[SpfOutcome, SpfOutcome]:
        return await spf_outcome(facts, ports), await spf_helo_outcome(facts, ports)

    first, second = asyncio.run(main())
    assert first is second
    assert dns.queries("mx.example.net", "TXT") == 1


# ---------------------------------------------------------------- memo


def test_one_evaluation_for_two_rules(dns: ZoneServer) -> None:
    facts = make_facts(CLIENT, sender="bob@fail.example.net")
    ports = make_ports(dns, cache_size=0)  # no resolver cache: only the memo can save a query

    async def main() -> tuple[Any, Any]:
        return await asyncio.gather(
            check().evaluate(facts, ports), check(result="pass").evaluate(facts, ports)
        )

    deny, accept = asyncio.run(main())
    assert deny.matched and not accept.matched
    assert dns.queries("fail.example.net", "TXT") == 1
    outcome = known(facts, SPF)
    assert outcome is not None and outcome.result == "fail"
    assert run(check(), facts, ports).matched  # a later stage: still no second evaluation
    assert dns.queries("fail.example.net", "TXT") == 1
    facts.tx = Findings()  # the session empties it at the next MAIL
    run(check(), facts, ports)
    assert dns.queries("fail.example.net", "TXT") == 2


# ---------------------------------------------------------------- DNS failures


def test_dns_server_down_is_temperror(dns: ZoneServer) -> None:
    ports = make_ports(dns)
    dns.stop()
    facts = make_facts(CLIENT, sender="bob@fail.example.net")
    result = run(check(), facts, ports)  # no CheckError: temperror is an SPF result
    assert not result.matched
    assert result.values["spf_result"] == "temperror"
    assert "DNS" in result.values["spf_explanation"]
    assert run(check(result=["fail", "temperror"]), facts, ports).matched


def test_timeout_is_temperror(dns: ZoneServer) -> None:
    dns.set("slow.example.net", "TXT", ["v=spf1 -all"])
    dns.behave("slow.example.net", "timeout")
    started = time.monotonic()
    outcome = outcome_of(dns, make_facts(CLIENT, sender="a@slow.example.net"), timeout=0.2)
    assert outcome.result == "temperror"
    assert time.monotonic() - started < 3


def test_zero_string_txt_record_is_temperror(dns: ZoneServer) -> None:
    """A TXT record of no character-strings is malformed (RFC 1035 3.3.14): the adapter refuses
    the whole answer, so the result is temperror, not the suite's "ignored" (see the suite test)."""
    dns.set("null.example.net", "TXT", [[]])
    outcome = outcome_of(dns, make_facts(CLIENT, sender="a@null.example.net"))
    assert outcome.result == "temperror"


def test_void_lookup_limit(dns: ZoneServer) -> None:
    dns.set(
        "void.example.net", "TXT", ["v=spf1 a:n1.example.net a:n2.example.net a:n3.example.net"]
    )
    outcome = outcome_of(dns, make_facts(CLIENT, sender="a@void.example.net"))
    assert outcome.result == "permerror"
    assert "Void lookup limit" in outcome.explanation


def test_ptr_lookup_error_does_not_end_the_evaluation(dns: ZoneServer) -> None:
    """RFC 7208 5.5: a DNS error during "ptr" makes it not match; evaluation goes on."""
    dns.add_zone("in-addr.arpa")
    dns.set("ptr.example.net", "TXT", ["v=spf1 ptr ?all"])
    dns.behave("1.2.0.192.in-addr.arpa", "servfail")
    outcome = outcome_of(dns, make_facts(CLIENT, sender="a@ptr.example.net"))
    assert outcome.result == "neutral"


# ---------------------------------------------------------------- the bridge


class _StubResolver:
    """Answers TXT for one name from memory; records what it was asked."""

    def __init__(self, record: str, hang: bool = False) -> None:
        self.record = record
        self.hang = hang
        self.asked: list[tuple[str, str]] = []
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()

    async def query(self, name: str, rdtype: str) -> DnsAnswer:
        self.asked.append((name, rdtype))
        if self.hang:
            self.started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        await asyncio.sleep(0.01)  # let the other evaluation interleave
        if rdtype == "TXT":
            return DnsAnswer((self.record,), 300)
        return DnsAnswer((), 300, nxdomain=True)

    async def ptr(self, ip: str) -> DnsAnswer:
        raise NotImplementedError


def _ports(resolver: Any) -> Ports:
    return Ports(resolver=resolver, state=NoState(), clock=SettableClock())


def test_concurrent_evaluations_use_their_own_resolvers() -> None:
    """Eight evaluations at once, half of them with a resolver that says pass, half fail."""
    passing = _StubResolver(f"v=spf1 ip4:{CLIENT} -all")
    failing = _StubResolver("v=spf1 -all")

    async def main() -> list[SpfOutcome]:
        jobs = []
        for n in range(8):
            facts = make_facts(CLIENT, sender=f"u{n}@d{n}.example.net")
            jobs.append(spf_outcome(facts, _ports(passing if n % 2 else failing)))
        return await asyncio.gather(*jobs)

    outcomes = asyncio.run(main())
    assert [o.result for o in outcomes] == ["fail", "pass"] * 4
    assert sorted(passing.asked) == sorted((f"d{n}.example.net", "TXT") for n in (1, 3, 5, 7))


def test_cancelled_evaluation_abandons_its_lookup() -> None:
    resolver = _StubResolver("", hang=True)
    facts = make_facts(CLIENT, sender="a@hang.example.net")

    async def main() -> None:
        waiter = asyncio.ensure_future(spf_outcome(facts, _ports(resolver)))
        await asyncio.wait_for(resolver.started.wait(), 5)
        facts.tx[SPF].cancel()  # what loop shutdown does to the memoised evaluation
        await asyncio.wait_for(resolver.cancelled.wait(), 2)
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(main())


# ---------------------------------------------------------------- Received-SPF


def _unfold(header: str) -> str:
    assert all(line.startswith("\t") for line in header.split("\r\n")[1:])
    return header.replace("\r\n\t", " ")


def outcome(**fields: Any) -> SpfOutcome:
    base: dict[str, Any] = {
        "result": "pass",
        "identity": "mailfrom",
        "domain": "example.com",
        "mailbox": "myname@example.com",
        "explanation": "sender SPF authorized",
        "client_ip": "192.0.2.1",
        "helo": "foo.example.com",
        "sender": "myname@example.com",
    }
    base.update(fields)
    return SpfOutcome(**base)


def test_header_pass() -> None:
    header = received_spf_header(outcome(), "mybox.example.org")
    assert _unfold(header) == (
        "Received-SPF: pass (mybox.example.org: domain of myname@example.com designates "
        "192.0.2.1 as permitted sender) client-ip=192.0.2.1; "
        'envelope-from="myname@example.com"; helo=foo.example.com; '
        "receiver=mybox.example.org; identity=mailfrom;"
    )
    assert all(len(line) <= 78 for line in header.split("\r\n"))


def test_header_from_a_real_evaluation(dns: ZoneServer) -> None:
    facts = make_facts(CLIENT, sender="bob@pass.example.net", helo="client.example.org")
    header = _unfold(received_spf_header(outcome_of(dns, facts), "mx.example.test"))
    assert header.startswith(
        "Received-SPF: pass (mx.example.test: domain of bob@pass.example.net designates "
        "192.0.2.1 as permitted sender) client-ip=192.0.2.1;"
    )
    assert 'mechanism="ip4:192.0.2.1";' in header
    assert header.endswith("receiver=mx.example.test; identity=mailfrom;")


def test_header_helo_identity_and_ipv6() -> None:
    header = _unfold(
        received_spf_header(
            outcome(
                result="softfail",
                identity="helo",
                domain="mx.example.net",
                mailbox="postmaster@mx.example.net",
                client_ip="2001:db8::1",
                helo="mx.example.net",
                sender="",
            ),
            "mx.example.test",
        )
    )
    assert header == (
        "Received-SPF: softfail (mx.example.test: transitioning domain of "
        "postmaster@mx.example.net does not designate 2001:db8::1 as permitted sender) "
        'client-ip="2001:db8::1"; helo=mx.example.net; receiver=mx.example.test; identity=helo;'
    )


def test_header_quotes_hostile_input() -> None:
    evil_sender = 'a"b\\c\r\nX-Injected: yes@example.com'
    evil_helo = 'helo"\r\nX-Evil: 1 (x)'
    header = received_spf_header(
        outcome(
            result="permerror",
            mailbox=evil_sender,
            sender=evil_sender,
            helo=evil_helo,
            explanation="SPF Permanent Error: Unknown mechanism found: a\x00b\nc",
        ),
        "mx.example.test",
    )
    lines = header.split("\r\n")
    assert all(line.startswith("\t") for line in lines[1:])
    assert not any(ch in header.replace("\r\n\t", "") for ch in "\r\n\x00")
    assert not re.search(r"^\S+:", "\n".join(lines[1:]), re.MULTILINE)
    text = _unfold(header)
    assert text.startswith("Received-SPF: permerror (mx.example.test: permanent error")
    assert (
        '(mx.example.test: permanent error in processing the SPF record of a"b\\\\c X-Inj' in text
    )
    assert 'envelope-from="a\\"b\\\\c  X-Injected: yes@example.com";' in text
    assert 'helo="helo\\"  X-Evil: 1 (x)";' in text
    assert 'problem="SPF Permanent Error: Unknown mechanism found: a b c";' in text


def test_header_comment_escapes_parentheses() -> None:
    header = _unfold(received_spf_header(outcome(mailbox="x)(y@example.com"), "mx.example.test"))
    assert "domain of x\\)\\(y@example.com designates" in header


def test_header_lines_stay_short_for_long_input() -> None:
    long = "a" * 300 + '"' * 300 + "@" + "b" * 300
    header = received_spf_header(
        outcome(mailbox=long, sender=long, helo=long, domain=long), "h" * 255
    )
    assert all(len(line) <= 998 for line in header.split("\r\n"))


def test_questions_remembered_per_domain_never_change_the_result(dns: ZoneServer) -> None:
    """The second evaluation of a domain starts from the questions of the first; with another
    client, another record, or an include that appeared, pyspf still decides from the DNS."""
    dns.set("inc.example.net", "TXT", ["v=spf1 include:pass.example.net -all"])
    first = outcome_of(dns, make_facts(ip=CLIENT, helo="h.example.net", sender="a@inc.example.net"))
    assert first.result == "pass"
    other = outcome_of(
        dns, make_facts(ip="203.0.113.9", helo="h.example.net", sender="a@inc.example.net")
    )
    assert other.result == "fail"
    dns.set("inc.example.net", "TXT", ["v=spf1 include:soft.example.net -all"])
    changed = outcome_of(
        dns, make_facts(ip=CLIENT, helo="h.example.net", sender="a@inc.example.net")
    )
    assert changed.result == "fail"  # soft.example.net's ~all does not match: the include fails
    assert dns.queries("soft.example.net", "TXT") >= 1
