"""Group commit: concurrent commits share the directory fsync; all of them are durable.

``os.fsync`` is wrapped in these tests purely as INSTRUMENTATION: the wrapper counts calls (and
tells file from directory descriptors), then calls the real fsync. Behaviour is unchanged.
"""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from palisade.obs.log import MemoryEventLog
from palisade.spool import Spool
from palisade.spool.writer import SpoolWriter
from tests.spool.spoolkit import make_envelope


@pytest.fixture
def fsync_counter(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    counts = {"file": 0, "dir": 0}
    real = os.fsync

    def counting_fsync(fd: int) -> None:
        counts["dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"] += 1
        real(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    yield counts


async def commit_many(spool: Spool, n: int) -> list[str]:
    async def one(i: int) -> str:
        env = make_envelope()
        writer = spool.open_message(env)
        writer.write(b"Subject: %d\r\n\r\n" % i)
        await asyncio.sleep(0)  # sessions interleave, as they do on a real server
        writer.write(b"body\r\n" * 100)
        await writer.commit()
        return env.queue_id

    return await asyncio.gather(*(one(i) for i in range(n)))


def test_concurrent_commits_share_directory_fsyncs(
    tmp_path: Path, fsync_counter: dict[str, int]
) -> None:
    spool = Spool(tmp_path)
    ids = asyncio.run(commit_many(spool, 100))
    spool.close()
    stats = spool.commit_stats
    assert stats.jobs == 100
    assert fsync_counter["file"] == 100  # every file is made durable ...
    assert (
        fsync_counter["dir"] == stats.dir_fsyncs == stats.batches
    )  # ... with one dir fsync a batch
    assert stats.batches < 100 / 4, f"no batching: {stats}"
    assert stats.largest_batch > 10
    assert sorted(Spool(tmp_path, fsync=False).recover(MemoryEventLog())) == sorted(ids)


def test_sequential_commits_each_get_their_own_fsync(
    tmp_path: Path, fsync_counter: dict[str, int]
) -> None:
    spool = Spool(tmp_path)

    async def sequential() -> None:
        for _ in range(5):
            await commit_many(spool, 1)

    asyncio.run(sequential())
    spool.close()
    assert fsync_counter == {"file": 5, "dir": 5}


def test_fsync_false_never_fsyncs(tmp_path: Path, fsync_counter: dict[str, int]) -> None:
    spool = Spool(tmp_path, fsync=False)
    asyncio.run(commit_many(spool, 20))
    assert fsync_counter == {"file": 0, "dir": 0}
    assert len(os.listdir(tmp_path / "queue")) == 20


def test_commits_from_several_event_loops_in_threads(tmp_path: Path) -> None:
    import threading

    spool = Spool(tmp_path)
    results: list[list[str]] = []

    def worker() -> None:
        results.append(asyncio.run(commit_many(spool, 30)))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spool.close()
    assert sum(len(r) for r in results) == 120
    assert len(os.listdir(tmp_path / "queue")) == 120
    assert os.listdir(tmp_path / "tmp") == []


@pytest.mark.parametrize("fsync", [True, False])
def test_commit_never_replaces_a_queued_message_with_the_same_id(
    tmp_path: Path, fsync: bool
) -> None:
    spool = Spool(tmp_path, fsync=fsync)
    env = make_envelope()
    queued = tmp_path / "queue" / env.queue_id
    queued.write_bytes(b"an acknowledged message")

    async def commit_again() -> None:
        writer = spool.open_message(env)
        writer.write(b"Subject: other\r\n\r\nbody\r\n")
        try:
            await writer.commit()
        finally:
            writer.abort()

    with pytest.raises(FileExistsError):
        asyncio.run(commit_again())
    spool.close()
    assert queued.read_bytes() == b"an acknowledged message"
    assert os.listdir(tmp_path / "tmp") == []


def test_close_finishes_the_commits_already_submitted_then_refuses_new_ones(
    tmp_path: Path,
) -> None:
    """A commit submitted just before close() is still made durable and answered; one after it
    gets an error at once instead of waiting for a thread that is gone."""
    spool = Spool(tmp_path)

    async def main() -> None:
        writers = []
        for i in range(5):
            writer = spool.open_message(make_envelope())
            writer.write(b"Subject: %d\r\n\r\nbody\r\n" % i)
            writers.append(writer)
        commits = [asyncio.ensure_future(w.commit()) for w in writers]
        await asyncio.sleep(0)  # every commit is submitted ...
        await asyncio.to_thread(spool.close)  # ... before the committer is told to stop
        await asyncio.wait_for(asyncio.gather(*commits), 10)
        late = spool.open_message(make_envelope())
        late.write(b"Subject: late\r\n\r\nbody\r\n")
        with pytest.raises(RuntimeError, match="closed"):
            await asyncio.wait_for(late.commit(), 10)
        late.abort()

    asyncio.run(main())
    assert len(os.listdir(tmp_path / "queue")) == 5
    assert os.listdir(tmp_path / "tmp") == []


def test_a_batch_fsyncs_its_files_at_the_same_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One after the other, each file of a batch waits for its own disk flush (5 ms here, as on
    a busy disk); the committer fsyncs a batch's files at the same time, a lone file itself.

    The wrapper is INSTRUMENTATION (it records which thread fsyncs, and how many at once) plus a
    delay standing in for a slow disk: the real fsync is always called.
    """
    real = os.fsync
    lock = threading.Lock()
    seen = {"now": 0, "most": 0}
    threads: dict[str, set[str]] = {"file": set(), "dir": set()}

    def slow_fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        with lock:
            threads[kind].add(threading.current_thread().name)
            if kind == "file":
                seen["now"] += 1
                seen["most"] = max(seen["most"], seen["now"])
        try:
            time.sleep(0.005)
            real(fd)
        finally:
            if kind == "file":
                with lock:
                    seen["now"] -= 1

    monkeypatch.setattr(os, "fsync", slow_fsync)
    spool = Spool(tmp_path)
    lone = asyncio.run(commit_many(spool, 1))
    assert threads["file"] == {"spool-commit"}  # a lone file: no hand-off to the pool
    ids = asyncio.run(commit_many(spool, 40))
    spool.close()
    assert seen["most"] > 1, f"a batch's files were fsynced one after the other: {seen}"
    assert any(name.startswith("spool-fsync") for name in threads["file"])
    assert {n.split("_")[0] for n in threads["dir"]} == {"spool-dirsync"}  # once a batch
    assert spool.commit_stats.largest_batch > 1
    assert sorted(os.listdir(tmp_path / "queue")) == sorted(lone + ids)
    assert sorted(Spool(tmp_path, fsync=False).recover(MemoryEventLog())) == sorted(lone + ids)


def test_a_failed_fsync_in_a_batch_fails_that_message_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO from one file's fsync (a fault that cannot be provoked on a healthy disk: injected)
    fails that commit alone; the batch's other messages are committed while it runs beside
    them on the pool."""
    real = os.fsync
    failing: set[int] = set()

    def faulty_fsync(fd: int) -> None:
        time.sleep(0.002)
        if fd in failing:
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", faulty_fsync)
    spool = Spool(tmp_path)

    async def main() -> list[BaseException | str]:
        writers = []
        for i in range(6):
            writer = spool.open_message(make_envelope())
            writer.write(b"Subject: %d\r\n\r\nbody\r\n" % i)
            writers.append(writer)
        failing.add(writers[2]._file.fileno())  # type: ignore[union-attr]

        async def commit(w: SpoolWriter) -> str:
            await w.commit()
            return w.queue_id

        return await asyncio.gather(*(commit(w) for w in writers), return_exceptions=True)

    outcomes = asyncio.run(main())
    spool.close()
    assert isinstance(outcomes[2], OSError)
    done = [o for i, o in enumerate(outcomes) if i != 2]
    assert all(isinstance(o, str) for o in done)
    assert sorted(os.listdir(tmp_path / "queue")) == sorted(done)  # type: ignore[type-var]
