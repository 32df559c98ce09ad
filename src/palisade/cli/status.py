"""``palisade status [--json]``: what the running daemon says about itself, from its control socket.

Owns: the text this command prints and its exit status, which follows the LSB's for ``status``
(as ``systemctl status`` does): 0 running; 3 not running (no control socket, or nobody answers
on it: a stale file a killed daemon left); 4 unknown (permission denied on the socket, no answer
in time, an answer that is not a status). Asking is :func:`palisade.server.control.ask_status`.
Trust: the reply comes from the daemon through a socket only root and the service user may open;
its text (zone names, reasons) is printed escaped all the same.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from palisade.cli.queue import human_age
from palisade.obs.log import escape

RUNNING, NOT_RUNNING, UNKNOWN = 0, 3, 4


def add_arguments(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "status", help="ask the running daemon (pid, uptime, queue, connections, DNSBL zones)"
    )
    parser.add_argument("--json", action="store_true", help="print the daemon's reply as JSON")
    return parser


def run(args: argparse.Namespace, socket_path: Path) -> int:
    from palisade.server.control import NotRunning, StatusUnknown, ask_status

    try:
        reply = ask_status(socket_path)
    except NotRunning as exc:
        print(f"palisade is not running ({exc})")
        return NOT_RUNNING
    except StatusUnknown as exc:
        hint = " (run as root or as the service user)" if exc.denied else ""
        print(f"palisade status: {exc}{hint}", file=sys.stderr)
        return UNKNOWN
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        print("\n".join(table(reply)))
    return RUNNING


def _when(epoch: Any) -> str:
    if not isinstance(epoch, int | float):
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(epoch))


def _age(seconds: Any) -> str:
    return human_age(float(seconds)) if isinstance(seconds, int | float) else "?"


def table(reply: dict[str, Any]) -> list[str]:
    """The human form of a status reply: a first line that says it runs, then one
    ``name: value`` row per fact."""
    now = time.time()
    version = escape(str(reply.get("version", "?")))
    rows: list[tuple[str, str]] = [
        ("started", f"{_when(reply.get('started'))} (up {_age(reply.get('uptime'))})"),
        ("config", escape(str(reply.get("config", "?")))),
    ]
    loaded = reply.get("loaded_at")
    loaded_ago = _age(now - loaded) if isinstance(loaded, int | float) else "?"
    rows.append(
        ("generation", f"{reply.get('generation')}, loaded {_when(loaded)} ({loaded_ago} ago)")
    )
    workers = reply.get("workers", [])
    connections = reply.get("connections", {})
    per = []
    for worker in workers:
        if worker.get("answered"):
            per.append(f"{worker.get('pid')}: {worker.get('connections')} connections")
        else:
            per.append(f"{worker.get('pid')}: no answer")
    rows.append(("workers", f"{len(workers)} ({', '.join(per)})"))
    total = f"{connections.get('total')} open"
    if not connections.get("complete", True):
        total += " (some workers did not answer)"
    rows.append(("connections", total))
    queue = reply.get("queue", {})
    size = queue.get("size")
    if queue.get("oldest_age") is None:
        rows.append(("queue", f"{size} message(s)"))
    else:
        rows.append(("queue", f"{size} message(s), oldest {_age(queue['oldest_age'])} old"))
    state = reply.get("state")
    if state:
        text = str(state.get("backend"))
        if state.get("fallback_workers"):
            text += (
                f": away since {_when(state.get('since'))}, {state['fallback_workers']} "
                "worker(s) counting on [paths] state"
            )
        elif state.get("backend") == "redis":
            text += ": shared"
        rows.append(("state", text))
    dnsbl = reply.get("dnsbl", {})
    zones = dnsbl.get("zones", [])
    if not zones:
        rows.append(("dnsbl zones", "none configured"))
    for number, zone in enumerate(zones):
        text = f"{escape(str(zone.get('zone')))}: {zone.get('state')}"
        if zone.get("state") == "disabled":
            text += f" since {_when(zone.get('since'))}: {escape(str(zone.get('reason', '')))}"
        rows.append(("dnsbl zones" if number == 0 else "", text))
    width = max(len(name) for name, _ in rows) + 1
    lines = [f"palisade {version} is running (pid {reply.get('pid')})"]
    return lines + [f"  {name + ':' if name else '':<{width}} {value}" for name, value in rows]
