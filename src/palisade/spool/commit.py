"""Group commit: many sessions' "make this message durable" requests share directory fsyncs.

Owns: a few committer threads per spool. Each takes one job from a queue, fsyncs the file (the
threads run in parallel, so the file system can merge their journal commits), renames
``tmp/<id>`` into ``queue/<id>`` without ever replacing a file there, and then makes the queue
directory durable: whoever holds the directory lock fsyncs it for every rename finished before
that fsync started, so the threads waiting behind it find their rename already covered and skip
their own (leader-based group commit, as in database logs). Each job's coroutine is woken in its
own event loop.
Must not touch: anything but the files handed to it and the queue directory; it never decides what
a message is (the store does) and never answers a client (the server does, after ``commit``).
Trust: jobs come from :class:`palisade.spool.store.SpoolWriter` only; paths were validated there.

Why threads that pull jobs directly (and no batch hand-off): the first version handed each batch
from one thread to a pool, one more thread switch per message; this one is no slower in the
benchmark (same CPU per message within the noise, 2026-11-23) and simpler. Python has no
asynchronous fsync; threads blocked in fsync release the GIL. The rename never replaces an
existing queue file (renameat2 RENAME_NOREPLACE), which replaced an ``exists()`` check before it.

Failure rules: a job whose file fsync or rename fails fails alone. A job is told "durable" only
after a directory fsync that STARTED after its rename returned and that succeeded; if the fsync
that would have covered it fails, its file is unlinked from queue/ again and it fails, so that no
client is told 250 for a message whose directory entry may not survive, and none that was told 4xx
is later delivered anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_AT_FDCWD = -100
_NOREPLACE = 1  # RENAME_NOREPLACE


def _load_renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    result: Callable[[int, bytes, int, bytes, int], int] = func
    return result


_renameat2 = _load_renameat2()


def rename_noreplace(src: str | Path, dst: str | Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError if ``dst`` exists, never replacing it.

    Linux's renameat2(RENAME_NOREPLACE) makes that one atomic system call; elsewhere (or on a file
    system without it) the check and the rename are two steps, safe here because only this
    process's ids, unique per process, are renamed into queue/.
    """
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not supported here
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(17, "queue file exists", str(dst))
    os.rename(src, dst)


@dataclass
class CommitJob:
    fd: int
    tmp_path: str
    final_path: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    error: BaseException | None = None
    renamed: bool = False


@dataclass
class CommitStats:
    """Counters for benchmarks and tests: jobs, directory fsyncs ("batches": one directory fsync
    makes every rename before it durable) and the most renames one directory fsync covered."""

    batches: int = 0
    jobs: int = 0
    dir_fsyncs: int = 0
    largest_batch: int = 0


def _settle(job: CommitJob) -> None:
    def done() -> None:
        if job.future.done():  # the waiting coroutine was cancelled
            return
        if job.error is None:
            job.future.set_result(None)
        else:
            job.future.set_exception(job.error)

    with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting any more
        job.loop.call_soon_threadsafe(done)


class GroupCommitter:
    """The committer threads, started on first use; :meth:`close` stops them after their jobs."""

    def __init__(self, queue_dir: Path, *, threads: int = 8) -> None:
        self._queue_dir = queue_dir
        self._jobs: queue.SimpleQueue[CommitJob | None] = queue.SimpleQueue()
        self._max_threads = threads
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._state_lock = threading.Lock()  # threads, idle count, closed, counters
        self._dir_lock = threading.Lock()  # one directory fsync at a time
        self._closed = False
        self._renamed = 0  # renames finished so far (a generation number)
        self._synced = 0  # renames covered by the last successful directory fsync
        self.stats = CommitStats()

    def submit(self, job: CommitJob) -> None:
        with self._state_lock:
            if self._closed:
                raise RuntimeError("spool committer is closed")
            if self._idle == 0 and len(self._threads) < self._max_threads:
                thread = threading.Thread(target=self._run, name="spool-commit", daemon=True)
                self._threads.append(thread)
                self._idle += 1
                thread.start()
            self._idle -= 1
        self._jobs.put(job)

    def close(self) -> None:
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        for thread in threads:
            thread.join()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._commit(job)
            finally:
                with self._state_lock:
                    self._idle += 1
                    self.stats.jobs += 1
                _settle(job)

    def _commit(self, job: CommitJob) -> None:
        try:
            os.fsync(job.fd)
            rename_noreplace(job.tmp_path, job.final_path)
        except OSError as exc:
            job.error = exc
            return
        job.renamed = True
        with self._state_lock:
            self._renamed += 1
            generation = self._renamed
        with self._dir_lock:
            if self._synced >= generation:
                return  # a directory fsync that started after our rename succeeded
            with self._state_lock:
                covers = self._renamed
            try:
                fd = os.open(self._queue_dir, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(job.final_path)
                job.renamed = False
                job.error = exc
                return
            with self._state_lock:
                self.stats.dir_fsyncs += 1
                self.stats.batches += 1
                self.stats.largest_batch = max(self.stats.largest_batch, covers - self._synced)
            self._synced = covers
