"""``palisade history add|list|remove`` through ``run()`` with parsed arguments."""

from __future__ import annotations

import argparse
import io
import time

import pytest

from palisade.adapters.sqlite_state import SqliteStateStore
from palisade.cli import history as history_cli
from palisade.ports import BlockPolicy
from tests.state.conftest import SettableClock

T0 = 1_700_000_000.0


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="palisade")
    commands = parser.add_subparsers(dest="command", required=True)
    history_cli.add_arguments(commands)
    return parser.parse_args(["history", *argv])


def call(
    store: SqliteStateStore,
    *argv: str,
    now: float | None = None,
    policy: BlockPolicy | None = None,
) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = history_cli.run(parse(*argv), store, out=out, err=err, now=now, policy=policy)
    return status, out.getvalue(), err.getvalue()


def stamp(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def test_add_list_remove(store: SqliteStateStore, clock: SettableClock) -> None:
    status, out, err = call(store, "add", "192.0.2.1")
    assert (status, err) == (0, "")
    assert out == f"192.0.2.1: 1 incident(s), first seen {stamp(T0)}, last seen {stamp(T0)}\n"
    clock.advance(120)
    status, out, _ = call(store, "add", "192.0.2.1", "--count", "4", "--rule", "dovecot-auth")
    assert status == 0 and out.startswith("192.0.2.1: 5 incident(s)")
    assert call(store, "add", "2001:db8:1:2::77", "--count", "9")[0] == 0
    assert call(store, "add", "198.51.100.3", now=T0 - 3600)[0] == 0

    status, out, _ = call(store, "list")
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "address", "count", "first", "seen", "last", "seen", "blocked", "until", "rules"
    ]  # fmt: skip
    assert lines[1].split()[:2] == ["2001:db8:1:2::/64", "9"]
    assert lines[1].endswith("-                    manual x9")
    assert lines[2].split()[:2] == ["192.0.2.1", "5"]
    assert f"{stamp(T0)}  {stamp(T0 + 120)}" in lines[2]
    assert lines[2].endswith("dovecot-auth x4, manual x1")
    assert lines[3].split()[:2] == ["198.51.100.3", "1"]
    assert lines[4] == "3 record(s), 0 blocked"

    status, out, err = call(store, "remove", "2001:db8:1:2::1")  # any address of the /64
    assert (status, out, err) == (
        0,
        "2001:db8:1:2::/64: removed (incidents forgotten, block lifted)\n",
        "",
    )
    status, out, err = call(store, "remove", "2001:db8:1:2::/64")
    assert status == 1 and out == ""
    assert err == "palisade history: no record for 2001:db8:1:2::/64\n"


def test_add_blocks_show_tells_why_remove_lifts(
    store: SqliteStateStore, clock: SettableClock
) -> None:
    policy = BlockPolicy(window=86400.0, block_at=10, block_for=3600.0)
    status, _, _ = call(store, "add", "192.0.2.8", "--count", "6", "--rule", "dnsbl", policy=policy)
    assert status == 0
    clock.advance(60)
    status, out, err = call(store, "add", "192.0.2.8", "--count", "4", policy=policy)
    assert (status, err) == (0, "")
    assert out == (
        f"192.0.2.8: 10 incident(s), first seen {stamp(T0)}, last seen {stamp(T0 + 60)}; "
        f"now blocked until {stamp(T0 + 3660)} (first block, 1h): dnsbl x6, manual x4\n"
    )
    status, out, err = call(store, "show", "192.0.2.8", policy=policy)
    assert (status, err) == (0, "")
    assert out.splitlines() == [
        "192.0.2.8: 10 incident(s) in the last 1d (blocked at 10)",
        f"blocked since {stamp(T0 + 60)} until {stamp(T0 + 3660)} (first block, 1h): "
        "dnsbl x6, manual x4",
        "time                 weight  rule",
        f"{stamp(T0)}       6  dnsbl",
        f"{stamp(T0 + 60)}       4  manual",
    ]
    status, out, _ = call(store, "list", policy=policy)
    assert out.splitlines()[1].endswith(f"{stamp(T0 + 3660)}  dnsbl x6, manual x4")
    assert out.splitlines()[-1] == "1 record(s), 1 blocked"
    assert call(store, "remove", "192.0.2.8")[0] == 0
    assert store.active_blocks_sync(T0 + 60) == []
    status, out, err = call(store, "show", "192.0.2.8", policy=policy)
    assert (status, out) == (1, "") and err == "palisade history: no record for 192.0.2.8\n"


def test_a_protected_address_is_never_blocked(store: SqliteStateStore) -> None:
    status, out, _ = call(store, "add", "127.0.0.1", "--count", "12")
    assert status == 0 and out.endswith("; protected (loopback): never blocked\n")
    assert store.active_blocks_sync(T0) == []
    status, out, _ = call(store, "show", "127.0.0.1")
    assert "not blocked\nprotected (loopback): never blocked\n" in out


@pytest.mark.parametrize("rule", ["", "two words", "x" * 65, ".dot", "a\x1b[31m"])
def test_bad_rule_name(store: SqliteStateStore, rule: str) -> None:
    status, out, err = call(store, "add", "192.0.2.1", "--rule", rule)
    assert status == 1 and out == ""
    assert err.startswith("palisade history: --rule must be a name") and "\x1b" not in err
    assert store.list_incidents_sync() == []


def test_list_empty(store: SqliteStateStore) -> None:
    assert call(store, "list") == (0, "0 record(s), 0 blocked\n", "")


@pytest.mark.parametrize("bad", ["mail.example.org", "192.0.2.300", "10.0.0.0/8", "::1\x1b[31m"])
@pytest.mark.parametrize("command", ["add", "remove", "show"])
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
