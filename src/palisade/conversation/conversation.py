"""One SMTP conversation, without I/O: events in; replies, log lines and requests out.

Owns: the order of work of a conversation (connect rules, the banner, HELO, MAIL, RCPT, DATA and
the final dot), ``delay_reject``, the transaction record (:class:`Transaction`), the facts the
rules read, every literal reply and every log line of a session, the Received header and the
headers the DATA stage adds, and the decision to DKIM-sign a relay client's message (for its
From domain, before the 250; the signing itself, with the generation's keys, is the ``Signer``
port's, which reads the spooled copy like the scanners do). The caller (the server's session,
``check-host``) owns the I/O:

* it hands in SMTP events (:meth:`Conversation.handle`, :meth:`Conversation.content` for DATA
  content, the hot path) and sends the reply bytes gathered in :attr:`Conversation.out`;
* it acts on the :class:`Step` :meth:`~Conversation.handle` returns: close the connection, run
  the TLS handshake, or open a spool file for :attr:`Transaction.envelope` and give the writer
  back (:meth:`~Conversation.spool_opened`);
* it keeps the time: a deadline that passed is :meth:`~Conversation.timed_out`, a client that
  spoke before the banner :meth:`~Conversation.pregreet_spoke`;
* it records the incidents gathered in :attr:`Conversation.incidents` (``(rule, weight)``
  pairs) after writing the replies they go with, and empties the list (the server's session
  hands them to ``feedback.incidents.IncidentRecorder``; ``check-host`` records nothing).

Incidents (README "Incidents and blocks"): a refusal by a rule with ``incident = N`` (a real
match of a deny or drop rule: the engine puts the weight in the verdict, never for a check that
failed nor for a defer), and, with the weights of ``[incidents]``: ``pregreet`` (spoke before
the banner), ``pipelining`` and ``too-many-errors`` (protocol violations), ``smuggling`` (bare
LF, bare CR or NUL in DATA), ``unknown-recipients`` (the connection's
``unknown_recipients_burst``-th recipient refused by a ``recipient`` check: one incident per
connection, whatever follows) and ``auth-failure`` (:meth:`Conversation.auth_failed`, for
AUTH when it comes). Each rule or event counts at most once per connection: one connection is
one offence, however many commands it repeats it with (a delayed refusal answered at every
RCPT, a smuggling attempt in each of several messages).

What the config decides (rules, relay control, the checks' clients, TLS on offer) comes as
:class:`Settings`, fixed for the whole conversation (the server hands in the generation the
connection began with); the process's shared parts (log, queue ids, the way to the queue runner,
shutdown state) as :class:`ConversationContext`. Checks run through the policy engine, which sees
the outside world only through ports; log lines go to the context's ``EventLog``. Nothing here
reads a socket, a deadline or a file but through those.
Submission (a listener's :class:`Role` other than ``SMTP``, RFC 6409): the perimeter's
connect, HELO, MAIL and RCPT rules do not apply there, nor does the wait before the banner. The
gates are the SMTP core's (TLS before AUTH, AUTH before MAIL) and this module's: the SASL
exchange (PLAIN, LOGIN) checked through the ``Authenticator`` port, a failure delay that grows
with each failure of the client address (counted in the state store), a disconnect after
``max_auth_failures`` on one connection, the ``senders`` map at MAIL, the per-user message and
recipient rates. Relay control still routes each recipient (an authenticated user may send to any
domain). At DATA only the virus scan runs (and the spam scan with ``spam_scan``); the message is
DKIM-signed like relay_from_hosts mail.

Trust: everything from the client is hostile; client text reaches the logs only through
``obs.log.escape_field`` (which also escapes brackets, quotes and angle brackets, so the
``[ip]`` of the ``H=`` field is the only bracketed address a line can show).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import ipaddress
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from palisade.config import Config
from palisade.conversation import content
from palisade.obs.log import EventLog, escape, escape_field, rfc5322_date
from palisade.obs.queueid import QueueIdGenerator
from palisade.policy import keys
from palisade.policy.checks import dmarc
from palisade.policy.engine import Rule, StageOutcome, evaluate_stage
from palisade.policy.findings import Finding, SpamScan, VirusScan
from palisade.policy.policy import Policy
from palisade.policy.relay import RelayPolicy
from palisade.policy.rules import Facts, Findings, IPAddress, MessageFacts, Ports, Stage
from palisade.policy.verdict import Verb, Verdict
from palisade.ports import (
    AuthAttempt,
    DkimSignature,
    Route,
    ServiceTempError,
    SigningKeyError,
    StateTempError,
    UnsignableMessage,
)
from palisade.smtp import Features, Limits, Reply, SmtpConnection, events, replies, sasl
from palisade.smtp.headers import HeaderSplitter, MessageIdFinder
from palisade.spool import Envelope, SpoolWriter

__all__ = [
    "Conversation",
    "ConversationContext",
    "Observer",
    "Role",
    "Settings",
    "Step",
    "Transaction",
]


class Step(enum.Enum):
    """What the caller must do after an event was handled."""

    GO_ON = "go on"  # send what is in ``out`` when the client waits for it, read on
    CLOSE = "close"  # send what is in ``out``, then close the connection
    START_TLS = "start tls"  # send ``out`` now, then the TLS handshake (tls_started/tls_failed)
    OPEN_SPOOL = "open spool"  # open a spool file for ``tx.envelope``: spool_opened/spool_failed


class Role(enum.Enum):
    """What a listener is for: the perimeter (port 25) or submission by our own users."""

    SMTP = "smtp"  # port 25: connect/HELO/MAIL/RCPT/DATA rules, no AUTH
    SUBMISSION = "submission"  # 587: STARTTLS, then AUTH, then mail
    SUBMISSIONS = "submissions"  # 465: TLS from the first byte (RFC 8314), then AUTH


class ConversationContext(Protocol):
    """What a conversation reads of its process (the server's, or ``check-host``'s stand-in)."""

    @property
    def log(self) -> EventLog: ...
    @property
    def queue_ids(self) -> QueueIdGenerator: ...
    @property
    def submit(self) -> Callable[[str], None]: ...
    @property
    def draining(self) -> bool: ...
    @property
    def zone_failure_reported(self) -> dict[str, float]: ...


class Settings(Protocol):
    """What the config decides, fixed for the whole conversation (the server gives the
    generation the connection began with, ``server.generation.Generation``)."""

    @property
    def config(self) -> Config: ...
    @property
    def policy(self) -> Policy: ...
    @property
    def relay_policy(self) -> RelayPolicy: ...
    @property
    def tls_context(self) -> ssl.SSLContext | None: ...
    @property
    def our_ips(self) -> frozenset[IPAddress]: ...
    @property
    def session_ports(self) -> Ports: ...


class Observer(Protocol):
    """What ``check-host`` is told besides replies and log lines (the server gives none)."""

    def stage(self, stage: Stage, subject: str, outcome: StageOutcome) -> None: ...

    def delayed(self, stage: Stage, verdict: Verdict) -> None: ...

    def relay(self, recipient: str, decision: Route | Verdict) -> None: ...

    def delayed_refusal(self, verdict: Verdict) -> None: ...

    def added_headers(self, lines: bytes) -> None: ...


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


# A configured key that cannot be used: the client keeps the message and tries again (the
# operator is told in paniclog); never sent unsigned.
_SIGNING_DEFERRED = Reply(451, "4.3.5", "Temporary local problem, please try again later")
_AUTH_FAILED = Reply(535, "5.7.8", "Error: authentication failed")
_AUTH_TEMP = Reply(454, "4.7.0", "Temporary authentication failure")
_AUTH_ABORTED = Reply(501, "5.0.0", "Authentication aborted")
_AUTH_UNDECODABLE = Reply(501, "5.5.2", "Cannot decode response")
_STATE_DEFERRED = Reply(451, "4.3.0", "Temporary local problem, please try again later")
# Failures of one client address are counted over this long for the failure delay.
AUTH_FAILURE_WINDOW = 3600.0


# the field that makes a connect-stage refusal also a connection refused (obs.metrics)
_REFUSED_AT_CONNECT: dict[str, object] = {"connection": "refused"}


class _Closed(Exception):
    """The conversation is over (QUIT, drop, too many errors, EOF)."""


_DATA_FLAWS = {
    "bare_lf": "SMTP smuggling attempt: bare LF in message data",
    "bare_cr": "SMTP smuggling attempt: bare CR in message data",
    "nul": "SMTP smuggling attempt: NUL in message data",
    "line_too_long": "message line longer than the RFC 5322 limit",
    "size": "message too big",
}
_SMUGGLING = frozenset({"bare_lf", "bare_cr", "nul"})  # the flaws that count as smuggling


@dataclass
class Transaction:
    """What one MAIL ... DATA exchange has gathered so far."""

    sender: str | None = None
    recipients: list[str] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    envelope: Envelope | None = None  # made at DATA, for the spool
    writer: SpoolWriter | None = None
    queue_id: str | None = None
    message_id: str | None = None
    headers: list[str] = field(default_factory=list)  # X-Warning lines of MAIL/RCPT warn rules
    splitter: HeaderSplitter | None = None  # the header section of the message being received
    message_ids: MessageIdFinder | None = None  # its Message-ID (every message, examined or not)
    dkim: str | None = None  # "domain:selector,..." when the message was signed


class Conversation:
    """One client's conversation from the connect rules to the last reply."""

    def __init__(
        self,
        ctx: ConversationContext,
        settings: Settings,
        ip_text: str,
        port: int,
        *,
        observer: Observer | None = None,
        role: Role = Role.SMTP,
        local_ip: str = "",
    ) -> None:
        """``settings``: the rules, clients and domains for the whole conversation, whatever a
        reload does meanwhile; ``ctx``: the process's shared parts (log, queue ids, ...);
        ``role``: what the listener the client came to is for; ``local_ip``: its address."""
        self.ctx = ctx
        self.settings = settings
        self.config = settings.config
        self.policy = settings.policy
        self.relay_policy = settings.relay_policy
        self.ports = settings.session_ports
        self.ip_text = ip_text
        self.port = port
        self.ip = _client_address(ip_text)
        self.observer = observer
        self.role = role
        self.submission = role is not Role.SMTP
        self.local_ip = local_ip
        self.user: str | None = None  # the authenticated user (submission)
        self._auth_failures = 0  # on this connection
        self._sasl: tuple[str, str | None] | None = None  # (mechanism, LOGIN user) in progress
        # The SMTP state machine (``conn``) is built on first use, after the connect rules:
        # a client refused instead of the banner never needs one.
        self.helo: str | None = None
        self.esmtp = False
        self.tls: str | None = None
        self.tx = Transaction()
        self.facts = Facts(
            client_ip=self.ip,
            client_port=port,
            local_domains=settings.relay_policy.local_domains,
            our_names=_our_names(self.config.server.hostname),
            our_ips=settings.our_ips,
        )
        self.facts.results[keys.RELAY_CLIENT] = settings.relay_policy.client_may_relay(self.ip)
        self.delayed: tuple[Stage, Verdict] | None = None  # delay_reject: answered at RCPT
        self._warn_headers: list[str] = []
        self.out: list[bytes] = []  # reply bytes not sent yet
        # pregreet (greeting_delay): whether a connect rule accepted the client, whether this
        # connection waited and kept quiet, and how it went afterwards (see behaved)
        self._connect_accepted = False
        self._waited = False
        self._served = False  # a command other than QUIT was answered 2xx/3xx
        self._refused = False  # a command was answered 5xx (rule, relay, protocol, content)
        self._client_ended = False  # QUIT, or the client closed between commands
        self.incidents: list[tuple[str, int]] = []  # (rule, weight) for the caller to record
        self._counted: set[str] = set()  # rules and events already counted on this connection
        self._unknown_recipients = 0  # RCPTs refused by a ``recipient`` check
        self._refusing_check = ""  # the check of the rule behind the last stage verdict

    @functools.cached_property
    def conn(self) -> SmtpConnection:
        """The SMTP protocol state of this connection (built once, on first use)."""
        limits = self.config.limits
        return SmtpConnection(
            features=Features(
                hostname=self.config.server.hostname,
                max_size=limits.max_message_size,
                starttls=self.settings.tls_context is not None
                and self.role is not Role.SUBMISSIONS,
                auth=self.submission,
                auth_required=self.submission,
            ),
            tls_active=self.role is Role.SUBMISSIONS,
            limits=Limits(
                max_command_line=limits.max_command_line,
                max_text_line=limits.max_text_line,
                max_message_size=limits.max_message_size,
                max_recipients=limits.max_recipients,
                max_errors=limits.max_errors,
            ),
        )

    # -- state the caller reads --------------------------------------------------------------
    @property
    def in_transaction(self) -> bool:
        """A MAIL was accepted or a message is being received (shutdown waits for it)."""
        return self.tx.sender is not None or self.tx.writer is not None

    @property
    def protocol(self) -> str:
        """exim's P= (and RFC 3848's WITH): esmtp, esmtps, esmtpa, esmtpsa..."""
        base = "esmtp" if self.esmtp else "smtp"
        return base + ("s" if self.tls else "") + ("a" if self.user is not None else "")

    # -- log helpers ------------------------------------------------------------------------
    def host_field(self) -> str:
        """exim's ``H=`` field: ``(helo) [ip]:port`` (no PTR lookups in the core)."""
        helo = f"({escape_field(self.helo, 100)}) " if self.helo else ""
        return f"H={helo}[{self.ip_text}]:{self.port}"

    def _sender_field(self) -> str:
        return (
            f" F=<{escape_field(self.tx.sender or '', 200)}>" if self.tx.sender is not None else ""
        )

    # -- before the banner ------------------------------------------------------------------
    async def connect(self) -> bool:
        """The connect rules; False: refused before the banner (the reply is in ``out``)."""
        if self.submission:
            return True  # the perimeter's rules are not the submission port's
        verdict = await self._run_stage(Stage.CONNECT, "")
        if verdict is not None and not self._delay(Stage.CONNECT, verdict):
            self._log_refusal(Stage.CONNECT, "", verdict)
            assert verdict.reply is not None
            self.out.append(verdict.reply.to_bytes())
            return False  # refused before the banner: nothing more is said
        return True

    def _pregreet_key(self) -> str:
        return f"pregreet:{self.ip_text}"

    async def pregreet_delay(self, now: float) -> float:
        """``greeting_delay``: how long the caller waits before the banner, refusing a client
        that talks meanwhile (Postfix postscreen's pregreet test); 0: no wait. None is asked of
        a client that a connect rule accepted or that passed within ``pregreet_pass_ttl``."""
        server = self.config.server
        delay = server.greeting_delay
        if delay <= 0 or self._connect_accepted or self.submission:
            return 0.0
        if server.pregreet_pass_ttl > 0:
            try:
                until = await self.ports.state.pass_until(self._pregreet_key(), now)
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
                return 0.0
        return delay

    def implicit_tls(self, description: str | None) -> None:
        """The handshake of an implicit-TLS listener (465) finished, before the banner."""
        self.tls = description
        self.facts.tls = True

    # -- incidents ---------------------------------------------------------------------------
    def _incident(self, rule: str, weight: int) -> None:
        """Counts ``rule`` once on this connection, with ``weight`` (0: not counted)."""
        if weight > 0 and rule not in self._counted:
            self._counted.add(rule)
            self.incidents.append((rule, weight))

    def auth_failed(self) -> None:
        """An AUTH attempt failed (the hook for SMTP AUTH: ``[incidents] auth_failure``)."""
        self._incident("auth-failure", self.config.incidents.auth_failure)

    def pregreet_spoke(self, early: bytes) -> None:
        """The client sent ``early`` before the banner: refused (the caller closes)."""
        self._incident("pregreet", self.config.incidents.pregreet)
        self.ctx.log.reject(
            f"SMTP protocol synchronization error (input sent without waiting for "
            f"greeting): rejected connection from H=[{self.ip_text}]:{self.port} "
            f'input="{escape_field(early.decode("latin-1"), 60)}"',
            event="refused",
            stage="connect",
            rule="pregreet",
            verb="drop",
            connection="pregreet",
        )
        self.send(Reply(554, "5.5.0", "SMTP synchronization error"))

    def pregreet_waited(self) -> None:
        """The client kept quiet through the whole delay."""
        self._waited = True

    def greet(self) -> None:
        self.ctx.log.event("greeted")
        self.out.append(self.conn.greeting(self.config.server.hostname))

    def behaved(self) -> bool:
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

    async def finish(self, now: float) -> None:
        """After the connection closed: a client that behaved is remembered (pregreet)."""
        if not self.behaved():
            return
        ttl = self.config.server.pregreet_pass_ttl
        try:
            await self.ports.state.remember_pass(self._pregreet_key(), now + ttl, now)
        except StateTempError as exc:
            self.ctx.log.main(
                f"{self.host_field()} pregreet passed, not remembered: {escape_field(exc.reason)}"
            )
            return
        self.ctx.log.main(f"{self.host_field()} pregreet passed, remembered for {ttl:g}s")

    # -- the end, as the caller sees it -------------------------------------------------------
    def shutdown_reply(self) -> Reply:
        return Reply(421, "4.3.2", f"{self.config.server.hostname} Service shutting down")

    def shutting_down(self) -> None:
        """The server is stopping: the client is told to come back."""
        self.send(self.shutdown_reply())

    def timed_out(self, what: str) -> None:
        """A deadline passed (``what``: "SMTP command timeout", ...): 421, the caller closes."""
        self.ctx.log.main(f"{what} on connection from {self.host_field()}{self._sender_field()}")
        self.send(Reply(421, "4.4.2", f"{self.config.server.hostname} {what} - closing connection"))

    # -- policy ------------------------------------------------------------------------------
    async def _run_stage(self, stage: Stage, subject: str) -> Verdict | None:
        """Runs the stage's rules, logs every decision, returns the verdict (None: go on)."""
        rules = self._rules(stage)
        findings = self._findings(stage) if self.facts.message is not None else ()
        if not rules and not findings:
            if self.observer is not None:
                self.observer.stage(stage, subject, StageOutcome(stage))
            return None
        outcome = await evaluate_stage(stage, rules, self.facts, self.ports, findings)
        if outcome.verdict is not None and outcome.decisions:
            last = outcome.decisions[-1]
            self._refusing_check = "" if last.error is not None else last.rule.check.name
        if self.observer is not None:
            self.observer.stage(stage, subject, outcome)
        self._log_decisions(outcome, subject)
        self._log_checks(outcome)
        if stage is Stage.CONNECT:
            self._connect_accepted = outcome.accepted
        target = self._warn_headers if stage in (Stage.CONNECT, Stage.HELO) else self.tx.headers
        for header in outcome.headers:
            if header not in target:
                target.append(header)
        return outcome.verdict

    def _rules(self, stage: Stage) -> tuple[Rule, ...]:
        """The rules of ``stage`` that apply here: on submission, only the virus rule of
        ``[clamd]`` (and the spam kill level with ``spam_scan``) at DATA."""
        rules = self.policy.for_stage(stage)
        if not self.submission:
            return rules
        if stage is not Stage.DATA:
            return ()
        wanted = {"clamd", "spam kill level"} if self.config.submission.spam_scan else {"clamd"}
        return tuple(r for r in rules if r.name in wanted)

    def _findings(self, stage: Stage) -> tuple[Finding, ...]:
        """The findings of ``stage`` worked out here: on submission, the scans alone (no
        inbound SPF/DKIM/DMARC for our own users' mail)."""
        found = self.policy.findings_for(stage)
        if not self.submission:
            return found
        wanted: tuple[type, ...] = (
            (VirusScan, SpamScan) if self.config.submission.spam_scan else (VirusScan,)
        )
        return tuple(f for f in found if isinstance(f, wanted))

    def _delay(self, stage: Stage, verdict: Verdict) -> bool:
        """delay_reject: keep a connect/HELO/MAIL refusal for the first RCPT (not a drop)."""
        if not self.policy.delay_reject or verdict.action is Verb.DROP:
            return False
        if self.delayed is None:
            self.delayed = (stage, verdict)
        if self.observer is not None:
            self.observer.delayed(stage, verdict)
        return True

    def _log_decisions(self, outcome: StageOutcome, subject: str) -> None:
        lines: list[str] = []  # most stages log nothing: the prefix is built only when needed
        results = self.facts.results
        for decision in outcome.decisions:
            if getattr(decision.rule.check, "log_rates", False) and keys.RATELIMIT_RATE in results:
                lines.append(f"rate {results[keys.RATELIMIT_RATE]}")
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

    def _log_checks(self, outcome: StageOutcome) -> None:
        """The stage's checks for the metrics: each rule's time and whether it failed, each
        DNSBL zone's (public names), the spam score after DATA."""
        zones = self.facts.results.pop(keys.DNSBL_TIMINGS)
        score = content.spam_score(self.facts) if outcome.stage is Stage.DATA else None
        if outcome.decisions or zones or score is not None:
            self.ctx.log.event(
                "checks",
                stage=outcome.stage.value,
                rules=[(d.rule.name, d.elapsed, d.error is not None) for d in outcome.decisions],
                zones=zones or (),
                spam_score=score,
            )

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
        if verdict.incident:
            self._incident(verdict.rule, verdict.incident)
        temporarily = "temporarily " if verdict.action is Verb.DEFER else ""
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
            f"{escape_field(verdict.log_message, 400)}",
            event="refused",
            stage=stage.value,
            rule=verdict.rule or "relay",  # the verdicts that are no rule's are relay control's
            verb=verdict.action.value,
            **_REFUSED_AT_CONNECT if stage is Stage.CONNECT else {},
        )

    # -- replies -----------------------------------------------------------------------------
    def send(self, reply: Reply) -> None:
        """Queues ``reply`` in ``out`` (rendered by the SMTP core when it answers a command)."""
        if reply.code >= 500:
            self._refused = True
        elif reply.code < 400 and not self._client_ended:
            self._served = True
        self.out.append(
            self.conn.send_reply(reply) if self.conn.awaiting_reply else reply.to_bytes()
        )

    # -- events ------------------------------------------------------------------------------
    def content(self, data: bytes) -> None:
        """DATA content as it arrives (the hot path: no coroutine, no event object kept)."""
        tx = self.tx
        if tx.writer is not None:
            splitter = tx.splitter
            tx.writer.write(splitter.feed(data) if splitter else data)
            finder = tx.message_ids
            if finder is not None and not finder.done:
                finder.feed(data)

    async def handle(self, event: object) -> Step:
        """Answers one SMTP event (not ``DataChunk``: see :meth:`content`)."""
        try:
            match event:
                case events.Helo():
                    await self._on_helo(event)
                case events.Mail():
                    await self._on_mail(event)
                case events.Rcpt():
                    await self._on_rcpt(event)
                case events.Data():
                    return self._on_data()
                case events.DataEnd():
                    await self._on_data_end(event)
                case events.Rset():
                    self.abort_transaction()
                    self.facts.sender, self.facts.recipient, self.facts.recipients = None, None, []
                    self.facts.tx = Findings()
                    self.send(replies.OK)
                case events.Noop():
                    self.send(replies.OK)
                case events.Quit():
                    self._client_ended = True
                    self.send(
                        Reply(221, "2.0.0", f"{self.config.server.hostname} closing connection")
                    )
                    return Step.CLOSE
                case events.Help():
                    self.send(
                        Reply(
                            214,
                            "2.0.0",
                            "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA "
                            "RSET NOOP QUIT HELP VRFY STARTTLS",
                        )
                    )
                case events.Vrfy():
                    self.send(Reply(252, "2.5.2", "Cannot VRFY user; try RCPT to attempt delivery"))
                case events.Expn():
                    self.send(Reply(502, "5.5.1", "EXPN not available"))
                case events.StartTls():
                    self.send(Reply(220, "2.0.0", "Ready to start TLS"))
                    return Step.START_TLS
                case events.Auth() if self.submission:
                    return await self._on_auth(event)
                case events.AuthResponse():
                    return await self._on_auth_response(event)
                case events.Auth():
                    # exim's line, which fail2ban's stock exim filter matches; the mechanism is
                    # escaped (no quote or bracket), so it cannot end the quotes or forge an
                    # address
                    mechanism = escape_field(event.argument.split(" ")[0], 20)
                    self.ctx.log.reject(
                        f'SMTP protocol error in "AUTH {mechanism}" {self.host_field()} '
                        "AUTH command used when not advertised",
                        event="refused",
                        stage="protocol",
                        rule="auth_not_offered",
                        verb="deny",
                    )
                    self.send(Reply(503, "5.5.1", "Error: authentication not enabled"))
                case events.CommandError():
                    return self._on_command_error(event)
                case events.TooManyErrors():
                    self._incident("too-many-errors", self.config.incidents.protocol_violation)
                    # exim's line, which fail2ban's stock exim filter matches
                    last = escape_field(self.conn.last_command, 100)
                    self.ctx.log.reject(
                        f"SMTP call from {self.host_field()} dropped: "
                        f'too many syntax or protocol errors (last command was "{last}")',
                        event="refused",
                        stage="protocol",
                        rule="too_many_errors",
                        verb="drop",
                    )
                    self.send(event.reply)
                    return Step.CLOSE
                case events.ConnectionClosed():
                    self._client_ended = self.tx.sender is None  # not in the middle of a tx
                    if self.tx.sender is not None:
                        self.ctx.log.main(
                            f"unexpected disconnection while reading SMTP command from "
                            f"{self.host_field()}{self._sender_field()}"
                        )
                    return Step.CLOSE
                case _:
                    raise AssertionError(f"unhandled SMTP event {event!r}")
        except _Closed:
            return Step.CLOSE
        return Step.GO_ON

    async def _on_helo(self, event: events.Helo) -> None:
        self.abort_transaction()
        self.helo = event.name
        self.esmtp = event.extended
        self.facts.helo = event.name
        verdict = None if self.submission else await self._run_stage(Stage.HELO, event.name)
        if verdict is not None and not self._delay(Stage.HELO, verdict):
            self._refuse_stage(Stage.HELO, event.name, verdict)
            return
        self.send(self.conn.helo_reply(event, self.config.server.hostname))

    async def _on_mail(self, event: events.Mail) -> None:
        self.tx = Transaction(sender="" if event.address is None else event.address.text)
        self.facts.sender = self.tx.sender
        self.facts.recipient = None
        self.facts.recipients = []
        self.facts.tx = Findings()  # SPF, DKIM, DMARC and scan results belong to one transaction
        self.facts.message = None
        if self.submission:
            if not await self._submission_sender():
                self.tx = Transaction()
                return
            self.send(replies.SENDER_OK)
            return
        verdict = await self._run_stage(Stage.MAIL, self.tx.sender or "")
        if verdict is not None and not self._delay(Stage.MAIL, verdict):
            self._refuse_stage(Stage.MAIL, self.tx.sender or "", verdict)
            self.tx = Transaction()
            return
        self.send(replies.SENDER_OK)

    async def _on_rcpt(self, event: events.Rcpt) -> None:
        decision = self.relay_policy.decide(
            event.address, self.ip, authenticated=self.user is not None
        )
        if self.observer is not None:
            self.observer.relay(event.address.text, decision)
        if isinstance(decision, Verdict):
            self._refuse_stage(Stage.RCPT, event.address.text, decision)
            return
        rcpt = event.address.text
        if event.address.domain == "":  # RCPT TO:<postmaster> (RFC 5321 4.5.1)
            rcpt = f"postmaster@{self.relay_policy.postmaster_domain}"
        if self.delayed is not None:  # a delayed connect/HELO/MAIL refusal answers here
            if self.observer is not None:
                self.observer.delayed_refusal(self.delayed[1])
            self._refuse_stage(Stage.RCPT, rcpt, self.delayed[1])
            return
        self.facts.recipient = rcpt
        if self.submission:
            if not await self._recipient_rate(rcpt):
                return
            verdict = None
        else:
            verdict = await self._run_stage(Stage.RCPT, rcpt)
        if verdict is not None:
            if self._refusing_check == "recipient" and verdict.action is not Verb.DEFER:
                self._unknown_recipients += 1
                incidents = self.config.incidents
                if self._unknown_recipients >= incidents.unknown_recipients_burst:
                    self._incident("unknown-recipients", incidents.unknown_recipients)
            self._refuse_stage(Stage.RCPT, rcpt, verdict)
            return
        self.facts.recipients.append(rcpt)
        self.tx.recipients.append(rcpt)
        self.tx.routes.append(decision)
        self.send(replies.RECIPIENT_OK)

    def _refuse_stage(self, stage: Stage, subject: str, verdict: Verdict) -> None:
        self._log_refusal(stage, subject, verdict)
        assert verdict.reply is not None
        self.send(verdict.reply)
        if verdict.closes:
            raise _Closed

    def _on_command_error(self, event: events.CommandError) -> Step:
        if event.kind == "pipelining":
            self._incident("pipelining", self.config.incidents.protocol_violation)
            self.ctx.log.reject(
                f"SMTP protocol synchronization error (next input sent too soon: pipelining was "
                f"not advertised): rejected connection from {self.host_field()} next "
                f'input="{escape_field(event.pending.decode("latin-1"), 60)}"',
                event="refused",
                stage="protocol",
                rule="pipelining",
                verb="deny" if self.conn.is_open else "drop",
            )
        else:
            self.ctx.log.reject(
                f"SMTP protocol error in {event.kind}: {self.host_field()}{self._sender_field()} "
                f"{escape_field(event.reason, 200)}",
                event="refused",
                stage="protocol",
                rule=event.kind,  # a token of the SMTP core's fixed list, never client text
                verb="deny" if self.conn.is_open else "drop",
            )
        self.send(event.reply)
        return Step.GO_ON if self.conn.is_open else Step.CLOSE

    # -- STARTTLS ----------------------------------------------------------------------------
    def tls_started(self, description: str | None) -> None:
        """The handshake after STARTTLS finished: the conversation starts over (RFC 3207)."""
        self.conn.tls_started()
        self.tls = description
        self.helo = None
        self.facts.tls = True
        self.facts.helo = None
        self.tx = Transaction()

    # -- DATA ------------------------------------------------------------------------------
    def _on_data(self) -> Step:
        tx = self.tx
        if self.ctx.draining:
            self.shutting_down()
            return Step.CLOSE
        tx.queue_id = self.ctx.queue_ids.new()
        tx.envelope = Envelope(
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
        return Step.OPEN_SPOOL

    def spool_opened(self, writer: SpoolWriter) -> None:
        """The caller opened a spool file for ``tx.envelope``: the message may come."""
        tx = self.tx
        if self._examines_content():
            tx.splitter = HeaderSplitter(content.forged_header_filter(self.config))
        tx.message_ids = MessageIdFinder()
        tx.writer = writer
        try:
            writer.write(self._received_header(tx))
            for header in self._warn_headers + tx.headers:
                writer.write(_header_line(header))
        except OSError as exc:
            self.spool_failed(exc)
            return
        self.send(replies.DATA_START)

    def spool_failed(self, exc: OSError) -> None:
        """No spool file for this message: the client tries later."""
        self.ctx.log.panic(f"spool write failed: {exc}")
        self.send(replies.LOCAL_ERROR)
        self.abort_transaction()

    def _examines_content(self) -> bool:
        """Whether anything looks at the message: DATA rules or findings (authentication, a
        scanner). Without them the content goes to the spool untouched, with no parsing."""
        return (
            bool(self._rules(Stage.DATA))
            or bool(self._findings(Stage.DATA))
            or self._signs()  # the From domain chooses the key
        )

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
        tx = self.tx
        writer, tx.writer = tx.writer, None
        if event.flaw is not None or writer is None:
            if writer is not None:
                writer.abort()
            self._log_data_refusal(event)
            self.send(event.suggested_reply)
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
        tx.headers.clear()  # MAIL/RCPT warn headers are written already; DATA ones come now
        verdict = await self._run_stage(Stage.DATA, "")
        if verdict is not None:
            writer.abort()  # refused after the final dot: nothing of it is kept
            if verdict.reply is not None and verdict.reply.code >= 500:
                self._record_dmarc("reject")
            self._log_refusal(Stage.DATA, "", verdict)
            assert verdict.reply is not None
            self.send(verdict.reply)
            self.tx = Transaction()
            if verdict.closes:
                raise _Closed
            return
        signed, signature = await self._sign(writer)
        if not signed:
            return
        added = content.added_headers(self.config, self.facts)
        added += b"".join(_header_line(h) for h in tx.headers)
        if added:
            writer.prepend(added)
        if signature is not None:  # on top of everything: the newest trace comes first
            writer.prepend(signature.lines, first=True)
            added = signature.lines + added
        if added and self.observer is not None:
            self.observer.added_headers(added)
        if tx.message_ids is not None:
            tx.message_id = writer.message_id = tx.message_ids.finish()
        try:
            await writer.commit()
        except OSError as exc:
            self._spool_failed(writer, "commit", exc)
            return
        assert tx.queue_id is not None
        self._log_arrival(tx, event.size)
        self._record_dmarc("none")
        self.ctx.submit(tx.queue_id)
        self.send(Reply(250, "2.0.0", f"Ok: queued as {tx.queue_id}"))
        self.tx = Transaction()

    def _record_dmarc(self, disposition: str) -> None:
        """Keeps the message's DMARC evaluation for our aggregate reports (``[dmarc] reports``)
        with what was done to it: accepted ("none") or refused for good ("reject"). A deferred
        message is not kept: it comes back. The sink never raises."""
        sink = self.ports.dmarc_reports
        if sink is None:
            return
        found = dmarc.evaluation(self.facts, disposition, self.ports.clock.now())
        if found is not None:
            sink.record(found)

    def _signs(self) -> bool:
        """Whether this client's mail is signed: it may relay (``relay_from_hosts``) or it
        authenticated (submission), and ``[dkim]`` has keys."""
        return self.ports.signer is not None and (
            self.user is not None
            or (keys.RELAY_CLIENT in self.facts.results and self.facts.results[keys.RELAY_CLIENT])
        )

    async def _sign(self, writer: SpoolWriter) -> tuple[bool, DkimSignature | None]:
        """DKIM-signs the received message for its From domain, when this client's mail is
        signed: (True, the signature), (True, None) when it goes unsigned (a log line says
        why), (False, None) when a key cannot be used: the message is deferred (451 sent,
        nothing kept) and paniclog names the key file."""
        signer = self.ports.signer
        message = self.facts.message
        if signer is None or message is None or not self._signs():
            return True, None
        qid = self.tx.queue_id
        result, from_domain = dmarc.from_domain(message.get_all("From"))
        domain = signer.signing_domain(from_domain) if from_domain is not None else None
        if domain is None:
            why = (
                f"no key for the From domain {escape_field(from_domain, 200)}"
                if from_domain is not None
                else f"no single From domain ({result})"
            )
            self.ctx.log.main(f"{qid} {self.host_field()} not DKIM-signed: {why}")
            return True, None
        try:
            signature = await signer.sign(writer.received(), domain)
        except SigningKeyError as exc:
            writer.abort()
            self.ctx.log.panic(
                f"{qid} DKIM signing for {domain} failed, message deferred: key file "
                f"{exc.path} {exc.reason}"
            )
            self.ctx.log.reject(
                f"{self.host_field()}{self._sender_field()} temporarily rejected after DATA: "
                f"DKIM key for {domain} unusable",
                event="refused",
                stage="data",
                rule="dkim_key",
                verb="defer",
            )
            self.send(_SIGNING_DEFERRED)
            self.tx = Transaction()
            return False, None
        except OSError as exc:
            self._spool_failed(writer, "read for signing", exc)
            return False, None
        except UnsignableMessage as exc:  # the message itself: it goes unsigned, said so
            self.ctx.log.main(
                f"{qid} {self.host_field()} not DKIM-signed: {escape_field(exc.reason, 200)}"
            )
            return True, None
        self.tx.dkim = f"{signature.domain}:{','.join(signature.selectors)}"
        return True, signature

    def _spool_failed(self, writer: SpoolWriter, step: str, exc: OSError) -> None:
        """The spool could not keep the message: nothing of it stays, the client tries later."""
        writer.abort()
        self.ctx.log.panic(f"{self.tx.queue_id} spool {step} failed: {exc}")
        self.send(replies.LOCAL_ERROR)
        self.tx = Transaction()

    def _log_data_refusal(self, event: events.DataEnd) -> None:
        if event.flaw in _SMUGGLING:
            self._incident("smuggling", self.config.incidents.smuggling)
        what = _DATA_FLAWS.get(event.flaw or "", event.flaw_reason)
        rcpts = ",".join(f"<{escape_field(r, 200)}>" for r in self.tx.recipients)
        self.ctx.log.reject(
            f"{self.host_field()}{self._sender_field()} T={rcpts} rejected after DATA: {what}",
            event="refused",
            stage="data",
            rule=event.flaw if event.flaw in _DATA_FLAWS else "data_error",
            verb="deny",
        )

    def _log_arrival(self, tx: Transaction, size: int) -> None:
        parts = [
            f"{tx.queue_id} <= {escape_field(tx.sender, 200) if tx.sender else '<>'}",
            self.host_field(),
            f"P={self.protocol}",
        ]
        if self.tls:
            parts.append(f"X={self.tls}")
        if self.user is not None:  # exim's A=<authenticator>:<set_id>
            parts.append(f"A={self._auth_name}:{escape_field(self.user, 100)}")
        parts.append(f"S={size}")
        parts.extend(content.log_fields(self.config, self.facts))
        if tx.dkim is not None:
            parts.append(f"DKIM={tx.dkim}")
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
            event="accepted",
        )

    # -- submission: AUTH, senders, rates ----------------------------------------------------
    _auth_name = "plain"  # exim's authenticator name in A= and in failure lines

    async def _on_auth(self, event: events.Auth) -> Step:
        """AUTH PLAIN or LOGIN, already checked by the core (TLS, EHLO, sequence, mechanism)."""
        mechanism = event.mechanism
        initial = event.initial_response
        if mechanism == "PLAIN":
            if initial is None:
                self._sasl = ("PLAIN", None)
                self.send(Reply(334, None, ""))
                return Step.GO_ON
            return await self._plain(initial)
        if initial is None:
            self._sasl = ("LOGIN", None)
            self.send(Reply(334, None, sasl.LOGIN_USERNAME))
            return Step.GO_ON
        return self._login_user(initial)

    async def _on_auth_response(self, event: events.AuthResponse) -> Step:
        state, self._sasl = self._sasl, None
        if state is None:  # a 334 is only ever sent with a state set
            self.send(_AUTH_ABORTED)
            return Step.GO_ON
        if event.text.strip(" ") == "*":
            self.send(_AUTH_ABORTED)
            return Step.GO_ON
        mechanism, login_user = state
        if mechanism == "PLAIN":
            return await self._plain(event.text)
        if login_user is None:
            return self._login_user(event.text)
        try:
            password = sasl.decode(event.text)
        except sasl.SaslError:
            return self._undecodable("LOGIN")
        return await self._check("LOGIN", "", login_user, password)

    def _login_user(self, text: str) -> Step:
        try:
            user = sasl.decode(text)
        except sasl.SaslError:
            return self._undecodable("LOGIN")
        self._sasl = ("LOGIN", user)
        self.send(Reply(334, None, sasl.LOGIN_PASSWORD))
        return Step.GO_ON

    async def _plain(self, text: str) -> Step:
        try:
            authzid, authcid, password = sasl.split_plain(sasl.decode(text))
        except sasl.SaslError:
            return self._undecodable("PLAIN")
        return await self._check("PLAIN", authzid, authcid, password)

    def _undecodable(self, mechanism: str) -> Step:
        self.ctx.log.reject(
            f'SMTP protocol error in "AUTH {mechanism}" {self.host_field()} undecodable response'
        )
        self.send(_AUTH_UNDECODABLE)
        return Step.GO_ON

    async def _check(self, mechanism: str, authzid: str, authcid: str, password: str) -> Step:
        """Asks the back end; 235, 454, or 535 after the failure delay (421 past the limit)."""
        name = mechanism.lower()
        authenticator = self.ports.authenticator
        attempt = AuthAttempt(
            mechanism=mechanism,
            authcid=authcid,
            password=password,
            authzid=authzid,
            client_ip=self.ip_text,
            local_ip=self.local_ip,
            secured=self.conn.tls_active,
        )
        del password
        try:
            if authenticator is None:
                raise ServiceTempError("no authentication back end is configured")
            user = await authenticator.authenticate(attempt)
        except ServiceTempError as exc:
            self.ctx.log.panic(
                f"{name} authenticator temporarily failed for {self._auth_host()}: "
                f"{escape_field(exc.reason, 300)}"
            )
            self.send(_AUTH_TEMP)
            return Step.GO_ON
        if user is not None:
            self.user = user
            self._auth_name = name
            self.send(replies.AUTH_SUCCESSFUL)
            return Step.GO_ON
        self._auth_failures += 1
        self.auth_failed()  # [incidents] auth_failure, once per connection
        await asyncio.sleep(await self._failure_delay())
        # exim's line, in both logs, which fail2ban's stock exim filter counts; never the
        # password, the user name escaped
        self.ctx.log.reject(
            f"{name} authenticator failed for {self._auth_host()}: 535 Incorrect "
            f"authentication data (set_id={escape_field(authcid, 100)})",
            client_ip=self.ip_text,
        )
        self.send(_AUTH_FAILED)
        limit = self.config.submission.max_auth_failures
        if self._auth_failures >= limit:
            self.ctx.log.reject(
                f"SMTP call from {self.host_field()} dropped: too many authentication "
                f"failures ({self._auth_failures}, max_auth_failures={limit})"
            )
            self.out.append(
                Reply(
                    421,
                    "4.7.0",
                    f"{self.config.server.hostname} Too many authentication failures, "
                    "closing connection",
                ).to_bytes()
            )
            return Step.CLOSE
        return Step.GO_ON

    def _auth_host(self) -> str:
        """exim's ``(helo) [ip]:port`` of an authenticator line (no ``H=``)."""
        helo = f"({escape_field(self.helo, 100)}) " if self.helo else ""
        return f"{helo}[{self.ip_text}]:{self.port}"

    async def _failure_delay(self) -> float:
        """failure_delay doubled for each earlier failure of this client address within
        :data:`AUTH_FAILURE_WINDOW`, up to failure_delay_max (counted in the state store, so
        every worker and every connection of the address adds to it)."""
        sub = self.config.submission
        try:
            count = await self.ports.state.rate_hit(
                f"authfail:{self.ip_text}", AUTH_FAILURE_WINDOW, time.time()
            )
        except StateTempError:
            count = self._auth_failures
        return float(min(sub.failure_delay * 2 ** min(count - 1, 30), sub.failure_delay_max))

    async def _submission_sender(self) -> bool:
        """MAIL on submission: the sender must be the user's (``senders`` map), and the user
        under its message rate. False: refused (the reply is sent)."""
        user = self.user
        assert user is not None  # the core refuses MAIL before AUTH
        sender = self.tx.sender or ""
        senders = self.ports.senders
        owns = senders().owns(user, sender) if senders is not None else _own_name(user, sender)
        where = f"{self.host_field()}{self._sender_field()}"
        if not owns:
            self.ctx.log.reject(
                f"{where} rejected MAIL <{escape_field(sender, 200)}>: sender address not owned "
                f"by user {escape_field(user, 100)}"
            )
            self.send(
                Reply(
                    553,
                    "5.7.1",
                    f"<{sender}>: Sender address rejected: not owned by user {user}",
                )
            )
            return False
        limit = self.config.submission.max_messages
        if limit:
            count = await self._user_rate("msg", user, where)
            if count is None:
                return False
            if count > limit:
                self.ctx.log.reject(
                    f"{where} temporarily rejected MAIL <{escape_field(sender, 200)}>: user "
                    f"{escape_field(user, 100)} over its message rate ({count} in "
                    f"{self.config.submission.rate_window:g}s, max_messages={limit})"
                )
                self.send(
                    Reply(450, "4.7.1", f"Error: too many messages from {user}, try again later")
                )
                return False
        return True

    async def _recipient_rate(self, rcpt: str) -> bool:
        """RCPT on submission: whether the user is under its recipient rate (False: the
        refusal is sent)."""
        user = self.user
        limit = self.config.submission.max_recipients
        if user is None or not limit:
            return True
        where = f"{self.host_field()}{self._sender_field()}"
        count = await self._user_rate("rcpt", user, where)
        if count is not None and count <= limit:
            return True
        if count is not None:
            self.ctx.log.reject(
                f"{where} temporarily rejected RCPT <{escape_field(rcpt, 200)}>: user "
                f"{escape_field(user, 100)} over its recipient rate ({count} in "
                f"{self.config.submission.rate_window:g}s, max_recipients={limit})"
            )
            self.send(
                Reply(
                    450,
                    "4.7.1",
                    f"<{rcpt}>: Recipient address rejected: too many recipients from {user}, "
                    "try again later",
                )
            )
        return False

    async def _user_rate(self, what: str, user: str, where: str) -> int | None:
        """One more event of ``user``'s ``what`` rate; None: the store failed (451 sent)."""
        try:
            return await self.ports.state.rate_hit(
                f"submit:{what}:{user}", self.config.submission.rate_window, time.time()
            )
        except StateTempError as exc:
            self.ctx.log.reject(
                f"{where} temporarily rejected: rate of user {escape_field(user, 100)} "
                f"unknown: {escape_field(exc.reason)}"
            )
            self.send(_STATE_DEFERRED)
            return None

    def abort_transaction(self) -> None:
        """Forgets the transaction; a message being received is thrown away."""
        if self.tx.writer is not None:
            self.tx.writer.abort()
        self.tx = Transaction()


def _own_name(user: str, sender: str) -> bool:
    """Without a senders map a user may send as its own login name, when that is an address."""
    return "@" in user and sender.lower() == user.lower()
