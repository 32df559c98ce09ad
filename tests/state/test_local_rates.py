"""Process-local rate counting with write-behind, against a real SQLite store."""

from __future__ import annotations

import asyncio
from pathlib import Path

from palisade.adapters.local_rates import WriteBehindRates
from palisade.adapters.sqlite_state import SqliteStateStore


def test_counts_are_exact_and_reach_the_store_for_the_next_process(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"

    async def first_process() -> list[int]:
        rates = WriteBehindRates(SqliteStateStore(path), flush_interval=0.05)
        counts = [await rates.rate_hit("ip:192.0.2.1", 900, 1000.0 + n) for n in range(10)]
        await asyncio.sleep(0.3)  # the write-behind flush
        assert SqliteStateStore(path).rate_hit_sync("probe", 900, 1010.0) == 1  # store usable
        rates.close()
        return counts

    assert asyncio.run(first_process()) == list(range(1, 11))

    async def restarted() -> list[int]:
        rates = WriteBehindRates(SqliteStateStore(path))
        counts = [await rates.rate_hit("ip:192.0.2.1", 900, 1011.0)]  # seeded from the store
        counts.append(await rates.rate_hit("ip:192.0.2.1", 900, 1000.0 + 900 + 5))  # window slid
        rates.close()
        return counts

    assert asyncio.run(restarted()) == [11, 6]


def test_close_writes_what_is_pending(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"

    async def go() -> None:
        rates = WriteBehindRates(SqliteStateStore(path), flush_interval=3600)
        for n in range(3):
            await rates.rate_hit("k", 60, 500.0 + n)
        rates.close()  # no flush happened yet: close must write them

    asyncio.run(go())
    assert SqliteStateStore(path).rate_events_sync("k", 0.0) == [500.0, 501.0, 502.0]


def test_concurrent_first_hits_share_one_seed_and_count_exactly(tmp_path: Path) -> None:
    async def go() -> list[int]:
        rates = WriteBehindRates(SqliteStateStore(tmp_path / "s.sqlite"))
        counts = await asyncio.gather(*(rates.rate_hit("k", 60, 100.0) for _ in range(20)))
        rates.close()
        return sorted(counts)

    assert asyncio.run(go()) == list(range(1, 21))


def test_a_batch_counts_like_single_hits(tmp_path: Path) -> None:
    """The grouped batch write and the per-hit write leave the same counts in the store."""
    batched = SqliteStateStore(tmp_path / "a.sqlite")
    single = SqliteStateStore(tmp_path / "b.sqlite")
    hits = [("k1", 10.0, t) for t in (1.0, 2.0, 2.0, 5.0)] + [("k2", 10.0, 3.0)]
    batched.rate_batch_sync(hits[:2])
    batched.rate_batch_sync(hits[2:])
    for key, window, at in hits:
        single.rate_hit_sync(key, window, at)
    for key in ("k1", "k2"):
        assert batched.rate_events_sync(key, 0.0) == single.rate_events_sync(key, 0.0)
        assert batched.rate_hit_sync(key, 10.0, 12.5) == single.rate_hit_sync(key, 10.0, 12.5)
