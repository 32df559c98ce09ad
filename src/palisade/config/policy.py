"""Builds the runtime ``Policy`` (``palisade.policy.policy``) from a loaded config: named lists,
per-stage rules, findings.

Owns: turning ``[lists]`` and ``[[rules.<stage>]]`` into list handles and ``Rule`` objects, and
``[authentication]`` and the scanner sections into the DATA stage's always-on findings
(``policy.findings``) and the rules they imply, so
that every mistake (an unknown check, a bad option, a list that does not exist or does not parse,
a check used at a stage it cannot serve) is a ConfigError with the file, the rule and its line,
before the server starts or a reload is accepted.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from palisade.config.lists import ListHandle
from palisade.config.loader import ConfigError
from palisade.config.model import Config, RuleSpec
from palisade.policy import findings
from palisade.policy.checks import REGISTRY
from palisade.policy.engine import Rule
from palisade.policy.findings import Finding
from palisade.policy.lists import ListKind
from palisade.policy.policy import ListRegistry, Policy
from palisade.policy.rules import OnError, Stage, default_on_error, uses_dns
from palisade.policy.verdict import Verb


def _rule_line(config: Config, spec: RuleSpec) -> int | None:
    """Where a rule starts, for messages (a second look at the source text)."""
    if config.source.startswith("<"):
        return None
    try:
        with open(config.source, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    pattern = re.compile(rf"^\s*\[\[\s*rules\.{spec.stage}\s*\]\]")
    seen = -1
    for number, line in enumerate(lines, 1):
        if pattern.match(line):
            seen += 1
            if seen == spec.index:
                return number
    return None


def build_policy(config: Config, on_list_error: Callable[[str], None] | None = None) -> Policy:
    """Lists and rules of ``config``; ConfigError on the first problem."""
    handles: dict[str, ListHandle] = {}
    for list_spec in config.lists:
        kind = ListKind(list_spec.kind)
        name = list_spec.name
        try:
            if list_spec.file is not None:
                handles[name] = ListHandle.load(name, kind, list_spec.file, on_error=on_list_error)
            else:
                handles[name] = ListHandle.inline(name, kind, "\n".join(list_spec.entries))
        except ValueError as exc:
            raise ConfigError(config.source, f"lists.{name}", str(exc)) from None
    relay_list = handles.get("relay_from_hosts")
    if relay_list is not None and relay_list.kind is not ListKind.IP:
        raise ConfigError(config.source, "lists.relay_from_hosts", "must be an ip list")
    registry = ListRegistry(handles)
    rules: dict[Stage, list[Rule]] = {}
    for spec in config.rules:
        where = f"rules.{spec.stage}[{spec.index + 1}]"
        stage = Stage(spec.stage)
        factory = REGISTRY.get(spec.check)
        if factory is None:
            known = ", ".join(sorted(REGISTRY))
            raise ConfigError(
                config.source,
                f"{where}.check",
                f"unknown check {spec.check!r} (known: {known})",
                _rule_line(config, spec),
            )
        try:
            check = factory(dict(spec.options), registry)
        except ValueError as exc:
            raise ConfigError(config.source, where, str(exc), _rule_line(config, spec)) from None
        if stage not in check.stages:
            usable = ", ".join(sorted(s.value for s in check.stages))
            raise ConfigError(
                config.source,
                where,
                f"check {spec.check!r} cannot be used at stage {spec.stage} (only: {usable})",
                _rule_line(config, spec),
            )
        rules.setdefault(stage, []).append(
            Rule(
                name=spec.name or f"{spec.check} #{spec.index + 1}",
                stage=stage,
                check=check,
                verb=Verb(spec.verb),
                message=spec.message,
                log_message=spec.log_message,
                observe=spec.observe,
                on_error=default_on_error(check)
                if spec.on_error is None
                else OnError(spec.on_error),
                timeout=spec.timeout if spec.timeout is not None else config.policy.check_timeout,
                negate=spec.negate,
                code=spec.code,
                enhanced=spec.enhanced,
                recipient_domains=frozenset(spec.recipient_domains),
                incident=spec.incident,
            )
        )
    data_rules = rules.setdefault(Stage.DATA, [])
    data_rules[:0] = _virus_rules(config, registry)
    data_rules.extend(_spam_kill_rules(config, registry))
    if not data_rules:
        del rules[Stage.DATA]
    return Policy(
        {stage: tuple(items) for stage, items in rules.items()},
        registry,
        config.policy.delay_reject,
        _findings(config),
    )


def _findings(config: Config) -> dict[Stage, tuple[Finding, ...]]:
    """The DATA stage's always-on findings: authentication, then the spam and virus scans."""
    found: list[Finding] = []
    auth = config.authentication
    if auth.enabled:
        found.append(findings.Authentication(spf=auth.spf, dkim=auth.dkim, dmarc=auth.dmarc))
    if config.spam_scanner is not None:
        found.append(findings.SpamScan())
    if config.clamd.address:
        found.append(findings.VirusScan())
    return {Stage.DATA: tuple(found)} if found else {}


def _virus_rules(config: Config, registry: ListRegistry) -> list[Rule]:
    """The rule ``[clamd]`` implies, before the operator's DATA rules: a whitelisted sender's
    virus is still a virus."""
    if not config.clamd.address:
        return []
    return [
        Rule(
            name="clamd",
            stage=Stage.DATA,
            check=REGISTRY["virus"]({}, registry),
            verb=Verb.DENY,
            message="This message contains a virus ($virus)",
            log_message="virus found: $virus",
            on_error=OnError.DEFER if config.clamd.on_failure == "defer" else OnError.SKIP,
            timeout=config.clamd.timeout + 1.0,
            code=550,
            enhanced="5.7.1",
        )
    ]


def _spam_kill_rules(config: Config, registry: ListRegistry) -> list[Rule]:
    """The rule ``[spamd]`` or ``[rspamd]`` implies, after the operator's DATA rules, so that
    an operator's ``accept`` (a sender whitelist) exempts a message from the kill level, as a
    whitelist in exim's DATA ACL does."""
    scanner = config.spam_scanner
    if scanner is None:
        return []
    kill = scanner.kill_level
    return [
        Rule(
            name="spam kill level",
            stage=Stage.DATA,
            check=REGISTRY["spam_score"]({"min": kill}, registry),
            verb=Verb.DENY,
            message="Message rejected as spam",
            log_message=f"spam score $spam_score >= {kill:g} ($spam_rules)",
            on_error=OnError.DEFER if scanner.on_failure == "defer" else OnError.SKIP,
            timeout=scanner.timeout + 1.0,
            code=550,
            enhanced="5.7.1",
        )
    ]


_PERMANENT = frozenset({Verb.DENY, Verb.DROP})


def permanent_on_error_warnings(config: Config, policy: Policy | None = None) -> list[str]:
    """A warning for every DNS-based rule whose temporary failure gives a permanent refusal.

    ``on_error = "deny"``, or ``"match"`` on a deny/drop rule, turns a dead, silent or SERVFAIL
    resolver into a 5xx for every client: senders bounce legitimate mail instead of retrying.
    Rules in observe mode refuse nothing and are not named. ConfigError if the policy does
    not build (as ``build_policy``); pass ``policy`` when it is built already.
    """
    if policy is None:
        policy = build_policy(config)
    warnings: list[str] = []
    for stage in Stage:
        # [clamd] puts its rule before the operator's DATA rules: number as the file does
        implied = 1 if stage is Stage.DATA and config.clamd.address else 0
        for number, rule in enumerate(policy.for_stage(stage), 1 - implied):
            if rule.observe or not uses_dns(rule.check):
                continue
            permanent = rule.on_error is OnError.DENY or (
                rule.on_error is OnError.MATCH and rule.verb in _PERMANENT
            )
            if permanent:
                warnings.append(
                    f"{config.source}: rules.{stage.value}[{number}] ({rule.name}): "
                    f'on_error = "{rule.on_error.value}" turns a DNS failure (resolver down, '
                    f"time-out, SERVFAIL) into a permanent 5xx refusal: senders bounce "
                    f'legitimate mail; use "defer" (451) instead'
                )
    return warnings
