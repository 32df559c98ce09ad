"""``palisade queue list|show|retry|delete``: the operator's view of the spool.

Owns: the text these commands print. Everything goes through the public API of
:mod:`palisade.spool`, never raw files.
Must not touch: delivery (``retry`` only marks a message due: it sets its next attempt to now, and
the running server's queue runner picks it up within its scan interval, 10 s by default).
Trust: the queue id comes from the command line: it is validated (``is_queue_id``) before the
spool is asked anything, and a malformed or unknown id is a clear error with exit status 1.
Message headers shown by ``show`` are remote text: control characters are escaped.

Wiring: ``add_arguments(subparsers)`` adds the ``queue`` command to an argparse sub-parser set
(the caller adds global options such as ``--config``); ``run(args, spool, log)`` executes it, where
``args`` is the parsed namespace (``queue_command``, ``queue_id``) or a list such as
``["show", ID]``. Returns the exit status.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from palisade.obs.log import EventLog, escape
from palisade.obs.queueid import is_queue_id
from palisade.spool import DeliveryState, Envelope, Spool, SpoolError, UnknownMessage

COMMANDS = ("list", "show", "retry", "delete")


def add_arguments(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``queue`` and its sub-commands to ``subparsers`` (from ``add_subparsers()``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "queue", help="list, show, retry or delete queued messages"
    )
    _add_commands(parser)
    return parser


def _add_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="queue_command", required=True)
    sub.add_parser("list", help="every queued message with its recipients' state")
    for name, text in (
        ("show", "envelope, delivery state and headers of one message"),
        ("retry", "make one message due now"),
        ("delete", "remove one message (no bounce is sent)"),
    ):
        sub.add_parser(name, help=text).add_argument("queue_id", metavar="ID")


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="palisade queue")
    _add_commands(parser)
    return parser.parse_args(list(argv))


def human_age(seconds: float) -> str:
    """exim's mailq style: 45s, 12m, 3h, 2d."""
    seconds = max(seconds, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def human_size(size: int) -> str:
    if size < 1024:
        return str(size)
    if size < 1024 * 1024:
        return f"{size / 1024:.1f}K"
    return f"{size / 1024 / 1024:.1f}M"


def _when(at: float, now: float) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
    return f"{stamp} (now)" if at <= now else f"{stamp} (in {human_age(at - now)})"


def _recipient_lines(state: DeliveryState) -> list[str]:
    out = []
    for rcpt, rs in state.recipients.items():
        line = f"          {rs.status:<9} {escape(rcpt)}"
        if rs.detail:
            line += f"  {escape(rs.detail, 120)}"
        out.append(line)
    return out


def _list(spool: Spool, out: TextIO, now: float) -> int:
    entries = spool.list(now)
    for e in entries:
        sender = escape(e.envelope.sender)
        out.write(f"{human_age(e.age):>4} {human_size(e.size):>6} {e.queue_id} <{sender}>\n")
        for line in _recipient_lines(e.state):
            out.write(line + "\n")
        if e.state.pending():
            out.write(
                f"          attempts={e.state.attempts}"
                f" next attempt {_when(e.state.next_attempt, now)}\n"
            )
        out.write("\n")
    out.write(f"{len(entries)} message(s) in the queue\n")
    return 0


def _headers(spool: Spool, queue_id: str) -> str:
    prefix = spool.read_body(queue_id, 64 * 1024)
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = prefix.find(sep)
        if end >= 0:
            prefix = prefix[:end]
            break
    text = prefix.decode("utf-8", "replace").replace("\r\n", "\n")
    return "\n".join(escape(line, 998) for line in text.split("\n"))


def _show(spool: Spool, queue_id: str, out: TextIO, now: float) -> int:
    envelope, state = spool.load(queue_id)
    env: Envelope = envelope
    fields = [
        ("Queue-ID", env.queue_id),
        ("Sender", f"<{env.sender}>"),
        ("Received", f"{_when(env.received_at, now)} from {env.client_ip}:{env.client_port}"),
        ("HELO", env.helo),
        ("Client-Name", env.client_name or "-"),
        ("Protocol", env.protocol),
        ("TLS", env.tls or "-"),
        ("Message-ID", env.message_id or "-"),
        ("Attempts", str(state.attempts)),
        ("Next-Attempt", _when(state.next_attempt, now) if state.pending() else "-"),
        ("Last-Error", state.last_error or "-"),
    ]
    fields += [(f"Extra-{k}", v) for k, v in sorted(env.extra.items())]
    for name, value in fields:
        out.write(f"{name}: {escape(value)}\n")
    out.write("Recipients:\n")
    for line in _recipient_lines(state):
        out.write(line + "\n")
    out.write("\n" + _headers(spool, queue_id) + "\n")
    return 0


def _retry(spool: Spool, queue_id: str, out: TextIO, now: float) -> int:
    _envelope, state = spool.load(queue_id)
    state.next_attempt = now
    spool.save_state(queue_id, state)
    out.write(f"{queue_id}: due now; the running server retries it within its scan interval\n")
    return 0


def _delete(spool: Spool, queue_id: str, log: EventLog, out: TextIO) -> int:
    if not spool.remove(queue_id):
        raise UnknownMessage(queue_id)
    log.main(f"{queue_id} removed by operator", queue_id=queue_id, event="removed")
    out.write(f"{queue_id}: removed\n")
    return 0


def run(
    args: argparse.Namespace | Sequence[str],
    spool: Spool,
    log: EventLog,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    now: float | None = None,
) -> int:
    """Execute one queue command; returns the exit status (0 ok, 1 bad or unknown id)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    ns = args if isinstance(args, argparse.Namespace) else _parse(args)
    now = time.time() if now is None else now
    command = getattr(ns, "queue_command", None)
    if command not in COMMANDS:
        err.write(f"palisade queue: unknown command {escape(str(command))}\n")
        return 1
    if command == "list":
        return _list(spool, out, now)
    queue_id = str(getattr(ns, "queue_id", ""))
    if not is_queue_id(queue_id):
        err.write(f"palisade queue: malformed queue id: {escape(queue_id, 64)}\n")
        return 1
    try:
        if command == "show":
            return _show(spool, queue_id, out, now)
        if command == "retry":
            return _retry(spool, queue_id, out, now)
        return _delete(spool, queue_id, log, out)
    except UnknownMessage:
        err.write(f"palisade queue: no such message in the queue: {queue_id}\n")
        return 1
    except SpoolError as exc:
        err.write(f"palisade queue: {queue_id}: {escape(str(exc))}\n")
        return 1
