"""``palisade check-host``: what would happen to a client, rule by rule (exim's ``-bh``).

Owns: the simulation and its printout. It runs the configured rules with the real resolver and
the real state store (so a rate-limit rule counts this simulated connection, as it would count a
real one), and relay control, in the order a session does; it sends no mail.
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
import sys
from pathlib import Path
from typing import Any, TextIO

from palisade.config import ConfigError, load_config
from palisade.config.policy import Policy, build_policy
from palisade.policy.engine import Decision, StageOutcome, evaluate_stage
from palisade.policy.relay import RelayPolicy
from palisade.policy.rules import Facts, Ports, Stage
from palisade.policy.verdict import Action, Verdict
from palisade.smtp.address import AddressError, parse_path
from palisade.smtp.replies import Reply

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
        if args.sender is not None:
            args.sender = _address(args.sender, null=True)
        args.rcpt = [_address(rcpt, null=False) for rcpt in args.rcpt]
    except AddressError as exc:
        print(f"palisade check-host: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load_config(args.config)
        policy = build_policy(config)
    except ConfigError as exc:
        print(f"palisade: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from palisade.ports import StateTempError
    from palisade.selfcheck import state_problem
    from palisade.server.generation import build_ports, relay_policy

    try:  # the real state store: a rate-limit rule counts this simulated connection
        ports = build_ports(config)
    except (OSError, StateTempError) as exc:
        reason = exc.reason if isinstance(exc, StateTempError) else exc.strerror or str(exc)
        problem = state_problem(config.paths.state, reason)
        print(f"palisade: {problem}", file=sys.stderr)
        return 1
    return asyncio.run(
        _simulate(
            args, ip, config.server.hostname, policy, relay_policy(config, policy), ports, out
        )
    )


def _address(text: str, *, null: bool) -> str:
    """An address as given on the command line (with or without <>), checked as a client's
    MAIL FROM / RCPT TO would be; "" or "<>" is the null sender where ``null``."""
    option = "--from" if null else "--rcpt"
    path = text if text.startswith("<") else f"<{text}>"
    try:
        address, rest = parse_path(path, allow_null=null, allow_postmaster=not null)
    except AddressError as exc:
        raise AddressError(f"{option} {text!r}: bad address: {exc}") from None
    if rest:
        raise AddressError(f"{option} {text!r}: bad address: text after the closing '>'")
    return "" if address is None else str(address)


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


def _status(verdict: Verdict) -> int:
    return EXIT_DEFERRED if verdict.action is Action.DEFER else EXIT_REFUSED


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


def _reply(reply: Reply | None, out: TextIO) -> None:
    if reply is not None:
        out.write(f"  <<< {reply.to_bytes().decode().rstrip()}\n")


async def _simulate(
    args: argparse.Namespace,
    ip: Any,
    hostname: str,
    policy: Policy,
    relay: RelayPolicy,
    ports: Ports,
    out: TextIO,
) -> int:
    facts = Facts(
        client_ip=ip,
        client_port=0,
        local_domains=relay.local_domains,
        our_names=frozenset({hostname.lower()}),
        tls=args.tls,
    )
    facts.results["relay_client"] = relay.client_may_relay(ip)
    out.write(
        f"Simulated SMTP session from [{ip}]"
        f"{' (relay_from_hosts)' if facts.results['relay_client'] else ''}\n"
    )
    delayed: Verdict | None = None

    async def stage(which: Stage, subject: str) -> Verdict | None:
        nonlocal delayed
        if which is not Stage.RCPT:  # the RCPT heading is written before relay control
            out.write(f"\n{which.value}{' ' + subject if subject else ''}:\n")
        outcome = await evaluate_stage(which, policy.for_stage(which), facts, ports)
        _print_outcome(outcome, out)
        verdict = outcome.verdict
        if (
            verdict is not None
            and policy.delay_reject
            and which in (Stage.CONNECT, Stage.HELO, Stage.MAIL)
            and verdict.action is not Action.DROP
        ):
            out.write("  (delay_reject: this refusal is given at RCPT)\n")
            delayed = delayed or verdict
            return None
        if verdict is not None:
            _reply(verdict.reply, out)
            if verdict.closes or which is Stage.CONNECT:
                out.write("  connection closed\n")
        return verdict

    verdict = await stage(Stage.CONNECT, "")
    if verdict is not None:
        return _status(verdict)
    out.write(f"  <<< 220 {hostname} ESMTP\n")
    facts.helo = args.helo
    if args.helo is not None:
        verdict = await stage(Stage.HELO, args.helo)
        if verdict is not None:
            return _status(verdict)
        out.write(f"  <<< 250 {hostname}\n")
    if args.sender is None:
        return EXIT_ACCEPTED if delayed is None else _status(delayed)
    facts.sender = args.sender
    verdict = await stage(Stage.MAIL, f"<{args.sender}>")
    if verdict is not None:
        return _status(verdict)
    out.write("  <<< 250 2.1.0 Ok\n")
    if not args.rcpt:
        return EXIT_ACCEPTED if delayed is None else _status(delayed)
    statuses: list[int] = []
    for rcpt in args.rcpt:
        out.write(f"\nrcpt <{rcpt}>:\n")
        try:
            address, _ = parse_path(f"<{rcpt}>", allow_null=False, allow_postmaster=True)
        except AddressError as exc:  # checked in main(): not reached
            out.write(f"  <<< 501 5.1.3 Bad recipient address syntax ({exc})\n")
            statuses.append(EXIT_REFUSED)
            continue
        assert address is not None
        decision = relay.decide(address, ip)
        if isinstance(decision, Verdict):
            out.write(f"  relay control: {decision.log_message}\n")
            _reply(decision.reply, out)
            statuses.append(_status(decision))
            continue
        out.write(f"  relay control: route {decision.value}\n")
        if delayed is not None:
            out.write(f"  delayed refusal: {delayed.log_message}\n")
            _reply(delayed.reply, out)
            statuses.append(_status(delayed))
            continue
        facts.recipient = rcpt
        verdict = await stage(Stage.RCPT, f"<{rcpt}>")
        if verdict is None:
            out.write("  <<< 250 2.1.5 Ok\n")
            facts.recipients.append(rcpt)
            statuses.append(EXIT_ACCEPTED)
        else:
            statuses.append(_status(verdict))
            if verdict.closes:
                break
    # one recipient accepted: the mail gets in; else a deferral means "try again"
    for status in (EXIT_ACCEPTED, EXIT_DEFERRED):
        if status in statuses:
            return status
    return EXIT_REFUSED
