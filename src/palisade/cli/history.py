"""``palisade history add|list|remove``: the operator's view of the incident database.

Owns: the text these commands print and their exit status (0 done; 1 a malformed address, an
unknown record, or a state store that cannot answer). Everything goes through the
``StateStore`` port (the SQLite file, or any other store the caller passes), never raw SQL.
Must not touch: rate-limit counters, the firewall export, the running server (a change is seen by
the ``history`` check at the client's next connection, since every lookup reads the store).
Trust: addresses come from the command line and are validated (an address, an IPv4 /32 or an
IPv6 /64) before the store is asked anything; a malformed one is a clear error on stderr. The
store's records are our own data; keys are printed as stored.

Wiring: ``add_arguments(subparsers)`` adds the ``history`` command to an argparse sub-parser set
(the caller adds global options such as ``--config``); ``run(args, store)`` executes it, where
``args`` is the parsed namespace (``history_command``, ``ip``, ``count``) or a list such as
``["add", "192.0.2.1", "--count", "3"]``. Returns the exit status.

``list`` prints one record per line, highest count first: key, count, first seen, last seen
(local time, ``YYYY-MM-DD HH:MM:SS`` as exim stamps its logs), then a total line.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, TextIO, TypeVar

from palisade.adapters.sqlite_state import incident_key
from palisade.obs.log import escape
from palisade.obs.log import timestamp as stamp
from palisade.ports import Incident, StateStore, StateTempError

COMMANDS = ("add", "list", "remove")
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
        "history", help="list, add or remove incident records (history of unwanted activity)"
    )
    _add_commands(parser)
    return parser


def _add_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="history_command", required=True)
    add = sub.add_parser("add", help="add incidents for an address (IPv6: its /64)")
    add.add_argument("ip", metavar="IP")
    add.add_argument("--count", type=_positive, default=1, metavar="N", help="default 1")
    sub.add_parser("list", help="every record, highest count first")
    remove = sub.add_parser("remove", help="forget an address (IPv6: its /64)")
    remove.add_argument("ip", metavar="IP")


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="palisade history")
    _add_commands(parser)
    return parser.parse_args(list(argv))


def _await(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


def _line(incident: Incident) -> str:
    return (
        f"{escape(incident.key):<43} {incident.count:>7}"
        f"  {stamp(incident.first_seen)}  {stamp(incident.last_seen)}"
    )


def _list(store: StateStore, out: TextIO) -> int:
    incidents = _await(store.list_incidents())
    if incidents:
        out.write(f"{'address':<43} {'count':>7}  {'first seen':<19}  last seen\n")
    for incident in incidents:
        out.write(_line(incident) + "\n")
    out.write(f"{len(incidents)} record(s)\n")
    return 0


def run(
    args: argparse.Namespace | Sequence[str],
    store: StateStore,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    now: float | None = None,
) -> int:
    """Execute one history command; returns the exit status (0 ok, 1 failure)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    ns = args if isinstance(args, argparse.Namespace) else _parse(args)
    command = getattr(ns, "history_command", None)
    if command not in COMMANDS:
        err.write(f"palisade history: unknown command {escape(str(command))}\n")
        return 1
    try:
        if command == "list":
            return _list(store, out)
        text = str(getattr(ns, "ip", ""))
        try:
            key = incident_key(text)
        except ValueError:
            err.write(f"palisade history: not an IP address (or IPv6 /64): {escape(text, 64)}\n")
            return 1
        if command == "add":
            count = getattr(ns, "count", 1)
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                err.write(f"palisade history: --count must be at least 1: {count!r}\n")
                return 1
            incident = _await(store.add_incident(text, count, now))
            out.write(
                f"{incident.key}: {incident.count} incident(s), first seen"
                f" {stamp(incident.first_seen)}, last seen {stamp(incident.last_seen)}\n"
            )
            return 0
        if not _await(store.remove_incident(text)):
            err.write(f"palisade history: no record for {key}\n")
            return 1
        out.write(f"{key}: removed\n")
        return 0
    except StateTempError as exc:
        err.write(f"palisade history: state store unavailable: {escape(exc.reason)}\n")
        return 1
