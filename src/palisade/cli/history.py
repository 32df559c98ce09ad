"""``palisade history list|show|add|remove``: the operator's view of incidents and blocks.

Owns: the text these commands print and their exit status (0 done; 1 a malformed address, an
unknown record, a bad rule name, or a state store that cannot answer). Everything goes through
the ``StateStore`` port (the SQLite file, or any other store the caller passes), never raw SQL;
``add`` records through ``feedback.incidents.record`` with the config's block policy and
protection, as the gateway does.
Must not touch: rate-limit counters, nftables, the running server (a change is seen by the
``history`` check at the client's next connection, and by ``palisade firewall`` at its next
sync, since both read the store).
Trust: addresses come from the command line and are validated (an address, an IPv4 /32 or an
IPv6 /64) before the store is asked anything; a malformed one is a clear error on stderr. Rule
names from ``--rule`` are checked (letters, digits, ``.``, ``_``, ``:``, ``-``). The store's
records are our own data; keys and rule names are escaped when printed all the same.

Wiring: ``add_arguments(subparsers)`` adds the ``history`` command to an argparse sub-parser set
(the caller adds global options such as ``--config``); ``run(args, store, policy=...,
protection=...)`` executes it, where ``args`` is the parsed namespace (``history_command``,
``ip``, ``count``, ``rule``) or a list such as ``["add", "192.0.2.1", "--count", "3"]``.
Returns the exit status. A closed standard output (``| head``) is the entry point's business
(``cli.main``: quiet, status 0).

``list``: every address with incidents in the window or an active block, blocked ones first,
then highest count first: key, weighted count, first and last seen (local time, ``YYYY-MM-DD
HH:MM:SS`` as exim stamps its logs), until when it is blocked (``-``: not blocked) and the rules
that counted (``dnsbl x6, no-ptr x4``); then a total line. ``show IP``: the block (since, until,
which block of the key, why), whether the address is protected, and every incident in the
window: time, weight, rule.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import Any, TextIO, TypeVar

from palisade.adapters.sqlite_state import incident_key
from palisade.feedback.incidents import describe_block, record, span
from palisade.feedback.protect import Protection
from palisade.obs.log import escape
from palisade.obs.log import timestamp as stamp
from palisade.ports import BlockPolicy, Incident, IncidentEvent, StateStore, StateTempError

COMMANDS = ("add", "list", "remove", "show")
MANUAL_RULE = "manual"
_RULE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
_T = TypeVar("_T")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def add_arguments(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``history`` and its sub-commands to ``subparsers`` (from ``add_subparsers()``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "history", help="incidents and blocks: list, show why, add, remove"
    )
    _add_commands(parser)
    return parser


def _add_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="history_command", required=True)
    add = sub.add_parser(
        "add", help="record incidents for an address (IPv6: its /64); may block it"
    )
    add.add_argument("ip", metavar="IP")
    add.add_argument("--count", type=_positive, default=1, metavar="N", help="weight, default 1")
    add.add_argument(
        "--rule", default=MANUAL_RULE, metavar="NAME", help=f"what it was, default {MANUAL_RULE}"
    )
    sub.add_parser("list", help="blocked addresses and counts, with the rules that counted")
    show = sub.add_parser("show", help="an address's block and every incident in the window")
    show.add_argument("ip", metavar="IP")
    remove = sub.add_parser(
        "remove", help="forget an address's incidents and lift its block (IPv6: its /64)"
    )
    remove.add_argument("ip", metavar="IP")


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="palisade history")
    _add_commands(parser)
    return parser.parse_args(list(argv))


def _await(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


def _rules(events: Sequence[IncidentEvent]) -> str:
    """``dnsbl x6, no-ptr x4``: weight per rule, heaviest first (the store's block reason)."""
    weights: dict[str, int] = {}
    for event in events:
        weights[event.rule] = weights.get(event.rule, 0) + event.weight
    ordered = sorted(weights.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{rule} x{weight}" for rule, weight in ordered)


def _list(store: StateStore, out: TextIO, policy: BlockPolicy, now: float) -> int:
    incidents = _await(store.list_incidents())
    if incidents:
        out.write(
            f"{'address':<43} {'count':>7}  {'first seen':<19}  {'last seen':<19}"
            f"  {'blocked until':<19}  rules\n"
        )
    blocked = 0
    for incident in incidents:
        if incident.block is not None:
            blocked += 1
            until = stamp(incident.block.until)
            rules = incident.block.reason
        else:
            until = "-"
            rules = _rules(_await(store.incident_events(incident.key, now - policy.window)))
        out.write(
            f"{escape(incident.key):<43} {incident.count:>7}"
            f"  {stamp(incident.first_seen)}  {stamp(incident.last_seen)}"
            f"  {until:<19}  {escape(rules, 300)}\n"
        )
    out.write(f"{len(incidents)} record(s), {blocked} blocked\n")
    return 0


def _show(
    store: StateStore,
    text: str,
    key: str,
    out: TextIO,
    err: TextIO,
    policy: BlockPolicy,
    protection: Protection,
    now: float,
) -> int:
    incident = _await(store.get_incident(text))
    events = _await(store.incident_events(text, now - policy.window))
    if incident is None and not events:
        err.write(f"palisade history: no record for {key}\n")
        return 1
    count = sum(event.weight for event in events)
    out.write(
        f"{escape(key)}: {count} incident(s) in the last {span(policy.window)}"
        f" (blocked at {policy.block_at})\n"
    )
    block = incident.block if incident is not None else None
    if block is not None:
        out.write(f"blocked since {stamp(block.since)} {describe_block(block)}\n")
    else:
        out.write("not blocked\n")
    why = protection.why(key)
    if why is not None:
        out.write(f"protected ({why}): never blocked\n")
    if events:
        out.write(f"{'time':<19}  {'weight':>6}  rule\n")
    for event in events:
        out.write(f"{stamp(event.at)}  {event.weight:>6}  {escape(event.rule, 100)}\n")
    return 0


def _add(
    store: StateStore,
    ns: argparse.Namespace,
    text: str,
    out: TextIO,
    err: TextIO,
    policy: BlockPolicy,
    protection: Protection,
    now: float,
) -> int:
    count = getattr(ns, "count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        err.write(f"palisade history: --count must be at least 1: {count!r}\n")
        return 1
    rule = str(getattr(ns, "rule", MANUAL_RULE))
    if not _RULE_RE.match(rule):
        err.write(
            f"palisade history: --rule must be a name of letters, digits, '.', '_', ':' or '-' "
            f"(at most 64), got {escape(rule, 64)}\n"
        )
        return 1
    outcome = _await(record(store, text, count, rule, policy, protection, now))
    incident = _await(store.get_incident(text))
    if incident is None:  # stamped before the window: counted nowhere
        incident = Incident(outcome.key, 0, now, now)
    line = (
        f"{incident.key}: {incident.count} incident(s), first seen"
        f" {stamp(incident.first_seen)}, last seen {stamp(incident.last_seen)}"
    )
    if outcome.block is not None:
        line += f"; {'now ' if outcome.new_block else ''}blocked {describe_block(outcome.block)}"
    elif outcome.count >= policy.block_at:
        line += f"; protected ({protection.why(outcome.key)}): never blocked"
    out.write(line + "\n")
    return 0


def run(
    args: argparse.Namespace | Sequence[str],
    store: StateStore,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    now: float | None = None,
    policy: BlockPolicy | None = None,
    protection: Protection | None = None,
) -> int:
    """Execute one history command; returns the exit status (0 ok, 1 failure).

    ``now``: the time of an ``add`` and of the window (default: the store's clock, or the
    system's); ``policy`` and ``protection``: the config's (defaults: ``BlockPolicy()`` and
    loopback only)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    policy = BlockPolicy() if policy is None else policy
    protection = Protection() if protection is None else protection
    if now is None:
        clock = getattr(store, "clock", None)
        now = clock.now() if clock is not None else time.time()
    ns = args if isinstance(args, argparse.Namespace) else _parse(args)
    command = getattr(ns, "history_command", None)
    if command not in COMMANDS:
        err.write(f"palisade history: unknown command {escape(str(command))}\n")
        return 1
    try:
        if command == "list":
            return _list(store, out, policy, now)
        text = str(getattr(ns, "ip", ""))
        try:
            key = incident_key(text)
        except ValueError:
            err.write(f"palisade history: not an IP address (or IPv6 /64): {escape(text, 64)}\n")
            return 1
        if command == "show":
            return _show(store, text, key, out, err, policy, protection, now)
        if command == "add":
            return _add(store, ns, text, out, err, policy, protection, now)
        if not _await(store.remove_incident(text)):
            err.write(f"palisade history: no record for {key}\n")
            return 1
        out.write(f"{key}: removed (incidents forgotten, block lifted)\n")
        return 0
    except StateTempError as exc:
        err.write(f"palisade history: state store unavailable: {escape(exc.reason)}\n")
        return 1
