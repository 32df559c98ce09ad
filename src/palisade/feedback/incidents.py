"""Recording incidents: the block policy and protection applied, the outcome told.

Owns: the one way an incident reaches the store (:func:`record`: the key's protection decides
``may_block``), the text that describes a block (:func:`describe_block`, for the log and
``palisade history``), and the gateway's background recorder (:class:`IncidentRecorder`): the
session hands it the incidents of a conversation after their reply is written, and it records
them one after the other in a task of its own, so a refusal is never delayed by the store and a
store that fails never turns a refusal into a temporary error. What queued up while the
previous write ran (and in the ``linger`` before a write: 50 ms) is written in one transaction
(at most ``BATCH``) when the store can batch.
A failure is one panic-log line (at most one per ``failure_every`` seconds, with the number
lost meanwhile); a new block is one main-log line. ``palisade scan`` and ``palisade history
add`` call :func:`record` and see the errors themselves.

What counts, and how much, is decided by the caller (the conversation's weights from
``[incidents]`` and the rules' ``incident = N``; a scan pattern's weight); when a count blocks
and for how long is the store's (``StateStore.record_incident`` with the ``BlockPolicy``).

Must not touch: replies, the SMTP conversation, the config (built by ``palisade.config.feedback``).
Trust: the address comes from the socket or a log line (``ValueError`` when malformed); rule
names come from the config or the code, and are escaped for the log anyway.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from palisade.clock import SYSTEM_CLOCK
from palisade.feedback.protect import Protection
from palisade.obs.log import EventLog, escape, escape_field
from palisade.ports import Block, BlockPolicy, Clock, IncidentOutcome, StateStore, StateTempError

__all__ = ["IncidentRecorder", "describe_block", "record", "span", "stamp"]

MAX_PENDING = 10_000  # incidents waiting for the store; more are dropped (and counted)
BATCH = 200  # incidents written in one transaction at most
LINGER = 0.05  # seconds the first incident of a write waits for others to join it


class _Batch(Protocol):
    """A store's batch write (``SqliteStateStore.record_incidents``), when it has one."""

    async def __call__(
        self, incidents: Sequence[tuple[str, int, str, float, BlockPolicy, bool]], /
    ) -> list[IncidentOutcome]: ...


def stamp(at: float) -> str:
    """exim's local time stamp, ``2026-12-02 07:45:00``."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def span(seconds: float) -> str:
    """A duration as an operator writes it: ``7d``, ``36h``, ``90m``, ``45s``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    if seconds >= 86400:
        return f"{seconds / 86400:.1f}d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds:g}s"


def describe_block(block: Block) -> str:
    """``until 2026-12-03 07:45:00 (block 2, 2d): dnsbl x6, no-ptr x4``"""
    times = "first block" if block.times == 1 else f"block {block.times}"
    return (
        f"until {stamp(block.until)} ({times}, {span(block.until - block.since)}): "
        f"{escape(block.reason, 300)}"
    )


async def record(
    store: StateStore,
    ip: str,
    weight: int,
    rule: str,
    policy: BlockPolicy,
    protection: Protection,
    now: float,
) -> IncidentOutcome:
    """Records ``weight`` incidents of ``rule`` for ``ip`` at ``now``; a protected key is
    recorded but never blocked. Raises ``StateTempError`` (store) and ``ValueError`` (address)."""
    may_block = not protection.covers(ip)
    return await store.record_incident(ip, weight, rule, now, policy, may_block)


@dataclass(frozen=True, slots=True)
class _Pending:
    store: StateStore
    ip: str
    weight: int
    rule: str
    policy: BlockPolicy
    protection: Protection
    at: float
    done: Callable[[], None] | None


class IncidentRecorder:
    """The gateway's background writer of incidents (one per process; see the module text)."""

    def __init__(
        self,
        log: EventLog,
        *,
        clock: Clock = SYSTEM_CLOCK,
        max_pending: int = MAX_PENDING,
        failure_every: float = 60.0,
        linger: float = LINGER,
    ) -> None:
        self.log = log
        self.linger = linger
        self.clock = clock
        self.max_pending = max_pending
        self.failure_every = failure_every
        self._queue: collections.deque[_Pending] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._last_failure: float | None = None
        self._lost = 0  # incidents not recorded since the last failure line
        self.recorded = 0
        self.failed = 0

    @property
    def pending(self) -> int:
        return len(self._queue)

    def submit(
        self,
        store: StateStore,
        ip: str,
        weight: int,
        rule: str,
        policy: BlockPolicy,
        protection: Protection,
        now: float | None = None,
        *,
        done: Callable[[], None] | None = None,
    ) -> None:
        """Queues one incident; returns at once, never raises (needs a running event loop).
        ``done`` is called once the incident was written or given up (the caller may hold the
        store open until then)."""
        if weight <= 0 or len(self._queue) >= self.max_pending:
            if weight > 0:
                self._failure(ip, rule, f"{self.max_pending} incidents already wait for the store")
            if done is not None:
                done()
            return
        at = self.clock.now() if now is None else now
        self._queue.append(_Pending(store, ip, weight, rule, policy, protection, at, done))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._work())

    async def drain(self, timeout: float) -> bool:
        """Waits up to ``timeout`` seconds for the queued incidents (at shutdown); True when
        none is left."""
        task = self._task
        if task is not None and not task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), timeout)
        return not self._queue

    async def _work(self) -> None:
        queue = self._queue
        if self.linger > 0:
            await asyncio.sleep(self.linger)  # let a flood's incidents gather into one write
        while queue:
            # what queued up meanwhile for one store goes in one transaction when the store
            # can batch (SqliteStateStore.record_incidents), else one by one
            items = [queue.popleft()]
            while queue and len(items) < BATCH and queue[0].store is items[0].store:
                items.append(queue.popleft())
            try:
                await self._write(items)
            finally:
                for item in items:
                    if item.done is not None:
                        item.done()

    async def _write(self, items: list[_Pending]) -> None:
        store = items[0].store
        batch: _Batch | None = getattr(store, "record_incidents", None)
        if batch is not None and len(items) > 1:
            try:
                args = [
                    (i.ip, i.weight, i.rule, i.at, i.policy, not i.protection.covers(i.ip))
                    for i in items
                ]
                outcomes = await batch(args)
            except StateTempError as exc:
                for item in items:
                    self._failure(item.ip, item.rule, f"state store: {exc.reason}")
                return
            except ValueError:
                pass  # one bad item: each on its own below, so that the others are written
            else:
                for item, outcome in zip(items, outcomes, strict=True):
                    self._recorded(item, outcome)
                return
        for item in items:
            try:
                outcome = await record(
                    item.store,
                    item.ip,
                    item.weight,
                    item.rule,
                    item.policy,
                    item.protection,
                    item.at,
                )
            except StateTempError as exc:
                self._failure(item.ip, item.rule, f"state store: {exc.reason}")
                continue
            except ValueError as exc:  # an address the store refuses: a bug, said once
                self._failure(item.ip, item.rule, str(exc))
                continue
            self._recorded(item, outcome)

    def _recorded(self, item: _Pending, outcome: IncidentOutcome) -> None:
        self.recorded += 1
        if outcome.new_block and outcome.block is not None:
            window = span(item.policy.window)
            self.log.main(
                f"incident block: {escape_field(outcome.key)} blocked "
                f"{describe_block(outcome.block)} ({outcome.count} incidents in {window})",
                client_ip=item.ip,
                event="block",
            )

    def _failure(self, ip: str, rule: str, reason: str) -> None:
        self.failed += 1
        self._lost += 1
        now = time.monotonic()
        if self._last_failure is not None and now - self._last_failure < self.failure_every:
            return
        self._last_failure = now
        lost, self._lost = self._lost, 0
        more = f" ({lost - 1} more lost since the last such line)" if lost > 1 else ""
        self.log.panic(
            f"incident not recorded ({escape_field(rule, 60)} for {escape_field(ip, 60)}): "
            f"{escape(reason, 300)}; the refusal stands{more}"
        )
