"""``palisade replay``: what a new policy would have done to recorded traffic, offline.

Owns: reading facts files (``[record] facts``; plain or gzip'd by logrotate, ``-`` for standard
input), running each recorded connection again through the server's own conversation
(:class:`palisade.conversation.Conversation`) with the *new* config's rules, relay control and
domains, against a recorded world (:class:`palisade.conversation.record.RecordedWorld`) instead
of DNS, the state store, LDAP and the scanners, and printing what changed: per rule, the
connections newly refused and newly accepted with a few examples each, and the totals.

Nothing is asked of the network: every question the new rules ask is answered from the line or
counted as *unknown* for that connection (reported, never sent). Rate counters the line does not
hold are counted over the replayed traffic in file order (*estimated*). A connection that the
old policy cut short (refused at connect, its client gone after a refusal) and the new one lets
on is *partial*: what its client would have said next was never recorded.

Exit status: 0 the report was printed (whatever it says), 2 bad usage, a config that does not
load, a file that cannot be read or a line that is not a facts line (``FILE:LINE: reason``;
``--skip-broken`` counts such lines instead).
Trust: facts files are the operator's, but their texts came from clients: each line is checked
(:func:`palisade.conversation.record.parse_line`), addresses are parsed by the SMTP grammar, and
client text is printed escaped.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import io
import json
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO

from palisade.config import Config, ConfigError, load_config
from palisade.config.policy import build_policy
from palisade.conversation import Conversation, Step
from palisade.conversation.record import (
    RecordedWorld,
    RecordError,
    StepLog,
    TrafficRates,
    decide,
    parse_line,
)
from palisade.obs.log import escape
from palisade.obs.queueid import QueueIdGenerator
from palisade.policy.policy import Policy
from palisade.policy.relay import RelayPolicy
from palisade.policy.rules import IPAddress, Ports
from palisade.smtp import events
from palisade.smtp.address import Address, AddressError, parse_path
from palisade.spool import Spool

EXIT_OK = 0
EXIT_USAGE = 2


def add_arguments(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "replay",
        help="what a new policy would have done to recorded connections ([record] facts)",
        description="Runs the connections recorded in FILE(s) ([record] facts) through the "
        "rules of --config, offline (no DNS, no network), and prints per rule the connections "
        "newly refused and newly accepted, with examples, and the totals.",
        epilog="Exit status: 0 the report was printed, 2 bad usage, a config that does not "
        "load, a file that cannot be read or a broken line (FILE:LINE: reason).",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="facts files, oldest first")
    parser.add_argument("--config", type=Path, help="the config whose rules to try")
    parser.add_argument("--json", action="store_true", help="one JSON document (for tools)")
    parser.add_argument(
        "--examples", type=int, default=3, metavar="N", help="examples per rule (default 3)"
    )
    parser.add_argument(
        "--each", action="store_true", help="also list every connection with both decisions"
    )
    parser.add_argument(
        "--skip-broken",
        action="store_true",
        help="count lines that are not facts lines instead of stopping at the first",
    )
    return parser


class _NoLog:
    """The replayed conversations' log lines go nowhere: the report is the output."""

    def main(self, line: str, **fields: object) -> None:
        pass

    def reject(self, line: str, **fields: object) -> None:
        pass

    def panic(self, line: str, **fields: object) -> None:
        pass

    def event(self, name: str, **fields: object) -> None:
        pass


@dataclass
class _Context:
    """The process parts and the generation a replayed conversation reads (one per run; the
    ports are each connection's recorded world)."""

    config: Config
    policy: Policy
    relay_policy: RelayPolicy
    our_ips: frozenset[IPAddress]
    submit: Callable[[str], None]
    log: _NoLog = field(default_factory=_NoLog)
    queue_ids: QueueIdGenerator = field(default_factory=QueueIdGenerator)
    draining: bool = False
    zone_failure_reported: dict[str, float] = field(default_factory=dict)
    tls_context: None = None
    secrets: tuple[str, ...] = ()  # the new config's DQS keys ({key} in recorded names)


class _Settings:
    __slots__ = ("config", "our_ips", "policy", "relay_policy", "session_ports", "tls_context")

    def __init__(self, ctx: _Context, ports: Ports) -> None:
        self.config = ctx.config
        self.policy = ctx.policy
        self.relay_policy = ctx.relay_policy
        self.our_ips = ctx.our_ips
        self.tls_context = None
        self.session_ports = ports


@dataclass
class Replayed:
    """One connection, before and after."""

    where: str  # FILE:LINE
    record: dict[str, Any]
    before: dict[str, Any]
    after: dict[str, Any]
    unknown: list[str]
    estimated: list[str]
    partial: bool

    @property
    def status(self) -> str:
        """``unknown``, ``same``, ``refused`` (newly), ``accepted`` (newly) or ``moved`` (refused
        by another rule)."""
        if self.unknown:
            return "unknown"
        old, new = self.before.get("result"), self.after["result"]
        if old == new:
            if old == "refused" and self.before.get("rule") != self.after.get("rule"):
                return "moved"
            return "same"
        return "refused" if new == "refused" else "accepted"

    def example(self) -> dict[str, Any]:
        steps = self.record["steps"]
        helo = next((s["helo"] for s in steps if s["s"] == "helo"), None)
        sender = next((s["from"] for s in steps if s["s"] == "mail"), None)
        return {
            "where": self.where,
            "t": self.record["t"],
            "ip": self.record["ip"],
            "helo": helo,
            "sender": sender,
            "before": self.before,
            "after": self.after,
            "partial": self.partial,
        }


def _address(text: str, *, null: bool) -> Address | None:
    try:
        address, rest = parse_path(f"<{text}>", allow_null=null, allow_postmaster=not null)
    except AddressError as exc:
        raise RecordError(f"address {text!r}: {exc}") from None
    if rest:
        raise RecordError(f"address {text!r}: text after the address")
    return address


def _message(step: dict[str, Any]) -> bytes:
    """A stand-in for the message: the recorded header fields the DATA checks read, and a body
    that says it was not recorded (the findings that need the body come recorded)."""
    lines = []
    headers = step.get("hdr")
    if isinstance(headers, dict):
        for name, values in headers.items():
            for value in values if isinstance(values, list) else []:
                clean = str(value).replace("\r", " ").replace("\n", " ")
                lines.append(f"{name}: {clean}\r\n")
    lines.append("\r\n(the message body is not recorded)\r\n")
    return "".join(lines).encode("utf-8", "replace")


async def replay_one(
    ctx: _Context, record: dict[str, Any], traffic: TrafficRates, spool: Spool, where: str
) -> Replayed:
    """Runs one recorded connection through the new policy."""
    world = RecordedWorld(record, ctx.secrets, traffic)
    scanner = ctx.config.spam_scanner
    ports = world.ports(
        spam=None if scanner is None else ("spamd" if scanner is ctx.config.spamd else "rspamd"),
        virus="clamd" if ctx.config.clamd.address else None,
    )
    log = StepLog()
    conv = Conversation(
        ctx, _Settings(ctx, ports), record["ip"], int(record.get("port", 0)), observer=log
    )
    log.facts = conv.facts
    log.esmtp = lambda: conv.esmtp
    steps: list[dict[str, Any]] = record["steps"]
    closed_at: int | None = None
    # Every recorded step passed the SMTP core's sequence checks live; under the new policy a
    # step may lose what it relied on (an accepted HELO, MAIL, a recipient): the core would
    # then answer 503 and the conversation never see it, so neither does the replay.
    helo_ok = mail_ok = False
    for number, step in enumerate(steps):
        kind = step["s"]
        result = Step.GO_ON
        if kind == "connect":
            if not await conv.connect():
                result = Step.CLOSE
        elif kind == "helo":
            if step.get("tls") and not conv.facts.tls:
                conv.tls, conv.facts.tls = "TLS", True
            result = await conv.handle(events.Helo(step["helo"], bool(step.get("ext", True))))
            helo_ok = helo_ok or _passed(log)
            mail_ok = False
        elif kind == "mail" and helo_ok:
            result = await conv.handle(events.Mail(_address(step["from"], null=True)))
            mail_ok = conv.tx.sender is not None
        elif kind == "rcpt" and mail_ok:
            rcpt = _address(step["to"], null=False)
            assert rcpt is not None
            result = await conv.handle(events.Rcpt(rcpt))
        elif kind == "data" and mail_ok and conv.tx.recipients:
            result = await _data(conv, world, step, spool)
            mail_ok = False
        conv.out.clear()
        if result is Step.CLOSE:
            closed_at = number
            break
    before = record.get("decision") or decide(steps)
    after = decide(log.steps)
    partial = (
        before.get("result") == "refused"
        and after["result"] == "accepted"
        and _cut_short(steps, before)
        and closed_at is None
    )
    return Replayed(where, record, before, after, world.unknown, world.estimated, partial)


def _passed(log: StepLog) -> bool:
    """Whether the step just run was let through (or its refusal kept for RCPT)."""
    last = log.steps[-1] if log.steps else {}
    return last.get("v") is None or bool(last.get("delayed"))


def _cut_short(steps: list[dict[str, Any]], before: dict[str, Any]) -> bool:
    """Whether the recorded conversation ended at the refusal that decided it (its client had
    nothing more to say, or was not let say it)."""
    return bool(steps) and steps[-1].get("v") is not None and steps[-1]["s"] == before.get("stage")


async def _data(
    conv: Conversation, world: RecordedWorld, step: dict[str, Any], spool: Spool
) -> Step:
    """DATA with the stand-in message, the recorded findings in place before the final dot."""
    result = await conv.handle(events.Data())
    if result is not Step.OPEN_SPOOL:
        return result
    envelope = conv.tx.envelope
    assert envelope is not None
    try:
        writer = spool.open_message(envelope)
    except OSError as exc:
        conv.spool_failed(exc)
        return Step.GO_ON
    conv.spool_opened(writer)
    if conv.tx.writer is None:
        return Step.GO_ON
    message = _message(step)
    conv.content(message)
    seeded = world.findings(step, conv.facts)
    size = step.get("size")
    result = await conv.handle(
        events.DataEnd(size=size if isinstance(size, int) and size > 0 else len(message))
    )
    world.check_findings(conv.facts, seeded)
    conv.abort_transaction()
    return result


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class InputError(Exception):
    """A file that cannot be read or a line that is not a facts line."""


def _open(name: str) -> IO[str]:
    if name == "-":
        return sys.stdin
    path = Path(name)
    try:
        if path.suffix == ".gz":
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
        return path.open(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise InputError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{name}: is a directory, not a facts file") from None
    except OSError as exc:
        raise InputError(f"{name}: cannot be read: {exc.strerror or exc}") from None


def read_records(
    names: list[str], broken: list[str] | None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(``FILE:LINE``, record) of every facts line, in the order given; a broken line raises
    :class:`InputError`, or is noted in ``broken`` when it is a list."""
    for name in names:
        stream = _open(name)
        try:
            number = 0
            try:
                for number, text in enumerate(stream, 1):
                    if not text.strip():
                        continue
                    where = f"{name}:{number}"
                    try:
                        yield where, parse_line(text)
                    except RecordError as exc:
                        if broken is None:
                            raise InputError(f"{where}: not a facts line: {exc}") from None
                        broken.append(f"{where}: {exc}")
            except (OSError, EOFError) as exc:  # a truncated .gz, a read error
                raise InputError(f"{name}: cannot be read after line {number}: {exc}") from None
        finally:
            if stream is not sys.stdin:
                stream.close()


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


@dataclass
class _RuleReport:
    newly_refused: int = 0
    newly_accepted: int = 0
    moved_here: int = 0
    moved_away: int = 0
    examples: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {"newly_refused": [], "newly_accepted": [], "moved_here": []}
    )


@dataclass
class Report:
    examples: int
    connections: int = 0
    refused_before: int = 0
    refused_after: int = 0
    changed: int = 0
    unknown: int = 0
    partial: int = 0
    estimated: int = 0
    broken: list[str] = field(default_factory=list)
    rules: dict[str, _RuleReport] = field(default_factory=dict)
    questions: Counter[str] = field(default_factory=Counter)
    each: list[dict[str, Any]] | None = None

    def _rule(self, name: str) -> _RuleReport:
        return self.rules.setdefault(name, _RuleReport())

    def _example(self, rule: _RuleReport, kind: str, one: Replayed) -> None:
        if len(rule.examples[kind]) < self.examples:
            rule.examples[kind].append(one.example())

    def add(self, one: Replayed) -> None:
        self.connections += 1
        status = one.status
        refused_before = one.before.get("result") == "refused"
        self.refused_before += refused_before
        if one.estimated:
            self.estimated += 1
        if self.each is not None:
            self.each.append({**one.example(), "status": status, "unknown": one.unknown})
        if status == "unknown":
            self.unknown += 1
            self.refused_after += refused_before  # as far as anyone can tell: unchanged
            self.questions.update(one.unknown)
            return
        self.refused_after += one.after["result"] == "refused"
        if status == "same":
            return
        self.changed += 1
        if status == "refused":
            rule = self._rule(str(one.after.get("rule")))
            rule.newly_refused += 1
            self._example(rule, "newly_refused", one)
        elif status == "accepted":
            self.partial += one.partial
            rule = self._rule(str(one.before.get("rule")))
            rule.newly_accepted += 1
            self._example(rule, "newly_accepted", one)
        else:  # moved
            self._rule(str(one.before.get("rule"))).moved_away += 1
            rule = self._rule(str(one.after.get("rule")))
            rule.moved_here += 1
            self._example(rule, "moved_here", one)

    def document(self) -> dict[str, Any]:
        return {
            "totals": {
                "connections": self.connections,
                "refused_before": self.refused_before,
                "refused_after": self.refused_after,
                "changed": self.changed,
                "unknown": self.unknown,
                "partial": self.partial,
                "estimated": self.estimated,
                "broken_lines": len(self.broken),
            },
            "rules": {
                name: {
                    "newly_refused": r.newly_refused,
                    "newly_accepted": r.newly_accepted,
                    "moved_here": r.moved_here,
                    "moved_away": r.moved_away,
                    "examples": r.examples,
                }
                for name, r in sorted(self.rules.items())
            },
            "unknown_questions": dict(self.questions.most_common(20)),
            "broken_lines": self.broken[:20],
            **({"connections": self.each} if self.each is not None else {}),
        }

    def print(self, out: TextIO) -> None:
        for name, rule in sorted(self.rules.items()):
            parts = []
            if rule.newly_refused:
                parts.append(f"{rule.newly_refused} newly refused")
            if rule.newly_accepted:
                parts.append(f"{rule.newly_accepted} newly accepted")
            if rule.moved_here:
                parts.append(f"{rule.moved_here} now refused here instead of by another rule")
            if rule.moved_away:
                parts.append(f"{rule.moved_away} now refused by another rule")
            out.write(f'rule "{escape(name, 100)}": {", ".join(parts)}\n')
            for kind, label in (
                ("newly_refused", "newly refused"),
                ("newly_accepted", "newly accepted"),
                ("moved_here", "moved here"),
            ):
                for ex in rule.examples[kind]:
                    out.write(f"  {label}: {_describe(ex)}\n")
        if self.each is not None:
            out.write("connections:\n")
            for ex in self.each:
                out.write(f"  {ex['status']}: {_describe(ex)}\n")
        if self.questions:
            out.write("questions not recorded (their connections count as unknown):\n")
            for question, count in self.questions.most_common(10):
                out.write(f"  {count} x {escape(question, 200)}\n")
        if self.broken:
            out.write(f"{len(self.broken)} broken line(s) skipped, e.g.:\n")
            for line in self.broken[:5]:
                out.write(f"  {escape(line, 300)}\n")
        out.write(
            f"connections {self.connections}, refused before {self.refused_before}, "
            f"refused after {self.refused_after}, changed {self.changed}, "
            f"unknown {self.unknown}"
            + (f", partial {self.partial}" if self.partial else "")
            + (f", with estimated rates {self.estimated}" if self.estimated else "")
            + "\n"
        )


def _describe(ex: dict[str, Any]) -> str:
    def field_text(value: Any) -> str:
        return "-" if value is None else escape(str(value), 100)

    before, after = ex["before"], ex["after"]

    def decision(d: dict[str, Any]) -> str:
        if d.get("result") != "refused":
            return "accepted"
        rule = escape(str(d.get("rule")), 60)
        return f"{d.get('verb')} {d.get('code')} by {rule} at {d.get('stage')}"

    partial = " partial: its client said no more" if ex.get("partial") else ""
    return (
        f"[{ex['ip']}] helo={field_text(ex['helo'])} from=<{field_text(ex['sender'])}> "
        f"({decision(before)} -> {decision(after)}{partial}) {ex['where']}"
    )


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = sys.stdout if out is None else out
    if args.examples < 0:
        print("palisade replay: --examples must be 0 or more", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load_config(args.config)
        policy = build_policy(config)
    except ConfigError as exc:
        print(f"palisade replay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from palisade.server.generation import listening_ips, relay_policy, secrets_of

    report = Report(args.examples, each=[] if args.each else None)
    with tempfile.TemporaryDirectory(prefix="palisade-replay-") as tmp:
        spool = Spool(Path(tmp), fsync=False)

        def forget(queue_id: str) -> None:  # an accepted stand-in message is thrown away
            spool.remove(queue_id, state_file=False)

        ctx = _Context(
            config,
            policy,
            relay_policy(config, policy),
            listening_ips(config),
            forget,
            secrets=tuple(secrets_of(config)),
        )
        try:
            asyncio.run(_run(ctx, args.files, report, spool, args.skip_broken))
        except InputError as exc:
            print(f"palisade replay: {exc}", file=sys.stderr)
            return EXIT_USAGE
        finally:
            spool.close()
    if args.json:
        json.dump(report.document(), out, indent=2)
        out.write("\n")
    else:
        report.print(out)
    return EXIT_OK


async def _run(
    ctx: _Context, files: list[str], report: Report, spool: Spool, skip_broken: bool
) -> None:
    traffic = TrafficRates()
    broken = report.broken if skip_broken else None
    for where, record in read_records(files, broken):
        try:
            one = await replay_one(ctx, record, traffic, spool, where)
        except RecordError as exc:
            if broken is None:
                raise InputError(f"{where}: not a facts line: {exc}") from None
            broken.append(f"{where}: {exc}")
            continue
        report.add(one)
