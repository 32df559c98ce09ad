"""One client connection: the socket side of a :class:`palisade.conversation.Conversation`.

Owns: the I/O of a connection and nothing of what is said on it -- reading bytes into the SMTP
core, the per-request deadlines that stop clients who trickle bytes (and the minimum DATA rate),
the wait before the banner (``greeting_delay``), reply batching (all replies to one pipelined
group leave in one write), the TLS handshake, opening the spool file the conversation asks for,
and shutdown. Replies, log lines, stages and the transaction are the conversation's; what the
config decides (rules, clients, domains, TLS) comes from the generation the connection began
with, to its end.
Trust: everything from the client is hostile and goes to the SMTP core and the conversation
untouched; the only text written here is the TLS handshake failure line (``server.tls``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from palisade.conversation import Conversation, Role, Step
from palisade.conversation.record import ConnectionRecorder
from palisade.server.stream import ClientStream
from palisade.server.tls import describe, handshake_error_line
from palisade.smtp import NEED_DATA, PAUSED, events

if TYPE_CHECKING:
    from palisade.server.context import ServerContext
    from palisade.server.generation import Generation


class _Closed(Exception):
    """The connection is over (QUIT, drop, timeout, EOF)."""


class Session:
    """Drives one client connection from greeting to close."""

    def __init__(
        self,
        ctx: ServerContext,
        generation: Generation,
        stream: ClientStream,
        peer: tuple[str, int] | None = None,
        *,
        role: Role = Role.SMTP,
    ) -> None:
        """``generation``: what the config decides (rules, clients, domains, TLS), for the
        whole connection whatever a reload does meanwhile; ``ctx``: the process's shared parts."""
        self.ctx = ctx
        self.stream = stream
        self.generation = generation
        self.config = generation.config
        ip_text, port = peer if peer is not None else stream.peer
        self.role = role
        # [record] facts: the inbound port's connections only (submission runs no perimeter rule)
        facts_path = generation.config.record.facts if role is Role.SMTP else None
        self._recorder = (
            ConnectionRecorder(generation, ip_text, port, generation.secrets)
            if facts_path is not None and ctx.facts is not None
            else None
        )
        self.conversation = Conversation(
            ctx,
            generation if self._recorder is None else self._recorder.settings,
            ip_text,
            port,
            role=role,
            local_ip=stream.local_ip,
            observer=self._recorder,
        )
        if self._recorder is not None:
            self._recorder.watch(self.conversation)
        self._deadline: float | None = None
        self._data_started: float | None = None
        self._data_bytes = 0

    # -- main loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        conv = self.conversation
        try:
            if not await self._greet():
                return
            conn = conv.conn
            data_chunk = events.DataChunk
            while True:
                event = conn.next_event()
                if event is NEED_DATA or event is PAUSED:
                    await self._flush()
                    await self._receive()
                    continue
                if type(event) is data_chunk:
                    conv.content(event.data)
                    continue
                step = await conv.handle(event)
                if step is not Step.GO_ON:
                    await self._act(step)
                self._after(event)
        except _Closed:
            pass
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # Shutdown after the grace period: the open transaction is aborted below and the
            # client told to come back, so it keeps responsibility for its message.
            conv.out.append(conv.shutdown_reply().to_bytes())
        finally:
            if conv.in_transaction:
                conv.abort_transaction()
            with contextlib.suppress(Exception):
                await self._flush()
            self._record_incidents()  # also when the last reply could not be written
            self.stream.close()
            self.ctx.log.event("closed")
            self._record_facts()
        await conv.finish(time.time())

    async def _act(self, step: Step) -> None:
        """Does what the conversation asked for: close, the TLS handshake, a spool file."""
        if step is Step.CLOSE:
            raise _Closed
        if step is Step.START_TLS:
            await self._start_tls()
        elif step is Step.OPEN_SPOOL:
            conv = self.conversation
            envelope = conv.tx.envelope
            assert envelope is not None
            try:
                writer = self.ctx.spool.open_message(envelope)
            except OSError as exc:
                conv.spool_failed(exc)
                return
            conv.spool_opened(writer)
            if conv.tx.writer is not None:
                self._data_started = time.monotonic()
                self._data_bytes = 0

    async def _greet(self) -> bool:
        conv = self.conversation
        if self.ctx.draining:
            conv.shutting_down()
            return False
        # Connect rules come first: a refused client is refused at once, and a client that a
        # connect rule accepts (a whitelist) never waits for the banner.
        if not await conv.connect():
            return False
        if self.role is Role.SUBMISSIONS and not await self._implicit_tls():
            return False
        if not await self._pregreet():
            return False
        if self.ctx.draining:
            conv.shutting_down()
            return False
        conv.greet()
        return True

    async def _pregreet(self) -> bool:
        """``greeting_delay``: waits before the banner, as long as the conversation says, and
        refuses a client that talks meanwhile. False: the connection is over."""
        conv = self.conversation
        delay = await conv.pregreet_delay(time.time())
        if delay <= 0:
            return True
        with contextlib.suppress(TimeoutError):
            early = await self.stream.read(delay)
            if early or self.stream.has_data():
                conv.pregreet_spoke(early)
                return False
            if early == b"":
                return False
        conv.pregreet_waited()
        return True

    # -- time --------------------------------------------------------------------------------
    def _after(self, event: object) -> None:
        """Starts the next request's deadline: DATA content gets data_timeout, commands theirs."""
        if self._data_started is not None:
            if isinstance(event, events.Data):
                self._deadline = self._data_started + self.config.limits.data_timeout
                return
            if isinstance(event, events.DataEnd):
                self._data_started = None
        self._deadline = None

    async def _receive(self) -> None:
        """Reads more input under the current request's deadline.

        The deadline is set when a request begins (a new command, or DATA) and is not extended
        by bytes that trickle in, so a client cannot hold a connection by sending one byte at a
        time. During DATA a minimum average rate applies after a grace period as well.
        """
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self.config.limits.command_timeout
        remaining = self._deadline - now
        if self._data_started is not None:
            elapsed = now - self._data_started
            limits = self.config.limits
            if elapsed > limits.min_data_rate_grace and (
                self._data_bytes < limits.min_data_rate * elapsed
            ):
                self._timeout("SMTP data transfer too slow")
            remaining = min(remaining, max(0.5, limits.min_data_rate_grace - elapsed))
        if remaining <= 0:
            self._timeout(
                "SMTP data timeout" if self._data_started is not None else "SMTP command timeout"
            )
        try:
            data = await self.stream.read(remaining)
        except TimeoutError:
            if self._data_started is not None and time.monotonic() < self._deadline:
                return  # time to re-check the data rate
            self._timeout(
                "SMTP data timeout" if self._data_started is not None else "SMTP command timeout"
            )
        if self._data_started is not None:
            self._data_bytes += len(data)
        self.conversation.conn.receive_data(data)

    def _timeout(self, what: str) -> None:
        self.conversation.timed_out(what)
        raise _Closed

    # -- output ------------------------------------------------------------------------------
    async def _flush(self) -> None:
        out = self.conversation.out
        if out:
            self.stream.write(b"".join(out))
            out.clear()
            self._record_incidents()
            await self.stream.drain()

    def _record_incidents(self) -> None:
        """Hands the conversation's incidents to the process's recorder, after the replies
        that go with them were written: it stores them in a task of its own, so neither this
        reply nor the next command waits for the store, and a store failure is its panic-log
        line, never this client's reply."""
        conv = self.conversation
        if conv.incidents:
            generation = self.generation
            state = generation.session_ports.state
            for rule, weight in conv.incidents:
                # the generation (its state store) stays open until the incident is written,
                # even when a reload retires it and this session ends first
                generation.acquire()
                self.ctx.incidents.submit(
                    state,
                    conv.ip_text,
                    weight,
                    rule,
                    generation.block_policy,
                    generation.protection,
                    done=generation.release,
                )
            conv.incidents.clear()

    def _record_facts(self) -> None:
        """The connection's facts line, after its last reply: queued for the facts file (a
        record that cannot be made is a panic line, never the client's problem)."""
        recorder, facts = self._recorder, self.ctx.facts
        path = self.config.record.facts
        if recorder is None or facts is None or path is None:
            return
        try:
            facts.add(path, recorder.line())
        except Exception as exc:  # a bug in the recorder must not end the worker
            self.ctx.log.panic(f"facts record of [{recorder.ip}] not made: {exc!r}")

    def notify_shutdown(self) -> None:
        """Called at shutdown: a client between transactions is told 421 and let go at once."""
        conv = self.conversation
        if conv.tx.sender is None and self._data_started is None and not conv.out:
            self.stream.write(conv.shutdown_reply().to_bytes())
            self.stream.close()

    # -- TLS ---------------------------------------------------------------------------------
    async def _implicit_tls(self) -> bool:
        """The handshake of a submissions (465) connection, before the banner; False: failed
        (the main log says why, as for STARTTLS)."""
        conv = self.conversation
        tls_context = self.generation.tls_context
        if tls_context is None:  # the loader refuses submission listeners without [tls]
            return False
        try:
            await self.stream.start_tls(tls_context, self.config.limits.command_timeout)
        except (OSError, ConnectionError, TimeoutError) as exc:
            self.ctx.log.main(
                handshake_error_line(None, conv.ip_text, conv.port, exc), client_ip=conv.ip_text
            )
            return False
        conv.implicit_tls(describe(self.stream.tls_info()))
        return True

    async def _start_tls(self) -> None:
        conv = self.conversation
        tls_context = self.generation.tls_context
        assert tls_context is not None
        await self._flush()
        try:
            await self.stream.start_tls(tls_context, self.config.limits.command_timeout)
        except (OSError, ConnectionError, TimeoutError, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            # exim's words and place: the main log only.
            self.ctx.log.main(
                handshake_error_line(conv.helo, conv.ip_text, conv.port, exc),
                client_ip=conv.ip_text,
                event="tls",
                ok=False,
            )
            raise _Closed from None
        self.ctx.log.event("tls", ok=True)
        conv.tls_started(describe(self.stream.tls_info()))
