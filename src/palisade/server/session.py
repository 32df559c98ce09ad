"""One SMTP conversation: bytes from the stream into the SMTP core, events to policy and spool.

Owns: the order of work for a connection (greeting, commands, STARTTLS, DATA streamed to the
spool, the 250 only after the spool commit), the per-request deadlines that stop clients who
trickle bytes, reply batching (all replies to one pipelined group leave in one write), and the
log line for each decision. It never decides policy itself: relay control and, later, the rule
engine return verdicts, and this module renders them. Everything built from the config (rules,
clients, domains, TLS) comes from the generation it was started with, to its end.
Trust: everything from the client is hostile; client text reaches the logs only through
``obs.log.escape_field`` (which also escapes brackets, quotes and angle brackets, so the
``[ip]`` of the ``H=`` field is the only bracketed address a line can show).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from palisade.obs.log import escape, escape_field, rfc5322_date
from palisade.policy.engine import StageOutcome, evaluate_stage
from palisade.policy.rules import Facts, MessageFacts, Stage
from palisade.policy.verdict import Action, Verdict
from palisade.ports import Route, StateTempError
from palisade.server import data_stage
from palisade.server.stream import ClientStream
from palisade.server.tls import describe, handshake_error_line
from palisade.smtp import (
    NEED_DATA,
    PAUSED,
    Features,
    Limits,
    Reply,
    SmtpConnection,
    events,
    replies,
)
from palisade.smtp.headers import HeaderSplitter, MessageIdFinder
from palisade.spool import Envelope

if TYPE_CHECKING:
    from palisade.server.context import ServerContext
    from palisade.server.generation import Generation
    from palisade.spool import SpoolWriter


def _header_line(header: str) -> bytes:
    """``X-Warning: ...`` as one header line; text that came from DNS is made safe first."""
    if ":" not in header.split(" ", 1)[0]:
        header = f"X-Warning: {header}"
    return (escape(header, 900) + "\r\n").encode("utf-8", "replace")


@functools.lru_cache(maxsize=4096)
def _client_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The peer address as an object, parsed once per address seen lately (addresses are
    immutable; the same clients come back, and listed ones hammer)."""
    return ipaddress.ip_address(text)


@functools.lru_cache(maxsize=16)
def _our_names(hostname: str) -> frozenset[str]:
    return frozenset({hostname.lower()})


class _Closed(Exception):
    """The conversation is over (QUIT, drop, timeout, EOF)."""


@dataclass
class Transaction:
    """What one MAIL ... DATA exchange has gathered so far."""

    sender: str | None = None
    recipients: list[str] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    writer: SpoolWriter | None = None
    queue_id: str | None = None
    message_id: str | None = None
    headers: list[str] = field(default_factory=list)  # X-Warning lines of MAIL/RCPT warn rules
    splitter: HeaderSplitter | None = None  # the header section of the message being received
    message_ids: MessageIdFinder | None = None  # its Message-ID (every message, examined or not)


class Session:
    """Drives one client connection from greeting to close."""

    def __init__(
        self,
        ctx: ServerContext,
        generation: Generation,
        stream: ClientStream,
        peer: tuple[str, int] | None = None,
    ) -> None:
        """``generation``: what the config decides (rules, clients, domains, TLS), for the
        whole connection whatever a reload does meanwhile; ``ctx``: the process's shared parts."""
        self.ctx = ctx
        self.stream = stream
        self.generation = generation
        self.config = generation.config
        self.ports = generation.session_ports
        self.ip_text, self.port = peer if peer is not None else stream.peer
        self.ip = _client_address(self.ip_text)
        # The SMTP state machine (``conn``) is built on first use, after the connect rules:
        # a client refused instead of the banner never needs one.
        self.helo: str | None = None
        self.esmtp = False
        self.tls: str | None = None
        self.tx = Transaction()
        self.facts = Facts(
            client_ip=self.ip,
            client_port=self.port,
            local_domains=generation.relay_policy.local_domains,
            our_names=_our_names(self.config.server.hostname),
            our_ips=generation.our_ips,
        )
        self.facts.results["relay_client"] = generation.relay_policy.client_may_relay(self.ip)
        self._delayed: tuple[Stage, Verdict] | None = None  # delay_reject: answered at RCPT
        self._warn_headers: list[str] = []
        self._out: list[bytes] = []
        self._deadline: float | None = None
        self._data_started: float | None = None
        self._data_bytes = 0
        # pregreet (greeting_delay): whether a connect rule accepted the client, whether this
        # connection waited and kept quiet, and how it went afterwards (see _behaved)
        self._connect_accepted = False
        self._waited = False
        self._served = False  # a command other than QUIT was answered 2xx/3xx
        self._refused = False  # a command was answered 5xx (rule, relay, protocol, content)
        self._client_ended = False  # QUIT, or the client closed between commands

    @functools.cached_property
    def conn(self) -> SmtpConnection:
        """The SMTP protocol state of this connection (built once, on first use)."""
        limits = self.config.limits
        return SmtpConnection(
            features=Features(
                hostname=self.config.server.hostname,
                max_size=limits.max_message_size,
                starttls=self.generation.tls_context is not None,
            ),
            limits=Limits(
                max_command_line=limits.max_command_line,
                max_text_line=limits.max_text_line,
                max_message_size=limits.max_message_size,
                max_recipients=limits.max_recipients,
                max_errors=limits.max_errors,
            ),
        )

    # -- log helpers ------------------------------------------------------------------------
    def host_field(self) -> str:
        """exim's ``H=`` field: ``(helo) [ip]:port`` (no PTR lookups in the core)."""
        helo = f"({escape_field(self.helo, 100)}) " if self.helo else ""
        return f"H={helo}[{self.ip_text}]:{self.port}"

    def _sender_field(self) -> str:
        return (
            f" F=<{escape_field(self.tx.sender or '', 200)}>" if self.tx.sender is not None else ""
        )

    # -- main loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            if not await self._greet():
                return
            while True:
                event = self.conn.next_event()
                if event is NEED_DATA or event is PAUSED:
                    await self._flush()
                    await self._receive()
                    continue
                await self._dispatch(event)
                if not isinstance(event, events.DataChunk):
                    self._after_dispatch(event)
        except _Closed:
            pass
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # Shutdown after the grace period: the open transaction is aborted below and the
            # client told to come back, so it keeps responsibility for its message.
            self._out.append(self._shutdown_reply().to_bytes())
        finally:
            if self.tx.writer is not None or self.tx.sender is not None:
                self._abort_transaction()
            with contextlib.suppress(Exception):
                await self._flush()
            self.stream.close()
        if self._behaved():
            await self._remember_pass()

    async def _greet(self) -> bool:
        if self.ctx.draining:
            self._send(self._shutdown_reply())
            return False
        # Connect rules come first: a refused client is refused at once, and a client that a
        # connect rule accepts (a whitelist) never waits for the banner.
        verdict = await self._run_stage(Stage.CONNECT, "")
        if verdict is not None and not self._delay(Stage.CONNECT, verdict):
            self._log_refusal(Stage.CONNECT, "", verdict)
            assert verdict.reply is not None
            self._out.append(verdict.reply.to_bytes())
            return False  # refused before the banner: nothing more is said
        if not await self._pregreet():
            return False
        if self.ctx.draining:
            self._send(self._shutdown_reply())
            return False
        self._out.append(self.conn.greeting(self.config.server.hostname))
        return True

    # -- pregreet ----------------------------------------------------------------------------
    def _pregreet_key(self) -> str:
        return f"pregreet:{self.ip_text}"

    async def _pregreet(self) -> bool:
        """``greeting_delay``: waits that long before the banner and refuses a client that
        talks meanwhile (Postfix postscreen's pregreet test). Skipped for a client that a
        connect rule accepted and for one that passed within ``pregreet_pass_ttl``. False: the
        connection is over."""
        server = self.config.server
        delay = server.greeting_delay
        if delay <= 0 or self._connect_accepted:
            return True
        if server.pregreet_pass_ttl > 0:
            try:
                until = await self.ports.state.pass_until(self._pregreet_key(), time.time())
            except StateTempError as exc:  # no pass known: the client waits, as everyone
                until = None
                self.ctx.log.main(
                    f"{self.host_field()} pregreet pass unknown: {escape_field(exc.reason)}"
                )
            if until is not None:
                self.ctx.log.main(
                    f"{self.host_field()} pregreet skipped: passed before (until "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(until))})"
                )
                return True
        with contextlib.suppress(TimeoutError):
            early = await self.stream.read(delay)
            if early or self.stream.has_data():
                self.ctx.log.reject(
                    f"SMTP protocol synchronization error (input sent without waiting for "
                    f"greeting): rejected connection from H=[{self.ip_text}]:{self.port} "
                    f'input="{escape_field(early.decode("latin-1"), 60)}"'
                )
                self._send(Reply(554, "5.5.0", "SMTP synchronization error"))
                return False
            if early == b"":
                return False
        self._waited = True
        return True

    def _behaved(self) -> bool:
        """Whether a client that waited for the banner earned a pass: it was answered 2xx/3xx
        to at least one command besides QUIT, never 5xx (a rule, relay control, a protocol
        error, a content refusal), and the connection ended by its QUIT or its close between
        commands, not by us (drop, timeout, too many errors, shutdown)."""
        return (
            self._waited
            and self._served
            and not self._refused
            and self._client_ended
            and self.config.server.pregreet_pass_ttl > 0
        )

    async def _remember_pass(self) -> None:
        ttl = self.config.server.pregreet_pass_ttl
        now = time.time()
        try:
            await self.ports.state.remember_pass(self._pregreet_key(), now + ttl, now)
        except StateTempError as exc:
            self.ctx.log.main(
                f"{self.host_field()} pregreet passed, not remembered: {escape_field(exc.reason)}"
            )
            return
        self.ctx.log.main(f"{self.host_field()} pregreet passed, remembered for {ttl:g}s")

    # -- policy ------------------------------------------------------------------------------
    async def _run_stage(self, stage: Stage, subject: str) -> Verdict | None:
        """Runs the stage's rules, logs every decision, returns the verdict (None: go on)."""
        rules = self.generation.policy.for_stage(stage)
        if not rules:
            return None
        outcome = await evaluate_stage(stage, rules, self.facts, self.ports)
        self._log_decisions(outcome, subject)
        if stage is Stage.CONNECT:
            self._connect_accepted = outcome.accepted
        target = self._warn_headers if stage in (Stage.CONNECT, Stage.HELO) else self.tx.headers
        for header in outcome.headers:
            if header not in target:
                target.append(header)
        return outcome.verdict

    def _delay(self, stage: Stage, verdict: Verdict) -> bool:
        """delay_reject: keep a connect/HELO/MAIL refusal for the first RCPT (not a drop)."""
        if not self.generation.policy.delay_reject or verdict.action is Action.DROP:
            return False
        if self._delayed is None:
            self._delayed = (stage, verdict)
        return True

    def _log_decisions(self, outcome: StageOutcome, subject: str) -> None:
        lines: list[str] = []  # most stages log nothing: the prefix is built only when needed
        results = self.facts.results
        for decision in outcome.decisions:
            if getattr(decision.rule.check, "log_rates", False) and "ratelimit.rate" in results:
                lines.append(f"rate {results['ratelimit.rate']}")
            if decision.error is not None:
                rule = f'{outcome.stage.value} rule "{escape_field(decision.rule.name)}"'
                if decision.matched:
                    lines.append(f"{rule}: temporary failure: {escape_field(decision.error)}")
                else:  # skipped: this line is all that is said about it
                    lines.append(f"{rule} (temporary failure): {escape_field(decision.log_text)}")
                if decision.error_zones:
                    self._report_zones(decision.error_zones)
            if not decision.matched:
                continue
            if not decision.acted:
                lines.append(escape_field(decision.log_text))
            elif decision.rule.verb.value == "warn":
                lines.append(f"Warning: {escape_field(decision.log_text)}")
        if lines:
            where = f"{self.host_field()}{self._sender_field()}"
            for line in lines:
                self.ctx.log.main(f"{where} {line}")

    def _report_zones(self, zones: Mapping[str, str]) -> None:
        """A failing DNSBL zone goes to the panic log once per probe interval (5 min when probes
        are off), so an operator sees a dead or refusing list without a line per client."""
        interval = self.config.dns.dnsbl_probe_interval or 300.0
        reported = self.ctx.zone_failure_reported
        now = time.monotonic()
        for zone, text in zones.items():
            last = reported.get(zone)
            if last is not None and now - last < interval:
                continue
            reported[zone] = now
            self.ctx.log.panic(
                f"DNSBL zone {escape(zone)} lookup failed: {escape(text, 400)} "
                f"(said once per {interval:g}s per zone; each failed lookup is in the main log)"
            )

    def _log_refusal(self, stage: Stage, subject: str, verdict: Verdict) -> None:
        temporarily = "temporarily " if verdict.action is Action.DEFER else ""
        if stage is Stage.CONNECT:
            what = 'connection in "connect" ACL'
        elif stage is Stage.HELO:
            what = f"EHLO or HELO {escape_field(subject, 100)}"
        elif stage is Stage.MAIL:
            what = f"MAIL <{escape_field(subject, 200)}>"
        elif stage is Stage.RCPT:
            what = f"RCPT <{escape_field(subject, 200)}>"
        else:
            what = "after DATA"
        self.ctx.log.reject(
            f"{self.host_field()}{self._sender_field()} {temporarily}rejected {what}: "
            f"{escape_field(verdict.log_message, 400)}"
        )

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
                await self._timeout("SMTP data transfer too slow")
            remaining = min(remaining, max(0.5, limits.min_data_rate_grace - elapsed))
        if remaining <= 0:
            await self._timeout(
                "SMTP data timeout" if self._data_started is not None else "SMTP command timeout"
            )
        try:
            data = await self.stream.read(remaining)
        except TimeoutError:
            if self._data_started is not None and time.monotonic() < self._deadline:
                return  # time to re-check the data rate
            await self._timeout(
                "SMTP data timeout" if self._data_started is not None else "SMTP command timeout"
            )
        if self._data_started is not None:
            self._data_bytes += len(data)
        self.conn.receive_data(data)

    async def _timeout(self, what: str) -> None:
        self.ctx.log.main(f"{what} on connection from {self.host_field()}{self._sender_field()}")
        self._send(
            Reply(421, "4.4.2", f"{self.config.server.hostname} {what} - closing connection")
        )
        raise _Closed

    def _send(self, reply: Reply) -> None:
        if reply.code >= 500:
            self._refused = True
        elif reply.code < 400 and not self._client_ended:
            self._served = True
        self._out.append(
            self.conn.send_reply(reply) if self.conn.awaiting_reply else reply.to_bytes()
        )

    async def _flush(self) -> None:
        if self._out:
            self.stream.write(b"".join(self._out))
            self._out.clear()
            await self.stream.drain()

    def _shutdown_reply(self) -> Reply:
        return Reply(421, "4.3.2", f"{self.config.server.hostname} Service shutting down")

    def notify_shutdown(self) -> None:
        """Called at shutdown: a client between transactions is told 421 and let go at once."""
        if self.tx.sender is None and self._data_started is None and not self._out:
            self.stream.write(self._shutdown_reply().to_bytes())
            self.stream.close()

    # -- events ------------------------------------------------------------------------------
    async def _dispatch(self, event: object) -> None:
        if isinstance(event, events.DataChunk):
            tx = self.tx
            if tx.writer is not None:
                splitter = tx.splitter
                tx.writer.write(splitter.feed(event.data) if splitter else event.data)
                finder = tx.message_ids
                if finder is not None and not finder.done:
                    finder.feed(event.data)
            return
        match event:
            case events.Helo():
                await self._on_helo(event)
            case events.Mail():
                await self._on_mail(event)
            case events.Rcpt():
                await self._on_rcpt(event)
            case events.Data():
                await self._on_data()
            case events.DataEnd():
                await self._on_data_end(event)
            case events.Rset():
                self._abort_transaction()
                self.facts.sender, self.facts.recipient, self.facts.recipients = None, None, []
                self.facts.tx = {}
                self._send(replies.OK)
            case events.Noop():
                self._send(replies.OK)
            case events.Quit():
                self._client_ended = True
                self._send(Reply(221, "2.0.0", f"{self.config.server.hostname} closing connection"))
                raise _Closed
            case events.Help():
                self._send(
                    Reply(
                        214,
                        "2.0.0",
                        "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA "
                        "RSET NOOP QUIT HELP VRFY STARTTLS",
                    )
                )
            case events.Vrfy():
                self._send(Reply(252, "2.5.2", "Cannot VRFY user; try RCPT to attempt delivery"))
            case events.Expn():
                self._send(Reply(502, "5.5.1", "EXPN not available"))
            case events.StartTls():
                await self._on_starttls()
            case events.Auth():
                # exim's line, which fail2ban's stock exim filter matches; the mechanism is
                # escaped (no quote or bracket), so it cannot end the quotes or forge an address
                mechanism = escape_field(event.argument.split(" ")[0], 20)
                self.ctx.log.reject(
                    f'SMTP protocol error in "AUTH {mechanism}" {self.host_field()} '
                    "AUTH command used when not advertised"
                )
                self._send(Reply(503, "5.5.1", "Error: authentication not enabled"))
            case events.CommandError():
                self._on_command_error(event)
            case events.TooManyErrors():
                self.ctx.log.reject(
                    f"SMTP call from {self.host_field()} dropped: "
                    "too many syntax or protocol errors"
                )
                self._send(event.reply)
                raise _Closed
            case events.ConnectionClosed():
                self._client_ended = self.tx.sender is None  # not in the middle of a transaction
                if self.tx.sender is not None:
                    self.ctx.log.main(
                        f"unexpected disconnection while reading SMTP command from "
                        f"{self.host_field()}{self._sender_field()}"
                    )
                raise _Closed
            case _:
                raise AssertionError(f"unhandled SMTP event {event!r}")

    async def _on_helo(self, event: events.Helo) -> None:
        self._abort_transaction()
        self.helo = event.name
        self.esmtp = event.extended
        self.facts.helo = event.name
        verdict = await self._run_stage(Stage.HELO, event.name)
        if verdict is not None and not self._delay(Stage.HELO, verdict):
            self._refuse_stage(Stage.HELO, event.name, verdict)
            return
        self._send(self.conn.helo_reply(event, self.config.server.hostname))

    async def _on_mail(self, event: events.Mail) -> None:
        self.tx = Transaction(sender="" if event.address is None else event.address.text)
        self.facts.sender = self.tx.sender
        self.facts.recipient = None
        self.facts.recipients = []
        self.facts.tx = {}  # SPF, DKIM, DMARC and scan results belong to one transaction
        self.facts.message = None
        verdict = await self._run_stage(Stage.MAIL, self.tx.sender or "")
        if verdict is not None and not self._delay(Stage.MAIL, verdict):
            self._refuse_stage(Stage.MAIL, self.tx.sender or "", verdict)
            self.tx = Transaction()
            return
        self._send(replies.SENDER_OK)

    async def _on_rcpt(self, event: events.Rcpt) -> None:
        decision = self.generation.relay_policy.decide(event.address, self.ip)
        if isinstance(decision, Verdict):
            self._refuse_stage(Stage.RCPT, event.address.text, decision)
            return
        rcpt = event.address.text
        if event.address.domain == "":  # RCPT TO:<postmaster> (RFC 5321 4.5.1)
            rcpt = f"postmaster@{self.generation.relay_policy.postmaster_domain}"
        if self._delayed is not None:  # a delayed connect/HELO/MAIL refusal answers here
            self._refuse_stage(Stage.RCPT, rcpt, self._delayed[1])
            return
        self.facts.recipient = rcpt
        verdict = await self._run_stage(Stage.RCPT, rcpt)
        if verdict is not None:
            self._refuse_stage(Stage.RCPT, rcpt, verdict)
            return
        self.facts.recipients.append(rcpt)
        self.tx.recipients.append(rcpt)
        self.tx.routes.append(decision)
        self._send(replies.RECIPIENT_OK)

    def _refuse_stage(self, stage: Stage, subject: str, verdict: Verdict) -> None:
        self._log_refusal(stage, subject, verdict)
        assert verdict.reply is not None
        self._send(verdict.reply)
        if verdict.closes:
            raise _Closed

    def _on_command_error(self, event: events.CommandError) -> None:
        if event.kind == "pipelining":
            self.ctx.log.reject(
                f"SMTP protocol synchronization error (next input sent too soon: pipelining was "
                f"not advertised): rejected connection from {self.host_field()}"
            )
        else:
            self.ctx.log.reject(
                f"SMTP protocol error in {event.kind}: {self.host_field()}{self._sender_field()} "
                f"{escape_field(event.reason, 200)}"
            )
        self._send(event.reply)
        if not self.conn.is_open:
            raise _Closed

    async def _on_starttls(self) -> None:
        assert self.generation.tls_context is not None
        self._send(Reply(220, "2.0.0", "Ready to start TLS"))
        await self._flush()
        try:
            await self.stream.start_tls(
                self.generation.tls_context, self.config.limits.command_timeout
            )
        except (OSError, ConnectionError, TimeoutError, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            # exim's words and place: the main log only.
            self.ctx.log.main(
                handshake_error_line(self.helo, self.ip_text, self.port, exc),
                client_ip=self.ip_text,
            )
            raise _Closed from None
        self.conn.tls_started()
        self.tls = describe(self.stream.tls_info())
        self.helo = None
        self.facts.tls = True
        self.facts.helo = None
        self.tx = Transaction()

    async def _on_data(self) -> None:
        tx = self.tx
        if self.ctx.draining:
            self._send(self._shutdown_reply())
            raise _Closed
        tx.queue_id = self.ctx.queue_ids.new()
        envelope = Envelope(
            queue_id=tx.queue_id,
            sender=tx.sender or "",
            recipients=tuple(tx.recipients),
            received_at=time.time(),
            client_ip=self.ip_text,
            client_port=self.port,
            helo=self.helo or "",
            client_name=None,
            protocol=self.protocol,
            tls=self.tls,
            routes=tuple(tx.routes),  # decided at RCPT; delivery follows them
        )
        if self._examines_content():
            tx.splitter = HeaderSplitter(data_stage.forged_header_filter(self.config))
        tx.message_ids = MessageIdFinder()
        try:
            tx.writer = self.ctx.spool.open_message(envelope)
            tx.writer.write(self._received_header(tx))
            for header in self._warn_headers + tx.headers:
                tx.writer.write(_header_line(header))
        except OSError as exc:
            self.ctx.log.panic(f"spool write failed: {exc}")
            self._send(replies.LOCAL_ERROR)
            self._abort_transaction()
            return
        self._send(replies.DATA_START)
        self._data_started = time.monotonic()
        self._data_bytes = 0

    def _examines_content(self) -> bool:
        """Whether anything looks at the message: DATA rules, authentication or a scanner.
        Without them the content goes to the spool untouched, with no parsing at all."""
        return bool(self.generation.policy.for_stage(Stage.DATA)) or data_stage.configured(
            self.config
        )

    def _after_dispatch(self, event: object) -> None:
        """Starts the next request's deadline: DATA content gets data_timeout, commands theirs."""
        if self._data_started is not None and isinstance(event, events.Data):
            self._deadline = self._data_started + self.config.limits.data_timeout
        else:
            self._deadline = None

    @property
    def protocol(self) -> str:
        base = "esmtp" if self.esmtp else "smtp"
        return base + ("s" if self.tls else "")

    def _received_header(self, tx: Transaction) -> bytes:
        helo = escape(self.helo or "unknown", 100).replace("(", "").replace(")", "")
        tls = f" ({self.tls})" if self.tls else ""
        rcpt = f"\r\n\tfor <{escape(tx.recipients[0], 200)}>" if len(tx.recipients) == 1 else ""
        return (
            f"Received: from {helo} ([{self.ip_text}])\r\n"
            f"\tby {self.config.server.hostname} (Palisade) with {self.protocol.upper()}{tls}\r\n"
            f"\tid {tx.queue_id}{rcpt};\r\n"
            f"\t{rfc5322_date()}\r\n"
        ).encode("utf-8", "replace")

    async def _on_data_end(self, event: events.DataEnd) -> None:
        self._data_started = None
        tx = self.tx
        writer, tx.writer = tx.writer, None
        if event.flaw is not None or writer is None:
            if writer is not None:
                writer.abort()
            self._log_data_refusal(event)
            self._send(event.suggested_reply)
            self.tx = Transaction()
            return
        splitter = tx.splitter
        if splitter is not None:
            try:
                writer.write(splitter.finish())
                fields = tuple(splitter.fields)
                self.facts.message = MessageFacts(fields, writer.received(), writer.size)
            except OSError as exc:
                self._spool_failed(writer, "write", exc)
                return
            if splitter.dropped:
                names = ", ".join(sorted({escape_field(name, 40) for name, _ in splitter.dropped}))
                self.ctx.log.main(
                    f"{tx.queue_id} {self.host_field()} removed {len(splitter.dropped)} inbound "
                    f"verdict header(s) that only we may write: {names}"
                )
            await data_stage.examine(self.config, self.facts, self.ports)
        tx.headers.clear()  # MAIL/RCPT warn headers are written already; DATA ones come now
        verdict = await self._run_stage(Stage.DATA, "")
        if verdict is not None:
            writer.abort()  # refused after the final dot: nothing of it is kept
            self._log_refusal(Stage.DATA, "", verdict)
            assert verdict.reply is not None
            self._send(verdict.reply)
            self.tx = Transaction()
            if verdict.closes:
                raise _Closed
            return
        added = data_stage.added_headers(self.config, self.facts)
        added += b"".join(_header_line(h) for h in tx.headers)
        if added:
            writer.prepend(added)
        if tx.message_ids is not None:
            tx.message_id = writer.message_id = tx.message_ids.finish()
        try:
            await writer.commit()
        except OSError as exc:
            self._spool_failed(writer, "commit", exc)
            return
        assert tx.queue_id is not None
        self._log_arrival(tx, event.size)
        self.ctx.submit(tx.queue_id)
        self._send(Reply(250, "2.0.0", f"Ok: queued as {tx.queue_id}"))
        self.tx = Transaction()

    def _spool_failed(self, writer: SpoolWriter, step: str, exc: OSError) -> None:
        """The spool could not keep the message: nothing of it stays, the client tries later."""
        writer.abort()
        self.ctx.log.panic(f"{self.tx.queue_id} spool {step} failed: {exc}")
        self._send(replies.LOCAL_ERROR)
        self.tx = Transaction()

    def _log_data_refusal(self, event: events.DataEnd) -> None:
        what = {
            "bare_lf": "SMTP smuggling attempt: bare LF in message data",
            "bare_cr": "SMTP smuggling attempt: bare CR in message data",
            "nul": "SMTP smuggling attempt: NUL in message data",
            "line_too_long": "message line longer than the RFC 5322 limit",
            "size": "message too big",
        }.get(event.flaw or "", event.flaw_reason)
        rcpts = ",".join(f"<{escape_field(r, 200)}>" for r in self.tx.recipients)
        self.ctx.log.reject(
            f"{self.host_field()}{self._sender_field()} T={rcpts} rejected after DATA: {what}"
        )

    def _log_arrival(self, tx: Transaction, size: int) -> None:
        parts = [
            f"{tx.queue_id} <= {escape_field(tx.sender, 200) if tx.sender else '<>'}",
            self.host_field(),
            f"P={self.protocol}",
        ]
        if self.tls:
            parts.append(f"X={self.tls}")
        parts.append(f"S={size}")
        parts.extend(data_stage.log_fields(self.config, self.facts))
        if tx.message_id is not None:
            # exim's id=: the Message-ID without its angle brackets; a space would let the client
            # write what looks like another field (" H=[...]"), so it is escaped too
            msgid = escape_field(tx.message_id.removeprefix("<").removesuffix(">"))
            parts.append(f"id={msgid.replace(' ', chr(92) + 'x20')}")
        parts.append("T=" + ",".join(f"<{escape_field(r, 200)}>" for r in tx.recipients))
        self.ctx.log.main(
            " ".join(parts),
            queue_id=tx.queue_id,
            client_ip=self.ip_text,
            message_id=tx.message_id,
        )

    def _abort_transaction(self) -> None:
        if self.tx.writer is not None:
            self.tx.writer.abort()
        self.tx = Transaction()
