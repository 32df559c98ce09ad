"""``palisade queue`` commands, called as functions on a real spool (argparse comes later)."""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import pytest

from palisade.cli import queue as qcli
from tests.delivery.deliverykit import Setup, envelope, queue, run, setup


def call(s: Setup, *argv: str, now: float | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = qcli.run(list(argv), s.spool, s.log, out=out, err=err, now=now)
    return code, out.getvalue(), err.getvalue()


def test_list_show_retry_delete(tmp_path: Path) -> None:
    s = setup(tmp_path)  # corp.test is a relay domain without a next hop: messages wait
    a, b = envelope(recipients=("a@corp.test",)), envelope(recipients=("b@corp.test",))
    t0 = time.time()

    async def go() -> None:
        await queue(s.spool, a)
        await queue(s.spool, b)
        await s.runner(retry_initial=600).run_once(now=t0)

    run(go())
    code, out, _ = call(s, "list", now=t0 + 60)
    assert code == 0
    assert a.queue_id in out and b.queue_id in out and "a@corp.test" in out
    assert "<alice@example.test>" in out and "pending" in out and "(in 9m)" in out
    assert "2 message(s) in the queue" in out

    code, out, _ = call(s, "show", a.queue_id)
    assert code == 0 and "Subject: hello" in out and "Sender: <alice@example.test>" in out
    assert "Attempts: 1" in out and "no next hop configured" in out

    code, out, _ = call(s, "retry", a.queue_id, now=t0 + 60)
    assert code == 0 and s.spool.load(a.queue_id)[1].next_attempt == t0 + 60

    code, out, _ = call(s, "delete", b.queue_id)
    assert code == 0 and not s.spool.exists(b.queue_id)
    assert f"{b.queue_id} removed by operator" in s.lines()
    assert [e.queue_id for e in s.spool.list()] == [a.queue_id]


@pytest.mark.parametrize("command", ["show", "retry", "delete"])
@pytest.mark.parametrize("bad", ["../../etc/passwd", "1vA2bC-0001Xy-7Q", "", "a\nb"])
def test_bad_ids_are_a_clear_error(tmp_path: Path, command: str, bad: str) -> None:
    s = setup(tmp_path)
    code, out, err = call(s, command, bad)
    assert code == 1 and out == ""
    assert "malformed queue id" in err or "no such message" in err
    assert "\n" not in err.rstrip("\n")


def test_add_arguments_wires_into_argparse(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="palisade")
    qcli.add_arguments(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["queue", "show", "1vA2bC-0001Xy-7Q"])
    assert ns.command == "queue" and ns.queue_command == "show"
    s = setup(tmp_path)
    assert qcli.run(ns, s.spool, s.log, out=io.StringIO(), err=io.StringIO()) == 1
