"""SqliteStateStore's own side of incidents and blocks against a real SQLite file: pruning in
sweeps, batches in one transaction, and the migration from a file of the previous release. What
every backend must do (windows, weights, blocks with growth and cap, protected keys,
unblock/remove) is in test_store_contract.py, run on SQLite and on Redis."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from palisade.adapters import sqlite_state
from palisade.adapters.sqlite_state import LEGACY_RULE, SCHEMA_VERSION, SqliteStateStore
from palisade.ports import BlockPolicy, Incident, IncidentEvent, StateStore
from tests.state.conftest import SettableClock

T0 = 1_700_000_000.0
DAY = 86400.0
T = TypeVar("T")
POLICY = BlockPolicy(window=7 * DAY, block_at=10, block_for=DAY, growth=2.0, block_max=3 * DAY)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def record(
    store: SqliteStateStore,
    ip: str,
    weight: int,
    rule: str,
    now: float,
    policy: BlockPolicy = POLICY,
    *,
    may_block: bool = True,
) -> Any:
    return run(store.record_incident(ip, weight, rule, now, policy, may_block))


def test_the_port_has_the_new_methods(store: SqliteStateStore) -> None:
    assert isinstance(store, StateStore)
    for name in ("record_incident", "active_blocks", "incident_events", "unblock"):
        assert callable(getattr(store, name)) and callable(getattr(store, f"{name}_sync"))


def test_block_policy_length() -> None:
    policy = BlockPolicy(block_for=60, growth=3, block_max=1000)
    assert [policy.block_length(n) for n in (1, 2, 3, 4)] == [60, 180, 540, 1000]
    assert BlockPolicy(growth=10.0).block_length(10_000) == BlockPolicy().block_max


def test_periodic_sweep_forgets_keys_that_left(
    store: SqliteStateStore, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_state, "INCIDENT_SWEEP_EVERY", 5)
    for n in range(20):
        record(store, f"198.51.100.{n}", 1, "dnsbl", T0)
    later = T0 + POLICY.window + 1
    for _ in range(5):  # the fifth write sweeps
        record(store, "192.0.2.1", 1, "dnsbl", later)
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM incident_keys").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM incident_events").fetchone()[0] == 5


# ------------------------------------------------------------------------------ migration

# The previous release's DDL, verbatim (schema version 1 with the passes table).
OLD_DDL = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE incidents (
    key TEXT PRIMARY KEY, count INTEGER NOT NULL, first_seen REAL NOT NULL,
    last_seen REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX incidents_by_count ON incidents (count DESC, key);
CREATE TABLE rate_keys (
    key TEXT PRIMARY KEY, events INTEGER NOT NULL, expires REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX rate_keys_by_expiry ON rate_keys (expires);
CREATE TABLE passes (key TEXT PRIMARY KEY, until REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX passes_by_expiry ON passes (until);
CREATE TABLE rate_events (
    key TEXT NOT NULL, at REAL NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (key, at)
) WITHOUT ROWID;
INSERT INTO schema_version (version) VALUES (1);
"""
# What the previous release ran to add an incident (its add_incident statement).
OLD_ADD = (
    "INSERT INTO incidents (key, count, first_seen, last_seen) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (key) DO UPDATE SET count = count + excluded.count,"
    " first_seen = min(first_seen, excluded.first_seen),"
    " last_seen = max(last_seen, excluded.last_seen)"
)


def test_a_file_of_the_previous_release_is_migrated(db_path: Path, clock: SettableClock) -> None:
    db_path.parent.mkdir(parents=True)
    with sqlite3.connect(db_path) as conn:
        conn.executescript(OLD_DDL)
        conn.execute(OLD_ADD, ("192.0.2.1", 4, T0 - DAY, T0 - 60))
        conn.execute(OLD_ADD, ("2001:db8::/64", 12, T0 - 3 * DAY, T0 - 2 * DAY))
        conn.execute(OLD_ADD, ("198.51.100.1", 9, T0 - 30 * DAY, T0 - 20 * DAY))  # too old
        conn.execute("INSERT INTO passes VALUES ('pregreet:192.0.2.1', ?)", (T0 + 60,))
    with SqliteStateStore(db_path, clock=clock, policy=POLICY) as store:
        assert run(store.get_incident("192.0.2.1")) == Incident("192.0.2.1", 4, T0 - 60, T0 - 60)
        assert run(store.incident_events("2001:db8::1", 0)) == [
            IncidentEvent("2001:db8::/64", T0 - 2 * DAY, 12, LEGACY_RULE)
        ]
        assert run(store.get_incident("198.51.100.1")) is None
        assert [i.key for i in run(store.list_incidents())] == ["2001:db8::/64", "192.0.2.1"]
        # a migrated count is evidence, not a block: the next incident decides
        out = record(store, "2001:db8::7", 1, "dnsbl", T0)
        assert out.count == 13 and out.new_block
        assert out.block.reason == f"{LEGACY_RULE} x12, dnsbl x1"
        assert run(store.pass_until("pregreet:192.0.2.1", T0)) == T0 + 60
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM incidents").fetchone()[0] == 0
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


def test_an_old_palisade_on_a_new_file(db_path: Path, clock: SettableClock) -> None:
    """The version stays 1: the previous release opens the file, ignores the new tables, and
    what it adds to its ``incidents`` table is moved into events at the next open."""
    with SqliteStateStore(db_path, clock=clock, policy=POLICY) as store:
        record(store, "192.0.2.1", 10, "dnsbl", T0)
    with sqlite3.connect(db_path) as conn:  # the previous release's start-up and an add
        for statement in OLD_DDL.split(";"):
            if statement.strip().startswith("CREATE"):
                old = statement.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS")
                conn.execute(old.replace("CREATE INDEX", "CREATE INDEX IF NOT EXISTS"))
        assert conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] == 1
        conn.execute(OLD_ADD, ("192.0.2.1", 2, T0 + 5, T0 + 5))
    with SqliteStateStore(db_path, clock=clock, policy=POLICY) as store:
        assert [(e.weight, e.rule) for e in run(store.incident_events("192.0.2.1", 0))] == [
            (10, "dnsbl"),
            (2, LEGACY_RULE),
        ]
        assert [b.key for b in run(store.active_blocks(T0 + 5))] == ["192.0.2.1"]


def test_a_batch_is_as_one_by_one(db_path: Path, tmp_path: Path) -> None:
    items = [
        ("192.0.2.1", 4, "dnsbl", T0, POLICY, True),
        ("192.0.2.1", 4, "dnsbl", T0 + 1, POLICY, True),
        ("127.0.0.1", 20, "dnsbl", T0 + 1, POLICY, False),
        ("192.0.2.1", 2, "no-ptr", T0 + 2, POLICY, True),
        ("192.0.2.1", 2, "no-ptr", T0 + 3, POLICY, True),
    ]
    with SqliteStateStore(db_path) as batched, SqliteStateStore(tmp_path / "one.sqlite") as one:
        together = run(batched.record_incidents(items))
        alone = [one.record_incident_sync(*item) for item in items]
        assert together == alone
        assert [o.count for o in together] == [4, 8, 20, 10, 12]
        assert [o.new_block for o in together] == [False, False, False, True, False]
        assert run(batched.active_blocks(T0 + 3)) == run(one.active_blocks(T0 + 3))


def test_a_bad_item_writes_nothing_of_its_batch(store: SqliteStateStore) -> None:
    with pytest.raises(ValueError):
        store.record_incidents_sync(
            [("192.0.2.1", 1, "dnsbl", T0, POLICY, True), ("bogus", 1, "dnsbl", T0, POLICY, True)]
        )
    assert run(store.incident_events("192.0.2.1", 0)) == []
