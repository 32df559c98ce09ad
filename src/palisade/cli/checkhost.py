"""``palisade check-host``: what would happen to a client, rule by rule (exim's ``-bh``).

Owns: the simulation and its printout. It runs the configured rules with the real resolver and
the real state store (so a rate-limit rule counts this simulated connection, as it would count a
real one), and relay control, in the order a session does; it sends no mail.
Trust: the arguments are the operator's; addresses are parsed by the SMTP grammar all the same.
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
from palisade.policy.engine import StageOutcome, evaluate_stage
from palisade.policy.relay import RelayPolicy
from palisade.policy.rules import Facts, Ports, Stage
from palisade.policy.verdict import Action, Verdict
from palisade.smtp.address import AddressError, parse_path
from palisade.smtp.replies import Reply


def add_arguments(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "check-host", help="simulate a session from an IP: which rule fires where"
    )
    parser.add_argument("ip", help="the client's IP address")
    parser.add_argument("--helo", help="the HELO/EHLO name it gives")
    parser.add_argument("--from", dest="sender", help="the envelope sender (MAIL FROM)")
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
        return 2
    try:
        config = load_config(args.config)
        policy = build_policy(config)
    except ConfigError as exc:
        print(f"palisade: {exc}", file=sys.stderr)
        return 2
    from palisade.ports import StateTempError
    from palisade.selfcheck import state_problem
    from palisade.server.app import build_ports, relay_policy

    try:  # the real state store: a rate-limit rule counts this simulated connection
        ports = build_ports(config)
    except (OSError, StateTempError) as exc:
        reason = exc.reason if isinstance(exc, StateTempError) else exc.strerror or str(exc)
        problem = state_problem(config.paths.state) if isinstance(exc, OSError) else reason
        print(f"palisade: {problem}", file=sys.stderr)
        return 1
    return asyncio.run(
        _simulate(
            args, ip, config.server.hostname, policy, relay_policy(config, policy), ports, out
        )
    )


def _print_outcome(outcome: StageOutcome, out: TextIO) -> None:
    for number, decision in enumerate(outcome.decisions, 1):
        took = f"{decision.elapsed * 1000:.1f} ms"
        if decision.error is not None and not decision.matched:
            result = f"temporary failure, skipped: {decision.error}"
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

    if await stage(Stage.CONNECT, "") is not None:
        return 0
    out.write(f"  <<< 220 {hostname} ESMTP\n")
    facts.helo = args.helo
    if args.helo is not None:
        verdict = await stage(Stage.HELO, args.helo)
        if verdict is not None:
            return 0
        out.write(f"  <<< 250 {hostname}\n")
    if args.sender is None:
        return 0
    facts.sender = args.sender
    verdict = await stage(Stage.MAIL, f"<{args.sender}>")
    if verdict is not None:
        return 0
    out.write("  <<< 250 2.1.0 Ok\n")
    for rcpt in args.rcpt:
        out.write(f"\nrcpt <{rcpt}>:\n")
        try:
            address, _ = parse_path(f"<{rcpt}>", allow_null=False, allow_postmaster=True)
        except AddressError as exc:
            out.write(f"  <<< 501 5.1.3 Bad recipient address syntax ({exc})\n")
            continue
        assert address is not None
        decision = relay.decide(address, ip)
        if isinstance(decision, Verdict):
            out.write(f"  relay control: {decision.log_message}\n")
            _reply(decision.reply, out)
            continue
        out.write(f"  relay control: route {decision.value}\n")
        if delayed is not None:
            out.write(f"  delayed refusal: {delayed.log_message}\n")
            _reply(delayed.reply, out)
            continue
        facts.recipient = rcpt
        verdict = await stage(Stage.RCPT, f"<{rcpt}>")
        if verdict is None:
            out.write("  <<< 250 2.1.5 Ok\n")
            facts.recipients.append(rcpt)
        elif verdict.closes:
            return 0
    return 0
