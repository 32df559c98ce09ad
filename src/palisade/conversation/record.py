"""Policy facts: what one connection's checks were told, as one JSON line, and the recorded
world that answers the same questions again (``[record] facts``, ``palisade replay``).

Owns: the format of a facts line and both of its ends --

* :class:`ConnectionRecorder` (the server's session makes one per inbound connection when
  ``[record] facts`` is set): it wraps the connection's ports so that every answer a check
  gets is kept, keyed by what was asked (each DNS name and type -> records, NXDOMAIN or the
  temporary error; each rate counter and window -> the counts, in order; each incident-history
  lookup; each recipient-directory lookup), watches the conversation as its
  :class:`~palisade.conversation.Observer` (each stage's subject and verdict), keeps the
  transaction's findings after DATA (SPF, DKIM, DMARC, iprev, the spam and virus reports) and
  the few header fields the DATA checks read (From, Sender, Reply-To, Message-ID), and renders
  it all as one line with the connection's decision (:func:`decide`);
* :class:`RecordedWorld`: ports that answer from one such line -- a resolver, a state store, a
  recipient directory and scanners that never touch the network. A question the line does not
  hold is an *unknown*: it is noted (:attr:`RecordedWorld.unknown`) and answered as a temporary
  failure, never asked of the world. A rate counter the line does not hold is counted over the
  replayed traffic itself (:class:`TrafficRates`) and noted as *estimated*.

What a line never holds: a message body, a password, a Spamhaus DQS key (it is replaced by
``{key}`` in query names, both when recording and when replaying).
Must not touch: files and sockets (the session writes the line, ``cli.replay`` reads it); the
decisions themselves stay the engine's and the conversation's.
Trust: a line read back is operator-supplied JSON that may be broken or hostile: every field is
checked by type when decoded (:class:`RecordError` names the field); texts from it reach the
conversation as a client's would (parsed by the SMTP grammar, escaped in logs).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import ipaddress
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from palisade.policy.checks.authres import IPREV, IprevOutcome
from palisade.policy.checks.content import SPAM, VIRUS
from palisade.policy.checks.dkim import DKIM, DkimOutcome, DkimSignatureResult
from palisade.policy.checks.dmarc import DMARC, DmarcOutcome
from palisade.policy.checks.spf import SPF, SPF_HELO, SpfOutcome
from palisade.policy.engine import StageOutcome
from palisade.policy.rules import CheckError, Facts, Key, Ports, Stage
from palisade.policy.verdict import Verdict
from palisade.ports import (
    Block,
    BlockPolicy,
    DnsAnswer,
    DnsTempError,
    Incident,
    IncidentEvent,
    IncidentOutcome,
    MessageSource,
    RecipientDirectory,
    Resolver,
    Route,
    ServiceTempError,
    SpamReport,
    StateStore,
    StateTempError,
    VirusReport,
)

__all__ = [
    "FORMAT",
    "HEADERS",
    "ConnectionRecorder",
    "RecordError",
    "RecordedWorld",
    "StepLog",
    "TrafficRates",
    "decide",
    "parse_line",
]

FORMAT = 1  # the "v" of every line; a reader refuses another
HEADERS = ("From", "Sender", "Reply-To", "Message-ID")  # what DATA checks read of the header
KEY_PLACEHOLDER = "{key}"
# one encoder for every line (json.dumps with options would build a new one each time)
_ENCODE = json.JSONEncoder(separators=(",", ":"), default=str).encode


class RecordError(ValueError):
    """A facts line that cannot be used: ``str(exc)`` says which field and why."""


# --------------------------------------------------------------------------------------------
# Keys and codecs
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8192)  # the same clients and zones come back
def dns_key(name: str, rdtype: str, secrets: tuple[str, ...] = ()) -> str:
    """``name TYPE`` as recorded: lower case, no trailing dot, secrets (DQS keys) replaced."""
    text = name.lower().rstrip(".")
    for secret in secrets:
        if secret:
            text = text.replace(secret.lower(), KEY_PLACEHOLDER)
    return f"{text} {rdtype}" if rdtype.isupper() else f"{text} {rdtype.upper()}"


@functools.lru_cache(maxsize=4096)
def ptr_key(ip: str) -> str:
    """The key of a reverse lookup: the in-addr.arpa / ip6.arpa name, type PTR."""
    try:
        name = ipaddress.ip_address(ip).reverse_pointer
    except ValueError:
        name = ip
    return dns_key(name, "PTR")


def rate_key(key: str, window: float) -> str:
    return f"{key} {window:g}"


def _answer(answer: DnsAnswer) -> dict[str, Any]:
    if answer.nxdomain:
        return {"nx": True}
    return {"r": list(answer.records)}


def _incident(incident: Incident | None) -> dict[str, Any] | None:
    return None if incident is None else asdict(incident)


def _decode_incident(data: Any, where: str) -> Incident | None:
    if data is None:
        return None
    try:
        block = data.get("block")
        return Incident(
            key=str(data["key"]),
            count=int(data["count"]),
            first_seen=float(data["first_seen"]),
            last_seen=float(data["last_seen"]),
            block=None if block is None else Block(**block),
        )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise RecordError(f"{where}: not an incident record ({exc})") from None


_FINDINGS: tuple[tuple[str, Key[Any]], ...] = (
    ("spf", SPF),
    ("spf_helo", SPF_HELO),
    ("dkim", DKIM),
    ("dmarc", DMARC),
    ("iprev", IPREV),
    ("spam", SPAM),
    ("virus", VIRUS),
)
# Findings that cannot be worked out again without the message itself: computed afresh in a
# replay (no recording of them) they would be guesses, so they make the connection unknown.
_MESSAGE_FINDINGS = frozenset({"dkim", "dmarc", "spam", "virus"})


def _finding(future: asyncio.Future[Any]) -> dict[str, Any] | None:
    """One memoised finding as JSON (None: not finished, so nothing to say)."""
    if not future.done() or future.cancelled():
        return None
    error = future.exception()
    if error is not None:
        return {"err": str(error)[:300]}
    value = future.result()
    return {"ok": None if value is None else asdict(value)}


def _decode_finding(name: str, data: Any) -> Any:
    if name == "spf" or name == "spf_helo":
        return SpfOutcome(**data)
    if name == "dkim":
        return DkimOutcome(tuple(DkimSignatureResult(**s) for s in data["signatures"]))
    if name == "dmarc":
        return DmarcOutcome(**data)
    if name == "iprev":
        return IprevOutcome(data["result"], data["ip"], tuple(data["names"]), data["reason"])
    if name == "spam":
        return (
            None
            if data is None
            else SpamReport(data["score"], tuple(data["rules"]), data["scanner"])
        )
    return None if data is None else VirusReport(data["signature"])


def _verdict(verdict: Verdict | None) -> dict[str, Any] | None:
    if verdict is None:
        return None
    reply = verdict.reply
    return {
        "rule": verdict.rule or "relay",  # the verdicts that are no rule's are relay control's
        "verb": verdict.action.value,
        "code": reply.code if reply is not None else 0,
        "text": str(reply.text)[:300] if reply is not None else "",
    }


# --------------------------------------------------------------------------------------------
# Steps and the decision
# --------------------------------------------------------------------------------------------


def decide(steps: list[dict[str, Any]], *, text: bool = True) -> dict[str, Any]:
    """The connection's decision from its steps: ``accepted`` when a message passed DATA (or,
    with no DATA, a recipient was accepted), or when nothing was refused at all; else
    ``refused``, with the refusal that decided (the DATA refusal when there was one, else the
    first refusal): its stage, rule, verb, reply code and (with ``text``) reply text."""
    datas = [s for s in steps if s["s"] == "data"]
    if any(s.get("v") is None for s in datas):
        return {"result": "accepted"}
    if not datas and any(s["s"] == "rcpt" and s.get("v") is None for s in steps):
        return {"result": "accepted"}
    refusals = [s for s in steps if s.get("v") is not None and not s.get("delayed")]
    if not refusals:
        return {"result": "accepted"}
    deciding = datas[0] if datas else refusals[0]
    verdict = deciding["v"]
    decision = {"result": "refused", "stage": deciding["s"], "rule": verdict.get("rule")}
    decision["verb"], decision["code"] = verdict.get("verb"), verdict.get("code")
    if text:
        decision["text"] = verdict.get("text")
    return decision


def _NO_ESMTP() -> bool:
    return True


class StepLog:
    """The conversation's observer: each stage's subject and verdict, in order (the steps of a
    facts line). ``facts`` is the conversation's (set right after it is made)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.facts: Facts | None = None
        self.esmtp: Callable[[], bool] = lambda: True

    def stage(self, stage: Stage, subject: str, outcome: StageOutcome) -> None:
        verdict = _verdict(outcome.verdict)
        if stage is Stage.RCPT:
            if self.steps and self.steps[-1]["s"] == "rcpt":
                self.steps[-1]["v"] = verdict
            return
        step: dict[str, Any] = {"s": stage.value, "v": verdict}
        facts = self.facts
        if stage is Stage.HELO:
            step["helo"] = subject
            step["ext"] = self.esmtp()
            step["tls"] = bool(facts is not None and facts.tls)
        elif stage is Stage.MAIL:
            step["from"] = subject
        elif stage is Stage.DATA and facts is not None:
            self._data(step, facts)
        self.steps.append(step)

    def _data(self, step: dict[str, Any], facts: Facts) -> None:
        message = facts.message
        if message is not None:
            step["size"] = message.size
            step["hdr"] = {
                name: [v[:998] for v in message.get_all(name)[:5]]
                for name in HEADERS
                if message.get_all(name)
            }
        found: dict[str, Any] = {}
        for name, key in _FINDINGS:
            future = facts.tx.get(key)
            if future is not None and (value := _finding(future)) is not None:
                found[name] = value
        step["find"] = found

    def delayed(self, stage: Stage, verdict: Verdict) -> None:
        if self.steps:
            self.steps[-1]["delayed"] = True

    def relay(self, recipient: str, decision: Route | Verdict) -> None:
        verdict = _verdict(decision) if isinstance(decision, Verdict) else None
        self.steps.append({"s": "rcpt", "to": recipient, "v": verdict})

    def delayed_refusal(self, verdict: Verdict) -> None:
        if self.steps:
            self.steps[-1]["v"] = _verdict(verdict)

    def added_headers(self, lines: bytes) -> None:
        pass


# --------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------


class _RecordingResolver:
    """The connection's resolver, keeping the first answer to each question."""

    __slots__ = ("_answers", "_inner", "_secrets")

    def __init__(self, inner: Resolver, answers: dict[str, Any], secrets: tuple[str, ...]):
        self._inner = inner
        self._answers = answers
        self._secrets = secrets

    async def query(self, name: str, rdtype: str) -> DnsAnswer:
        try:
            answer = await self._inner.query(name, rdtype)
        except DnsTempError as exc:
            self._answers.setdefault(dns_key(name, rdtype, self._secrets), {"err": exc.reason})
            raise
        self._answers.setdefault(dns_key(name, rdtype, self._secrets), _answer(answer))
        return answer

    async def ptr(self, ip: str) -> DnsAnswer:
        try:
            answer = await self._inner.ptr(ip)
        except DnsTempError as exc:
            self._answers.setdefault(ptr_key(ip), {"err": exc.reason})
            raise
        self._answers.setdefault(ptr_key(ip), _answer(answer))
        return answer


class _RecordingState:
    """The connection's state store, keeping the rate counts and incident records it gave."""

    __slots__ = ("_history", "_inner", "_rates")

    def __init__(self, inner: StateStore, rates: dict[str, list[Any]], history: dict[str, Any]):
        self._inner = inner
        self._rates = rates
        self._history = history

    async def rate_hit(self, key: str, window: float, now: float) -> int:
        counts = self._rates.setdefault(rate_key(key, window), [])
        try:
            count = await self._inner.rate_hit(key, window, now)
        except StateTempError as exc:
            counts.append({"err": exc.reason})
            raise
        counts.append(count)
        return count

    async def get_incident(self, ip: str) -> Incident | None:
        try:
            incident = await self._inner.get_incident(ip)
        except StateTempError as exc:
            self._history.setdefault(ip, {"err": exc.reason})
            raise
        self._history.setdefault(ip, {"ok": _incident(incident)})
        return incident

    # the rest goes through untouched (no check asks them)
    async def add_incident(self, ip: str, count: int = 1, now: float | None = None) -> Incident:
        return await self._inner.add_incident(ip, count, now)

    async def remove_incident(self, ip: str) -> bool:
        return await self._inner.remove_incident(ip)

    async def list_incidents(self) -> list[Incident]:
        return await self._inner.list_incidents()

    async def record_incident(
        self,
        ip: str,
        weight: int,
        rule: str,
        now: float,
        policy: BlockPolicy,
        may_block: bool = True,
    ) -> IncidentOutcome:
        return await self._inner.record_incident(ip, weight, rule, now, policy, may_block)

    async def active_blocks(self, now: float) -> list[Block]:
        return await self._inner.active_blocks(now)

    async def incident_events(self, ip: str, since: float) -> list[IncidentEvent]:
        return await self._inner.incident_events(ip, since)

    async def unblock(self, ip: str) -> bool:
        return await self._inner.unblock(ip)

    async def pass_until(self, key: str, now: float) -> float | None:
        return await self._inner.pass_until(key, now)

    async def remember_pass(self, key: str, until: float, now: float) -> None:
        await self._inner.remember_pass(key, until, now)


class _RecordingDirectory:
    __slots__ = ("_answers", "_inner")

    def __init__(self, inner: RecipientDirectory, answers: dict[str, Any]) -> None:
        self._inner = inner
        self._answers = answers

    async def exists(self, address: str) -> bool:
        try:
            found = await self._inner.exists(address)
        except ServiceTempError as exc:
            self._answers.setdefault(address, {"err": exc.reason})
            raise
        self._answers.setdefault(address, found)
        return found


class _Settings:
    """A generation seen through one connection's recording ports (``conversation.Settings``)."""

    __slots__ = ("config", "our_ips", "policy", "relay_policy", "session_ports", "tls_context")

    def __init__(self, settings: Any, ports: Ports) -> None:
        self.config = settings.config
        self.policy = settings.policy
        self.relay_policy = settings.relay_policy
        self.tls_context = settings.tls_context
        self.our_ips = settings.our_ips
        self.session_ports = ports


class ConnectionRecorder(StepLog):
    """Everything one inbound connection's checks were told, for one facts line."""

    def __init__(self, settings: Any, ip: str, port: int, secrets: tuple[str, ...]) -> None:
        """``settings``: the generation the connection began with (``conversation.Settings``);
        ``secrets``: texts that must never be written (the DQS keys)."""
        super().__init__()
        self.started = time.time()
        self.ip = ip
        self.port = port
        self.dns: dict[str, Any] = {}
        self.rates: dict[str, list[Any]] = {}
        self.history: dict[str, Any] = {}
        self.directory: dict[str, Any] = {}
        ports: Ports = settings.session_ports
        recipients = ports.recipients
        self.settings = _Settings(
            settings,
            Ports(  # not dataclasses.replace: this runs for every connection
                resolver=_RecordingResolver(ports.resolver, self.dns, secrets),
                state=_RecordingState(ports.state, self.rates, self.history),
                clock=ports.clock,
                recipients=None
                if recipients is None
                else _RecordingDirectory(recipients, self.directory),
                spam=ports.spam,
                virus=ports.virus,
                signer=ports.signer,
                authenticator=ports.authenticator,
                senders=ports.senders,
            ),
        )

    def watch(self, conversation: Any) -> None:
        """Follows ``conversation`` (made with :attr:`settings` and this observer) until
        :meth:`line`, which lets go of it: no reference cycle keeps a finished conversation
        for the garbage collector to find."""
        self.facts = conversation.facts
        self.esmtp = lambda: bool(conversation.esmtp)

    def line(self) -> bytes:
        """The facts line (ASCII JSON and a newline)."""
        record: dict[str, Any] = {
            "v": FORMAT,
            "t": round(self.started, 3),
            "ip": self.ip,
            "port": self.port,
            "steps": self.steps,
            "decision": decide(self.steps, text=False),  # the deciding step holds the text
        }
        if self.dns:
            record["dns"] = self.dns
        if self.rates:
            record["rates"] = self.rates
        if self.history:
            record["history"] = self.history
        if self.directory:
            record["recipients"] = self.directory
        self.facts, self.esmtp = None, _NO_ESMTP  # the conversation is done with
        return _ENCODE(record).encode("ascii") + b"\n"


# --------------------------------------------------------------------------------------------
# Reading a line back
# --------------------------------------------------------------------------------------------


_STEP_FIELDS: dict[str, tuple[tuple[str, type | tuple[type, ...]], ...]] = {
    "connect": (),
    "helo": (("helo", str),),
    "mail": (("from", str),),
    "rcpt": (("to", str),),
    "data": (),
}


def parse_line(text: str) -> dict[str, Any]:
    """One facts line, checked; raises :class:`RecordError` saying what is wrong."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(f"not JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(record, dict):
        raise RecordError("not a JSON object")
    if record.get("v") != FORMAT:
        raise RecordError(f'"v": expected {FORMAT}, got {record.get("v")!r}')
    fields: tuple[tuple[str, type | tuple[type, ...]], ...] = (
        ("t", (int, float)),
        ("ip", str),
        ("steps", list),
    )
    for name, kind in fields:
        if not isinstance(record.get(name), kind):
            raise RecordError(f'"{name}": missing or of the wrong type')
    try:
        ipaddress.ip_address(record["ip"])
    except ValueError:
        raise RecordError(f'"ip": not an IP address: {record["ip"]!r}') from None
    for number, step in enumerate(record["steps"], 1):
        where = f'"steps"[{number}]'
        if not isinstance(step, dict) or step.get("s") not in _STEP_FIELDS:
            raise RecordError(f"{where}: expected an object with s = one of {list(_STEP_FIELDS)}")
        for name, kind in _STEP_FIELDS[step["s"]]:
            if not isinstance(step.get(name), kind):
                raise RecordError(f'{where}: "{name}" missing or of the wrong type')
        verdict = step.get("v")
        if verdict is not None and not (
            isinstance(verdict, dict) and isinstance(verdict.get("rule"), str)
        ):
            raise RecordError(f'{where}: "v": expected null or a verdict object')
    for name in ("dns", "rates", "history", "recipients"):
        if not isinstance(record.get(name, {}), dict):
            raise RecordError(f'"{name}": expected an object')
    if not isinstance(record.get("decision", {}), dict):
        raise RecordError('"decision": expected an object')
    return record


# --------------------------------------------------------------------------------------------
# The recorded world
# --------------------------------------------------------------------------------------------


class TrafficRates:
    """Rate counters the facts do not hold, counted over the replayed connections themselves
    (each evaluation adds one, as ``StateStore.rate_hit`` does), by their recorded times."""

    def __init__(self) -> None:
        self._events: dict[str, collections.deque[float]] = {}

    def hit(self, key: str, window: float, now: float) -> int:
        events = self._events.setdefault(key, collections.deque())
        events.append(now)
        while events and events[0] <= now - window:
            events.popleft()
        return len(events)


class _Clock:
    __slots__ = ("_at",)

    def __init__(self, at: float) -> None:
        self._at = at

    def now(self) -> float:
        return self._at

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass
class RecordedWorld:
    """Ports answering from one facts line; :attr:`unknown` lists the questions it could not
    answer, :attr:`estimated` the rate counters counted over the replayed traffic."""

    record: Mapping[str, Any]
    secrets: tuple[str, ...] = ()
    traffic: TrafficRates = field(default_factory=TrafficRates)
    unknown: list[str] = field(default_factory=list)
    estimated: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rates = {
            k: collections.deque(v)
            for k, v in self.record.get("rates", {}).items()
            if isinstance(v, list)
        }

    def _unknown(self, question: str) -> None:
        if question not in self.unknown:
            self.unknown.append(question)

    # -- Resolver
    async def query(self, name: str, rdtype: str) -> DnsAnswer:
        return self._dns(dns_key(name, rdtype, self.secrets))

    async def ptr(self, ip: str) -> DnsAnswer:
        return self._dns(ptr_key(ip))

    def _dns(self, key: str) -> DnsAnswer:
        answer = self.record.get("dns", {}).get(key)
        if not isinstance(answer, dict):
            self._unknown(f"DNS {key}")
            raise DnsTempError(f"not recorded: {key}")
        if "err" in answer:
            raise DnsTempError(str(answer["err"]))
        records = answer.get("r", [])
        if not isinstance(records, list):
            raise DnsTempError(f"recorded answer to {key} is malformed")
        return DnsAnswer(tuple(str(r) for r in records), 60, bool(answer.get("nx")))

    # -- StateStore (what checks ask)
    async def rate_hit(self, key: str, window: float, now: float) -> int:
        name = rate_key(key, window)
        counts = self._rates.get(name)
        if counts:
            count = counts.popleft()
            if isinstance(count, dict):
                raise StateTempError(str(count.get("err", "recorded failure")))
            return int(count)
        if name not in self.estimated:
            self.estimated.append(name)
        return self.traffic.hit(name, window, now)

    async def get_incident(self, ip: str) -> Incident | None:
        entry = self.record.get("history", {}).get(ip)
        if not isinstance(entry, dict):
            self._unknown(f"incident history of {ip}")
            raise StateTempError(f"not recorded: incident history of {ip}")
        if "err" in entry:
            raise StateTempError(str(entry["err"]))
        return _decode_incident(entry.get("ok"), f'"history" {ip}')

    # -- RecipientDirectory
    async def exists(self, address: str) -> bool:
        found = self.record.get("recipients", {}).get(address)
        if isinstance(found, bool):
            return found
        if isinstance(found, dict) and "err" in found:
            raise ServiceTempError(str(found["err"]))
        self._unknown(f"recipient directory {address}")
        raise ServiceTempError(f"not recorded: recipient directory lookup of {address}")

    def findings(self, step: Mapping[str, Any], facts: Facts) -> set[str]:
        """Puts the findings recorded with a DATA ``step`` into ``facts.tx`` (the memo the DATA
        checks read); returns their names."""
        loop = asyncio.get_running_loop()
        seeded = set()
        found = step.get("find")
        for name, key in _FINDINGS:
            entry = found.get(name) if isinstance(found, dict) else None
            if not isinstance(entry, dict):
                continue
            future: asyncio.Future[Any] = loop.create_future()
            if "err" in entry:
                future.set_exception(CheckError(str(entry["err"])))
                future.exception()  # retrieved: it is the rules' to read, not the loop's
            else:
                try:
                    future.set_result(_decode_finding(name, entry.get("ok")))
                except (KeyError, TypeError, ValueError, AttributeError) as exc:
                    raise RecordError(f'"find" {name}: not a {name} outcome ({exc})') from None
            facts.tx[key] = future
            seeded.add(name)
        return seeded

    def check_findings(self, facts: Facts, seeded: set[str]) -> None:
        """After the DATA stage: a finding that needs the message itself and was worked out
        afresh (not recorded) makes the connection unknown."""
        for name, key in _FINDINGS:
            if name in _MESSAGE_FINDINGS and name not in seeded and key in facts.tx:
                self._unknown(f"{name} of the message")

    def ports(self, *, spam: str | None, virus: str | None) -> Ports:
        """The replay's ports: this world for DNS, state and recipients, a clock at the
        connection's time, scanners (named as the new config's) that only count as unknown."""
        return Ports(
            resolver=self,
            state=_ReplayState(self),
            clock=_Clock(float(self.record["t"])),
            recipients=self,
            spam=None if spam is None else _UnknownScanner(self, spam, SpamReport),
            virus=None if virus is None else _UnknownScanner(self, virus, VirusReport),
        )


class _UnknownScanner:
    """A scanner whose report was not recorded: asked, it makes the connection unknown."""

    def __init__(self, world: RecordedWorld, name: str, kind: type) -> None:
        self.world = world
        self.name = name
        self.max_size = 2**62
        self.kind = kind

    async def scan(self, message: MessageSource) -> Any:
        self.world._unknown(f"{self.name} report")
        raise ServiceTempError(f"{self.name} report not recorded")


class _ReplayState:
    """The recorded world as a whole ``StateStore``: what checks ask is answered from the
    line; the rest (incidents written, passes) is accepted and forgotten."""

    def __init__(self, world: RecordedWorld) -> None:
        self.world = world

    async def rate_hit(self, key: str, window: float, now: float) -> int:
        return await self.world.rate_hit(key, window, now)

    async def get_incident(self, ip: str) -> Incident | None:
        return await self.world.get_incident(ip)

    async def add_incident(self, ip: str, count: int = 1, now: float | None = None) -> Incident:
        raise StateTempError("a replay writes no incident")

    async def remove_incident(self, ip: str) -> bool:
        return False

    async def list_incidents(self) -> list[Incident]:
        return []

    async def record_incident(
        self,
        ip: str,
        weight: int,
        rule: str,
        now: float,
        policy: BlockPolicy,
        may_block: bool = True,
    ) -> IncidentOutcome:
        raise StateTempError("a replay writes no incident")

    async def active_blocks(self, now: float) -> list[Block]:
        return []

    async def incident_events(self, ip: str, since: float) -> list[IncidentEvent]:
        return []

    async def unblock(self, ip: str) -> bool:
        return False

    async def pass_until(self, key: str, now: float) -> float | None:
        return None

    async def remember_pass(self, key: str, until: float, now: float) -> None:
        return None
