"""The composition root: one immutable *generation* of everything the config decides.

Owns: turning a loaded :class:`~palisade.config.Config` into the parts built from it (the rules
and lists, relay control, the STARTTLS context, the resolver, the state store, the LDAP and
scanner clients, the delivery router) and nothing else: no sockets are bound and no process is
started here (``server.app`` does that). Every other module gets its parts from a generation;
only this module names the concrete adapters (``cli/`` commands build theirs here too).

A :class:`Generation` is built whole or not at all: :func:`build_generation` raises
:class:`GenerationError` naming the part that failed and closes whatever it had already opened,
so a reload either replaces everything or nothing. A process swaps its generation in one
assignment; a session keeps the generation it began with to its end (it *acquires* it), and an
old generation's clients are closed when it is retired and its last session has ended.
Trust: the config is already validated by the loader; what can still fail here is the
environment (a file gone, a directory where the state database should be, a bad CA file).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import ipaddress
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from palisade.adapters.clamd import ClamdScanner
from palisade.adapters.dkim_signer import DkimSigner
from palisade.adapters.dmarc_records import DmarcRecordFile, records_dir
from palisade.adapters.dns import DnsResolver
from palisade.adapters.dovecot_auth import DovecotAuthenticator
from palisade.adapters.ldap_directory import LdapDirectory, LdapSettings
from palisade.adapters.local_rates import WriteBehindRates
from palisade.adapters.password_file import PasswordFile
from palisade.adapters.rspamd import RspamdScanner
from palisade.adapters.spamd import SpamdScanner
from palisade.adapters.sqlite_state import SqliteStateStore
from palisade.clock import SYSTEM_CLOCK
from palisade.config import Config, ConfigError, parse_host_port
from palisade.config.feedback import block_policy, build_protection
from palisade.config.lists import SendersFile
from palisade.config.model import LdapConfig, RspamdConfig, SpamdConfig
from palisade.config.policy import build_policy
from palisade.delivery import Router
from palisade.delivery.mxdelivery import DaneMatch, MxDelivery, domain_levels
from palisade.feedback.protect import Protection
from palisade.obs.log import EventLog
from palisade.policy.policy import Policy
from palisade.policy.relay import RelayPolicy
from palisade.policy.rules import IPAddress, Ports
from palisade.ports import (
    Authenticator,
    BlockPolicy,
    MtaStsSource,
    Resolver,
    StateStore,
    TlsaSource,
    TlsLevel,
    TlsResultSink,
)
from palisade.server.tls import client_context, server_context

if TYPE_CHECKING:  # redis-py is imported only by a config that uses it (~0.2 s at start)
    from palisade.adapters.redis_state import RedisSettings, RedisStateStore


class GenerationError(Exception):
    """A part of a new generation could not be built; the text names the part and the cause."""


class _Users:
    """How many sessions hold a generation, and whether a newer one replaced it."""

    __slots__ = ("closed", "count", "retired")

    def __init__(self) -> None:
        self.count = 0
        self.retired = False
        self.closed = False


@dataclass(frozen=True, eq=False)
class Generation:
    """Everything built from one config, never changed after it is built.

    ``ports`` (the checks' clients) exist only in a process that listens, ``router`` only in one
    that delivers; ``number`` counts the generations of a process (1 at start-up), ``loaded_at``
    is when it was built (epoch seconds; ``palisade status`` shows both)."""

    config: Config
    policy: Policy
    relay_policy: RelayPolicy
    tls_context: ssl.SSLContext | None
    our_ips: frozenset[IPAddress]
    ports: Ports | None = None
    router: Router | None = None
    number: int = 1
    loaded_at: float = field(default_factory=time.time)
    # [incidents]: when incidents block, and who never is blocked (loopback, relay_from_hosts,
    # the connect whitelists)
    block_policy: BlockPolicy = field(default_factory=BlockPolicy)
    protection: Protection = field(default_factory=Protection)
    secrets: tuple[str, ...] = ()  # texts no log or facts line may hold (the DQS keys)
    _users: _Users = field(default_factory=_Users, repr=False)

    @property
    def session_ports(self) -> Ports:
        """The clients a session's checks use (a listening process's generation has them)."""
        if self.ports is None:
            raise RuntimeError("this generation was built for a process that does not listen")
        return self.ports

    @property
    def closed(self) -> bool:
        return self._users.closed

    def acquire(self) -> None:
        """A session begins with this generation."""
        self._users.count += 1

    def release(self) -> None:
        """A session that began with this generation ended."""
        self._users.count -= 1
        if self._users.retired and self._users.count <= 0:
            self.close()

    def retire(self) -> None:
        """A newer generation took this one's place: close it once no session holds it."""
        self._users.retired = True
        if self._users.count <= 0:
            self.close()

    def close(self) -> None:
        """Closes the clients (state database, LDAP connection, scanners) and the router's idle
        next-hop connections. Idempotent."""
        if self._users.closed:
            return
        self._users.closed = True
        if self.ports is not None:
            close_ports(self.ports)
        if self.router is not None:
            with contextlib.suppress(Exception):
                self.router.close()


def build_generation(
    config: Config,
    *,
    number: int = 1,
    listening: bool = True,
    delivering: bool = True,
    local_rates: bool = False,
    on_list_error: Callable[[str], None] | None = None,
    check_environment: bool = False,
    timed_by: EventLog | None = None,
) -> Generation:
    """Builds every part of ``config``'s generation, or raises :class:`GenerationError`.

    ``listening``: build the checks' clients (a process with sessions); ``delivering``: build
    the router (a process with the queue runner). ``local_rates``: see :func:`build_ports`.
    ``check_environment``: also run the start-up self-check's file checks (no DNS) and refuse
    on any error it finds, as ``serve`` would at start-up (a reload uses it). ``timed_by``: the
    scanner and LDAP calls are timed and told to this log (the metrics are on)."""
    part = "config"
    opened: list[Callable[[], None]] = []
    try:
        part = "rules and lists"
        policy = build_policy(config, on_list_error)
        if check_environment:
            part = "self-check"
            from palisade.server.selfcheck import run_selfcheck

            errors = [f for f in run_selfcheck(config, policy, dns=False) if f.level == "error"]
            if errors:
                raise GenerationError(f"{config.source}: " + "; ".join(f.message for f in errors))
        part = "[tls]"
        tls = server_tls(config)
        part = "relay control"
        relay = relay_policy(config, policy)
        ports = None
        if listening:
            part = "clients ([paths] state, [ldap], scanners, [submission])"
            ports = build_ports(config, local_rates=local_rates, on_error=on_list_error)
            opened.append(functools.partial(close_ports, ports))
            if timed_by is not None:
                from palisade.server.metrics import timed_ports

                ports = timed_ports(ports, timed_by)
        router = None
        if delivering:
            part = "delivery router ([delivery], [paths] mail)"
            router = build_router(config, on_list_error)
    except GenerationError:
        _close_all(opened)
        raise
    except ConfigError as exc:
        _close_all(opened)
        raise GenerationError(str(exc)) from None
    except Exception as exc:  # any part that cannot be built refuses the whole generation
        _close_all(opened)
        reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        raise GenerationError(f"{config.source}: {part}: {reason}") from None
    return Generation(
        config=config,
        policy=policy,
        relay_policy=relay,
        tls_context=tls,
        our_ips=listening_ips(config),
        ports=ports,
        router=router,
        number=number,
        block_policy=block_policy(config),
        protection=build_protection(config, policy),
        secrets=tuple(secrets_of(config)),
    )


def _close_all(closers: list[Callable[[], None]]) -> None:
    for close in closers:
        with contextlib.suppress(Exception):
            close()


# -- the parts -------------------------------------------------------------------------------


def relay_policy(config: Config, policy: Policy | None = None) -> RelayPolicy:
    """Relay control; a ``[lists] relay_from_hosts`` ip list adds to ``[relay]``'s networks."""
    relay_list = policy.lists.get("relay_from_hosts") if policy is not None else None
    return RelayPolicy.build(
        config.domains.local,
        config.domains.relay,
        config.relay.relay_from_hosts,
        outbound_available=config.delivery.next_hop is not None or config.outbound.delivery == "mx",
        relay_list=relay_list,
    )


def server_tls(config: Config) -> ssl.SSLContext | None:
    """The STARTTLS context, or None when no certificate is configured."""
    if config.tls.certificate and config.tls.private_key:
        return server_context(config.tls.certificate, config.tls.private_key)
    return None


def secrets_of(config: Config) -> list[str]:
    """Strings that must never reach a log line (Spamhaus DQS keys), for the resolver to redact."""
    return [str(v) for rule in config.rules for k, v in rule.options if k == "dqs_key" and v]


def build_ports(
    config: Config,
    *,
    local_rates: bool = False,
    on_error: Callable[[str], None] | None = None,
) -> Ports:
    """The checks' clients. ``local_rates``: every client of this process reaches only this
    process (one worker, or steered workers), so rate counters can be kept here, exact, and
    written behind. All of them share the one system clock. ``on_error``: where a password or
    senders file that breaks after start-up is reported (the panic log)."""
    store = build_state(config, local_rates=local_rates, on_error=on_error)
    try:
        submission = config.submission
        senders = None
        if submission.enabled and submission.senders is not None:
            try:
                senders = SendersFile.load(submission.senders, on_error=on_error)
            except ValueError as exc:
                raise GenerationError(f"{config.source}: {exc}") from None
        return Ports(
            resolver=build_resolver(config),
            state=store,
            clock=SYSTEM_CLOCK,
            recipients=build_directory(config),
            spam=build_spam_scanner(config),
            virus=(
                ClamdScanner(
                    config.clamd.address,
                    timeout=config.clamd.timeout,
                    max_size=config.clamd.max_size,
                )
                if config.clamd.address
                else None
            ),
            signer=build_signer(config),
            authenticator=build_authenticator(config, on_error),
            senders=senders,
            dmarc_reports=build_dmarc_records(config, on_error),
        )
    except BaseException:
        close = getattr(store, "close", None)
        if close is not None:
            close()
        raise


def build_state(
    config: Config,
    *,
    local_rates: bool = False,
    on_error: Callable[[str], None] | None = None,
) -> StateStore:
    """The gateway's state store. ``sqlite``: the ``[paths] state`` file (with the in-process
    rate windows when ``local_rates``: exact only because every client of this process reaches
    this process alone). ``redis``: the shared Redis, falling back to the ``[paths] state`` file
    while it is away (``on_error`` gets the two panic-log lines of an outage); the in-process
    windows are never used there: they cannot see the other hosts' connections."""
    policy = block_policy(config)
    local = SqliteStateStore(config.paths.state, clock=SYSTEM_CLOCK, policy=policy)
    if config.state.backend != "redis":
        return WriteBehindRates(local) if local_rates else local
    from palisade.adapters.redis_state import RedisStateStore
    from palisade.adapters.state_fallback import FallbackStateStore

    try:
        settings = redis_settings(config)
    except BaseException:
        local.close()
        raise
    return FallbackStateStore(
        RedisStateStore(settings, clock=SYSTEM_CLOCK, policy=policy),
        local,
        panic=on_error,
        retry_interval=config.state.retry_interval,
        where=settings.where,
        local_name=f"[paths] state {config.paths.state}",
        marker=config.paths.state.with_name(config.paths.state.name + ".redis-down"),
    )


def build_shared_store(config: Config) -> SqliteStateStore | RedisStateStore:
    """The store the operator's commands read and write (``history``, ``firewall``, ``scan``):
    the backend itself, without the gateway's fall-back (a command must say that Redis is
    unreachable, not answer from one host's file). Raises ``ConfigError`` (password file),
    and for SQLite what opening the file raises."""
    policy = block_policy(config)
    if config.state.backend == "redis":
        from palisade.adapters.redis_state import RedisStateStore

        return RedisStateStore(redis_settings(config), clock=SYSTEM_CLOCK, policy=policy)
    return SqliteStateStore(config.paths.state, clock=SYSTEM_CLOCK, policy=policy)


def redis_settings(config: Config) -> RedisSettings:
    """``[state]`` as the Redis adapter's settings, the password read from its file now (the
    first line, without its end of line). Raises ``ConfigError`` naming the file, never its
    contents."""
    state = config.state
    password = None
    if state.password_file is not None:
        try:
            text = state.password_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(
                config.source,
                "state.password_file",
                f"{state.password_file}: cannot be read: {reason}",
            ) from None
        password = text.splitlines()[0] if text.strip() else None
        if password is None:
            raise ConfigError(
                config.source, "state.password_file", f"{state.password_file} is empty"
            )
    from palisade.adapters.redis_state import RedisSettings

    return RedisSettings(
        url=state.url,
        username=state.username or None,
        password=password,
        ca_file=None if state.ca_file is None else str(state.ca_file),
        sentinels=tuple(parse_host_port(s, default_port=26379) for s in state.sentinels),
        service=state.service,
        prefix=state.prefix,
        timeout=state.timeout,
        connect_timeout=state.connect_timeout,
        max_connections=state.max_connections,
    )


def build_dmarc_records(
    config: Config, on_error: Callable[[str], None] | None = None
) -> DmarcRecordFile | None:
    """Where this process keeps its DMARC evaluations (``[dmarc] reports``); None when off."""
    if not config.dmarc.reports:
        return None
    return DmarcRecordFile(records_dir(config.dmarc.state), on_error=on_error)


def build_resolver(config: Config) -> DnsResolver:
    """The resolver of ``[dns]`` (the checks', and ``dns check``'s)."""
    dns = config.dns
    nameservers = [parse_host_port(n, default_port=53) for n in dns.nameservers]
    return DnsResolver(
        nameservers or None,
        timeout=dns.timeout,
        retries=dns.retries,
        cache_max_ttl=dns.cache_max_ttl,
        redact=secrets_of(config),
        clock=SYSTEM_CLOCK,
        trust_ad={"auto": None, "yes": True, "no": False}[dns.trust_ad],
    )


def build_signer(config: Config) -> DkimSigner | None:
    """The DKIM keys of ``[dkim]``, read now (a reload reads them again); None without keys.
    A key that cannot be used does not refuse the generation: its domain's mail is deferred."""
    dkim = config.dkim
    if not dkim.keys:
        return None
    return DkimSigner((k.domain, k.selector, dkim.key_path(k)) for k in dkim.keys)


def build_authenticator(
    config: Config, on_error: Callable[[str], None] | None = None
) -> Authenticator | None:
    """The back end of ``[submission] auth``: the password file or Dovecot's auth socket;
    None without submission listeners."""
    submission = config.submission
    if not submission.enabled:
        return None
    if submission.auth == "dovecot":
        return DovecotAuthenticator(submission.dovecot_socket, timeout=submission.auth_timeout)
    return PasswordFile(submission.password_file, on_error=on_error)


def build_spam_scanner(config: Config) -> SpamdScanner | RspamdScanner | None:
    """The client of ``config.spam_scanner`` (spamd or rspamd), or None."""
    scanner = config.spam_scanner
    if isinstance(scanner, SpamdConfig):
        return SpamdScanner(
            scanner.address, timeout=scanner.timeout, max_size=scanner.max_size, user=scanner.user
        )
    if isinstance(scanner, RspamdConfig):
        return RspamdScanner(
            scanner.url,
            password=scanner.password,
            timeout=scanner.timeout,
            max_size=scanner.max_size,
        )
    return None


def ldap_settings(ldap: LdapConfig) -> LdapSettings:
    """The LDAP adapter's settings from the ``[ldap]`` section (the server and the
    ``recipients sync`` command both build theirs here)."""
    return LdapSettings(
        servers=tuple(ldap.servers),
        base_dn=ldap.base_dn,
        bind_dn=ldap.bind_dn,
        bind_password=ldap.bind_password,
        bind_password_file=ldap.bind_password_file,
        filter=ldap.filter,
        attributes=tuple(ldap.attributes),
        start_tls=ldap.start_tls,
        ca_file=ldap.ca_file,
        timeout=ldap.timeout,
        positive_ttl=ldap.positive_ttl,
        negative_ttl=ldap.negative_ttl,
    )


def build_directory(config: Config) -> LdapDirectory | None:
    """The LDAP recipient directory, or None when ``[ldap] servers`` is empty."""
    if not config.ldap.servers:
        return None
    return LdapDirectory(ldap_settings(config.ldap), clock=SYSTEM_CLOCK)


def close_ports(ports: Ports) -> None:
    """Closes what the ports hold open (pending rate hits written, the state database, the LDAP
    connection, scanner connections)."""
    parts = (ports.state, ports.recipients, ports.spam, ports.virus, ports.authenticator)
    for part in (*parts, ports.dmarc_reports):
        close = getattr(part, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                _finish(close())


def _finish(result: object) -> None:
    """An asynchronous close (the Dovecot client's) runs on the loop when there is one."""
    if inspect.iscoroutine(result):
        try:
            asyncio.get_running_loop().create_task(result)
        except RuntimeError:
            result.close()


def listening_ips(config: Config) -> frozenset[IPAddress]:
    """The addresses of ``[server] listen`` (a HELO naming one of them claims to be us)."""
    ips = set()
    for entry in config.server.listen:
        host, _ = parse_host_port(entry)
        with contextlib.suppress(ValueError):
            ip = ipaddress.ip_address(host)
            if not ip.is_unspecified:
                ips.add(ip)
    return frozenset(ips)


def mta_sts_source(
    config: Config, resolver: Resolver, results: TlsResultSink | None
) -> MtaStsSource | None:
    """MTA-STS (``[outbound] mta_sts``): the policy source, or None (off). Its cache file lies
    beside ``[paths] state`` (shared by the worker processes, kept over a restart)."""
    outbound = config.outbound
    if not outbound.mta_sts:
        return None
    from palisade.adapters.mta_sts import MtaStsPolicies

    return MtaStsPolicies(
        resolver,
        cache_file=config.paths.state.parent / "mta-sts.json",
        ca_file=outbound.tls_ca_file,
        report=results,
        on_failure=outbound.on_tls_failure,
        port=outbound.mta_sts_port,
    )


def tlsa_source(config: Config, resolver: Resolver) -> TlsaSource | None:
    """DANE (``[outbound] dane``): authenticated TLSA records, or None (off)."""
    if not config.outbound.dane:
        return None
    from palisade.delivery.dane import DaneTlsaSource

    return DaneTlsaSource(resolver)


def dane_matcher(config: Config) -> DaneMatch | None:
    """DANE: the TLSA matching of ``palisade.delivery.dane``, or None (off)."""
    if not config.outbound.dane:
        return None
    from palisade.delivery.dane import matches

    return matches


def tls_result_sink(
    config: Config, on_error: Callable[[str], None] | None = None
) -> TlsResultSink | None:
    """TLS-RPT (``[outbound] tls_reports``): the daily JSON-lines files, or None (off). A
    write that fails is told to ``on_error`` (the panic log) at most once a minute."""
    if config.outbound.tls_reports is None:
        return None
    from palisade.adapters.tlsrpt_file import TlsResultFiles

    return TlsResultFiles(config.outbound.tls_reports, on_error=on_error)


def build_outbound(
    config: Config, on_error: Callable[[str], None] | None = None
) -> MxDelivery | None:
    """The MX transport of ``[outbound]`` when ``delivery = "mx"``, else None (the next hop
    takes OUTBOUND mail). Its own resolver (``[dns]``): it runs in the delivering process.
    ``on_error``: the panic log, for TLS-RPT files that cannot be written."""
    outbound = config.outbound
    if outbound.delivery != "mx":
        return None
    resolver = build_resolver(config)
    results = tls_result_sink(config, on_error)
    return MxDelivery(
        resolver,
        helo_name=config.server.hostname,
        port=outbound.port,
        default_level=TlsLevel(outbound.tls),
        domain_levels=domain_levels(outbound.domains),
        on_tls_failure=outbound.on_tls_failure,
        verify_context=client_context(outbound.tls_ca_file),
        concurrency_per_destination=outbound.concurrency_per_destination,
        mta_sts=mta_sts_source(config, resolver, results),
        tlsa=tlsa_source(config, resolver),
        dane_match=dane_matcher(config),
        tls_results=results,
        connect_timeout=min(30.0, config.delivery.timeout),
        command_timeout=config.delivery.timeout,
        data_timeout=max(600.0, config.delivery.timeout),
    )


def build_router(config: Config, on_error: Callable[[str], None] | None = None) -> Router:
    """The delivery router: Maildir for local domains, the next hop for relay domains, and
    for OUTBOUND mail the MX transport (``[outbound] delivery = "mx"``) or the next hop."""
    next_hop = parse_host_port(config.delivery.next_hop) if config.delivery.next_hop else None
    return Router(
        outbound=build_outbound(config, on_error),
        local_domains=frozenset(d.lower() for d in config.domains.local),
        relay_domains=frozenset(d.lower() for d in config.domains.relay),
        maildir_root=config.paths.mail,
        maildir_group=config.paths.group,
        next_hop=next_hop,
        require_tls=config.delivery.require_tls,
        tls_context=client_context(config.delivery.tls_ca_file),
        helo_name=config.server.hostname,
        connect_timeout=min(30.0, config.delivery.timeout),
        command_timeout=config.delivery.timeout,
        data_timeout=max(600.0, config.delivery.timeout),
    )
