"""The rule engine as a decision table. Checks here are in-memory stand-ins (the engine is pure);
every real check is tested against real servers in tests/checks and tests/state."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any, ClassVar, TypedDict

import pytest

from palisade.policy.engine import TEMPFAIL_REPLY, Rule, evaluate_stage
from palisade.policy.rules import CheckError, CheckResult, Facts, OnError, Ports, Stage
from palisade.policy.verdict import Verb
from palisade.ports import DnsTempError
from tests.unused_ports import NoClock, NoResolver, NoState


class Fixed:
    """A stand-in check with a fixed answer (or a failure, or a hang)."""

    name: ClassVar[str] = "fixed"
    stages: ClassVar[frozenset[Stage]] = frozenset(Stage)

    def __init__(
        self,
        matched: bool = True,
        *,
        fail: Exception | None = None,
        hang: bool = False,
        values: dict[str, str] | None = None,
        header: str | None = None,
    ) -> None:
        self.matched, self.fail, self.hang = matched, fail, hang
        self.values, self.header = values or {}, header
        self.calls = 0

    async def evaluate(self, facts: Facts, ports: Ports) -> CheckResult:
        self.calls += 1
        if self.hang:
            await asyncio.sleep(3600)
        if self.fail is not None:
            raise self.fail
        return CheckResult(self.matched, "because", self.values, self.header)


def rule(check: Any, verb: Verb = Verb.DENY, stage: Stage = Stage.RCPT, **kw: Any) -> Rule:
    return Rule(name=kw.pop("name", "r"), stage=stage, check=check, verb=verb, **kw)


def facts() -> Facts:
    return Facts(
        client_ip=ipaddress.ip_address("192.0.2.1"),
        client_port=1,
        helo="h.test",
        sender="s@x.test",
        recipient="r@example.test",
    )


PORTS = Ports(resolver=NoResolver(), state=NoState(), clock=NoClock())


def run(rules: list[Rule], f: Facts | None = None, stage: Stage = Stage.RCPT) -> Any:
    return asyncio.run(evaluate_stage(stage, rules, f or facts(), PORTS))


def test_first_decisive_rule_wins_and_later_rules_do_not_run() -> None:
    later = Fixed()
    out = run(
        [
            rule(Fixed(False)),
            rule(Fixed(), message="no $recipient", log_message="TAG $reason"),
            rule(later),
        ]
    )
    assert out.verdict.action is Verb.DENY
    assert out.verdict.reply.to_bytes() == b"550 5.7.1 no r@example.test\r\n"
    assert out.verdict.log_message == "TAG because"
    assert later.calls == 0
    assert [d.matched for d in out.decisions] == [False, True]


def test_accept_ends_the_stage_and_accept_all_every_later_stage() -> None:
    after = Fixed()
    out = run([rule(Fixed(), Verb.ACCEPT), rule(after)])
    assert out.verdict is None and out.accepted and after.calls == 0
    f = facts()
    run([rule(Fixed(), Verb.ACCEPT_ALL)], f, Stage.CONNECT)
    out = run([rule(after)], f)
    assert out.verdict is None and after.calls == 0


def test_warn_goes_on_and_collects_the_header() -> None:
    out = run([rule(Fixed(header="X-Warning: $ip listed"), Verb.WARN), rule(Fixed(False))])
    assert out.verdict is None
    assert out.headers == ["X-Warning: 192.0.2.1 listed"]


def test_observe_mode_logs_would_and_does_not_act() -> None:
    out = run([rule(Fixed(), observe=True, log_message="DENY - x")])
    assert out.verdict is None
    assert out.decisions[0].log_text == "would deny: DENY - x"
    assert not out.decisions[0].acted


@pytest.mark.parametrize(
    ("on_error", "expected"),
    [
        (OnError.DEFER, (451, "4.4.3")),
        (OnError.DENY, (550, "5.7.1")),
        (OnError.MATCH, (550, "5.7.1")),
        (OnError.SKIP, None),
    ],
)
def test_temporary_failure_follows_on_error(on_error: OnError, expected: Any) -> None:
    out = run([rule(Fixed(fail=DnsTempError("SERVFAIL")), on_error=on_error)])
    if expected is None:
        assert out.verdict is None and out.decisions[0].error
        return
    assert (out.verdict.reply.code, out.verdict.reply.enhanced) == expected
    if on_error is OnError.DEFER:
        assert out.verdict.reply == TEMPFAIL_REPLY


def test_a_hanging_check_is_cut_by_its_deadline_and_deferred() -> None:
    out = run([rule(Fixed(hang=True), timeout=0.05)])
    assert out.verdict.action is Verb.DEFER
    assert "timed out" in out.decisions[0].error


def test_check_error_is_a_temporary_failure_too() -> None:
    out = run(
        [rule(Fixed(fail=CheckError("zone answered 127.255.255.254")), on_error=OnError.DENY)]
    )
    assert out.verdict.action is Verb.DENY


def test_negate_and_connect_codes_and_code_override() -> None:
    out = run([rule(Fixed(False), negate=True, stage=Stage.CONNECT)], stage=Stage.CONNECT)
    assert out.verdict.reply.code == 554
    out = run([rule(Fixed(), Verb.DEFER, stage=Stage.CONNECT)], stage=Stage.CONNECT)
    assert out.verdict.reply.code == 421
    out = run([rule(Fixed(), code=553, enhanced="5.7.27", message="x")])
    assert (out.verdict.reply.code, out.verdict.reply.enhanced) == (553, "5.7.27")
    out = run([rule(Fixed(), Verb.DROP)])
    assert out.verdict.closes


def test_recipient_domains_limit_a_rule_to_those_recipients() -> None:
    only_corp = rule(Fixed(), recipient_domains=frozenset({"corp.test"}))
    f = facts()
    f.recipient = "boss@corp.test"
    assert run([only_corp], f).verdict is not None
    f.recipient = "someone@example.test"
    out = run([only_corp], f)
    assert out.verdict is None and out.decisions == []


class Waits:
    """A check that waits several times before answering (or failing): it runs under the rule's
    deadline after its first wait."""

    name: ClassVar[str] = "waits"
    stages: ClassVar[frozenset[Stage]] = frozenset(Stage)

    def __init__(self, *, fail: Exception | None = None, inner_timeout: float | None = None):
        self.fail, self.inner_timeout = fail, inner_timeout
        self.cleaned_up = False

    async def evaluate(self, facts: Facts, ports: Ports) -> CheckResult:
        try:
            await asyncio.sleep(0)
            loop = asyncio.get_running_loop()
            later: asyncio.Future[str] = loop.create_future()
            loop.call_later(0.01, later.set_result, "late")
            value = await later
            if self.inner_timeout is not None:  # a check with its own, shorter deadline
                try:
                    async with asyncio.timeout(self.inner_timeout):
                        await asyncio.sleep(3600)
                except TimeoutError:
                    value = "inner timeout"
            if self.fail is not None:
                raise self.fail
            return CheckResult(True, value, {"v": value})
        finally:
            self.cleaned_up = True


def test_a_check_that_waits_is_followed_to_its_answer_or_error() -> None:
    out = run([rule(Waits(), log_message="got $v")])
    assert out.verdict is not None and out.verdict.log_message == "got late"
    out = run([rule(Waits(inner_timeout=0.01), log_message="got $v")])
    assert out.verdict is not None and out.verdict.log_message == "got inner timeout"
    out = run([rule(Waits(fail=DnsTempError("SERVFAIL")), on_error=OnError.DENY)])
    assert out.verdict.action is Verb.DENY
    assert out.decisions[0].error is not None and "SERVFAIL" in out.decisions[0].error


def test_cancelling_a_stage_cancels_the_waiting_check() -> None:
    check = Waits(inner_timeout=3600)

    async def scenario() -> None:
        task = asyncio.ensure_future(evaluate_stage(Stage.RCPT, [rule(check)], facts(), PORTS))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert check.cleaned_up


@pytest.mark.parametrize(
    "text",
    ["$ip is listed at $zone", "a $$ b ${zone}s $unknown ${bad $", "$", "$$", "x$", "${}", "$1a"],
)
def test_rule_texts_fill_as_string_template_does(text: str) -> None:
    from string import Template

    values = {"zone": "bl.test"}
    out = run([rule(Fixed(values=values), message=text, log_message=text)])
    expected = Template(text).safe_substitute(
        {
            "ip": "192.0.2.1",
            "helo": "h.test",
            "sender": "s@x.test",
            "recipient": "r@example.test",
            "reason": "because",
            **values,
        }
    )
    assert out.verdict.log_message == expected
    assert out.verdict.reply.text == (expected or "Access denied")


# ---------------------------------------------------------------- a failure logs its own line


class MatchTexts(TypedDict):
    message: str
    log_message: str


MATCH_TEXTS: MatchTexts = {
    "message": "$ip is listed at $zone",
    "log_message": "DENY - listed at $zone ($codes)",
}


@pytest.mark.parametrize(
    ("on_error", "log_text", "reply"),
    [
        (OnError.DEFER, "DEFER - fixed lookup failed: fixed: SERVFAIL", TEMPFAIL_REPLY),
        (OnError.DENY, "DENY - fixed lookup failed (on_error = deny): fixed: SERVFAIL", None),
        (OnError.MATCH, "DENY - fixed lookup failed (on_error = match): fixed: SERVFAIL", None),
    ],
)
def test_a_failed_check_never_logs_the_match_text(
    on_error: OnError, log_text: str, reply: Any
) -> None:
    out = run([rule(Fixed(fail=DnsTempError("SERVFAIL")), on_error=on_error, **MATCH_TEXTS)])
    assert out.verdict.log_message == log_text
    assert out.decisions[0].log_text == log_text
    # the rule's message names $zone, which a failure cannot fill: the plain default is sent
    if reply is not None:
        assert out.verdict.reply == reply
    assert "$" not in out.verdict.reply.text and "listed" not in out.verdict.reply.text
    if on_error is not OnError.DEFER:
        assert out.verdict.reply.text == "Access denied"


def test_a_failed_check_keeps_a_message_the_facts_can_fill() -> None:
    out = run(
        [
            rule(
                Fixed(fail=DnsTempError("SERVFAIL")),
                on_error=OnError.DENY,
                message="No reverse DNS for $ip",
                log_message="DENY - no PTR for $ip ($reason)",
            )
        ]
    )
    assert out.verdict.reply.text == "No reverse DNS for 192.0.2.1"
    assert out.verdict.log_message == (
        "DENY - fixed lookup failed (on_error = deny): fixed: SERVFAIL"
    )


def test_a_skipped_failure_says_so_and_goes_on() -> None:
    later = Fixed()
    out = run(
        [
            rule(Fixed(fail=CheckError("zen: answer 127.255.255.254")), on_error=OnError.SKIP),
            rule(later, log_message="second"),
        ]
    )
    skipped = out.decisions[0]
    assert not skipped.matched and not skipped.acted
    assert skipped.log_text == "fixed lookup failed, skipped: zen: answer 127.255.255.254"
    assert later.calls == 1 and out.verdict.log_message == "second"


def test_an_observed_failure_is_a_would_line_of_its_own() -> None:
    out = run([rule(Fixed(fail=DnsTempError("SERVFAIL")), observe=True, **MATCH_TEXTS)])
    assert out.verdict is None
    assert out.decisions[0].log_text == "would defer: DEFER - fixed lookup failed: fixed: SERVFAIL"


class Zoned(Fixed):
    """A stand-in blocklist: names the zones it asks."""

    active_zones = ("bl.test", "other.test")


def test_failed_zones_travel_with_the_decision() -> None:
    error = CheckError("bl.test: answer 127.255.255.254", {"bl.test": "answer 127.255.255.254"})
    out = run([rule(Zoned(fail=error), on_error=OnError.SKIP)])
    assert out.decisions[0].error_zones == {"bl.test": "answer 127.255.255.254"}
    out = run([rule(Zoned(hang=True), timeout=0.05, on_error=OnError.SKIP)])
    assert set(out.decisions[0].error_zones) == {"bl.test", "other.test"}
