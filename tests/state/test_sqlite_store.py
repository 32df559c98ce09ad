"""SqliteStateStore against a real SQLite file: incident keys, persistence, sweeps, two
processes, a lock held beyond the busy timeout, schema versioning, per-operation cost. The
behaviour shared with the Redis store is in test_store_contract.py."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from palisade.adapters.sqlite_state import (
    SCHEMA_VERSION,
    SchemaError,
    SqliteStateStore,
    incident_key,
)
from palisade.ports import StateStore, StateTempError
from tests.state.conftest import SettableClock

T0 = 1_700_000_000.0
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


# ------------------------------------------------------------------------------------ keys


@pytest.mark.parametrize(
    ("given", "key"),
    [
        ("192.0.2.1", "192.0.2.1"),
        (" 192.0.2.1 ", "192.0.2.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("::ffff:c000:201", "192.0.2.1"),
        ("2001:db8:1:2::5", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("2001:db8:1:2::/64", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::99/64", "2001:db8:1:2::/64"),
        ("192.0.2.1/32", "192.0.2.1"),
    ],
)
def test_incident_key(given: str, key: str) -> None:
    assert incident_key(given) == key


@pytest.mark.parametrize(
    "bad", ["", "example.org", "192.0.2.256", "192.0.2.0/24", "2001:db8::/48", "1.2.3.4; DROP"]
)
def test_incident_key_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        incident_key(bad)


# ------------------------------------------------------------------------------------ incidents


def test_implements_the_port(store: SqliteStateStore) -> None:
    assert isinstance(store, StateStore)


def test_persists_across_reopen(db_path: Path, clock: SettableClock) -> None:
    with SqliteStateStore(db_path, clock=clock) as s:
        run(s.add_incident("192.0.2.1", 3))
        assert run(s.rate_hit("k", 900, T0)) == 1
    with SqliteStateStore(db_path, clock=clock) as s:
        got = run(s.get_incident("192.0.2.1"))
        assert got is not None and got.count == 3
        assert run(s.rate_hit("k", 900, T0 + 1)) == 2


# ------------------------------------------------------------------------------------ rate windows


def test_expired_events_are_swept(store: SqliteStateStore, db_path: Path) -> None:
    for i in range(50):
        run(store.rate_hit(f"gone:{i}", 60, T0))
    run(store.rate_hit("live", 600, T0))
    assert store.sweep_sync(T0 + 120) == 50
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT key FROM rate_events").fetchall() == [("live",)]


def test_periodic_sweep_bounds_stale_keys(
    store: SqliteStateStore, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import palisade.adapters.sqlite_state as mod

    monkeypatch.setattr(mod, "SWEEP_EVERY", 10)
    for i in range(9):
        run(store.rate_hit(f"old:{i}", 60, T0))
    run(store.rate_hit("new", 60, T0 + 3600))  # the 10th hit sweeps
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM rate_events").fetchone()[0] == 1


# ------------------------------------------------------------------------------------ processes


def _hammer(path: str, key: str, hits: int, start: Any, out: Any) -> None:
    try:
        s = SqliteStateStore(Path(path), busy_timeout=10.0)
        start.wait(10)
        counts = [asyncio.run(s.rate_hit(key, 3600.0, T0 + i * 0.001)) for i in range(hits)]
        incidents = [s.add_incident_sync("2001:db8::1").count for _ in range(hits // 10)]
        s.close()
        out.put(("ok", counts, incidents))
    except BaseException as exc:  # reported to the parent, which fails the test
        out.put(("error", repr(exc), []))


@pytest.mark.timeout(120)
def test_two_processes_count_exactly(db_path: Path) -> None:
    SqliteStateStore(db_path).close()  # schema created; the workers open their own connections
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    out = ctx.Queue()
    workers, hits = 4, 300
    procs = [
        ctx.Process(target=_hammer, args=(str(db_path), "shared", hits, start, out))
        for _ in range(workers)
    ]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=100) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    errors = [r[1] for r in results if r[0] != "ok"]
    assert errors == []
    counts = sorted(c for r in results for c in r[1])
    # each hit saw a distinct count: the increments were serialised, none lost or doubled
    assert counts == list(range(1, workers * hits + 1))
    incident_counts = sorted(c for r in results for c in r[2])
    assert incident_counts == list(range(1, workers * (hits // 10) + 1))
    with SqliteStateStore(db_path) as s:
        assert run(s.rate_hit("shared", 3600.0, T0 + 1)) == workers * hits + 1


# ------------------------------------------------------------------------------------ failures


def test_lock_held_beyond_busy_timeout(db_path: Path, clock: SettableClock) -> None:
    s = SqliteStateStore(db_path, clock=clock, busy_timeout=0.3)
    run(s.add_incident("192.0.2.1"))
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    other.execute("INSERT INTO incidents VALUES ('203.0.113.9', 1, 0, 0)")
    try:
        started = time.monotonic()
        with pytest.raises(StateTempError) as info:
            run(s.rate_hit("k", 900, T0))
        assert time.monotonic() - started >= 0.25  # it waited for the busy timeout first
        assert "locked" in info.value.reason
        with pytest.raises(StateTempError):
            run(s.add_incident("192.0.2.1"))
        with pytest.raises(StateTempError):
            run(s.remove_incident("192.0.2.1"))
        # WAL: readers do not wait for the writer, and see the last committed state
        got = run(s.get_incident("192.0.2.1"))
        assert got is not None and got.count == 1
        assert run(s.get_incident("203.0.113.9")) is None
    finally:
        other.execute("ROLLBACK")
        other.close()
    # the store recovers once the lock is gone, and the failed hit left nothing behind
    assert run(s.rate_hit("k", 900, T0)) == 1
    assert run(s.add_incident("192.0.2.1")).count == 2
    s.close()


def test_lock_released_within_busy_timeout_waits(db_path: Path) -> None:
    import threading

    s = SqliteStateStore(db_path, busy_timeout=5.0)
    other = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    threading.Timer(0.2, lambda: other.execute("COMMIT")).start()
    assert run(s.rate_hit("k", 900, T0)) == 1
    other.close()
    s.close()


def test_closed_store_is_a_temporary_error(store: SqliteStateStore) -> None:
    store.close()
    store.close()  # idempotent
    with pytest.raises(StateTempError):
        run(store.get_incident("192.0.2.1"))


def test_unreadable_file_is_a_temporary_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.sqlite"
    path.write_bytes(b"this is not a database" * 200)
    with pytest.raises(StateTempError):
        SqliteStateStore(path)


def test_wal_and_schema_version(db_path: Path) -> None:
    SqliteStateStore(db_path).close()
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    SqliteStateStore(db_path).close()  # reopening does not add a second version row
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM schema_version").fetchone()[0] == 1


def test_newer_schema_is_refused(db_path: Path) -> None:
    SqliteStateStore(db_path).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaError):
        SqliteStateStore(db_path)


# ------------------------------------------------------------------------------------ cost


def test_per_operation_cost(store: SqliteStateStore) -> None:
    """Each operation stays well under a millisecond (generous bound for slow CI disks)."""
    n = 500
    started = time.perf_counter()
    for i in range(n):
        run_sync = store.rate_hit_sync(f"rate:10/900s:ip:10.0.{i % 50}.1", 900.0, T0 + i)
        assert run_sync >= 1
    rate_cost = (time.perf_counter() - started) / n
    started = time.perf_counter()
    for i in range(n):
        store.get_incident_sync(f"10.1.{i % 50}.1")
    read_cost = (time.perf_counter() - started) / n
    assert rate_cost < 0.005 and read_cost < 0.005, (rate_cost, read_cost)


def test_a_flooding_key_costs_no_more_per_hit(store: SqliteStateStore) -> None:
    """No count(*) over the window: 20,000 events in the window, a hit stays cheap."""
    for i in range(20000):
        store.rate_hit_sync("flood", 900.0, T0 + i * 0.01)
    started = time.perf_counter()
    for i in range(200):
        count = store.rate_hit_sync("flood", 900.0, T0 + 200 + i * 0.01)
    per_hit = (time.perf_counter() - started) / 200
    assert count == 20200
    assert per_hit < 0.005, per_hit


# ------------------------------------------------------------------------------------ passes


def test_expired_passes_are_swept(store: SqliteStateStore) -> None:
    from palisade.adapters.sqlite_state import PASS_SWEEP_EVERY

    for i in range(PASS_SWEEP_EVERY - 1):
        run(store.remember_pass(f"k{i}", T0 + 1, T0))
    rows = sqlite3.connect(store.path).execute("SELECT count(*) FROM passes").fetchone()[0]
    assert rows == PASS_SWEEP_EVERY - 1
    run(store.remember_pass("fresh", T0 + 100, T0 + 2))  # the sweep forgets the expired ones
    rows = sqlite3.connect(store.path).execute("SELECT key FROM passes").fetchall()
    assert rows == [("fresh",)]
