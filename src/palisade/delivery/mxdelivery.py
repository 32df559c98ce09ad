"""Delivery to the world: OUTBOUND mail to each recipient domain's MX hosts, over the TLS its
policy demands.

Owns: one attempt for the recipients of one message, grouped by domain (domains in parallel,
at most ``concurrency_per_destination`` deliveries in flight per domain): the domain's TLS
policy, its MX hosts (palisade.delivery.mx), the hosts tried in order, and the TLS-RPT record
of each session. Each (address, MX name, TLS level) is one :class:`SmtpNextHop`, kept between
messages, so its connection cache gives connection reuse per destination host (the code the
``[delivery] next_hop`` uses, not a copy).

Policy, strongest source first (README "Outbound: delivery"): ``[outbound.domains]`` (the
operator's choice, wins over everything), DANE per MX host (authenticated TLSA records from
the optional ``tlsa`` source, matched by ``dane_match``), an MTA-STS policy in ``mode:
enforce`` (``verify``, and only MX hosts matching its ``mx`` patterns), ``[outbound] tls``.
An MTA-STS policy in ``mode: testing`` is tried as ``verify`` and, when that fails, the
delivery goes on at the default level on the same host; the failure is reported.
TLS levels: ``opportunistic`` (STARTTLS when offered, certificate not checked, cleartext when
it is not offered or the handshake fails), ``require`` (encrypted, certificate not checked),
``verify`` (a chain to a trusted CA and the MX name), ``dane`` (the TLSA records). With every
level but opportunistic there is never a cleartext fallback: a host that cannot do it is
skipped for the next one, and when no host could, the recipients fail at once with a DSN that
says why (``on_tls_failure = "fail"``) or are deferred (``"defer"``). When some host could
not be tried at all (connection refused, a TLSA lookup failed), the attempt is deferred instead:
that host may give the TLS later. A host that refuses the
connection, greets with an error or breaks the connection before the transaction is skipped
too; once a host held the transaction, its answers are final for this attempt (RFC 5321
section 5.1 leaves it to the client; like Postfix, a 4xx to MAIL or RCPT is not retried on
another MX at once). The MX hosts from this server's own name (``helo_name``, ``[server]
hostname``) on are never used (section 5.1); when that leaves none, the mail loops: failed 5.4.6.
Must not touch: the spool, the log (the runner does both).
Trust: DNS answers, MTA-STS policies and every reply are remote text: replies stay verbatim in
the results (escaped when logged); TLS-RPT details are the same texts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
import time
from collections.abc import Callable, Mapping, Sequence

from palisade.delivery.mx import MxHost, MxResolver
from palisade.delivery.nexthop import Session, SmtpNextHop, TlsCheck
from palisade.delivery.outcome import Outcome, RecipientResult
from palisade.ports import (
    DnsTempError,
    DomainTlsPolicy,
    MtaStsSource,
    Resolver,
    TlsaRecord,
    TlsaSource,
    TlsLevel,
    TlsResult,
    TlsResultSink,
)
from palisade.spool import Envelope

ROUTER = "dnslookup"  # exim's name for the MX router: R=dnslookup T=smtp
MAX_SESSIONS = (
    10  # hosts x addresses tried per domain and attempt (Postfix smtp_mx_address_limit 5)
)
MAX_HOPS = 512  # hosts kept (with their idle connections) between messages

# (records, the peer's chain as DER leaf first, the MX host name) -> match; the name is for
# DANE-TA records, whose leaf must name the host (palisade.delivery.dane.matches)
DaneMatch = Callable[[tuple[TlsaRecord, ...], list[bytes], str], bool]

# RFC 3463 / RFC 5248: 5.7.10 "Encryption needed", 5.7.5 "Cryptographic failure"
_TLS_STATUS = {"starttls-not-supported": "7.10"}


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 section 4.1: ``mx.example.com`` matches itself; ``*.example.com`` matches
    exactly one more label on the left (``a.example.com``, not ``a.b.example.com`` nor
    ``example.com``). Case-insensitive, trailing dots ignored."""
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, _, rest = host.partition(".")
        return bool(label) and rest == pattern[2:]
    return host == pattern


def insecure_context() -> ssl.SSLContext:
    """A client context that encrypts without checking the certificate (opportunistic,
    require, and DANE, which checks the certificate itself against the TLSA records)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@dataclasses.dataclass
class _TlsFailure:
    host: str
    ip: str
    level: TlsLevel
    failure_type: str
    detail: str


class MxDelivery:
    """The transport for Route.OUTBOUND when ``[outbound] delivery = "mx"``."""

    def __init__(
        self,
        resolver: Resolver,
        *,
        helo_name: str,
        port: int = 25,
        default_level: TlsLevel = TlsLevel.OPPORTUNISTIC,
        domain_levels: Mapping[str, TlsLevel] | None = None,
        on_tls_failure: str = "fail",
        verify_context: ssl.SSLContext | None = None,
        concurrency_per_destination: int = 4,
        mta_sts: MtaStsSource | None = None,
        tlsa: TlsaSource | None = None,
        dane_match: DaneMatch | None = None,
        tls_results: TlsResultSink | None = None,
        connect_timeout: float = 30.0,
        command_timeout: float = 60.0,
        data_timeout: float = 600.0,
        mx: MxResolver | None = None,
        clock: Callable[[], float] = time.time,
        cache_uses: int = 100,
    ) -> None:
        if on_tls_failure not in ("fail", "defer"):
            raise ValueError(f"on_tls_failure: expected fail or defer, got {on_tls_failure!r}")
        self.mx = mx or MxResolver(resolver)
        self.helo_name = helo_name
        self.port = port
        self.default_level = default_level
        self.domain_levels = {
            d.lower().rstrip("."): lvl for d, lvl in (domain_levels or {}).items()
        }
        self.on_tls_failure = on_tls_failure
        self.verify_context = verify_context or ssl.create_default_context()
        self.insecure_context = insecure_context()
        self.concurrency = concurrency_per_destination
        self.mta_sts = mta_sts
        self.tlsa = tlsa if dane_match is not None else None  # DANE needs both halves
        self.dane_match = dane_match
        self.tls_results = tls_results
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self.clock = clock
        self.cache_uses = cache_uses  # transactions per connection (1: no reuse, benchmarks)
        self._hops: dict[tuple[str, str, TlsLevel, tuple[TlsaRecord, ...]], SmtpNextHop] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._users: dict[str, int] = {}
        self._next_sweep = 0.0

    # -- the transport -------------------------------------------------------------------------

    async def deliver(
        self, envelope: Envelope, rcpts: Sequence[str], body: bytes
    ) -> list[RecipientResult]:
        """One attempt for ``rcpts`` (any domains); results in the same order; never raises for
        anything the network or the DNS does."""
        self._sweep()
        by_domain: dict[str, list[str]] = {}
        for rcpt in rcpts:
            by_domain.setdefault(rcpt.rpartition("@")[2].lower().rstrip("."), []).append(rcpt)
        groups = await asyncio.gather(
            *(self._limited(domain, envelope, group, body) for domain, group in by_domain.items())
        )
        results = {res.rcpt: res for group in groups for res in group}
        return [results[r] for r in rcpts]

    def _sweep(self) -> None:
        """At most once a second: closes the connections idle too long and forgets the hosts
        holding none, so idle connections to hosts no longer written to do not stay open."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + 1.0
        for key, hop in list(self._hops.items()):
            if not hop.close_expired() and not hop.active:
                del self._hops[key]

    def close_idle(self) -> None:
        """Closes every cached connection (at shutdown)."""
        for hop in self._hops.values():
            hop.close_idle()

    async def _limited(
        self, domain: str, envelope: Envelope, rcpts: list[str], body: bytes
    ) -> list[RecipientResult]:
        slot = self._slots.get(domain)
        if slot is None:
            slot = self._slots[domain] = asyncio.Semaphore(self.concurrency)
        self._users[domain] = self._users.get(domain, 0) + 1
        try:
            async with slot:
                return await self._deliver_domain(domain, envelope, rcpts, body)
        finally:
            self._users[domain] -= 1
            if not self._users[domain]:
                del self._users[domain]
                del self._slots[domain]

    # -- policy --------------------------------------------------------------------------------

    async def policy(self, domain: str) -> DomainTlsPolicy:
        """The domain's policy before its MX hosts are known (DANE is per host)."""
        configured = self.domain_levels.get(domain)
        if configured is not None:
            return DomainTlsPolicy(configured, source="config", on_failure=self.on_tls_failure)
        if self.mta_sts is not None:
            try:
                sts = await self.mta_sts.policy(domain)
            except Exception:  # the port must not raise; if it does, deliver as without it
                sts = None
            if sts is not None:
                level = self.default_level if sts.testing else TlsLevel.VERIFY
                return dataclasses.replace(
                    sts, level=level, source="mta-sts", on_failure=self.on_tls_failure
                )
        return DomainTlsPolicy(self.default_level, on_failure=self.on_tls_failure)

    def _result(
        self,
        rcpt: str,
        outcome: Outcome,
        detail: str,
        status: str,
        host: str = "",
        remote: str = "",
    ) -> RecipientResult:
        return RecipientResult(
            rcpt, outcome, detail, ROUTER, "smtp", host=host, status=status, remote_mta=remote
        )

    # -- one domain ----------------------------------------------------------------------------

    async def _deliver_domain(
        self, domain: str, envelope: Envelope, rcpts: list[str], body: bytes
    ) -> list[RecipientResult]:
        policy = await self.policy(domain)
        verdict = await self.mx.hosts(domain)
        if verdict.outcome != "ok":
            outcome: Outcome = "failed" if verdict.outcome == "failed" else "deferred"
            return [self._result(r, outcome, verdict.reason, verdict.status) for r in rcpts]
        hosts = list(verdict.hosts)
        ours = [h.preference for h in hosts if h.name == self.helo_name.lower().rstrip(".")]
        if ours:  # RFC 5321 section 5.1: never to ourselves nor to a less preferred host
            hosts = [h for h in hosts if h.preference < min(ours)]
            if not hosts:
                reason = f"mail for {domain} loops back to myself ({self.helo_name} is its MX)"
                return [self._result(r, "failed", reason, "5.4.6") for r in rcpts]
        sts = policy.source == "mta-sts"
        if sts and policy.mx_patterns:
            matching = [h for h in hosts if any(mx_matches(p, h.name) for p in policy.mx_patterns)]
            for host in hosts:
                if host not in matching:
                    self._record(
                        domain, policy, "sts", host.name, "", "validation-failure",
                        "MX host not listed in the MTA-STS policy",
                    )  # fmt: skip
            if not policy.testing:
                hosts = matching
                if not hosts:
                    names = ", ".join(h.name for h in verdict.hosts)
                    reason = f"no MX host of {domain} ({names}) matches its MTA-STS policy"
                    return self._tls_verdict(rcpts, policy, [], reason)
        last: list[RecipientResult] | None = None  # the last host's answers
        failures: list[_TlsFailure] = []
        unreachable = False  # a host could not be tried: it may do TLS when it is back
        sessions = 0
        for host in hosts:
            if sessions >= MAX_SESSIONS:
                break
            try:
                level, records = await self._host_level(policy, host)
            except DnsTempError as exc:
                # RFC 7672 section 2.2: this host is not usable now; the next may be
                reason = f"TLSA lookup for {host.name} failed: {exc.reason}"
                last = [
                    self._result(r, "deferred", reason, "4.7.5", remote=host.name) for r in rcpts
                ]
                self._record(domain, policy, "tlsa", host.name, "", "dnssec-invalid", reason)
                unreachable = True
                continue
            for ip in host.addresses[: MAX_SESSIONS - sessions]:
                sessions += 1
                session = await self._session(
                    domain, policy, host, ip, level, records, envelope, rcpts, body
                )
                if session.kind == "done":
                    return session.results
                if session.kind == "tls":
                    failure = session.tls_failure or "validation-failure"
                    failures.append(
                        _TlsFailure(host.name, session.ip or ip, level, failure, session.tls_detail)
                    )
                else:
                    unreachable = True
                last = session.results
        if failures and not unreachable:  # every host tried, none could: the policy's verdict
            return self._tls_verdict(rcpts, policy, failures, "")
        assert last is not None  # a verdict "ok" has at least one host with an address
        if failures:  # some hosts could not be tried: later, they may; the TLS failures said
            why = "; ".join(f"{f.host} [{f.ip}]: {f.failure_type}" for f in failures)
            return [
                dataclasses.replace(res, detail=f"{res.detail} (TLS failed on {why})")
                if res.outcome == "deferred"
                else res
                for res in last
            ]
        return last

    async def _host_level(
        self, policy: DomainTlsPolicy, host: MxHost
    ) -> tuple[TlsLevel, tuple[TlsaRecord, ...]]:
        """The level for ``host``: DANE when it has usable authenticated TLSA records and the
        operator did not choose the domain's level; else the domain's."""
        if self.tlsa is None or policy.source == "config":
            return policy.level, ()
        records = await self.tlsa.tlsa(host.name, self.port)
        if records:
            return TlsLevel.DANE, tuple(records)
        return policy.level, ()

    async def _session(
        self,
        domain: str,
        policy: DomainTlsPolicy,
        host: MxHost,
        ip: str,
        level: TlsLevel,
        records: tuple[TlsaRecord, ...],
        envelope: Envelope,
        rcpts: list[str],
        body: bytes,
    ) -> Session:
        """One host: at ``level``; an MTA-STS testing policy first tries ``verify`` (reporting
        its failure) before delivering at the domain's level."""
        if policy.testing and level not in (TlsLevel.VERIFY, TlsLevel.DANE):
            trial = await self._hop(ip, host.name, TlsLevel.VERIFY, ()).session(
                envelope, rcpts, body
            )
            if trial.kind != "tls":
                self._report(domain, policy, host, ip, TlsLevel.VERIFY, trial)
                return trial
            self._report(domain, policy, host, ip, TlsLevel.VERIFY, trial)
        session = await self._hop(ip, host.name, level, records).session(envelope, rcpts, body)
        if not policy.testing or level in (TlsLevel.VERIFY, TlsLevel.DANE):
            self._report(domain, policy, host, ip, level, session)
        return session

    def _hop(
        self, ip: str, name: str, level: TlsLevel, records: tuple[TlsaRecord, ...]
    ) -> SmtpNextHop:
        key = (ip, name, level, records)
        hop = self._hops.get(key)
        if hop is not None:
            return hop
        if len(self._hops) >= MAX_HOPS:
            for old_key, old in list(self._hops.items())[: MAX_HOPS // 2]:
                if not old.active:
                    old.close_idle()
                    del self._hops[old_key]
        check: TlsCheck | None = None
        if level is TlsLevel.DANE:
            check = self._dane_check(name, records)
        hop = SmtpNextHop(
            ip,
            self.port,
            helo_name=self.helo_name,
            require_tls=level is not TlsLevel.OPPORTUNISTIC,
            tls_context=self.verify_context if level is TlsLevel.VERIFY else self.insecure_context,
            tls_name=name,
            remote_name=name,
            tls_check=check,
            router=ROUTER,
            connect_timeout=self.connect_timeout,
            command_timeout=self.command_timeout,
            data_timeout=self.data_timeout,
            cache_uses=self.cache_uses,
        )
        self._hops[key] = hop
        return hop

    def _dane_check(self, name: str, records: tuple[TlsaRecord, ...]) -> TlsCheck:
        match = self.dane_match
        assert match is not None

        def check(chain: list[bytes]) -> str | None:
            try:
                ok = match(records, chain, name)
            except Exception as exc:  # a broken record or certificate: no match
                return f"DANE check of {name} failed: {exc}"
            return None if ok else f"the certificate of {name} matches none of its TLSA records"

        return check

    # -- verdicts and reports ------------------------------------------------------------------

    def _tls_verdict(
        self,
        rcpts: list[str],
        policy: DomainTlsPolicy,
        failures: list[_TlsFailure],
        reason: str,
    ) -> list[RecipientResult]:
        """No host gave the TLS the policy demands: failed at once or deferred, saying why."""
        if failures:
            levels = sorted({f.level.value for f in failures})
            source = {
                "config": "[outbound.domains]",
                "mta-sts": "MTA-STS",
                "default": "[outbound] tls",
            }
            why = "; ".join(f"{f.host} [{f.ip}]: {f.failure_type}: {f.detail}" for f in failures)
            dane = " (DANE)" if "dane" in levels else ""
            reason = (
                f"TLS {'/'.join(levels)} required by {source.get(policy.source, policy.source)}"
                f"{dane} but no MX host could provide it: {why}"
            )
            first = failures[0].failure_type
        else:
            first = "validation-failure"
        fail = policy.on_failure == "fail"
        code = _TLS_STATUS.get(first, "7.5")
        status = ("5." if fail else "4.") + code
        outcome: Outcome = "failed" if fail else "deferred"
        remote = failures[0].host if failures else ""
        return [self._result(r, outcome, reason, status, remote=remote) for r in rcpts]

    def _report(
        self,
        domain: str,
        policy: DomainTlsPolicy,
        host: MxHost,
        ip: str,
        level: TlsLevel,
        session: Session,
    ) -> None:
        """One TLS-RPT result for a new session (a reused connection was reported when made)."""
        if self.tls_results is None or not session.fresh:
            return
        if session.kind == "unusable" and not session.tls:
            return  # no TLS session took place: nothing about TLS to report
        if level is TlsLevel.DANE:
            policy_type = "tlsa"
        elif policy.source == "mta-sts":
            policy_type = "sts"
        else:
            policy_type = "no-policy-found"
        failure = (
            session.tls_failure
        )  # None: TLS as the policy wanted (or none offered, opportunistic)
        self._record(
            domain, policy, policy_type, host.name, session.ip or ip, failure, session.tls_detail
        )

    def _record(
        self,
        domain: str,
        policy: DomainTlsPolicy,
        policy_type: str,
        mx_host: str,
        ip: str,
        failure_type: str | None,
        detail: str,
    ) -> None:
        if self.tls_results is None:
            return
        result = TlsResult(
            domain=domain,
            policy_type=policy_type,
            policy_strings=policy.policy_strings if policy_type == "sts" else (),
            mx_host=mx_host,
            ip=ip,
            success=failure_type is None,
            failure_type=failure_type,
            detail=detail if failure_type else "",
            time=self.clock(),
        )
        with contextlib.suppress(Exception):  # the sink must not raise; a broken one is ignored
            self.tls_results.record(result)


def domain_levels(pairs: Sequence[tuple[str, str]]) -> dict[str, TlsLevel]:
    """``[outbound.domains]`` as levels."""
    return {domain: TlsLevel(level) for domain, level in pairs}


__all__ = ["MxDelivery", "domain_levels", "insecure_context", "mx_matches"]
