"""The per-IP connection table shared by workers: sums over workers, frees, overflows.

Both workers' views live in this one process here; the e2e tests in test_lifecycle_e2e.py drive
the table from real worker processes."""

from __future__ import annotations

import itertools
import os

from palisade.server.conncount import ENTRIES_PER_BUCKET, SharedCounts, ip_key


def test_counts_of_all_workers_add_up_and_a_dead_workers_column_is_cleared() -> None:
    table = SharedCounts(workers=2, max_connections=10)
    panics: list[str] = []
    first, second = table.for_slot(0, panics.append), table.for_slot(1, panics.append)
    assert [first.admit("192.0.2.1", 3)[0] for _ in range(2)] == [True, True]
    assert second.admit("192.0.2.1", 3) == (True, 2)
    assert second.admit("192.0.2.1", 3) == (False, 3)
    assert first.admit("2001:db8::1", 3) == (True, 0)  # another address, another entry
    assert first.admit("fe80::1%lo", 3) == (True, 0)  # the zone is not part of the key
    first.release("192.0.2.1")
    assert second.admit("192.0.2.1", 3) == (True, 2)
    table.clear_slot(1)  # worker 1 died with its two connections
    assert first.admit("192.0.2.1", 3) == (True, 1)
    assert not panics


def test_a_full_bucket_falls_back_to_this_workers_count_and_says_so() -> None:
    table = SharedCounts(workers=2, max_connections=1)
    panics: list[str] = []
    worker = table.for_slot(0, panics.append)
    bucket = hash(ip_key("10.0.0.1")) & (table.buckets - 1)
    addresses = (f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}" for n in range(1, 1 << 20))
    same_bucket = list(
        itertools.islice(
            (ip for ip in addresses if hash(ip_key(ip)) & (table.buckets - 1) == bucket),
            ENTRIES_PER_BUCKET + 1,
        )
    )
    for ip in same_bucket[:ENTRIES_PER_BUCKET]:
        assert worker.admit(ip, 1) == (True, 0)
    extra = same_bucket[-1]
    assert worker.admit(extra, 2) == (True, 0) and worker.admit(extra, 2) == (True, 1)
    assert worker.admit(extra, 2) == (False, 2)
    assert len(panics) == 1 and f"[{extra}]" in panics[0]
    worker.release(same_bucket[0])  # an entry frees up; the overflowed client stays counted here
    worker.release(extra)
    assert worker.admit(extra, 2) == (True, 1)


def test_the_table_is_shared_with_forked_workers() -> None:
    table = SharedCounts(workers=2, max_connections=10)
    table.for_slot(0, print).admit("192.0.2.7", 5)
    pid = os.fork()
    if pid == 0:  # a real worker process, as serve() forks them
        admitted, before = table.for_slot(1, print).admit("192.0.2.7", 5)
        os._exit(0 if admitted and before == 1 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert table.for_slot(0, print).admit("192.0.2.7", 2) == (False, 2)
