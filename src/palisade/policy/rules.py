"""Rules: what the operator configures per stage, and the interface every check implements.

Owns: the stages (the verbs are ``policy.verdict.Verb``), the per-connection facts checks read,
the result a check returns, and the Check protocol. A check gathers facts through ports (DNS,
state store) and says whether its condition holds; it never writes replies, logs or globals.
Only the engine turns a matched rule into a verdict, and only the conversation turns a verdict
into a reply.
Trust: facts come from the network (HELO, addresses) and are untrusted text; checks must treat
them as data, never as patterns or paths.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import ipaddress
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar, cast

from palisade.policy.senders import SenderMap
from palisade.ports import (
    Authenticator,
    Clock,
    DmarcEvaluationSink,
    MessageSource,
    RecipientDirectory,
    Resolver,
    Signer,
    SpamScanner,
    StateStore,
    VirusScanner,
)

T = TypeVar("T")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Stage(enum.Enum):
    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"


class OnError(enum.Enum):
    """What a rule does when its check fails temporarily (DNS timeout, store down)."""

    DEFER = "defer"  # 451 4.4.3: the default of most checks, never a silent accept
    DENY = "deny"  # treat the failure like a match of a deny rule (the seed's exim condition)
    MATCH = "match"  # act as if the condition held, with the rule's own verb
    SKIP = "skip"  # log it and go on to the next rule (documented fail-open; dnsbl/dbl default)


class Key(str, Generic[T]):
    """A typed key of :class:`Results` or :class:`Findings`: a ``str`` (it prints, compares and
    hashes as its name, ``"rdns.names"``) whose type parameter says what it holds. Declare one
    with its type: ``RDNS_NAMES: Key[tuple[str, ...]] = Key("rdns.names")``."""

    __slots__ = ()


class Results:
    """What checks learnt about the connection (Haraka's results store), by typed key, so a
    later check (and check-host) can read it without a second lookup. The connection-wide keys
    are in :mod:`palisade.policy.keys`."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[str, object] = {}

    def __getitem__(self, key: Key[T]) -> T:
        return cast(T, self._values[key])

    def __setitem__(self, key: Key[T], value: T) -> None:
        self._values[key] = value

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def get(self, key: Key[T]) -> T | None:
        return cast("T | None", self._values.get(key))

    def setdefault(self, key: Key[T], default: T) -> T:
        return cast(T, self._values.setdefault(key, default))

    def pop(self, key: Key[T]) -> T | None:
        return cast("T | None", self._values.pop(key, None))

    def __repr__(self) -> str:
        return repr(self._values)


class Findings:
    """The per-transaction findings (SPF, DKIM, DMARC, iprev, scans): one future per typed key,
    filled by :func:`memo`; emptied (replaced) at every MAIL. Each key is declared beside the
    finding it holds (``checks.spf.SPF``, ``checks.content.SPAM``, ...)."""

    __slots__ = ("_futures",)

    def __init__(self) -> None:
        self._futures: dict[str, asyncio.Future[Any]] = {}

    def __getitem__(self, key: Key[T]) -> asyncio.Future[T]:
        return self._futures[key]

    def __setitem__(self, key: Key[T], future: asyncio.Future[T]) -> None:
        self._futures[key] = future

    def __contains__(self, key: object) -> bool:
        return key in self._futures

    def get(self, key: Key[T]) -> asyncio.Future[T] | None:
        return self._futures.get(key)

    def __repr__(self) -> str:
        return repr(self._futures)


@dataclass(frozen=True)
class MessageFacts:
    """The message of a transaction after the final dot, for DATA-stage checks.

    ``headers`` are the header fields as the client sent them (name as written, value unfolded:
    CRLF before continuation lines removed), in order, forged Authentication-Results headers
    already dropped; ``source`` reads the spool copy (our Received header first) from disk.
    """

    headers: tuple[tuple[str, str], ...]
    source: MessageSource
    size: int

    def get_all(self, name: str) -> list[str]:
        """Values of every header field called ``name`` (case-insensitive), in order."""
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]


@dataclass
class Facts:
    """What is known about the connection so far; checks read it, the session fills it."""

    client_ip: IPAddress
    client_port: int
    local_domains: frozenset[str] = frozenset()
    our_names: frozenset[str] = frozenset()  # our hostname(s), lower case
    our_ips: frozenset[IPAddress] = frozenset()
    helo: str | None = None
    tls: bool = False
    sender: str | None = None  # "" is the null sender
    recipient: str | None = None  # the RCPT being checked
    recipients: list[str] = field(default_factory=list)
    # what checks learnt about the connection (typed keys: ``policy.keys``)
    results: Results = field(default_factory=Results)
    # Per-transaction findings (SPF, DKIM, DMARC, scans), emptied at every MAIL; see ``memo``.
    tx: Findings = field(default_factory=Findings)
    message: MessageFacts | None = None  # set after the final dot of DATA

    @functools.cached_property
    def client_ip_text(self) -> str:
        """``str(client_ip)``, converted once per connection (every check and text wants it)."""
        return str(self.client_ip)

    @property
    def sender_domain(self) -> str | None:
        if not self.sender or "@" not in self.sender:
            return None
        return self.sender.rpartition("@")[2].lower().rstrip(".")

    @property
    def recipient_domain(self) -> str | None:
        if not self.recipient or "@" not in self.recipient:
            return None
        return self.recipient.rpartition("@")[2].lower().rstrip(".")


@dataclass(frozen=True)
class Ports:
    """The outside world as checks may see it."""

    resolver: Resolver
    state: StateStore
    clock: Clock
    recipients: RecipientDirectory | None = None  # LDAP; None: the static file alone decides
    spam: SpamScanner | None = None  # spamd or rspamd; None: not configured
    virus: VirusScanner | None = None  # clamd; None: not configured
    signer: Signer | None = None  # DKIM keys of outbound mail; None: [dkim] has no keys
    # SMTP AUTH of submission listeners (password file or Dovecot); None: no submission
    authenticator: Authenticator | None = None
    # the [submission] senders map as it is now (read again when the file changes); None: no map
    senders: Callable[[], SenderMap] | None = None
    # where DMARC evaluations are kept for our aggregate reports; None: [dmarc] reports off
    dmarc_reports: DmarcEvaluationSink | None = None


async def memo(facts: Facts, key: Key[T], compute: Callable[[], Awaitable[T]]) -> T:
    """Computes a per-transaction finding once, however many rules (or the session) ask.

    The first caller starts ``compute``; later callers, even concurrent ones, await the same
    future, and a failure is remembered too, so two rules never see two different answers for
    one message. The future lives in ``facts.tx``, which the session empties at MAIL.
    """
    future: asyncio.Future[T] | None = facts.tx.get(key)
    if future is None:
        future = asyncio.ensure_future(compute())
        facts.tx[key] = future
    return await asyncio.shield(future)


def known(facts: Facts, key: Key[T]) -> T | None:
    """The finding stored under ``key`` if it was computed successfully, else None."""
    future = facts.tx.get(key)
    if future is None or not future.done() or future.cancelled() or future.exception():
        return None
    return future.result()


@dataclass(frozen=True)
class CheckResult:
    """A check's finding. ``matched``: its condition holds (listed, no PTR, pattern found...).

    ``reason`` goes into the log (``$reason``); ``values`` fill ``$name`` placeholders in the
    rule's message and log_message; ``header`` is the text of the X-Warning header a ``warn``
    rule adds.
    """

    matched: bool
    reason: str = ""
    values: Mapping[str, str] = field(default_factory=dict)
    header: str | None = None


NO_MATCH = CheckResult(False)


class CheckError(Exception):
    """The check could not decide right now (a temporary failure): the rule's on_error applies.

    ``zones``: for a blocklist check, the public name of each zone that failed and why, so the
    server can report a failing zone (rate-limited) apart from the per-lookup log line.
    """

    def __init__(self, message: str, zones: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.zones: Mapping[str, str] = dict(zones or {})


class Check(Protocol):
    """One condition, configured by a rule's options.

    Optional attributes, read with the helpers below: ``default_on_error`` (what a rule that
    does not set ``on_error`` does on a temporary failure; ``defer`` unless the check says
    otherwise), ``uses_dns`` (the check asks DNS as configured), ``active_zones`` (blocklist
    zones it would ask, for a failure that is reported per zone).
    """

    name: ClassVar[str]
    stages: ClassVar[frozenset[Stage]]

    async def evaluate(self, facts: Facts, ports: Ports) -> CheckResult: ...


def default_on_error(check: Check) -> OnError:
    """The check's own ``on_error`` default: ``defer`` but for blocklists (``skip``)."""
    value = getattr(check, "default_on_error", OnError.DEFER)
    return value if isinstance(value, OnError) else OnError.DEFER


def uses_dns(check: Check) -> bool:
    """Whether the check, as configured, depends on DNS answers."""
    return getattr(check, "uses_dns", False) is True


def active_zones(check: Check) -> tuple[str, ...]:
    """Public names of the blocklist zones the check asks (empty for other checks)."""
    return tuple(getattr(check, "active_zones", ()))


class CheckFactory(Protocol):
    """Builds a check from a rule's options; raises ``ValueError`` naming a bad option."""

    def __call__(self, options: Mapping[str, Any], lists: ListLookup) -> Check: ...


class ListLookup(Protocol):
    """Named operator lists (files reloaded on change); see :mod:`palisade.policy.lists`."""

    def get(self, name: str) -> Any: ...
