"""RedisStateStore's own side, against a real redis-server: every key expires, one round trip
per rate check, a flooding key costs no more per hit, two processes count exactly, and the
failures (closed, unreachable, a refused password) are ``StateTempError`` without a secret."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from pathlib import Path
from typing import Any

import pytest

from palisade.adapters.redis_state import RedisSettings, RedisStateStore, StateAuthError
from palisade.ports import BlockPolicy, StateTempError
from tests.conftest import free_port
from tests.redisserver import RedisServer
from tests.state.conftest import redis_store

T0 = 1_700_000_000.0
POLICY = BlockPolicy(window=3600, block_at=3, block_for=600, block_max=6000)


def test_every_key_expires(redis_server: RedisServer) -> None:
    store = redis_store(redis_server, policy=POLICY)

    async def go() -> None:
        for i in range(5):
            await store.rate_hit(f"rate:k{i}", 900, T0 + i)
            await store.record_incident(f"192.0.2.{i}", 2, "dnsbl", T0 + i, POLICY)
        await store.record_incident("192.0.2.0", 2, "dnsbl", T0 + 9, POLICY)  # a block
        await store.remember_pass("pregreet:192.0.2.1", T0 + 60, T0)
        await store.aclose()

    asyncio.run(go())
    keys = redis_server.cli("--scan", "--pattern", f"{store.prefix}*").split()
    assert len(keys) == 5 + 5 * 2 + 2 + 1 + 1  # rates, events+meta, the indexes, block, pass
    ttls = {key: int(redis_server.cli("PTTL", key).strip()) for key in keys}
    assert all(ttl > 0 for ttl in ttls.values()), ttls
    assert ttls[f"{store.prefix}r:rate:k0"] <= 900_000 + 1000
    assert ttls[f"{store.prefix}p:pregreet:192.0.2.1"] <= 60_000
    assert ttls[f"{store.prefix}b:192.0.2.0"] <= (600 + 3600) * 1000 + 1000


def test_one_round_trip_per_rate_check(redis_server: RedisServer) -> None:
    store = redis_store(redis_server)

    async def go() -> None:
        await store.rate_hit("k", 60, T0)  # the connection and the script are set up
        before = redis_server.commandstats()
        for i in range(100):
            await store.rate_hit("k", 60, T0 + i * 0.1)
        after = redis_server.commandstats()
        await store.aclose()
        sent = {
            name: after.get(name, 0) - before.get(name, 0)
            for name in ("evalsha", "eval", "script|load", "get", "hello", "ping")
        }
        assert sent == {"evalsha": 100, "eval": 0, "script|load": 0, "get": 0, "hello": 0,
                        "ping": 0}  # fmt: skip

    asyncio.run(go())


def test_scripts_are_loaded_again_after_a_script_flush(redis_server: RedisServer) -> None:
    store = redis_store(redis_server)

    async def go() -> list[int]:
        first = await store.rate_hit("k", 60, T0)
        redis_server.cli("SCRIPT", "FLUSH")  # as after a Redis restart
        second = await store.rate_hit("k", 60, T0 + 1)
        await store.aclose()
        return [first, second]

    assert asyncio.run(go()) == [1, 2]


def test_a_flooding_key_costs_no_more_per_hit(redis_server: RedisServer) -> None:
    store = redis_store(redis_server)

    async def go() -> tuple[int, float]:
        for i in range(0, 20000, 500):  # 20,000 events in the window, in pipelines
            await store.rate_batch([("flood", 900.0, T0 + (i + j) * 0.01) for j in range(500)])
        started = time.perf_counter()
        for i in range(200):
            count = await store.rate_hit("flood", 900.0, T0 + 200 + i * 0.01)
        per_hit = (time.perf_counter() - started) / 200
        await store.aclose()
        return count, per_hit

    count, per_hit = asyncio.run(go())
    assert count == 20200
    assert per_hit < 0.005, per_hit


def _hammer(url: str, prefix: str, hits: int, start: Any, out: Any) -> None:
    try:
        store = RedisStateStore(RedisSettings(url=url, prefix=prefix, timeout=5.0))
        start.wait(10)

        async def go() -> list[int]:
            counts = [await store.rate_hit("shared", 3600.0, T0 + i * 0.001) for i in range(hits)]
            await store.aclose()
            return counts

        out.put(("ok", asyncio.run(go())))
    except BaseException as exc:  # reported to the parent, which fails the test
        out.put(("error", repr(exc)))


@pytest.mark.timeout(120)
def test_two_processes_count_exactly(redis_server: RedisServer) -> None:
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    workers, hits = 4, 300
    prefix = f"procs{time.time_ns()}:"
    procs = [
        ctx.Process(target=_hammer, args=(redis_server.url, prefix, hits, start, out))
        for _ in range(workers)
    ]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=100) for _ in procs]
    for p in procs:
        p.join(30)
    assert [r[0] for r in results] == ["ok"] * workers, results
    counts = sorted(c for r in results for c in r[1])
    assert counts == list(range(1, workers * hits + 1))  # none lost, none counted twice


def test_closed_and_unreachable_are_temporary_errors(redis_server: RedisServer) -> None:
    store = redis_store(redis_server)
    store.close()
    store.close()  # idempotent
    with pytest.raises(StateTempError, match="closed"):
        asyncio.run(store.get_incident("192.0.2.1"))
    nobody = RedisStateStore(RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0"))
    started = time.monotonic()
    with pytest.raises(StateTempError) as info:
        asyncio.run(nobody.rate_hit("k", 60, T0))
    assert time.monotonic() - started < 2
    assert "rate update" in info.value.reason and "127.0.0.1" in info.value.reason


def test_a_refused_password_names_no_secret(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "auth", extra=("--requirepass", "the-right-one")).start()
    try:
        for password in (None, "a-wrong-one"):
            store = RedisStateStore(RedisSettings(url=server.url, password=password))
            with pytest.raises(StateAuthError) as info:
                asyncio.run(store.ping())
            assert "authentication failed" in info.value.reason
            assert "password_file" in info.value.reason
            assert "a-wrong-one" not in info.value.reason
            assert "the-right-one" not in info.value.reason
            assert "a-wrong-one" not in repr(store.settings)
        right = RedisStateStore(RedisSettings(url=server.url, password="the-right-one"))
        asyncio.run(right.ping())
    finally:
        server.stop()
