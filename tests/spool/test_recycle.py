"""Recycled message files (palisade.spool.recycle) on a real file system.

The delivering process and each SMTP worker have their own ``Spool`` object over one directory,
as in the server; the tests do the same with separate objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import zlib
from pathlib import Path

from palisade.obs.log import MemoryEventLog
from palisade.spool import Spool
from palisade.spool.recycle import FilePool
from tests.spool.spoolkit import IDS, make_envelope


def queue(spool: Spool, body: bytes) -> str:
    envelope = make_envelope()
    writer = spool.open_message(envelope)
    writer.write(body)
    asyncio.run(writer.commit())
    return envelope.queue_id


def test_a_recycled_file_holds_exactly_the_next_message(tmp_path: Path) -> None:
    deliverer = Spool(tmp_path, fsync=False)
    old_body = b"Subject: old\r\n\r\n" + b"secret old line\r\n" * 6000  # ~100 KB
    old_id = queue(Spool(tmp_path, fsync=False), old_body)
    old_inode = os.stat(tmp_path / "queue" / old_id).st_ino
    assert deliverer.remove(old_id, recycle=True)
    assert os.listdir(tmp_path / "queue") == []
    assert os.listdir(tmp_path / "free") == [old_id]

    new_body = b"Subject: new\r\n\r\nshort\r\n"
    new_id = queue(Spool(tmp_path, fsync=False), new_body)  # a worker that lists free/ afresh

    path = tmp_path / "queue" / new_id
    assert os.stat(path).st_ino == old_inode  # the same file: no inode allocated
    assert os.listdir(tmp_path / "free") == []
    assert b"secret old line" not in path.read_bytes()  # cut to the new length at the commit
    # The END record and checksum are verified: a file with old bytes after them is refused.
    assert deliverer.recover(MemoryEventLog()) == [new_id]
    assert deliverer.read_body(new_id) == new_body


def test_an_aborted_message_in_a_recycled_file_leaves_nothing(tmp_path: Path) -> None:
    old_id = queue(Spool(tmp_path, fsync=False), b"x\r\n")
    Spool(tmp_path, fsync=False).remove(old_id, recycle=True)
    writer = Spool(tmp_path, fsync=False).open_message(make_envelope())
    writer.write(b"half a message")
    writer.abort()
    for sub in ("tmp", "queue", "free"):
        assert os.listdir(tmp_path / sub) == [], sub


def test_queue_delete_unlinks_instead_of_recycling(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    queue_id = queue(spool, b"x\r\n")
    assert spool.remove(queue_id)  # what `palisade queue delete` calls
    assert os.listdir(tmp_path / "free") == []
    assert not spool.remove(queue_id, recycle=True)  # gone: nothing to recycle


def test_the_pool_is_bounded_and_keeps_no_large_file(tmp_path: Path) -> None:
    (tmp_path / "q").mkdir()
    (tmp_path / "free").mkdir()
    pool = FilePool(str(tmp_path / "free"), limit=2, max_bytes=1000)
    results = []
    for size in (10, 5000, 10, 10):
        name = IDS.new()
        path = tmp_path / "q" / name
        path.write_bytes(b"x" * size)
        results.append(pool.recycle(str(path), name))
    assert results == [True, False, True, False]  # too large; pool full
    assert len(os.listdir(tmp_path / "free")) == 2
    assert len(os.listdir(tmp_path / "q")) == 2  # refused files stay for the caller to unlink


def test_two_workers_never_claim_the_same_file(tmp_path: Path) -> None:
    free = tmp_path / "free"
    free.mkdir()
    inodes = set()
    for _ in range(40):
        name = IDS.new()
        (free / name).write_bytes(b"old")
        inodes.add(os.stat(free / name).st_ino)
    workers = [FilePool(str(free)), FilePool(str(free))]
    claimed = []
    for i in range(100):
        dest = str(tmp_path / f"claimed-{i}")
        if workers[i % 2].claim(dest):
            claimed.append(os.stat(dest).st_ino)
    assert sorted(claimed) == sorted(inodes)  # each file exactly once, none lost
    assert os.listdir(free) == []


def test_workers_with_shares_claim_disjoint_halves_and_together_all(tmp_path: Path) -> None:
    """With ``share`` each worker takes only its names: no file is ever tried by two workers
    (so no claim fails because another took the file), and the two shares cover the pool."""
    free = tmp_path / "free"
    free.mkdir()
    by_slot: dict[int, set[int]] = {0: set(), 1: set()}
    for _ in range(40):
        name = IDS.new()
        (free / name).write_bytes(b"old")
        by_slot[zlib.crc32(name.encode()) % 2].add(os.stat(free / name).st_ino)
    assert by_slot[0] and by_slot[1]
    workers = [FilePool(str(free)), FilePool(str(free))]
    for slot, pool in enumerate(workers):
        pool.share(slot, 2)
    claimed: dict[int, list[int]] = {0: [], 1: []}
    for i in range(60):  # worker 0 first, alone: it leaves worker 1's files in the pool
        dest = str(tmp_path / f"claimed-0-{i}")
        if workers[0].claim(dest):
            claimed[0].append(os.stat(dest).st_ino)
    assert set(claimed[0]) == by_slot[0]
    assert len(os.listdir(free)) == len(by_slot[1])
    for i in range(60):
        dest = str(tmp_path / f"claimed-1-{i}")
        if workers[1].claim(dest):
            claimed[1].append(os.stat(dest).st_ino)
    assert sorted(claimed[1]) == sorted(by_slot[1])
    assert os.listdir(free) == []


def test_recover_trims_the_pool_and_never_delivers_from_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    spool.pool.limit = 3
    queued = queue(spool, b"still queued\r\n")
    for _ in range(5):
        spool.remove(queue(spool, b"delivered\r\n"))  # unlinked: fill free/ by hand below
    for _ in range(5):
        (tmp_path / "free" / IDS.new()).write_bytes(b"old")
    (tmp_path / "free" / "not-a-queue-id").write_bytes(b"junk")
    assert spool.recover(MemoryEventLog()) == [queued]
    left = os.listdir(tmp_path / "free")
    assert len(left) == 3
    assert "not-a-queue-id" not in left


def test_a_link_in_the_pool_is_never_written_through(tmp_path: Path) -> None:
    """Only the delivering process puts files in free/; a symbolic link found there anyway
    (someone with write access to the spool) must not make a worker write to its target."""
    target = tmp_path / "elsewhere"
    target.write_bytes(b"precious")
    Spool(tmp_path, fsync=False)  # makes the directories
    (tmp_path / "free" / IDS.new()).symlink_to(target)
    with contextlib.suppress(OSError):  # refused (ELOOP) is fine; writing through it is not
        queue(Spool(tmp_path, fsync=False), b"x\r\n")
    assert target.read_bytes() == b"precious"
