"""The gateway's background incident recorder with a real SQLite store: batches, the block
line in the main log, protection, and a store that fails (a closed one, a locked one)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from palisade.adapters.local_rates import WriteBehindRates
from palisade.adapters.sqlite_state import SqliteStateStore
from palisade.feedback.incidents import IncidentRecorder, describe_block, span
from palisade.feedback.protect import Protection
from palisade.obs.log import MemoryEventLog
from palisade.ports import Block, BlockPolicy

T0 = 1_700_000_000.0
POLICY = BlockPolicy(block_at=10, block_for=3600.0)


def test_queued_incidents_are_written_and_a_block_is_logged(tmp_path: Path) -> None:
    log = MemoryEventLog()
    released: list[str] = []

    async def scenario(store: SqliteStateStore | WriteBehindRates) -> None:
        recorder = IncidentRecorder(log)
        for n in range(5):  # queued together: one batch
            recorder.submit(
                store, "192.0.2.1", 2, "dnsbl", POLICY, Protection(), T0 + n,
                done=lambda: released.append("x"),
            )  # fmt: skip
        recorder.submit(store, "127.0.0.1", 50, "dnsbl", POLICY, Protection(), T0)
        assert recorder.pending == 6
        assert await recorder.drain(10)
        assert (recorder.recorded, recorder.failed) == (6, 0)

    with SqliteStateStore(tmp_path / "a.sqlite") as store:
        asyncio.run(scenario(WriteBehindRates(store)))
        blocks = store.active_blocks_sync(T0 + 4)
        assert [b.key for b in blocks] == ["192.0.2.1"]  # loopback: protected
        assert [e.weight for e in store.incident_events_sync("127.0.0.1", 0)] == [50]
    assert released == ["x"] * 5
    assert log.lines == [
        (
            "main",
            f"incident block: 192.0.2.1 blocked {describe_block(blocks[0])} (10 incidents in 7d)",
        )
    ]


def test_a_store_that_fails_is_one_panic_line(tmp_path: Path) -> None:
    """Closed: every write fails at once; locked (a real lock held here): after the busy
    timeout. Lines are rate-limited; the count lost is said in the next line."""
    log = MemoryEventLog()
    path = tmp_path / "b.sqlite"

    async def scenario() -> IncidentRecorder:
        recorder = IncidentRecorder(log, failure_every=3600)
        with SqliteStateStore(path, busy_timeout=0.2) as store:
            holder = sqlite3.connect(path, isolation_level=None)
            holder.execute("BEGIN EXCLUSIVE")
            try:
                recorder.submit(store, "192.0.2.1", 3, "dnsbl", POLICY, Protection(), T0)
                recorder.submit(store, "192.0.2.2", 3, "dnsbl", POLICY, Protection(), T0)
                assert await recorder.drain(10)
            finally:
                holder.execute("ROLLBACK")
                holder.close()
        return recorder

    recorder = asyncio.run(scenario())
    assert recorder.failed == 2 and recorder.recorded == 0
    assert len(log.lines) == 1
    kind, line = log.lines[0]
    assert kind == "panic"
    assert line.startswith("incident not recorded (dnsbl for 192.0.2.1): state store: ")
    assert "database is locked; the refusal stands" in line


def test_spans_and_block_text() -> None:
    assert [span(s) for s in (604800, 86400, 5400, 7200, 90, 45, 1.5 * 86400, 100000)] == [
        "7d", "1d", "90m", "2h", "90s", "45s", "36h", "1.2d"
    ]  # fmt: skip
    block = Block("192.0.2.1", T0, T0 + 2 * 86400, 2, "dnsbl x6")
    assert describe_block(block).endswith("(block 2, 2d): dnsbl x6")
