"""The shared state store with a local fall-back: mail keeps flowing while Redis is away.

Owns: choosing, per call, between the shared store (Redis, ``primary``) and this host's own
store (``local``: the ``[paths] state`` SQLite file, shared by the host's workers, so its counts
are exact per host); remembering what the shared store last said (the blocks and incident
records it returned, and every active block, refreshed each ``BLOCKS_REFRESH`` seconds); the
events written locally while the shared store was away (replayed to it when it is back); and the
two panic-log lines of an outage: one when it begins, one when it ends, once per host (the
``marker`` file beside the local store says that another worker of the host has written it).

Why a fall-back and not ``on_error``: every perimeter rule that counts (rate limits, the history
check, the pregreet pass) would otherwise meet ``StateTempError`` on every connection while Redis
is down, and its ``on_error`` (451 by default) would defer *everybody's* mail, for an outage of a
component that only makes the limits shared. Counting locally instead keeps each limit exact per
host: a client spreading over N hosts gets at most N times its limit during the outage, never an
unlimited pass, and nobody is deferred for our failure. Blocks known before the outage still
hold (the remembered ones); blocks a host decides meanwhile are its own, and the replay gives
Redis the incidents, so the cluster-wide threshold applies to them when it returns.

How: the first failure of the shared store (``StateTempError``: refused, reset, timed out,
authentication refused) switches this process to the fall-back and logs it once; calls then never
wait for Redis: a background task asks it (``ping``) every ``retry_interval`` seconds, and
when it answers, the events recorded meanwhile (rate hits, incidents, passes; at most
``MAX_PENDING`` of each, oldest dropped) are written to Redis in pipelined batches, then the
shared store is used again and its return is logged with what was replayed. A hung Redis costs
only the calls already waiting when it hung: each is bounded by the client's timeout.

Must not touch: which store is which (the composition root builds both), logging beyond the
``panic`` callable it is given. ``ValueError`` (a bad argument) is never a failure of the store
and always propagates.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from palisade.adapters.state_keys import incident_key
from palisade.ports import (
    Block,
    BlockPolicy,
    Incident,
    IncidentEvent,
    IncidentOutcome,
    StateStore,
    StateTempError,
)

__all__ = ["FallbackStateStore"]

_T = TypeVar("_T")

MAX_PENDING = 100_000  # events of each kind kept for the replay; older ones are dropped
REPLAY_BATCH = 500  # events per pipelined write of the replay
CACHE_SIZE = 100_000  # incident records remembered from the shared store
BLOCKS_REFRESH = 60.0  # seconds between two readings of every active block
STALE_PROBES = 5  # an outage marker untouched for this many probe intervals is a dead one's

_Incident = tuple[str, int, str, float, BlockPolicy, bool]


class FallbackStateStore:
    """``StateStore``: ``primary`` while it answers, ``local`` and the remembered history while
    it does not (see the module docstring)."""

    def __init__(
        self,
        primary: Any,
        local: StateStore,
        *,
        panic: Callable[[str], None] | None = None,
        retry_interval: float = 2.0,
        where: str = "shared state store",
        local_name: str = "local state",
        marker: Path | None = None,
    ) -> None:
        self.primary = primary
        self.local = local
        self.panic = panic if panic is not None else (lambda _line: None)
        self.retry_interval = retry_interval
        self.where = where
        self.local_name = local_name
        self.marker = marker
        self.down_since: float | None = None  # wall clock, for the "back after" line
        self._probing: asyncio.Task[None] | None = None
        self._incidents: collections.OrderedDict[str, Incident] = collections.OrderedDict()
        self._blocks: dict[str, Block] = {}
        self._blocks_read = -BLOCKS_REFRESH  # monotonic
        self._refreshing: asyncio.Task[None] | None = None
        self.pending_rates: collections.deque[tuple[str, float, float]] = collections.deque(
            maxlen=MAX_PENDING
        )
        self.pending_incidents: collections.deque[_Incident] = collections.deque(maxlen=MAX_PENDING)
        self.pending_passes: dict[str, tuple[float, float]] = {}
        self.dropped = 0

    # ------------------------------------------------------------------------------ switching

    @property
    def degraded(self) -> bool:
        """True while the shared store is being done without."""
        return self.down_since is not None

    def _use_primary(self) -> bool:
        return self.down_since is None

    def _went_down(self, exc: StateTempError) -> None:
        if self.down_since is not None:
            return
        self.down_since = time.time()
        if self._claim():
            self.panic(
                f"state store: {exc.reason}; using {self.local_name} and the last known blocks "
                "until it is back (rate limits count per host meanwhile; nothing is deferred "
                "for it)"
            )
        if self._probing is None or self._probing.done():
            self._probing = asyncio.get_running_loop().create_task(self._probe())

    def _claim(self) -> bool:
        """True when this process is the one of the host to report the outage: it made the
        ``marker`` file, or found one nobody had touched for ``STALE_PROBES`` probes (left by
        a process that died while Redis was away). Without a marker, every process reports."""
        if self.marker is None:
            return True
        try:
            os.close(os.open(self.marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            return True
        except FileExistsError:
            try:
                age = time.time() - self.marker.stat().st_mtime
            except OSError:
                return False
            if age > STALE_PROBES * self.retry_interval + 1:
                with contextlib.suppress(OSError):
                    os.utime(self.marker)
                return True
            return False
        except OSError:
            return True  # the directory is unusable: better a line too many than none

    def _still_down(self) -> None:
        """A failed probe: the marker stays fresh while some process still waits for Redis."""
        if self.marker is not None:
            with contextlib.suppress(OSError):
                os.utime(self.marker)

    def _release(self) -> bool:
        """True when this process is the one to report the return (it removed the marker)."""
        if self.marker is None:
            return True
        try:
            self.marker.unlink()
            return True
        except FileNotFoundError:
            return False
        except OSError:
            return True

    async def _probe(self) -> None:
        """Every ``retry_interval`` while the shared store is away: a PING, then the replay;
        when both succeed, the shared store is used again (and that is logged)."""
        while self.down_since is not None:
            await asyncio.sleep(self.retry_interval)
            try:
                await self.primary.ping()
                await self._replay()
            except StateTempError:
                self._still_down()
                continue
            away = time.time() - self.down_since
            self.down_since = None
            replayed, self._replayed = self._replayed, (0, 0, 0)
            dropped = f", {self.dropped} dropped (too many)" if self.dropped else ""
            self.dropped = 0
            if self._release():
                self.panic(
                    f"state store: {self.where} is back after {away:.1f}s: shared again; "
                    f"replayed {replayed[0]} rate event(s), {replayed[1]} incident(s), "
                    f"{replayed[2]} pass(es) recorded meanwhile{dropped} (each worker replays "
                    "its own)"
                )

    _replayed: tuple[int, int, int] = (0, 0, 0)

    async def _replay(self) -> None:
        """Writes what was recorded locally during the outage to the shared store, in batches;
        raises ``StateTempError`` (the rest stays pending) when it fails again."""
        rates, incidents, passes = self._replayed
        while self.pending_incidents:
            batch = [
                self.pending_incidents[i]
                for i in range(min(REPLAY_BATCH, len(self.pending_incidents)))
            ]
            await self.primary.record_incidents(batch)
            for _ in batch:
                self.pending_incidents.popleft()
            incidents += len(batch)
            self._replayed = (rates, incidents, passes)
        while self.pending_rates:
            batch_r = [
                self.pending_rates[i] for i in range(min(REPLAY_BATCH, len(self.pending_rates)))
            ]
            await self.primary.rate_batch(batch_r)
            for _ in batch_r:
                self.pending_rates.popleft()
            rates += len(batch_r)
            self._replayed = (rates, incidents, passes)
        for key, (until, now) in list(self.pending_passes.items()):
            await self.primary.remember_pass(key, until, now)
            del self.pending_passes[key]
            passes += 1
            self._replayed = (rates, incidents, passes)

    async def _shared(self, call: Callable[[], Awaitable[_T]]) -> tuple[bool, _T | None]:
        """(True, the answer) from the shared store, or (False, None) when it is away."""
        if not self._use_primary():
            return False, None
        try:
            answer = await call()
        except StateTempError as exc:
            self._went_down(exc)
            return False, None
        self._maybe_refresh_blocks()
        return True, answer

    def _remember(self, key: str, incident: Incident | None) -> None:
        if incident is None:
            self._incidents.pop(key, None)
            return
        self._incidents[key] = incident
        self._incidents.move_to_end(key)
        while len(self._incidents) > CACHE_SIZE:
            self._incidents.popitem(last=False)

    def _maybe_refresh_blocks(self) -> None:
        if time.monotonic() - self._blocks_read < BLOCKS_REFRESH:
            return
        if self._refreshing is not None and not self._refreshing.done():
            return
        self._blocks_read = time.monotonic()
        self._refreshing = asyncio.get_running_loop().create_task(self._refresh_blocks())

    async def _refresh_blocks(self) -> None:
        try:
            blocks = await self.primary.active_blocks(time.time())
        except StateTempError:
            return  # the next call meets the failure and reports it
        self._blocks = {block.key: block for block in blocks}

    def _known_block(self, key: str, now: float) -> Block | None:
        candidates = [self._blocks.get(key)]
        cached = self._incidents.get(key)
        if cached is not None:
            candidates.append(cached.block)
        active = [b for b in candidates if b is not None and b.until > now]
        return max(active, key=lambda b: b.until) if active else None

    def _pend(self, queue: collections.deque[Any], item: Any) -> None:
        if len(queue) == queue.maxlen:
            self.dropped += 1  # the oldest goes
        queue.append(item)

    # ------------------------------------------------------------------------------ the port

    async def rate_hit(self, key: str, window: float, now: float) -> int:
        if not window > 0:
            raise ValueError(f"rate window must be positive, got {window!r}")
        ok, count = await self._shared(lambda: self.primary.rate_hit(key, window, now))
        if ok and count is not None:
            return int(count)
        self._pend(self.pending_rates, (key, window, now))
        return await self.local.rate_hit(key, window, now)

    async def get_incident(self, ip: str) -> Incident | None:
        key = incident_key(ip)
        ok, found = await self._shared(lambda: self.primary.get_incident(ip))
        if ok:
            self._remember(key, found)
            return found
        mine = await self.local.get_incident(ip)
        now = time.time()
        known = self._incidents.get(key)
        block = self._known_block(key, now)
        if mine is not None and mine.block is not None:
            block = mine.block
        if known is None and mine is None:
            return None if block is None else Incident(key, 0, block.since, block.since, block)
        parts = [i for i in (known, mine) if i is not None and i.count > 0]
        if not parts:
            return None if block is None else Incident(key, 0, block.since, block.since, block)
        return Incident(
            key,
            sum(i.count for i in parts),
            min(i.first_seen for i in parts),
            max(i.last_seen for i in parts),
            block,
        )

    async def record_incident(
        self,
        ip: str,
        weight: int,
        rule: str,
        now: float,
        policy: BlockPolicy,
        may_block: bool = True,
    ) -> IncidentOutcome:
        return (await self.record_incidents([(ip, weight, rule, now, policy, may_block)]))[0]

    async def record_incidents(self, incidents: Sequence[_Incident]) -> list[IncidentOutcome]:
        """The shared store's batch; while it is away, the local store's (and the incidents
        are kept for the replay)."""
        items = list(incidents)
        ok, outcomes = await self._shared(lambda: self.primary.record_incidents(items))
        if ok and outcomes is not None:
            for (_ip, _w, _r, at, _p, _m), outcome in zip(items, outcomes, strict=True):
                if outcome.block is not None:
                    old = self._incidents.get(outcome.key)
                    first = old.first_seen if old is not None else at
                    self._remember(
                        outcome.key, Incident(outcome.key, outcome.count, first, at, outcome.block)
                    )
            return list(outcomes)
        batch = getattr(self.local, "record_incidents", None)
        if batch is not None:
            local: list[IncidentOutcome] = await batch(items)
        else:
            local = [await self.local.record_incident(*item) for item in items]
        for item in items:
            self._pend(self.pending_incidents, item)
        # a block remembered from the shared store still holds
        merged = []
        for (_ip, _w, _r, at, _p, _m), outcome in zip(items, local, strict=True):
            known = self._known_block(outcome.key, at)
            if outcome.block is None and known is not None:
                outcome = IncidentOutcome(outcome.key, outcome.count, known, False)
            merged.append(outcome)
        return merged

    async def pass_until(self, key: str, now: float) -> float | None:
        ok, until = await self._shared(lambda: self.primary.pass_until(key, now))
        if ok:
            return until
        return await self.local.pass_until(key, now)

    async def remember_pass(self, key: str, until: float, now: float) -> None:
        ok, _ = await self._shared(lambda: self.primary.remember_pass(key, until, now))
        if ok:
            return
        if len(self.pending_passes) < MAX_PENDING:
            self.pending_passes[key] = (until, now)
        await self.local.remember_pass(key, until, now)

    async def active_blocks(self, now: float) -> list[Block]:
        ok, blocks = await self._shared(lambda: self.primary.active_blocks(now))
        if ok and blocks is not None:
            return list(blocks)
        mine = {b.key: b for b in await self.local.active_blocks(now)}
        for key in list(self._blocks) + list(self._incidents):
            known = self._known_block(key, now)
            if known is not None and key not in mine:
                mine[key] = known
        return sorted(mine.values(), key=lambda b: (-b.since, b.key))

    async def incident_events(self, ip: str, since: float) -> list[IncidentEvent]:
        ok, events = await self._shared(lambda: self.primary.incident_events(ip, since))
        if ok and events is not None:
            return list(events)
        return await self.local.incident_events(ip, since)

    # The operator's methods (``palisade history`` talks to Redis itself, not through this):
    # on the shared store, or failing that on the local one.

    async def add_incident(self, ip: str, count: int = 1, now: float | None = None) -> Incident:
        ok, found = await self._shared(lambda: self.primary.add_incident(ip, count, now))
        if ok and found is not None:
            return found  # type: ignore[no-any-return]
        return await self.local.add_incident(ip, count, now)

    async def remove_incident(self, ip: str) -> bool:
        self._incidents.pop(incident_key(ip), None)
        self._blocks.pop(incident_key(ip), None)
        _ok, known = await self._shared(lambda: self.primary.remove_incident(ip))
        mine = await self.local.remove_incident(ip)
        return bool(known) or mine

    async def unblock(self, ip: str) -> bool:
        self._incidents.pop(incident_key(ip), None)
        self._blocks.pop(incident_key(ip), None)
        _ok, was = await self._shared(lambda: self.primary.unblock(ip))
        mine = await self.local.unblock(ip)
        return bool(was) or mine

    async def list_incidents(self) -> list[Incident]:
        ok, found = await self._shared(lambda: self.primary.list_incidents())
        if ok and found is not None:
            return list(found)
        return await self.local.list_incidents()

    async def ping(self) -> None:
        await self.primary.ping()

    def close(self) -> None:
        for task in (self._probing, self._refreshing):
            if task is not None and not task.done():
                task.cancel()
        for store in (self.primary, self.local):
            close = getattr(store, "close", None)
            if close is not None:
                close()
