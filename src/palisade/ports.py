"""Ports: the interfaces the policy layer and the server use to reach the outside world.

Owns: ``typing.Protocol`` interfaces and the small value types and exceptions that cross them.
Must not touch: any implementation, any I/O, any other module of the project. This module imports
only the standard library, so that ``policy/`` and ``adapters/`` can both depend on it and on
nothing else (the import-linter contracts in pyproject.toml keep that true).
Trust: values crossing a port come from the network (DNS answers, LDAP entries, scanner replies).
The adapter behind a port normalises them into the plain types declared here and reports failures
as the temporary-error exceptions declared here; callers may rely on those types and nothing else,
but must still treat the *content* (names, TXT strings) as attacker-controlled text.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol, runtime_checkable

__all__ = [
    "AuthAttempt",
    "Authenticator",
    "Block",
    "BlockPolicy",
    "Clock",
    "DkimSignature",
    "DnsAnswer",
    "DnsTempError",
    "DomainTlsPolicy",
    "Firewall",
    "FirewallChange",
    "FirewallError",
    "Incident",
    "IncidentEvent",
    "IncidentOutcome",
    "MessageSource",
    "MtaStsSource",
    "RecipientDirectory",
    "Resolver",
    "Route",
    "ServiceTempError",
    "Signer",
    "SigningKeyError",
    "SpamReport",
    "SpamScanner",
    "StateStore",
    "StateTempError",
    "TlsLevel",
    "TlsResult",
    "TlsResultSink",
    "TlsaRecord",
    "TlsaSource",
    "UnsignableMessage",
    "VirusReport",
    "VirusScanner",
]


# --------------------------------------------------------------------------------------------
# DNS
# --------------------------------------------------------------------------------------------


class DnsTempError(Exception):
    """A lookup could not be completed: "try again later".

    Raised for timeouts (after all retries), SERVFAIL, REFUSED, network errors and malformed
    answers. ``reason`` is a short operator-facing text (never shown to SMTP clients as is).
    A check that gets this error must not treat it as "no record": it defers, or applies the
    documented fail-open for that check.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    """The outcome of one (name, type) lookup that the DNS did answer.

    ``records`` are rendered as text:

    * A / AAAA: the address (``"192.0.2.1"``, ``"2001:db8::1"``, the compressed IPv6 form);
    * MX: ``"<preference> <exchange>."`` with the exchange lowercased, e.g. ``"10 mx.example.com."``
      (a null MX, RFC 7505, is ``"0 ."``);
    * TXT / SPF: the character-strings of one record concatenated and decoded as latin-1 (so any
      byte survives and the text is never rejected for its encoding);
    * PTR / CNAME / NS: the target name, lowercased, without the trailing dot;
    * anything else: the presentation format of the record.

    ``ttl`` is the number of seconds the answer may still be reused (after the adapter's caps).
    ``nxdomain`` is True when the name does not exist; empty ``records`` with ``nxdomain`` False
    means NODATA (the name exists but has no record of that type).

    ``authentic`` is the AD bit of the resolver's answer (RFC 4035 section 3.2.3, asked for
    with AD set in the query as RFC 6840 section 5.7 allows): the resolver says it validated the
    answer with DNSSEC. It means something only when the resolver validates and the path to it
    cannot be tampered with (a validating resolver such as unbound on loopback); the adapter
    reports False unless it was told to trust that path. DANE (RFC 7672) uses TLSA records
    only when this is True.
    """

    records: tuple[str, ...]
    ttl: int
    nxdomain: bool = False
    authentic: bool = False

    @property
    def nodata(self) -> bool:
        """The name exists but has no record of the asked type."""
        return not self.records and not self.nxdomain


@runtime_checkable
class Resolver(Protocol):
    """A caching DNS resolver.

    ``rdtype`` is a mnemonic: A, AAAA, MX, TXT, PTR, CNAME, NS, SPF, SOA, ... CNAME chains are
    followed for every type except CNAME itself. Failures that may go away raise
    :class:`DnsTempError`; NXDOMAIN and NODATA are answers, not errors.
    """

    async def query(self, name: str, rdtype: str) -> DnsAnswer:
        """Look up ``name`` (absolute; a trailing dot is optional) for records of ``rdtype``."""
        ...

    async def ptr(self, ip: str) -> DnsAnswer:
        """Reverse lookup of an IPv4 or IPv6 address (in-addr.arpa / ip6.arpa PTR)."""
        ...


# --------------------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------------------


@runtime_checkable
class Clock(Protocol):
    """Time as the adapters and the policy see it (tests substitute a settable clock)."""

    def now(self) -> float:
        """Wall-clock time in seconds since the epoch (for logs, records, expiry dates)."""
        ...

    def monotonic(self) -> float:
        """Monotonic seconds (for timeouts, cache lifetimes, rate windows)."""
        ...


# --------------------------------------------------------------------------------------------
# Routes: decided once, at RCPT, by relay control; stored per recipient in the spool; obeyed by
# delivery.
# --------------------------------------------------------------------------------------------


class Route(enum.Enum):
    """Where an accepted recipient goes. The value is what the spool stores (``"local"``...).

    Relay control (``palisade.policy.relay``) decides it when it accepts the RCPT; the spool keeps
    it per recipient in the envelope; delivery (``palisade.delivery.router``) follows it without
    looking at the domain again.
    """

    LOCAL = "local"  # a local domain: Maildir
    RELAY = "relay"  # a relay domain: the internal next hop
    OUTBOUND = "outbound"  # any other domain, from relay_from_hosts (or a bounce): the next hop


# --------------------------------------------------------------------------------------------
# Services behind the RCPT and DATA stages: recipient directory (LDAP), spam and virus scanners.
# --------------------------------------------------------------------------------------------


class ServiceTempError(Exception):
    """A service (LDAP, spamd, clamd, rspamd) is down, slow or answered nonsense.

    ``reason`` is an operator-facing text that never contains a secret (no bind password, no
    key); it goes to the log, never to the SMTP client.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@runtime_checkable
class MessageSource(Protocol):
    """The received message as it lies in the spool file (our trace headers first).

    Scanners read it from disk in chunks; nothing needs the whole message in memory.
    """

    @property
    def size(self) -> int:
        """Length in bytes of what ``open`` yields."""
        ...

    def open(self) -> BinaryIO:
        """A new reader positioned at the first byte of the message; the caller closes it."""
        ...


@runtime_checkable
class RecipientDirectory(Protocol):
    """Who exists: the LDAP directory behind the static recipients file."""

    async def exists(self, address: str) -> bool:
        """True when ``address`` (lower-cased ``local@domain``) is a known recipient.

        Raises :class:`ServiceTempError` when the directory cannot answer (every server down,
        timeout, bind refused); never answers False for an outage.
        """
        ...


@dataclass(frozen=True, slots=True)
class SpamReport:
    """A spam scanner's verdict on one message."""

    score: float
    rules: tuple[str, ...] = ()  # names of the rules that hit (SpamAssassin symbols)
    scanner: str = "spamd"


@runtime_checkable
class SpamScanner(Protocol):
    """spamd (SPAMC protocol) or rspamd (HTTP /checkv2)."""

    name: str
    max_size: int  # messages larger than this are not scanned (as spamc's -s)

    async def scan(self, message: MessageSource) -> SpamReport:
        """Scores ``message``; raises :class:`ServiceTempError` when the scanner fails."""
        ...


@dataclass(frozen=True, slots=True)
class VirusReport:
    """A virus scanner's verdict: ``signature`` names what was found (None: clean)."""

    signature: str | None = None

    @property
    def infected(self) -> bool:
        return self.signature is not None


@runtime_checkable
class VirusScanner(Protocol):
    """clamd (INSTREAM)."""

    name: str
    max_size: int  # larger messages are not scanned (clamd's StreamMaxLength would refuse them)

    async def scan(self, message: MessageSource) -> VirusReport:
        """Scans ``message``; raises :class:`ServiceTempError` when the scanner fails."""
        ...


# --------------------------------------------------------------------------------------------
# State store: incidents and blocks (written by the gateway's refusals, ``palisade scan`` and the
# operator; read by the ``history`` check, ``palisade history`` and ``palisade firewall``) and
# rate-limit counters. SQLite by default; Redis when several gateway nodes share state.
# --------------------------------------------------------------------------------------------


class StateTempError(Exception):
    """The store cannot answer right now (locked too long, unreachable): try again later."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class BlockPolicy:
    """When incidents block an address, and for how long (``[incidents]`` in the config).

    An incident counts while it is younger than ``window`` seconds; the weighted count of a key
    reaching ``block_at`` blocks it for ``block_for`` seconds; each later block of the same key
    lasts ``growth`` times the previous one, at most ``block_max`` seconds.
    """

    window: float = 7 * 86400.0  # incidents older than this stop counting
    block_at: int = 10  # weighted count within window that blocks
    block_for: float = 86400.0  # first block's length
    growth: float = 2.0  # each later block of the same key lasts growth x the previous
    block_max: float = 30 * 86400.0  # cap

    def block_length(self, times: int) -> float:
        """Seconds the ``times``-th block of a key lasts (1 for the first)."""
        exponent = max(times - 1, 0)
        try:
            length = self.block_for * self.growth**exponent
        except OverflowError:
            return self.block_max
        return min(length, self.block_max)


@dataclass(frozen=True, slots=True)
class IncidentEvent:
    """One incident: a refusal, a protocol violation, an auth failure found in a log..."""

    key: str  # incident key: "192.0.2.1" or "2001:db8:1:2::/64" (sqlite_state.incident_key)
    at: float
    weight: int
    rule: str  # rule name or source, e.g. "dnsbl", "no-ptr", "dovecot-auth", "pregreet"


@dataclass(frozen=True, slots=True)
class Block:
    """A key refused outright (by the ``history`` check, and by the firewall) until ``until``."""

    key: str
    since: float
    until: float
    times: int  # 1 for a first block, 2 for the second, ...
    reason: str  # e.g. "dnsbl x6, no-ptr x4" (the rules that counted)


@dataclass(frozen=True, slots=True)
class IncidentOutcome:
    """What recording one incident led to."""

    key: str
    count: int  # weighted sum within the window, this one included
    block: Block | None  # the active block after this incident (new or existing), or None
    new_block: bool


@dataclass(frozen=True, slots=True)
class Incident:
    """What the incident database knows of one client (IPv6 clients are kept per /64).

    ``count`` is the weighted sum of the incidents within the store's window, ``first_seen`` /
    ``last_seen`` the oldest and newest of them; ``block`` is the key's active block, if any
    (a blocked key whose incidents have all left the window has ``count`` 0 and the block's
    ``since`` as both times).
    """

    key: str  # "192.0.2.1" or "2001:db8:1:2::/64"
    count: int
    first_seen: float
    last_seen: float
    block: Block | None = None


@runtime_checkable
class StateStore(Protocol):
    """Shared counters. Every method may raise StateTempError."""

    async def get_incident(self, ip: str) -> Incident | None:
        """The record for ``ip`` (an IPv6 address is looked up by its /64), or None."""
        ...

    async def add_incident(self, ip: str, count: int = 1, now: float | None = None) -> Incident:
        """Adds ``count`` matches for ``ip`` (creating the record) and returns the result."""
        ...

    async def remove_incident(self, ip: str) -> bool:
        """Forgets ``ip``; False when there was no record."""
        ...

    async def list_incidents(self) -> list[Incident]:
        """Every record, highest count first."""
        ...

    async def record_incident(
        self,
        ip: str,
        weight: int,
        rule: str,
        now: float,
        policy: BlockPolicy,
        may_block: bool = True,
    ) -> IncidentOutcome:
        """Records ``weight`` incidents of ``rule`` for ``ip`` (its key) at ``now``; blocks the
        key when the weighted count within ``policy.window`` reaches ``policy.block_at`` and
        ``may_block`` (False for protected addresses). An active block is kept as it is."""
        ...

    async def active_blocks(self, now: float) -> list[Block]:
        """Every block still in force at ``now``."""
        ...

    async def incident_events(self, ip: str, since: float) -> list[IncidentEvent]:
        """The incidents of ``ip``'s key stamped after ``since``, oldest first."""
        ...

    async def unblock(self, ip: str) -> bool:
        """Lifts ``ip``'s active block (and forgets what led to it); False when not blocked."""
        ...

    async def rate_hit(self, key: str, window: float, now: float) -> int:
        """Records one event for ``key`` and returns how many fell within the last ``window``
        seconds, this one included."""
        ...

    async def pass_until(self, key: str, now: float) -> float | None:
        """When the pass remembered for ``key`` (e.g. a client that waited for the banner and
        behaved) runs out, or None: never remembered, or expired at ``now``."""
        ...

    async def remember_pass(self, key: str, until: float, now: float) -> None:
        """Remembers a pass for ``key`` until ``until``, replacing an older one. Passes expired
        at ``now`` (of any key) may be forgotten on the way."""
        ...


# --------------------------------------------------------------------------------------------
# Signing: DKIM signatures for outbound mail (dkimpy behind it), with keys loaded per generation.
# --------------------------------------------------------------------------------------------


class SigningKeyError(Exception):
    """A configured key cannot be used (missing, unreadable, not a key): the message must be
    deferred, never sent unsigned. ``path`` names the key file, ``reason`` says what is wrong."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class UnsignableMessage(Exception):
    """The signer cannot parse the message itself (a header section it cannot read): the
    message goes unsigned, and the caller says so in the log. ``reason`` is the signer's text."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class DkimSignature:
    """What a signing produced: the header lines (CRLF-terminated, folded), the d= domain and
    the selectors used, in the order of the lines."""

    lines: bytes
    domain: str
    selectors: tuple[str, ...]


@runtime_checkable
class Signer(Protocol):
    """DKIM signing with the keys of one generation."""

    def signing_domain(self, domain: str) -> str | None:
        """The d= domain that signs mail whose From domain is ``domain`` (itself or its nearest
        parent with a key), or None: no key covers it."""
        ...

    async def sign(self, message: MessageSource, domain: str) -> DkimSignature:
        """Every configured key of ``domain`` signs ``message``; raises
        :class:`SigningKeyError` when one of them cannot be used, :class:`UnsignableMessage`
        when the message cannot be parsed, ``OSError`` when it cannot be read."""
        ...


# --------------------------------------------------------------------------------------------
# Firewall: the kernel's copy of the active blocks (nftables), kept by ``palisade firewall``.
# --------------------------------------------------------------------------------------------


class FirewallError(Exception):
    """The firewall refused a change or could not be reached; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class FirewallChange:
    """What one rebuild or sync did. Keys are canonical: ``192.0.2.1``, ``2001:db8:1:2::/64``."""

    rebuilt: bool
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    renewed: tuple[str, ...] = ()  # re-added with another time-out (a block lengthened)
    invalid: tuple[str, ...] = ()  # keys that are no address or network the firewall takes
    v4: int = 0  # elements in force after the change, IPv4 addresses
    v6: int = 0  # and IPv6 /64 networks
    error: str = ""  # why a difference batch failed, when a rebuild followed it


class Firewall(Protocol):
    """Blocked keys and the time each block ends (epoch seconds): ``wanted`` is the whole set.
    Every method may raise FirewallError."""

    def rebuild(self, wanted: Mapping[str, float], now: float) -> FirewallChange:
        """Replaces everything the firewall holds with ``wanted``, at once."""
        ...

    def sync(self, wanted: Mapping[str, float], now: float) -> FirewallChange:
        """Adds and removes what differs from ``wanted``; rebuilds when it cannot."""
        ...

    def remove(self) -> bool:
        """Removes every block and rule; False when there was nothing."""


# --------------------------------------------------------------------------------------------
# Authentication of submission clients (SMTP AUTH): a password file or Dovecot's auth socket.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthAttempt:
    """One SMTP AUTH exchange, decoded: what the client claimed and where it came from.

    ``password`` is a secret: it is never logged and never put in an exception text; the
    dataclass ``repr`` leaves it out.
    """

    mechanism: str  # "PLAIN" or "LOGIN"
    authcid: str  # the user name as the client gave it
    password: str = field(repr=False)  # never logged, never in an exception text
    authzid: str  # PLAIN's authorization identity ("" when absent)
    client_ip: str
    local_ip: str
    secured: bool  # TLS in force on the connection


@runtime_checkable
class Authenticator(Protocol):
    """Checks a user name and password: the password file or Dovecot's auth socket."""

    async def authenticate(self, attempt: AuthAttempt) -> str | None:
        """The authenticated user name as the back end knows it, or None for wrong
        credentials (unknown user included). Raises :class:`ServiceTempError` when the back end
        cannot answer (socket gone, timeout, protocol error)."""
        ...


# --------------------------------------------------------------------------------------------
# Outbound TLS policy (issue 15): what a destination demands, where that came from, and what
# happened. The MX delivery (palisade.delivery) enforces it; MTA-STS and DANE lookups supply
# it; the TLS-RPT recorder keeps the results for the daily report. Shared here because the
# MTA-STS fetcher is an adapter (it may import ports only).
# --------------------------------------------------------------------------------------------


class TlsLevel(enum.Enum):
    """How much TLS a destination gets. Only ``OPPORTUNISTIC`` may ever fall back to cleartext.

    ``REQUIRE``: encrypted, certificate not checked (Postfix ``encrypt``); ``VERIFY``: chain to
    a trusted CA and the MX name in the certificate (``secure``, and what MTA-STS enforces);
    ``DANE``: the certificate matches the MX host's DNSSEC-authenticated TLSA records (RFC 7672).
    """

    OPPORTUNISTIC = "opportunistic"
    REQUIRE = "require"
    VERIFY = "verify"
    DANE = "dane"


@dataclass(frozen=True, slots=True)
class DomainTlsPolicy:
    """The policy for one recipient domain, before looking at its MX hosts.

    ``source``: "default" (the ``[outbound] tls`` setting), "config" (a per-domain setting),
    "mta-sts" (a fetched policy). ``mx_patterns``: MTA-STS ``mx:`` lines; with them, only MX
    hosts matching one are used (empty: any). ``testing``: an MTA-STS policy in ``mode:
    testing``: failures are reported, delivery goes on as opportunistic. ``on_failure``: "fail"
    (DSN at once) or "defer" (retry). ``policy_strings``: the policy text lines for TLS-RPT.
    """

    level: TlsLevel
    source: str = "default"
    mx_patterns: tuple[str, ...] = ()
    testing: bool = False
    on_failure: str = "fail"
    policy_strings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TlsaRecord:
    """One TLSA record (RFC 6698): usage (2 DANE-TA, 3 DANE-EE), selector (0 full
    certificate, 1 SubjectPublicKeyInfo), matching type (0 exact, 1 SHA-256, 2 SHA-512)."""

    usage: int
    selector: int
    mtype: int
    data: bytes


@runtime_checkable
class MtaStsSource(Protocol):
    """MTA-STS policies (RFC 8461), fetched over HTTPS and cached by ``max_age``."""

    async def policy(self, domain: str) -> DomainTlsPolicy | None:
        """The domain's policy in force (``mode: enforce`` -> VERIFY, ``testing`` -> testing),
        or None: no policy, ``mode: none``, or no valid policy could be had (then the caller
        delivers as without one and the failure is reported)."""
        ...


@runtime_checkable
class TlsaSource(Protocol):
    """DANE TLSA records of an MX host, only when DNSSEC-authenticated."""

    async def tlsa(self, host: str, port: int) -> tuple[TlsaRecord, ...] | None:
        """The usable authenticated TLSA records of ``_port._tcp.host``, or None when the
        answer is not authenticated (no AD bit) or holds no usable record (no DANE: the
        domain policy applies). Raises :class:`DnsTempError` when the lookup fails (the
        delivery defers: a lookup failure must not downgrade a DANE destination)."""
        ...


@dataclass(frozen=True, slots=True)
class TlsResult:
    """The TLS outcome of one delivery session, for TLS-RPT (RFC 8460).

    ``policy_type``: "sts", "tlsa" or "no-policy-found"; ``failure_type`` one of RFC 8460's
    result types ("starttls-not-supported", "certificate-host-mismatch",
    "certificate-expired", "certificate-not-trusted", "validation-failure", "tlsa-invalid",
    "dnssec-invalid", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid")
    or None on success.
    """

    domain: str
    policy_type: str
    policy_strings: tuple[str, ...]
    mx_host: str
    ip: str
    success: bool
    failure_type: str | None = None
    detail: str = ""
    time: float = 0.0


@runtime_checkable
class TlsResultSink(Protocol):
    """Keeps TLS results for the daily TLS-RPT report. Must never block or raise."""

    def record(self, result: TlsResult) -> None:
        """Keeps one result."""
        ...


# --------------------------------------------------------------------------------------------
# DMARC aggregate reporting (RFC 7489 section 7.2): what the gateway decided, kept for the report.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DmarcEvaluation:
    """One DMARC evaluation of an inbound message that met a DMARC record, with what the
    aggregate report says of it (the fields of RFC 7489 appendix C's ``record``).

    ``disposition`` is what the gateway applied ("none": accepted, "reject": refused after
    DATA); ``requested`` what the policy asked (p or sp after the pct sample). ``dkim`` holds
    ``(domain, selector, result)`` per signature; ``spf_scope`` is "mfrom" or "helo". ``rua``
    the record's rua URIs as published (``mailto:a@b.example!10m``). Text fields are the
    sender's and were cleaned by the checks that made them.
    """

    time: float
    source_ip: str
    header_from: str
    envelope_from: str
    result: str
    spf_aligned: bool
    dkim_aligned: bool
    spf_domain: str
    spf_result: str
    spf_scope: str
    dkim: tuple[tuple[str, str, str], ...]
    policy_domain: str
    p: str
    sp: str
    adkim: str
    aspf: str
    pct: int
    requested: str
    disposition: str
    sampled: bool
    rua: tuple[str, ...]


@runtime_checkable
class DmarcEvaluationSink(Protocol):
    """Keeps DMARC evaluations for the daily aggregate report. Must never block for long or
    raise: a full disk costs the report, never the SMTP reply."""

    def record(self, evaluation: DmarcEvaluation) -> None:
        """Keeps one evaluation."""
        ...
