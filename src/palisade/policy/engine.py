"""The rule engine: per stage, rules in the operator's order; the first decisive verdict wins.

Owns: starting a stage's always-on findings together before its rules (``policy.findings``:
SPF, DKIM, DMARC and the scans of the DATA stage), evaluating one stage's rules against the
facts (each check under its own deadline), what a temporary failure turns into (the rule's
``on_error``; by default 451 4.4.3, never a silent accept; a blocklist's default is to skip) and
the log text it gets -- its own (``DEFER - dnsbl lookup failed: <reason>``), never the rule's
text for a match, whose placeholders a failure cannot fill -- observe mode (``would deny ...``),
``accept`` / ``accept_all``, ``warn`` headers, and the texts a matched rule produces. It returns
decisions; it writes no log and no reply (the conversation does both), as Postfix's
smtpd_check returns a reply for smtpd to send.
Trust: check results carry remote text (PTR names, DNSBL TXT records); the engine only places it
into templates, the conversation escapes it for the log.
"""

from __future__ import annotations

import asyncio
import time
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from string import Template

from palisade.policy import keys
from palisade.policy.eager import Resume
from palisade.policy.findings import Finding
from palisade.policy.rules import (
    Check,
    CheckError,
    CheckResult,
    Facts,
    OnError,
    Ports,
    Stage,
    active_zones,
)
from palisade.policy.verdict import Verb, Verdict
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
    incident: int = 0  # incidents a refusal (deny, drop) by this rule records for the client

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
    # a failed blocklist lookup: public zone name -> what went wrong (for the panic log)
    error_zones: Mapping[str, str] = field(default_factory=dict)


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


def _parse_text(template: str) -> tuple[str | tuple[str, str], ...]:
    """A rule text cut at its placeholders once: literal strings and (name, text as written)
    pairs. Filling it gives exactly ``Template(template).safe_substitute(values)``: ``$$`` is a
    ``$``, an unknown name or a lone ``$`` stays as written."""
    parts: list[str | tuple[str, str]] = []
    done = 0
    for match in Template.pattern.finditer(template):
        if match.start() > done:
            parts.append(template[done : match.start()])
        done = match.end()
        named = match.group("named") or match.group("braced")
        if named is not None:
            parts.append((named, match.group()))
        elif match.group("escaped") is not None:
            parts.append(Template.delimiter)
        else:  # invalid: kept as written
            parts.append(match.group())
    if done < len(template):
        parts.append(template[done:])
    return tuple(parts)


_TEXTS: dict[str, tuple[str | tuple[str, str], ...]] = {}  # rule texts, parsed once


def _fill(template: str, result: CheckResult, facts: Facts) -> str:
    if "$" not in template:
        return template
    parts = _TEXTS.get(template)
    if parts is None:
        if len(_TEXTS) >= 1024:  # rule texts come from the config: a few; bound it anyway
            _TEXTS.clear()
        parts = _TEXTS[template] = _parse_text(template)
    values = {
        "ip": facts.client_ip_text,
        "helo": facts.helo or "",
        "sender": facts.sender or "",
        "recipient": facts.recipient or "",
        "reason": result.reason,
        **result.values,
    }
    out: list[str] = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
        else:
            name, written = part
            out.append(str(values[name]) if name in values else written)
    return "".join(out)


def _reply(rule: Rule, verb: Verb, text: str) -> Reply:
    table = _CONNECT_CODES if rule.stage is Stage.CONNECT else _DEFAULT_CODES
    code, enhanced = table[verb]
    if rule.code is not None and rule.code // 100 == code // 100:
        code, enhanced = rule.code, rule.enhanced or enhanced
    return Reply(code, enhanced, text or ("Access denied" if code >= 500 else "Try again later"))


async def _run_check(rule: Rule, facts: Facts, ports: Ports) -> CheckResult:
    # A check answered from caches (the warm path: a refused listed client) finishes in its
    # first step; it then costs no deadline timer at all. One that has to wait (a DNS query on
    # the wire, the store) gets the rule's deadline from its first wait on: the CPU time before
    # that first wait is not counted (a deadline cannot interrupt it anyway).
    coro = rule.check.evaluate(facts, ports)
    try:
        if type(coro) is not types.CoroutineType:  # any other awaitable: the plain way
            async with asyncio.timeout(rule.timeout):
                return await coro
        try:
            pending = coro.send(None)
        except StopIteration as stop:
            return typing.cast(CheckResult, stop.value)
        # asyncio.timeout, not wait_for: no extra Task per check.
        async with asyncio.timeout(rule.timeout):
            return await Resume(coro, pending)
    except TimeoutError:
        text = f"{rule.check.name} check timed out after {rule.timeout:g}s"
        raise CheckError(text, dict.fromkeys(active_zones(rule.check), text)) from None
    except (DnsTempError, StateTempError) as exc:
        text = f"{rule.check.name}: {exc}"
        raise CheckError(text, dict.fromkeys(active_zones(rule.check), text)) from None


_FIXED_VALUES = frozenset({"ip", "helo", "sender", "recipient"})


def _fill_without_result(template: str, facts: Facts) -> str | None:
    """A rule's message for a check that failed: filled from the facts alone, or None when it
    names a value only a match provides (``$zone``): that text would be a lie or half empty."""
    for match in Template.pattern.finditer(template):
        named = match.group("named") or match.group("braced")
        if named is not None and named not in _FIXED_VALUES:
            return None
    return _fill(template, CheckResult(True), facts)


def _failure_text(rule: Rule, verb: Verb, error: str) -> str:
    """The log text of a rule whose check failed temporarily (never the match text)."""
    what = f"{rule.check.name} lookup failed"
    if rule.on_error is OnError.DEFER:
        return f"DEFER - {what}: {error}"
    return f"{verb.value.upper()} - {what} (on_error = {rule.on_error.value}): {error}"


async def gather_findings(findings: Sequence[Finding], facts: Facts, ports: Ports) -> None:
    """Starts a stage's findings together and waits for them all (see ``policy.findings``).

    Errors stay in the memoised futures (the rules that read them see them); nothing is raised.
    """
    if findings:
        await asyncio.gather(
            *(finding.compute(facts, ports) for finding in findings), return_exceptions=True
        )


async def evaluate_stage(
    stage: Stage,
    rules: Sequence[Rule],
    facts: Facts,
    ports: Ports,
    findings: Sequence[Finding] = (),
) -> StageOutcome:
    """Works out the stage's ``findings``, then runs ``rules`` (already those of ``stage``) in
    order until one decides."""
    if findings:
        await gather_findings(findings, facts, ports)
    outcome = StageOutcome(stage)
    if facts.results.get(keys.ACCEPT_ALL):
        return outcome
    for rule in rules:
        if rule.recipient_domains and not rule.applies_to(facts):
            continue
        started = time.monotonic()
        error: str | None = None
        error_zones: Mapping[str, str] = {}
        try:
            result = await _run_check(rule, facts, ports)
            matched = result.matched != rule.negate
        except CheckError as exc:
            error = str(exc)
            error_zones = exc.zones
            result = CheckResult(True, reason=f"temporary failure: {error}")
            matched = True
        elapsed = time.monotonic() - started
        if not matched:
            outcome.decisions.append(Decision(rule, False, False, result.reason, "", elapsed))
            continue
        verb = rule.verb
        if error is not None:
            if rule.on_error is OnError.SKIP:
                text = f"{rule.check.name} lookup failed, skipped: {error}"
                outcome.decisions.append(
                    Decision(
                        rule,
                        False,
                        False,
                        result.reason,
                        text,
                        elapsed,
                        error=error,
                        error_zones=error_zones,
                    )
                )
                continue
            if rule.on_error is OnError.DEFER:
                verb = Verb.DEFER
            elif rule.on_error is OnError.DENY:
                verb = Verb.DENY
            log_text = _failure_text(rule, verb, error)
        else:
            log_text = _fill(rule.log_message or f"{rule.name}: $reason", result, facts)
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
                    error_zones=error_zones,
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
                error_zones=error_zones,
                # only a warn rule adds its header: the others never fill it
                header=_fill(result.header, result, facts)
                if verb is Verb.WARN and result.header
                else None,
            )
        )
        if verb is Verb.WARN:
            continue
        if verb in (Verb.ACCEPT, Verb.ACCEPT_ALL):
            if verb is Verb.ACCEPT_ALL:
                facts.results[keys.ACCEPT_ALL] = True
            outcome.accepted = True
            return outcome
        if error is not None and verb is Verb.DEFER and rule.on_error is OnError.DEFER:
            reply = CONNECT_TEMPFAIL_REPLY if rule.stage is Stage.CONNECT else TEMPFAIL_REPLY
        elif error is not None:
            reply = _reply(rule, verb, _fill_without_result(rule.message, facts) or "")
        else:
            reply = _reply(rule, verb, _fill(rule.message, result, facts))
        # an incident only for a real match that refuses for good: never for a check that
        # failed (whatever its on_error made of it), never for a defer
        incident = rule.incident if error is None and verb in (Verb.DENY, Verb.DROP) else 0
        outcome.verdict = Verdict(verb, reply, log_text, rule.name, incident)
        return outcome
    return outcome
