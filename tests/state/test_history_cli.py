"""``palisade history add|list|remove`` through ``run()`` with parsed arguments."""

from __future__ import annotations

import argparse
import io
import time

import pytest

from palisade.adapters.sqlite_state import SqliteStateStore
from palisade.cli import history as history_cli
from tests.state.conftest import SettableClock

T0 = 1_700_000_000.0


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="palisade")
    commands = parser.add_subparsers(dest="command", required=True)
    history_cli.add_arguments(commands)
    return parser.parse_args(["history", *argv])


def call(store: SqliteStateStore, *argv: str, now: float | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = history_cli.run(parse(*argv), store, out=out, err=err, now=now)
    return status, out.getvalue(), err.getvalue()


def stamp(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def test_add_list_remove(store: SqliteStateStore, clock: SettableClock) -> None:
    status, out, err = call(store, "add", "192.0.2.1")
    assert (status, err) == (0, "")
    assert out == f"192.0.2.1: 1 incident(s), first seen {stamp(T0)}, last seen {stamp(T0)}\n"
    clock.advance(120)
    status, out, _ = call(store, "add", "192.0.2.1", "--count", "4")
    assert status == 0 and out.startswith("192.0.2.1: 5 incident(s)")
    assert call(store, "add", "2001:db8:1:2::77", "--count", "9")[0] == 0
    assert call(store, "add", "198.51.100.3", now=T0 - 3600)[0] == 0

    status, out, _ = call(store, "list")
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == ["address", "count", "first", "seen", "last", "seen"]
    assert lines[1].split()[:2] == ["2001:db8:1:2::/64", "9"]
    assert lines[2].split()[:2] == ["192.0.2.1", "5"]
    assert f"{stamp(T0)}  {stamp(T0 + 120)}" in lines[2]
    assert lines[3].split()[:2] == ["198.51.100.3", "1"]
    assert lines[4] == "3 record(s)"

    status, out, err = call(store, "remove", "2001:db8:1:2::1")  # any address of the /64
    assert (status, out, err) == (0, "2001:db8:1:2::/64: removed\n", "")
    status, out, err = call(store, "remove", "2001:db8:1:2::/64")
    assert status == 1 and out == ""
    assert err == "palisade history: no record for 2001:db8:1:2::/64\n"


def test_list_empty(store: SqliteStateStore) -> None:
    assert call(store, "list") == (0, "0 record(s)\n", "")


@pytest.mark.parametrize("bad", ["mail.example.org", "192.0.2.300", "10.0.0.0/8", "::1\x1b[31m"])
@pytest.mark.parametrize("command", ["add", "remove"])
def test_malformed_ip(store: SqliteStateStore, command: str, bad: str) -> None:
    status, out, err = call(store, command, bad)
    assert status == 1 and out == ""
    assert err.startswith("palisade history: not an IP address")
    assert "\x1b" not in err
    assert store.list_incidents_sync() == []


def test_bad_count_is_a_usage_error(store: SqliteStateStore) -> None:
    with pytest.raises(SystemExit) as info:
        parse("add", "192.0.2.1", "--count", "0")
    assert info.value.code == 2


def test_run_accepts_an_argument_list(store: SqliteStateStore) -> None:
    out = io.StringIO()
    assert history_cli.run(["add", "192.0.2.9", "--count", "2"], store, out=out) == 0
    assert history_cli.run(["list"], store, out=out) == 0
    assert "192.0.2.9" in out.getvalue()


def test_store_unavailable(store: SqliteStateStore) -> None:
    store.close()
    status, _out, err = call(store, "list")
    assert status == 1 and err.startswith("palisade history: state store unavailable")
