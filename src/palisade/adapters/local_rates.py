"""Rate counters kept in this process, exact, written behind to the shared state store.

Owns: the sliding windows of the clients this process serves. It is exact only when every event
of a key reaches this process: with one worker, or with several whose listening sockets steer
each client IP to one worker (``server.steering``). The composition root uses it only then;
otherwise the store's shared, synchronous counting stays in charge.

Why: the store's exact count costs one SQLite write transaction per connection under a write lock
shared by every worker; the perimeter bench measured that as 63 % of a worker's time on the
refusal path. Here a hit costs a deque append; hits reach the store in batches every
``flush_interval`` seconds, so a restarted process (which seeds a key from the store the first
time it sees it) forgets at most that much.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Sequence

from palisade.ports import (
    Block,
    BlockPolicy,
    Incident,
    IncidentEvent,
    IncidentOutcome,
    StateStore,
    StateTempError,
)

MAX_PENDING = 100_000  # hits kept while the store is unreachable; older ones are dropped


class WriteBehindRates:
    """A StateStore whose ``rate_hit`` is local; everything else goes to ``store``."""

    def __init__(self, store: StateStore, *, flush_interval: float = 0.5) -> None:
        self.store = store
        self.flush_interval = flush_interval
        self._windows: dict[str, tuple[float, collections.deque[float]]] = {}
        self._seeding: dict[str, asyncio.Future[list[float]]] = {}
        self._pending: list[tuple[str, float, float]] = []
        self._flush: asyncio.TimerHandle | None = None
        self._writing: asyncio.Task[None] | None = None

    async def get_incident(self, ip: str) -> Incident | None:
        return await self.store.get_incident(ip)

    async def add_incident(self, ip: str, count: int = 1, now: float | None = None) -> Incident:
        return await self.store.add_incident(ip, count, now)

    async def remove_incident(self, ip: str) -> bool:
        return await self.store.remove_incident(ip)

    async def list_incidents(self) -> list[Incident]:
        return await self.store.list_incidents()

    async def record_incident(
        self,
        ip: str,
        weight: int,
        rule: str,
        now: float,
        policy: BlockPolicy,
        may_block: bool = True,
    ) -> IncidentOutcome:
        return await self.store.record_incident(ip, weight, rule, now, policy, may_block)

    async def record_incidents(
        self, incidents: Sequence[tuple[str, int, str, float, BlockPolicy, bool]]
    ) -> list[IncidentOutcome]:
        """The store's batch (``SqliteStateStore.record_incidents``), else one by one."""
        batch = getattr(self.store, "record_incidents", None)
        if batch is not None:
            outcomes: list[IncidentOutcome] = await batch(incidents)
            return outcomes
        return [await self.store.record_incident(*incident) for incident in incidents]

    async def active_blocks(self, now: float) -> list[Block]:
        return await self.store.active_blocks(now)

    async def incident_events(self, ip: str, since: float) -> list[IncidentEvent]:
        return await self.store.incident_events(ip, since)

    async def unblock(self, ip: str) -> bool:
        return await self.store.unblock(ip)

    async def pass_until(self, key: str, now: float) -> float | None:
        return await self.store.pass_until(key, now)

    async def remember_pass(self, key: str, until: float, now: float) -> None:
        await self.store.remember_pass(key, until, now)

    async def rate_hit(self, key: str, window: float, now: float) -> int:
        if not window > 0:
            raise ValueError(f"rate window must be positive, got {window!r}")
        entry = self._windows.get(key)
        if entry is None:
            entry = (window, collections.deque(await self._seed(key, now - window)))
            entry = self._windows.setdefault(key, entry)
        events = entry[1]
        horizon = now - window
        while events and events[0] <= horizon:
            events.popleft()
        events.append(now)
        self._pending.append((key, window, now))
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(
                self.flush_interval, self._start_write
            )
        return len(events)

    async def _seed(self, key: str, horizon: float) -> list[float]:
        """What the store knows of ``key`` (this process's first sight of it); concurrent first
        hits share one read."""
        pending = self._seeding.get(key)
        if pending is None:
            loader = getattr(self.store, "rate_events_sync", None)
            if loader is None:
                return []
            pending = asyncio.ensure_future(asyncio.to_thread(loader, key, horizon))
            self._seeding[key] = pending
            pending.add_done_callback(lambda _f: self._seeding.pop(key, None))
        return list(await asyncio.shield(pending))

    def _start_write(self) -> None:
        self._flush = None
        if self._writing is not None and not self._writing.done():
            self._flush = asyncio.get_running_loop().call_later(
                self.flush_interval, self._start_write
            )
            return
        batch, self._pending = self._pending, []
        self._writing = asyncio.get_running_loop().create_task(self._write(batch))

    async def _write(self, batch: list[tuple[str, float, float]]) -> None:
        writer = getattr(self.store, "rate_batch_sync", None)
        try:
            if writer is not None:
                await asyncio.to_thread(writer, batch)
        except StateTempError:
            self._pending[:0] = batch[-MAX_PENDING:]  # try again with the next batch
        self._forget_idle(max((at for _k, _w, at in batch), default=0.0))

    def _forget_idle(self, now: float) -> None:
        """Drops keys whose newest event has left its window (bounded memory)."""
        for key in [k for k, (w, ev) in self._windows.items() if not ev or ev[-1] <= now - w]:
            del self._windows[key]

    def close(self) -> None:
        """Writes what is pending (synchronously) and closes the store."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        writer = getattr(self.store, "rate_batch_sync", None)
        if writer is not None and self._pending:
            with contextlib.suppress(StateTempError):
                writer(self._pending)
            self._pending = []
        close = getattr(self.store, "close", None)
        if close is not None:
            close()
