"""Group commit: many sessions' "make this message durable" requests share one directory fsync.

Owns: one worker thread per spool that takes every commit waiting at that moment as a batch,
fsyncs its files (a batch of several at the same time, see below), renames each ``tmp/<id>``
into ``queue/<id>`` without ever replacing a file there (renameat2 RENAME_NOREPLACE), then
fsyncs the queue directory ONCE for the whole batch and wakes each waiting coroutine in its own
event loop (those two on a second thread, while the first takes the next batch). The order for
each message is unchanged: its file fsynced, renamed, the directory fsynced, then its answer.
Why one thread with a batch: a version with several committer threads taking jobs directly made
~60% more futex calls per message in an SMTP worker (threads contending for the GIL) and batched
the directory fsync less, for no measurable gain (2026-11-23).
Why a batch's files are fsynced at the same time (from a small pool of threads): one after the
other, each fsync of a newly written file waits for its own journal commit and disk cache flush
(ext4's delayed allocation keeps the first fsync's commit from covering the others' data), so
a batch of k took k flushes (jbd2 and the block layer merge the commits and flushes of
concurrent fsyncs: this is how Postfix's cleanup processes, one per client, share theirs). On
this project's build machine, its disk shared with other work, 10 sessions committing 4 KB
messages (bench/commit_bench.py, 2026-12-02): 290-330 commits/s, p50 22-31 ms one after the
other; 960-1200 commits/s, p50 3-4 ms at the same time; with the directory stage overlapped (see
:meth:`GroupCommitter._commit`) p99 11-26 ms instead of 18-30. An earlier measurement
(2026-11-24), on a disk whose fsync took ~0.3 ms, found the hand-offs to a pool dearer than the
gain; a lone file is still fsynced by the committer thread itself.
Must not touch: anything but the files handed to it and the queue directory; it never decides what
a message is (the store does) and never answers a client (the server does, after ``commit``).
Trust: jobs come from :class:`palisade.spool.writer.SpoolWriter` only; paths were validated there.

Failure rules: a job whose file fsync or rename fails fails alone. If the directory fsync fails,
every file renamed in that batch is unlinked again and every job in it fails, so that no client is
told 250 for a message whose directory entry may not survive, and none that was told 4xx is later
delivered anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

_AT_FDCWD = -100
_FSYNC_THREADS = 8  # a batch's files fsynced at the same time (more wait for a free thread)
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
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # these: fall back below
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "queue file exists", str(dst))
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
    """Counters for benchmarks and tests: how many batches, jobs and directory fsyncs ran."""

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
    """The worker thread. Started on first use; :meth:`close` stops it after the jobs queued.

    Jobs travel on a :class:`queue.SimpleQueue` (C code: a put costs no Python-level lock, and the
    waiting thread sleeps in one futex without holding the GIL). An earlier version with a
    ``threading.Condition`` made twice the context switches per commit and cost ~80 µs more CPU
    per message in an SMTP worker (2026-11-24, ``bench`` A/B in BENCHMARKS.md).
    """

    def __init__(self, queue_dir: Path) -> None:
        self._queue_dir = queue_dir
        self._dir_fd: int | None = None  # opened once, closed by close()
        self._jobs: queue.SimpleQueue[CommitJob | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders submit against close; uncontended: no syscall
        self._closed = False
        self._thread: threading.Thread | None = None
        self._fsyncers: ThreadPoolExecutor | None = None  # made by the committer thread, on need
        self._dirsync: ThreadPoolExecutor | None = None  # the directory stage, likewise
        self.stats = CommitStats()

    def submit(self, job: CommitJob) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("spool committer is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="spool-commit", daemon=True)
                self._thread.start()
            self._jobs.put(job)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            thread = self._thread
            self._jobs.put(None)  # after every job already queued
        if thread is not None:
            thread.join()
        if self._dirsync is not None:  # after the committer: it hands batches to this stage
            self._dirsync.shutdown(wait=True)
            self._dirsync = None
        if self._fsyncers is not None:
            self._fsyncers.shutdown(wait=True)
            self._fsyncers = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def _run(self) -> None:
        jobs = self._jobs
        while True:
            waiting = [jobs.get()]
            with contextlib.suppress(queue.Empty):  # all else waiting now joins the batch
                while True:
                    waiting.append(jobs.get_nowait())
            batch = [job for job in waiting if job is not None]
            if batch:
                self._commit(batch)
            if len(batch) < len(waiting):  # close()'s None was among them
                return

    @staticmethod
    def _fsync_one(job: CommitJob) -> None:
        try:
            os.fsync(job.fd)
        except OSError as exc:
            job.error = exc

    def _fsync_all(self, batch: list[CommitJob]) -> None:
        if len(batch) == 1:
            self._fsync_one(batch[0])
            return
        if self._fsyncers is None:
            self._fsyncers = ThreadPoolExecutor(_FSYNC_THREADS, thread_name_prefix="spool-fsync")
        for _ in self._fsyncers.map(self._fsync_one, batch):
            pass  # _fsync_one keeps each job's error on the job

    def _commit(self, batch: list[CommitJob]) -> None:
        """Files fsynced, then renamed; the directory fsync and the answers are the next
        stage's (:meth:`_finish`, on its own thread), so that this thread takes the next batch
        and fsyncs its files while the directory of this one is being fsynced: the two waits
        overlap (and share the disk's flush) instead of adding up."""
        self._fsync_all(batch)
        for job in batch:
            if job.error is not None:
                continue
            try:
                rename_noreplace(job.tmp_path, job.final_path)
                job.renamed = True
            except OSError as exc:
                job.error = exc
        if self._dirsync is None:
            self._dirsync = ThreadPoolExecutor(1, thread_name_prefix="spool-dirsync")
        self._dirsync.submit(self._finish, batch)

    def _finish(self, batch: list[CommitJob]) -> None:
        """The directory fsync of one batch, then its answers; batches in the order committed
        (one thread), each after its own renames."""
        if any(job.renamed for job in batch):
            try:
                if self._dir_fd is None:
                    self._dir_fd = os.open(self._queue_dir, os.O_RDONLY | os.O_DIRECTORY)
                os.fsync(self._dir_fd)
                self.stats.dir_fsyncs += 1
            except OSError as exc:
                for job in batch:
                    if job.renamed:
                        with contextlib.suppress(OSError):
                            os.unlink(job.final_path)
                        job.renamed = False
                        job.error = exc
        self.stats.batches += 1
        self.stats.jobs += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        for job in batch:
            _settle(job)
