"""The queue runner: delivers spooled messages, retries with backoff, expires, bounces.

Owns: the delivery loop. At start it recovers the spool; ``submit`` delivers a freshly committed
message at once; a background loop wakes for the earliest due retry (and rescans the spool every
``scan_interval`` seconds, which is how an operator's ``queue retry`` is noticed). After each
attempt it logs one line per recipient in exim's shape (``=>`` delivered, ``==`` deferred, ``**``
failed), saves the delivery state, queues a DSN for new permanent failures (never for the null
sender), and removes the message once every recipient is done (``Completed``).
Retry: exponential backoff per message, ``retry_initial * retry_factor ** (attempts - 1)`` capped
at ``retry_max_interval``; a temporary failure of a message older than ``max_age`` becomes
permanent ("retry timeout exceeded").
Duplicates: a recipient is recorded as done only after the attempt; a kill between the delivery
and the state save makes the next run deliver it again (see palisade.spool.queue). The same holds
for a DSN queued just before a kill: it may be queued twice, never lost.
Spool I/O: loading, reading and removing a message are done on the event loop, not in a worker
thread. They are a few microseconds on a just-written, page-cached local file, while a thread hop
cost the delivering process more CPU than the delivery itself (benchmark of 2026-11-23: 0.91 ->
0.57 ms of parent CPU per relayed message). Only what fsyncs (state files, bounces, scans of the
whole spool) still runs in a thread, as Postfix's qmgr does its file work synchronously too.
Must not touch: message bodies (it loads each message once into a handle, palisade.spool.message,
that the router's transports and the DSN read), sockets, the SMTP session.
Trust: results carry remote text; everything logged passes through ``escape``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from palisade.delivery.dsn import build_dsn, header_block
from palisade.delivery.outcome import RecipientResult
from palisade.delivery.router import Router
from palisade.obs.log import EventLog, escape, escape_field
from palisade.obs.queueid import QueueIdGenerator, is_queue_id
from palisade.spool import (
    CorruptMessage,
    DeliveryState,
    Envelope,
    Message,
    Spool,
    SpoolError,
    UnknownMessage,
)

EXPIRED = "retry timeout exceeded"


def _route_text(res: RecipientResult) -> str:
    parts = []
    if res.router:
        parts.append(f"R={res.router}")
    if res.transport:
        parts.append(f"T={res.transport}")
    return (" " + " ".join(parts)) if parts else ""


class QueueRunner:
    """Delivers what is in ``spool`` through ``router``; one instance per spool and process."""

    def __init__(
        self,
        spool: Spool,
        router: Router,
        log: EventLog,
        *,
        retry_initial: float = 300.0,
        retry_max_interval: float = 3600.0,
        retry_factor: float = 2.0,
        max_age: float = 5 * 86400.0,
        concurrency: int = 20,
        clock: Callable[[], float] = time.time,
        scan_interval: float = 10.0,
        ids: QueueIdGenerator | None = None,
    ) -> None:
        self.spool = spool
        self.router = router
        self.log = log
        self.retry_initial = retry_initial
        self.retry_max_interval = retry_max_interval
        self.retry_factor = retry_factor
        self.max_age = max_age
        self.scan_interval = scan_interval
        self.clock = clock
        self._ids = ids or QueueIdGenerator()
        self._sem = asyncio.Semaphore(concurrency)
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        # Deferred messages known to this process and when they are due: the loop wakes for them
        # without listing the spool. Full scans (every scan_interval) catch everything else: an
        # operator's ``queue retry``, or a notification that never arrived.
        self._due: dict[str, float] = {}
        self._next_scan = 0.0

    # -- life cycle --------------------------------------------------------------------------

    async def start(self, *, background: bool = True, recover: bool = True) -> list[str]:
        """Recover the spool and start the background loop; returns the recovered ids.

        Recovered messages are delivered when due (at once unless their state says otherwise).
        ``background=False`` only recovers: tests then drive delivery with :meth:`run_once`.
        ``recover=False`` when the caller already recovered the spool before any writer started
        (recovery empties tmp/, so it must never run while a listener may be writing there).
        """
        ids = await asyncio.to_thread(self.spool.recover, self.log) if recover else []
        if background:
            self._loop_task = asyncio.create_task(self._loop(), name="queue-runner")
        return ids

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop scheduling; let deliveries in flight finish for up to ``timeout`` seconds."""
        self._stopping = True
        self._wakeup.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        tasks = list(self._inflight.values())
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        self.router.close()

    def submit(self, queue_id: str) -> None:
        """Deliver ``queue_id`` now (the server calls this right after a successful commit)."""
        if not is_queue_id(queue_id) or self._stopping:
            return
        # Just committed, so it has no state file yet (only an attempt writes one, and an
        # attempt that leaves work to do puts the id in _due): the first attempt skips the
        # state file's open and unlink.
        self._spawn(queue_id, None, due_only=False, fresh=queue_id not in self._due)

    async def wait_idle(self) -> None:
        """Wait until no delivery is in flight (for tests and orderly shutdown)."""
        while self._inflight:
            await asyncio.wait(list(self._inflight.values()))

    async def run_once(self, now: float | None = None) -> int:
        """Attempt every due message not already in flight, wait for them; return how many."""
        tasks = await self._launch_due(now)
        if tasks:
            await asyncio.wait(tasks)
        return len(tasks)

    # -- scheduling --------------------------------------------------------------------------

    def _spawn(
        self, queue_id: str, now: float | None, *, due_only: bool = True, fresh: bool = False
    ) -> asyncio.Task[None] | None:
        if queue_id in self._inflight:
            return None
        coro = self._guarded(queue_id, now, due_only, fresh)
        task = asyncio.create_task(coro, name=f"deliver-{queue_id}")
        self._inflight[queue_id] = task
        task.add_done_callback(lambda _t: self._inflight.pop(queue_id, None))
        return task

    async def _launch_due(self, now: float | None) -> list[asyncio.Task[None]]:
        current = self.clock() if now is None else now
        entries = await asyncio.to_thread(self.spool.list, current)
        tasks = []
        for entry in entries:
            if entry.queue_id in self._inflight:
                continue
            state = entry.state
            if state.next_attempt <= current or (
                not state.pending() and state.unreported_failures()
            ):
                task = self._spawn(entry.queue_id, now)
                if task is not None:
                    tasks.append(task)
            else:
                self._due[entry.queue_id] = state.next_attempt
        return tasks

    async def _loop(self) -> None:
        while not self._stopping:
            current = self.clock()
            try:
                if current >= self._next_scan:
                    self._next_scan = current + self.scan_interval
                    await self._launch_due(None)
                else:
                    self._launch_known_due(current)
            except Exception as exc:  # keep running: a failed scan is retried next time
                self.log.panic(f"queue runner: spool scan failed: {escape(str(exc))}")
            delay = self._next_scan - self.clock()
            if self._due:
                delay = min(delay, min(self._due.values()) - self.clock() + 0.01)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=max(delay, 0.05))
            self._wakeup.clear()

    def _launch_known_due(self, current: float) -> None:
        """Starts the deferred messages whose time has come (no spool listing)."""
        for queue_id, due in list(self._due.items()):
            if due <= current and queue_id not in self._inflight:
                del self._due[queue_id]
                self._spawn(queue_id, None)

    def _backoff(self, attempts: int) -> float:
        interval = self.retry_initial * self.retry_factor ** max(attempts - 1, 0)
        return float(min(interval, self.retry_max_interval))

    # -- one attempt -------------------------------------------------------------------------

    async def _guarded(self, queue_id: str, now: float | None, due_only: bool, fresh: bool) -> None:
        async with self._sem:
            try:
                await self.attempt(queue_id, now, due_only=due_only, fresh=fresh)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.panic(f"{queue_id} delivery attempt crashed: {escape(repr(exc))}")
            finally:
                self._wakeup.set()  # a new next-attempt time may be earlier than the loop's

    async def attempt(
        self,
        queue_id: str,
        now: float | None = None,
        *,
        due_only: bool = False,
        fresh: bool = False,
    ) -> None:
        """One delivery attempt for one message (all its pending recipients).

        ``due_only`` skips a message whose state (re-read here) says it is not due yet: a scan's
        listing may be older than an attempt that just finished. ``fresh``: the message has
        never been attempted, so there is no state file to read or remove.
        """
        now = self.clock() if now is None else now
        try:
            envelope, state, message = self.spool.open_for_delivery(queue_id, fresh=fresh)
        except UnknownMessage:
            return
        except CorruptMessage as exc:
            self.log.panic(f"{queue_id} cannot be delivered: {escape(str(exc))}")
            return
        # The one handle every reader of this attempt uses (Maildir, next hop, the DSN); a
        # small message is in memory, a large one open once (closed when the attempt is over;
        # unlinking it meanwhile is fine: only small files are recycled, palisade.spool.recycle).
        with message:
            await self._attempt(queue_id, now, envelope, state, message, due_only, fresh)

    async def _attempt(
        self,
        queue_id: str,
        now: float,
        envelope: Envelope,
        state: DeliveryState,
        message: Message,
        due_only: bool,
        fresh: bool,
    ) -> None:
        if due_only and state.next_attempt > now and not state.unreported_failures():
            return
        pending = state.pending()
        if pending:
            results = await self.router.deliver(envelope, pending, message)
            for res in results:
                self._record(queue_id, envelope, state, res, now)
            state.attempts += 1
            state.last_attempt = now
            deferred = [res for res in results if res.outcome == "deferred"]
            if state.pending():
                state.next_attempt = now + self._backoff(state.attempts)
                state.last_error = deferred[0].detail if deferred else ""
                self._due[queue_id] = state.next_attempt
            if state.finished():
                # Nothing left to remember: the common case (delivered at the first attempt)
                # removes the message without writing a state file first.
                await self._complete(queue_id, state_file=not fresh)
                return
            if not await self._save(queue_id, state):
                return
        if state.unreported_failures():
            await self._report_failures(queue_id, envelope, state, message, now)
            if not await self._save(queue_id, state):
                return
        if state.finished():
            await self._complete(queue_id)

    async def _complete(self, queue_id: str, *, state_file: bool = True) -> None:
        self._due.pop(queue_id, None)
        self.spool.remove(queue_id, state_file=state_file, recycle=True)
        self.log.main(f"{queue_id} Completed", queue_id=queue_id, event="completed")

    async def _save(self, queue_id: str, state: DeliveryState) -> bool:
        try:
            await asyncio.to_thread(self.spool.save_state, queue_id, state)
        except UnknownMessage:
            self.log.main(f"{queue_id} removed while being delivered", queue_id=queue_id)
            return False
        return True

    def _record(
        self,
        queue_id: str,
        envelope: Envelope,
        state: DeliveryState,
        res: RecipientResult,
        now: float,
    ) -> None:
        rstate = state.recipients[res.rcpt]
        rstate.updated_at = now
        rstate.detail = res.reply or res.detail
        rcpt = escape_field(res.rcpt)  # the client's text: no brackets, quotes or <> (obs.log)
        route = _route_text(res)
        host = f" {res.host}" if res.host else ""
        fields: dict[str, object] = {"queue_id": queue_id, "rcpt": res.rcpt}
        if res.outcome == "delivered":
            rstate.status = "delivered"
            confirm = f' C="{escape(res.reply)}"' if res.reply else ""
            line = f"{queue_id} => {rcpt}{route}{host}{confirm}"
            self.log.main(line, event="delivered", **fields)
            return
        expired = res.outcome == "deferred" and now - envelope.received_at >= self.max_age
        if res.outcome == "deferred" and not expired:
            self.log.main(
                f"{queue_id} == {rcpt}{route} defer ({res.errno}){host}: {escape(res.detail)}",
                event="deferred",
                **fields,
            )
            return
        rstate.status = "failed"
        rstate.code = res.status or ("4.4.7" if expired else "5.0.0")
        rstate.diagnostic = res.diagnostic
        rstate.remote = res.remote_mta
        reason = res.detail
        if expired:
            reason = f"{EXPIRED} (last error: {res.detail})"
            rstate.code = "4.4.7"
            rstate.detail = reason
        line = f"{queue_id} ** {rcpt}{route}{host}: {escape(reason)}"
        self.log.main(line, event="failed", **fields)

    async def _report_failures(
        self,
        queue_id: str,
        envelope: Envelope,
        state: DeliveryState,
        message: Message,
        now: float,
    ) -> None:
        failed = state.unreported_failures()
        if not envelope.sender:
            self.log.main(
                f"{queue_id} no bounce message sent for {len(failed)} failed recipient(s):"
                " null sender",
                queue_id=queue_id,
            )
            for rcpt in failed:
                state.recipients[rcpt].dsn_queued = True
            return
        failures = [
            RecipientResult(
                rcpt,
                "failed",
                state.recipients[rcpt].detail,
                "",
                "",
                status=state.recipients[rcpt].code,
                remote_mta=state.recipients[rcpt].remote,
                diagnostic=state.recipients[rcpt].diagnostic,
            )
            for rcpt in failed
        ]
        try:
            prefix = message.read(64 * 1024)  # the original's header section, from the handle
        except (OSError, SpoolError):
            prefix = b""
        helo = self.router.helo_name
        bounce_id = self._ids.new()
        data = build_dsn(
            envelope,
            failures,
            header_block(prefix),
            reporting_mta=helo,
            message_id=f"<{bounce_id}@{helo}>",
            now=now,
        )
        bounce = Envelope(
            queue_id=bounce_id,
            sender="",
            recipients=(envelope.sender,),
            received_at=now,
            client_ip="127.0.0.1",
            client_port=0,
            helo=helo,
            client_name=None,
            protocol="local",
            tls=None,
            message_id=f"<{bounce_id}@{helo}>",
            extra={"bounce_of": queue_id},
            routes=(self.router.bounce_route(envelope.sender),),
        )
        writer = await asyncio.to_thread(self.spool.open_message, bounce)
        try:
            await asyncio.to_thread(writer.write, data)
            await writer.commit()
        except BaseException:
            writer.abort()
            raise
        self.log.main(
            f"{bounce_id} <= <> R={queue_id} U=MAILER-DAEMON P=local S={len(data)}",
            queue_id=bounce_id,
            event="bounce",
            bounce_of=queue_id,
        )
        for rcpt in failed:
            state.recipients[rcpt].dsn_queued = True
        self.submit(bounce_id)
