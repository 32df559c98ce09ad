"""``palisade check-host``: what would happen to a client, rule by rule (exim's ``-bh``).

Owns: the printout. The simulation is the server's own conversation
(:class:`palisade.conversation.Conversation`) driven with the events a client's commands would
give, with the real resolver and the real state store (so a rate-limit rule counts this
simulated connection, as it would count a real one), the real scanners when configured, and
relay control: the rules, the replies and the log lines are the server's. With ``--message`` the
message file goes through the DATA stage (the header filter, SPF, DKIM, DMARC, the scanners,
the DATA rules) into a spool in a temporary directory that is thrown away; no mail is sent or
queued.
Trust: the arguments are the operator's; addresses are parsed by the SMTP grammar all the same,
and one that a real client could not send is refused before anything is asked.

Exit status (for scripts and monitoring): 0 the client would be accepted (a recipient accepted,
or no further step asked for), 1 refused (a permanent 5xx), 3 deferred (a 4xx: try again
later, e.g. a temporary DNS failure under ``on_error = "defer"``), 2 bad usage or a bad config.
An unusable state store is one line on standard error and exit 1, as for the other commands.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import ssl
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from palisade.config import Config, ConfigError, load_config
from palisade.config.policy import build_policy
from palisade.conversation import Conversation, Step
from palisade.obs.log import escape
from palisade.obs.queueid import QueueIdGenerator
from palisade.policy import keys
from palisade.policy.engine import Decision, StageOutcome
from palisade.policy.policy import Policy
from palisade.policy.relay import RelayPolicy
from palisade.policy.rules import IPAddress, Ports, Stage
from palisade.policy.verdict import Verb, Verdict
from palisade.ports import Route
from palisade.smtp import events
from palisade.smtp.address import Address, AddressError, parse_path
from palisade.spool import Spool

EXIT_ACCEPTED = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_DEFERRED = 3


def add_arguments(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "check-host", help="simulate a session from an IP: which rule fires where"
    )
    parser.add_argument("ip", help="the client's IP address")
    parser.add_argument("--helo", help="the HELO/EHLO name it gives")
    parser.add_argument(
        "--from", dest="sender", help='the envelope sender (MAIL FROM); "" is the null sender'
    )
    parser.add_argument("--rcpt", action="append", default=[], help="a recipient (repeatable)")
    parser.add_argument("--tls", action="store_true", help="as if STARTTLS had been done")
    parser.add_argument(
        "--message",
        type=Path,
        metavar="FILE",
        help="a message (RFC 5322, as sent after DATA) to run the DATA stage on; "
        "needs --from and --rcpt",
    )
    parser.add_argument("--config", type=Path)
    return parser


def main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = sys.stdout if out is None else out
    try:
        ip = ipaddress.ip_address(args.ip)
    except ValueError:
        print(f"palisade check-host: not an IP address: {args.ip!r}", file=sys.stderr)
        return EXIT_USAGE
    try:
        sender = _address(args.sender, null=True) if args.sender is not None else None
        rcpts = [_address(rcpt, null=False) for rcpt in args.rcpt]
    except AddressError as exc:
        print(f"palisade check-host: {exc}", file=sys.stderr)
        return EXIT_USAGE
    message: bytes | None = None
    if args.message is not None:
        if args.sender is None or not rcpts:
            print("palisade check-host: --message needs --from and --rcpt", file=sys.stderr)
            return EXIT_USAGE
        try:
            message = _message(args.message.read_bytes())
        except OSError as exc:
            print(
                f"palisade check-host: --message {args.message}: cannot read: "
                f"{exc.strerror or exc}",
                file=sys.stderr,
            )
            return EXIT_USAGE
    try:
        config = load_config(args.config)
        policy = build_policy(config)
    except ConfigError as exc:
        print(f"palisade: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from palisade.ports import StateTempError
    from palisade.server.generation import build_ports, relay_policy
    from palisade.server.selfcheck import state_problem

    try:  # the real state store: a rate-limit rule counts this simulated connection
        ports = build_ports(config)
    except (OSError, StateTempError) as exc:
        reason = exc.reason if isinstance(exc, StateTempError) else exc.strerror or str(exc)
        problem = state_problem(config.paths.state, reason)
        print(f"palisade: {problem}", file=sys.stderr)
        return 1
    ctx = _Context(config, policy, relay_policy(config, policy), ports, _PrintedLog(out))
    client = _Client(str(ip), args.helo, args.sender is not None, sender, rcpts, args.tls, message)
    return asyncio.run(_simulate(ctx, client, out))


def _address(text: str, *, null: bool) -> Address | None:
    """An address as given on the command line (with or without <>), checked as a client's
    MAIL FROM / RCPT TO would be; "" or "<>" is the null sender (None) where ``null``."""
    option = "--from" if null else "--rcpt"
    path = text if text.startswith("<") else f"<{text}>"
    try:
        address, rest = parse_path(path, allow_null=null, allow_postmaster=not null)
    except AddressError as exc:
        raise AddressError(f"{option} {text!r}: bad address: {exc}") from None
    if rest:
        raise AddressError(f"{option} {text!r}: bad address: text after the closing '>'")
    return address


def _message(data: bytes) -> bytes:
    """A message file as the content of DATA: CRLF line ends, ending with one."""
    data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return data if data.endswith(b"\r\n") or not data else data + b"\r\n"


def _error_result(decision: Decision) -> str:
    """How a temporary failure reads: the failure first, then what on_error made of it."""
    rule = decision.rule
    then = f"on_error={rule.on_error.value}"
    if not decision.matched:
        then += ", skipped"
    elif rule.on_error.value == "match":
        then += f", as a match: {rule.verb.value}"
    if decision.matched and not decision.acted:
        then += " (observe only)"
    return f"ERROR (temporary): {decision.error} -> {then}"


def _print_outcome(outcome: StageOutcome, out: TextIO) -> None:
    for number, decision in enumerate(outcome.decisions, 1):
        took = f"{decision.elapsed * 1000:.1f} ms"
        if decision.error is not None:
            result = _error_result(decision)
        elif not decision.matched:
            result = "no match" + (f" ({decision.reason})" if decision.reason else "")
        elif not decision.acted:
            result = f"MATCH, observe only: {decision.log_text}"
        else:
            result = f"MATCH: {decision.log_text}"
        out.write(f"  {number}. {decision.rule.describe()}\n     -> {result} [{took}]\n")
        if decision.header:
            out.write(f"     header: {decision.header}\n")
    if not outcome.decisions:
        out.write("  (no rules)\n")


class _PrintedLog:
    """The server's log lines, printed where they would be written."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def _write(self, where: str, line: str) -> None:
        self.out.write(f"  {where}: {escape(line, 2000)}\n")

    def main(self, line: str, **fields: object) -> None:
        self._write("mainlog", line)

    def reject(self, line: str, **fields: object) -> None:
        self._write("rejectlog", line)

    def panic(self, line: str, **fields: object) -> None:
        self._write("paniclog", line)

    def event(self, name: str, **fields: object) -> None:
        pass  # what check-host shows of a check is its own report


def _no_delivery(queue_id: str) -> None:
    """check-host queues nothing: the spool it writes to is thrown away."""


@dataclass
class _Context:
    """What the conversation reads of a server process and of its generation, for one
    simulated client."""

    config: Config
    policy: Policy
    relay_policy: RelayPolicy
    session_ports: Ports
    log: _PrintedLog
    tls_context: ssl.SSLContext | None = None
    queue_ids: QueueIdGenerator = field(default_factory=QueueIdGenerator)
    submit: Callable[[str], None] = _no_delivery
    our_ips: frozenset[IPAddress] = frozenset()
    draining: bool = False
    zone_failure_reported: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Client:
    """What the simulated client says."""

    ip: str
    helo: str | None
    mail: bool  # --from was given (MAIL is said)
    sender: Address | None  # None: the null sender
    recipients: list[Address | None]
    tls: bool
    message: bytes | None


class _Printer:
    """The conversation's observer: each stage's rules, relay control, delay_reject."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def stage(self, stage: Stage, subject: str, outcome: StageOutcome) -> None:
        if stage not in (Stage.RCPT, Stage.DATA):  # their headings come before their replies
            if stage is Stage.MAIL:
                subject = f"<{subject}>"
            self.out.write(f"\n{stage.value}{' ' + subject if subject else ''}:\n")
        _print_outcome(outcome, self.out)

    def delayed(self, stage: Stage, verdict: Verdict) -> None:
        self.out.write("  (delay_reject: this refusal is given at RCPT)\n")

    def relay(self, recipient: str, decision: Route | Verdict) -> None:
        self.out.write(f"\nrcpt <{recipient}>:\n")
        if isinstance(decision, Verdict):
            self.out.write(f"  relay control: {decision.log_message}\n")
        else:
            self.out.write(f"  relay control: route {decision.value}\n")

    def delayed_refusal(self, verdict: Verdict) -> None:
        self.out.write(f"  delayed refusal: {verdict.log_message}\n")

    def added_headers(self, lines: bytes) -> None:
        self.out.write("  headers added:\n")
        for line in lines.decode("utf-8", "replace").splitlines():
            folded = line[:1] in (" ", "\t")
            self.out.write(f"{'        ' if folded else '    '}{escape(line.lstrip(), 2000)}\n")


def _status(code: int) -> int:
    if code < 400:
        return EXIT_ACCEPTED
    return EXIT_DEFERRED if code < 500 else EXIT_REFUSED


class _Replies:
    """Prints what the conversation answers and remembers the last code."""

    def __init__(self, conversation: Conversation, out: TextIO) -> None:
        self.conversation = conversation
        self.out = out
        self.code = 0

    def flush(self) -> int:
        pending = self.conversation.out
        for chunk in pending:
            for line in chunk.decode("utf-8", "replace").splitlines():
                self.out.write(f"  <<< {line}\n")
                self.code = int(line[:3])
        pending.clear()
        return self.code


async def _simulate(ctx: _Context, client: _Client, out: TextIO) -> int:
    conversation = Conversation(ctx, ctx, client.ip, 0, observer=_Printer(out))
    conversation.facts.tls = client.tls
    relay_client = conversation.facts.results[keys.RELAY_CLIENT]
    out.write(
        f"Simulated SMTP session from [{client.ip}]"
        f"{' (relay_from_hosts)' if relay_client else ''}\n"
    )
    replies = _Replies(conversation, out)
    closed = "  connection closed\n"
    if not await conversation.connect():
        replies.flush()
        out.write(closed)
        return _status(replies.code)
    conversation.greet()
    replies.flush()

    def delayed() -> int:
        """No recipient was asked for: what a refusal kept for RCPT would have made of it."""
        if conversation.delayed is None:
            return EXIT_ACCEPTED
        return EXIT_DEFERRED if conversation.delayed[1].action is Verb.DEFER else EXIT_REFUSED

    async def say(event: object) -> tuple[Step, int]:
        step = await conversation.handle(event)
        code = replies.flush()
        if step is Step.CLOSE:
            out.write(closed)
        return step, code

    if client.helo is not None:
        step, code = await say(events.Helo(client.helo, extended=False))
        if code >= 400:
            return _status(code)
    if not client.mail:
        return delayed()
    step, code = await say(events.Mail(client.sender))
    if code >= 400:
        return _status(code)
    if not client.recipients:
        return delayed()
    statuses: list[int] = []
    for rcpt in client.recipients:
        assert rcpt is not None
        step, code = await say(events.Rcpt(rcpt))
        statuses.append(_status(code))
        if step is Step.CLOSE:
            break
    if client.message is not None and EXIT_ACCEPTED in statuses:
        return await _data(conversation, replies, client.message, out)
    # one recipient accepted: the mail gets in; else a deferral means "try again"
    for status in (EXIT_ACCEPTED, EXIT_DEFERRED):
        if status in statuses:
            return status
    return EXIT_REFUSED


async def _data(conversation: Conversation, replies: _Replies, message: bytes, out: TextIO) -> int:
    """DATA, the message, the final dot: into a spool in a temporary directory, thrown away."""
    out.write(f"\ndata ({len(message)} octets):\n")
    with tempfile.TemporaryDirectory(prefix="palisade-check-host-") as tmp:
        spool = Spool(Path(tmp), fsync=False)
        try:
            step = await conversation.handle(events.Data())
            if step is Step.OPEN_SPOOL:
                envelope = conversation.tx.envelope
                assert envelope is not None
                try:
                    writer = spool.open_message(envelope)
                except OSError as exc:
                    conversation.spool_failed(exc)
                else:
                    conversation.spool_opened(writer)
            if replies.flush() != 354:
                return _status(replies.code)
            conversation.content(message)
            await conversation.handle(events.DataEnd(size=len(message)))
            code = replies.flush()
        finally:
            conversation.abort_transaction()
            spool.close()
    if code < 400:
        out.write("  (check-host: nothing was queued; the spool copy is thrown away)\n")
    return _status(code)
