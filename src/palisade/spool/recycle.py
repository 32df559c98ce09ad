"""Recycled message files: the file of a delivered message is reused for a later one.

Why: every message used to cost the file system one inode allocation (the spool file's create)
and one release (its unlink after delivery). On ext4 without a journal -- this project's
benchmark machine, and many cloud images -- the allocator will not hand out an inode released in
the last 5 minutes (300 s while its inode table block is still dirty; ``recently_deleted`` in
fs/ext4/ialloc.c) and steps past every such inode on each create, so at hundreds of messages a
second the create itself became the most expensive step of receiving a message (perf: 80 % of
its time in ``recently_deleted`` and the buffer lookups it does). A delivered file renamed into
``free/``, and renamed from there into ``tmp/`` for the next message, needs neither an
allocation nor a release, and its data blocks are overwritten in place instead of freed and
allocated again. Measured in bench/ (BENCHMARKS.md, 2026-11-24): +10 % accepted msg/s.

Owns: the ``free/`` directory of the spool. Only the delivering process puts files in
(:meth:`FilePool.recycle`, for a message it finished with); any SMTP worker takes one out
(:meth:`FilePool.claim`) by renaming it to its new ``tmp/<id>`` name: rename is atomic, so when
two workers race for one file one of them gets ENOENT and tries the next name.
Rules: a claimed file still holds its previous bytes, so the writer overwrites it from offset 0
and truncates it to the new length before the fsync of its commit (``SpoolWriter``): a committed
queue file is exactly the new message, which its END record and checksum prove. At most
``limit`` files wait in ``free/``; beyond that a finished file is unlinked as before, and only
files up to ``max_bytes`` are kept (a large one would keep its blocks allocated for nothing).
Privacy: a file in ``free/`` keeps a delivered message's bytes until it is reused (mode 0600,
same owner as ``queue/``; at most ``limit`` files); nothing ever reads them. A file with a wider
mode (created by a version that left modes to the umask) is narrowed to 0600 when it enters the
pool and, at start-up, when ``trim`` finds it there. ``palisade queue
delete`` unlinks instead of recycling.
Must not touch: ``queue/``, ``tmp/`` beyond the one rename asked for.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
import zlib

from palisade.obs.queueid import is_queue_id

DEFAULT_LIMIT = 256
DEFAULT_MAX_BYTES = 256 * 1024
_RESCAN_EVERY = 64  # recycles between two counts of free/ (workers take files out meanwhile)
_EMPTY_RESCAN_S = 0.05  # an empty free/ is listed again at most this often per process


class FilePool:
    """The ``free/`` directory of one spool, as seen from one process."""

    def __init__(
        self, free_dir: str, *, limit: int = DEFAULT_LIMIT, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        self.free_dir = free_dir
        self.limit = limit
        self.max_bytes = max_bytes
        self._names: list[str] = []  # claim side: names seen at the last listing, shuffled
        self._listed_at = -_EMPTY_RESCAN_S
        self._count: int | None = None  # recycle side: files in free/ (re-counted now and then)
        self._since_count = 0
        self._share: tuple[int, int] | None = None  # claim side: (slot, of), see share()

    def share(self, slot: int, of: int) -> None:
        """This process claims only the names whose CRC-32 is ``slot`` modulo ``of`` (the SMTP
        workers, one slot each). Otherwise every worker's listing holds every free name, each
        file is tried by the others after one of them took it, and every claim costs one
        failed rename (measured: one per message with two workers), which takes the file
        system's rename lock and both directories' locks on the event loop. A worker whose
        share runs out creates its files as without a pool; what waits in the others' share
        is bounded by ``limit`` as before."""
        self._share = (slot, of) if of > 1 else None
        self._names = []

    def claim(self, dest: str) -> bool:
        """Rename a free file to ``dest``; False when none is free (then the caller creates)."""
        while True:
            if not self._names:
                now = time.monotonic()
                if now - self._listed_at < _EMPTY_RESCAN_S:
                    return False
                self._listed_at = now
                self._names = self._list()
                if self._share is not None:
                    slot, of = self._share
                    self._names = [n for n in self._names if zlib.crc32(n.encode()) % of == slot]
                if not self._names:
                    return False
                random.shuffle(self._names)  # two workers listing together rarely collide
            name = self._names.pop()
            try:
                os.rename(f"{self.free_dir}/{name}", dest)
            except OSError:
                continue  # another worker took it (ENOENT), or it cannot be had: the next one
            return True

    def recycle(self, path: str, name: str) -> bool:
        """Move a finished message file into the pool; False if it should be unlinked instead
        (pool full, or the file larger than ``max_bytes``). ``name`` must be a queue id."""
        info = os.stat(path)
        if not is_queue_id(name) or info.st_size > self.max_bytes:
            return False
        if info.st_mode & 0o077:  # a file from before modes were explicit: private before reuse
            os.chmod(path, 0o600)
        if self._count is None or self._since_count >= _RESCAN_EVERY:
            self._count = len(self._list())
            self._since_count = 0
        if self._count >= self.limit:
            return False
        os.rename(path, f"{self.free_dir}/{name}")
        self._count += 1
        self._since_count += 1
        return True

    def trim(self) -> int:
        """At start-up: unlinks files beyond ``limit`` and anything that is not a queue id.
        Returns how many were removed."""
        removed = 0
        kept = 0
        for entry in os.scandir(self.free_dir):
            if (
                is_queue_id(entry.name)
                and entry.is_file(follow_symlinks=False)
                and kept < self.limit
            ):
                kept += 1
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_mode & 0o077:
                        os.chmod(entry.path, 0o600)  # written before modes were explicit
                continue
            with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
                os.unlink(entry.path)
                removed += 1
        self._count = kept
        self._since_count = 0
        return removed

    def _list(self) -> list[str]:
        try:
            return [entry.name for entry in os.scandir(self.free_dir) if is_queue_id(entry.name)]
        except FileNotFoundError:
            return []
