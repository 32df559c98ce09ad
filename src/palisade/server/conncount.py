"""Open connections per client IP, counted across the worker processes that share a port.

Owns: the counts behind ``[server] max_connections_per_ip``. Trusts its callers (the listener,
the parent process); the IP strings come from the kernel's accept(), not from the client.

Why a shared table, and how it is kept cheap and honest:

- With one worker, or with steering (``ratelimit`` rules: every connection from one address is
  accepted by one worker), a worker sees all of a client's connections, and a plain dict in the
  worker (:class:`LocalCounts`) is exact at no cost.
- Unsteered, every worker accepts from every socket of the group (which keeps latency low and a
  stalled worker from holding clients up), so one client's connections are spread over the
  workers. Steering every client just for this limit would give that up, so the workers count in
  one table in shared memory (:class:`SharedCounts`), made by the parent before it forks them: a
  ``memfd`` mapped shared, of ``buckets x 8`` entries. An entry is an exact key (the 16-byte
  address, IPv4 mapped into IPv6) and one count per worker slot; a client's key lives in bucket
  ``hash(key) % buckets`` (the hash is salted per start and the same in every worker, all forked
  from one interpreter). The total for a client is the sum of its entry's counts.
- Each worker writes only its own column, and a check-and-add is done under a POSIX record lock
  (``lockf``) on the memfd, so two workers admitting the same client at once cannot both see 19
  of 20. The kernel releases such a lock when its holder dies, so a killed worker cannot wedge the
  others; the parent zeroes a dead worker's column before it starts the next one in its slot, so
  the connections that died with it are not counted forever.
- Cost on the hot path: two ``fcntl`` calls (uncontended) and one search of a bucket's 8 entries,
  at connect and again at disconnect: about 6 microseconds for both, against the milliseconds of
  CPU a session costs.
- An entry whose counts are all zero is free. With ``buckets`` the next power of two at or above
  the connections all workers may hold together (at most 16,384), a bucket's 8 entries overflow
  only when more than 8 addresses with open connections share it; a client that finds its bucket
  full is counted by its worker alone (per worker, as without this table), with a panic line.
"""

from __future__ import annotations

import array
import fcntl
import mmap
import os
import socket
from collections.abc import Callable

ENTRIES_PER_BUCKET = 8
MAX_BUCKETS = 1 << 14  # 128 Ki entries: 3 MB of shared memory with two workers
_KEY_WORDS = 4  # 16 bytes as four 32-bit words
_V4_PREFIX = b"\x00" * 10 + b"\xff\xff"


def ip_key(ip: str) -> bytes:
    """The 16-byte form of an address; an IPv6 zone (``%eth0``) is dropped."""
    if ":" in ip:
        return socket.inet_pton(socket.AF_INET6, ip.split("%", 1)[0])
    return _V4_PREFIX + socket.inet_aton(ip)


class LocalCounts:
    """Counts in this process only: exact when every connection of a client comes here."""

    def __init__(self) -> None:
        self.per_ip: dict[str, int] = {}

    def admit(self, ip: str, limit: int) -> tuple[bool, int]:
        """Adds a connection of ``ip`` unless ``limit`` are open; returns (added, open before)."""
        open_now = self.per_ip.get(ip, 0)
        if open_now >= limit:
            return False, open_now
        self.per_ip[ip] = open_now + 1
        return True, open_now

    def release(self, ip: str) -> None:
        left = self.per_ip.get(ip, 0) - 1
        if left > 0:
            self.per_ip[ip] = left
        else:
            self.per_ip.pop(ip, None)


class SharedCounts:
    """The table shared by the workers; see the module docstring. Create it before forking;
    each worker calls :meth:`for_slot` to get its own view."""

    def __init__(self, workers: int, max_connections: int) -> None:
        self.workers = workers
        wanted = max(64, workers * max_connections)
        self.buckets = min(MAX_BUCKETS, 1 << (wanted - 1).bit_length())
        self.stride = _KEY_WORDS + workers  # words per entry
        entries = self.buckets * ENTRIES_PER_BUCKET
        self.fd = os.memfd_create("palisade-per-ip", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, entries * self.stride * 4)
        self._map = mmap.mmap(self.fd, entries * self.stride * 4, mmap.MAP_SHARED)
        self.words = memoryview(self._map).cast("I")

    def _lock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def _unlock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def _find(self, key: bytes, *, claim: bool) -> int | None:
        """The word offset of ``key``'s entry; with ``claim`` a free entry is taken for it.
        Call with the lock held. The bucket is read in one copy and searched with ``find``."""
        size = self.stride * 4  # bytes per entry
        start = (hash(key) & (self.buckets - 1)) * ENTRIES_PER_BUCKET * size
        bucket = self._map[start : start + ENTRIES_PER_BUCKET * size]
        at = bucket.find(key)
        while at > 0 and at % size:  # a match across two fields is not a key
            at = bucket.find(key, at + 1)
        if at >= 0:
            return (start + at) // 4
        if not claim:
            return None
        no_counts = bytes(4 * self.workers)
        for at in range(0, len(bucket), size):
            if bucket[at + 4 * _KEY_WORDS : at + size] == no_counts:
                self._map[start + at : start + at + len(key)] = key
                return (start + at) // 4
        return None

    def clear_slot(self, slot: int) -> None:
        """Forgets every connection counted by worker ``slot`` (it died with them)."""
        column = self.words[_KEY_WORDS + slot :: self.stride]
        self._lock()
        try:
            column[:] = array.array("I", bytes(4 * len(column)))
        finally:
            self._unlock()

    def for_slot(self, slot: int, panic: Callable[[str], None]) -> SlotCounts:
        return SlotCounts(self, slot, panic)


class SlotCounts:
    """One worker's view of the shared table: admits and releases in its own column."""

    def __init__(self, table: SharedCounts, slot: int, panic: Callable[[str], None]) -> None:
        self.table = table
        self.column = _KEY_WORDS + slot
        self.panic = panic
        self.overflow = LocalCounts()  # clients whose bucket was full when they came

    def admit(self, ip: str, limit: int) -> tuple[bool, int]:
        """Adds a connection of ``ip`` unless ``limit`` are open in all workers together;
        returns (added, open before)."""
        if ip in self.overflow.per_ip:
            return self.overflow.admit(ip, limit)
        key = ip_key(ip)
        table = self.table
        table._lock()
        try:
            base = table._find(key, claim=True)
            if base is not None:
                counts = table.words[base + _KEY_WORDS : base + _KEY_WORDS + table.workers]
                open_now = sum(counts)
                if open_now >= limit:
                    return False, open_now
                table.words[base + self.column] += 1
                return True, open_now
        finally:
            table._unlock()
        self.panic(
            f"connection count table: bucket full, [{ip}] is counted by this worker only "
            "(max_connections_per_ip applies per worker to it)"
        )
        return self.overflow.admit(ip, limit)

    def release(self, ip: str) -> None:
        if ip in self.overflow.per_ip:
            self.overflow.release(ip)
            return
        key = ip_key(ip)
        table = self.table
        table._lock()
        try:
            base = table._find(key, claim=False)
            if base is not None and table.words[base + self.column] > 0:
                table.words[base + self.column] -= 1
        finally:
            table._unlock()
