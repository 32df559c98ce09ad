"""The rule engine: per stage, rules in the operator's order; the first decisive verdict wins.

Owns: evaluating one stage's rules against the facts (each check under its own deadline), what a
temporary failure turns into (the rule's ``on_error``; by default 451 4.4.3, never a silent
accept), observe mode (``would deny ...``), ``accept`` / ``accept_all``, ``warn`` headers, and the
texts a matched rule produces. It returns decisions; it writes no log and no reply (the session
does both), as Postfix's smtpd_check returns a reply for smtpd to send.
Trust: check results carry remote text (PTR names, DNSBL TXT records); the engine only places it
into templates, the session escapes it for the log.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from string import Template

from palisade.policy.rules import Check, CheckError, CheckResult, Facts, OnError, Ports, Stage, Verb
from palisade.policy.verdict import Action, Verdict
from palisade.ports import DnsTempError, StateTempError
from palisade.smtp.replies import Reply

_DEFAULT_CODES = {
    Verb.DENY: (550, "5.7.1"),
    Verb.DROP: (550, "5.7.1"),
    Verb.DEFER: (451, "4.7.1"),
}
_CONNECT_CODES = {Verb.DENY: (554, "5.7.1"), Verb.DROP: (554, "5.7.1"), Verb.DEFER: (421, "4.7.1")}
TEMPFAIL_REPLY = Reply(451, "4.4.3", "Temporary local problem, please try again later")
# At the greeting a deferral is 421: the server closes the connection (RFC 5321 3.8).
CONNECT_TEMPFAIL_REPLY = Reply(421, "4.4.3", "Temporary local problem, please try again later")


@dataclass(frozen=True)
class Rule:
    """One configured rule: a check with its options, a verb, and two texts."""

    name: str
    stage: Stage
    check: Check
    verb: Verb
    message: str = ""
    log_message: str = ""
    observe: bool = False
    on_error: OnError = OnError.DEFER
    timeout: float = 5.0
    negate: bool = False  # the verb applies when the condition does NOT hold
    code: int | None = None
    enhanced: str | None = None
    recipient_domains: frozenset[str] = frozenset()  # empty: every recipient

    def describe(self) -> str:
        prefix = "not " if self.negate else ""
        flags = " (observe only)" if self.observe else ""
        if self.recipient_domains:
            flags += f" (recipients in {', '.join(sorted(self.recipient_domains))})"
        return f"{self.verb.value} if {prefix}{self.check.name}: {self.name}{flags}"

    def applies_to(self, facts: Facts) -> bool:
        return not self.recipient_domains or facts.recipient_domain in self.recipient_domains


@dataclass(frozen=True)
class Decision:
    """What one evaluated rule did, for the log and for check-host."""

    rule: Rule
    matched: bool
    acted: bool  # False for observe-mode matches and non-matching rules
    reason: str
    log_text: str
    elapsed: float
    error: str | None = None
    header: str | None = None


@dataclass
class StageOutcome:
    """The result of one stage: the verdict (None = go on) and every decision taken."""

    stage: Stage
    verdict: Verdict | None = None
    accepted: bool = False  # an accept or accept_all rule ended the stage
    decisions: list[Decision] = field(default_factory=list)

    @property
    def headers(self) -> list[str]:
        return [d.header for d in self.decisions if d.acted and d.header]


def _fill(template: str, result: CheckResult, facts: Facts) -> str:
    values = {
        "ip": str(facts.client_ip),
        "helo": facts.helo or "",
        "sender": facts.sender or "",
        "recipient": facts.recipient or "",
        "reason": result.reason,
        **result.values,
    }
    return Template(template).safe_substitute(values)


def _reply(rule: Rule, verb: Verb, text: str) -> Reply:
    table = _CONNECT_CODES if rule.stage is Stage.CONNECT else _DEFAULT_CODES
    code, enhanced = table[verb]
    if rule.code is not None and rule.code // 100 == code // 100:
        code, enhanced = rule.code, rule.enhanced or enhanced
    return Reply(code, enhanced, text or ("Access denied" if code >= 500 else "Try again later"))


async def _run_check(rule: Rule, facts: Facts, ports: Ports) -> CheckResult:
    try:
        # asyncio.timeout, not wait_for: no extra Task per check on the hot path.
        async with asyncio.timeout(rule.timeout):
            return await rule.check.evaluate(facts, ports)
    except TimeoutError:
        raise CheckError(f"{rule.check.name} check timed out after {rule.timeout:g}s") from None
    except (DnsTempError, StateTempError) as exc:
        raise CheckError(f"{rule.check.name}: {exc}") from None


async def evaluate_stage(
    stage: Stage, rules: Sequence[Rule], facts: Facts, ports: Ports
) -> StageOutcome:
    """Runs ``rules`` (already those of ``stage``) in order until one decides."""
    outcome = StageOutcome(stage)
    if facts.results.get("accept_all"):
        return outcome
    for rule in rules:
        if not rule.applies_to(facts):
            continue
        started = time.monotonic()
        error: str | None = None
        try:
            result = await _run_check(rule, facts, ports)
            matched = result.matched != rule.negate
        except CheckError as exc:
            error = str(exc)
            result = CheckResult(True, reason=f"temporary failure: {error}")
            matched = True
        elapsed = time.monotonic() - started
        if not matched:
            outcome.decisions.append(Decision(rule, False, False, result.reason, "", elapsed))
            continue
        verb = rule.verb
        if error is not None:
            if rule.on_error is OnError.SKIP:
                outcome.decisions.append(
                    Decision(rule, False, False, result.reason, "", elapsed, error=error)
                )
                continue
            if rule.on_error is OnError.DEFER:
                verb = Verb.DEFER
            elif rule.on_error is OnError.DENY:
                verb = Verb.DENY
        log_text = _fill(rule.log_message or f"{rule.name}: $reason", result, facts)
        header = _fill(result.header, result, facts) if result.header else None
        if rule.observe:
            outcome.decisions.append(
                Decision(
                    rule,
                    True,
                    False,
                    result.reason,
                    f"would {verb.value}: {log_text}",
                    elapsed,
                    error=error,
                )
            )
            continue
        outcome.decisions.append(
            Decision(
                rule,
                True,
                True,
                result.reason,
                log_text,
                elapsed,
                error=error,
                header=header if verb is Verb.WARN else None,
            )
        )
        if verb is Verb.WARN:
            continue
        if verb in (Verb.ACCEPT, Verb.ACCEPT_ALL):
            if verb is Verb.ACCEPT_ALL:
                facts.results["accept_all"] = True
            outcome.accepted = True
            return outcome
        if error is not None and verb is Verb.DEFER and rule.on_error is OnError.DEFER:
            reply = CONNECT_TEMPFAIL_REPLY if rule.stage is Stage.CONNECT else TEMPFAIL_REPLY
        else:
            reply = _reply(rule, verb, _fill(rule.message, result, facts))
        action = {Verb.DENY: Action.DENY, Verb.DROP: Action.DROP, Verb.DEFER: Action.DEFER}[verb]
        outcome.verdict = Verdict(action, reply, log_text)
        return outcome
    return outcome
