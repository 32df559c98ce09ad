"""The composition root: builds every part from the config and runs the processes.

Owns: process layout and signals. With ``workers = 1`` one process listens and delivers. With
more, the parent binds one SO_REUSEPORT socket per worker and address, forks workers that accept
from them (see :func:`serve`) and send the queue id of every committed message down a
pipe; the parent alone runs the queue runner, so no message is ever delivered by two processes.
SIGTERM: stop accepting, finish or tempfail transactions in flight, stop delivery, exit 0.
SIGHUP: reload the config; a broken new config is logged and the old one stays.

Signals are handled from the first moment of ``serve`` (:class:`StartupSignals` remembers one that
comes before the event loop's handlers are in place, and the loop acts on it when they are), so a
SIGTERM during start-up never kills the parent alone. Workers never outlive the parent: each asks
the kernel for SIGUSR2 when the parent dies (``PR_SET_PDEATHSIG``; a signal of its own, so the
worker knows why it stops: the parent's thread that forked may die before the process, and
``getppid()`` still names it then) and also watches a pipe whose write end only the parent holds
(end of file: the parent is gone, however it died); either way the worker stops accepting and
ends like after SIGTERM. Messages it committed meanwhile stay in the spool, and the next start
delivers them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import os
import resource
import signal
import socket
import ssl
import sys
from pathlib import Path

from palisade.adapters.clamd import ClamdScanner
from palisade.adapters.dns import DnsResolver, SystemClock
from palisade.adapters.ldap_directory import LdapDirectory, LdapSettings
from palisade.adapters.local_rates import WriteBehindRates
from palisade.adapters.rspamd import RspamdScanner
from palisade.adapters.spamd import SpamdScanner
from palisade.adapters.sqlite_state import SqliteStateStore
from palisade.config import Config, ConfigError, load_config, parse_host_port
from palisade.config.model import LdapConfig, RspamdConfig, SpamdConfig
from palisade.config.policy import Policy, build_policy
from palisade.delivery import QueueRunner, Router
from palisade.obs.files import make_dirs
from palisade.obs.log import FileEventLog
from palisade.obs.queueid import QueueIdGenerator
from palisade.policy.relay import RelayPolicy
from palisade.policy.rules import Ports
from palisade.server.conncount import SharedCounts
from palisade.server.context import ServerContext
from palisade.server.listener import Listener, bind_socket
from palisade.server.steering import steer_by_source
from palisade.server.tls import client_context, server_context
from palisade.spool import Spool

SHUTDOWN_GRACE = 10.0
PR_SET_PDEATHSIG = 1
PARENT_DEATH_SIGNAL = signal.SIGUSR2  # what a worker gets from the kernel when the parent dies


class StartupSignals:
    """SIGTERM, SIGINT and SIGHUP that arrive before a process's event loop handles them.

    Installed at the start of ``serve`` and again in each worker right after fork (the parent's
    loop handlers would write to the parent's wake-up pipe); :meth:`Gateway.install_signals`
    then acts on what was remembered."""

    def __init__(self) -> None:
        self.stop = False
        self.reload = False

    def install(self, *, worker: bool = False) -> None:
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._remember)
        if worker:
            signal.signal(PARENT_DEATH_SIGNAL, self._remember)

    def _remember(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            self.reload = True
        else:
            self.stop = True


startup_signals = StartupSignals()


def die_with_parent(parent: int) -> None:
    """In a worker: PARENT_DEATH_SIGNAL from the kernel when the parent dies (Linux), and exit at
    once if it died before the request was made."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(PARENT_DEATH_SIGNAL), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)


def install_fast_loop() -> None:
    """Uses uvloop when it is installed; the stdlib loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def relay_policy(config: Config, policy: Policy | None = None) -> RelayPolicy:
    """Relay control; a ``[lists] relay_from_hosts`` ip list adds to ``[relay]``'s networks."""
    relay_list = policy.lists.get("relay_from_hosts") if policy is not None else None
    return RelayPolicy.build(
        config.domains.local,
        config.domains.relay,
        config.relay.relay_from_hosts,
        outbound_available=config.delivery.next_hop is not None,
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


def build_ports(config: Config, *, local_rates: bool = False) -> Ports:
    """``local_rates``: every client of this process reaches only this process (one worker, or
    steered workers), so rate counters can be kept here, exact, and written behind."""
    dns = config.dns
    nameservers = [parse_host_port(n, default_port=53) for n in dns.nameservers]
    return Ports(
        resolver=DnsResolver(
            nameservers or None,
            timeout=dns.timeout,
            retries=dns.retries,
            cache_max_ttl=dns.cache_max_ttl,
            redact=secrets_of(config),
        ),
        state=(
            WriteBehindRates(SqliteStateStore(config.paths.state))
            if local_rates
            else SqliteStateStore(config.paths.state)
        ),
        clock=SystemClock(),
        recipients=build_directory(config),
        spam=build_spam_scanner(config),
        virus=(
            ClamdScanner(
                config.clamd.address, timeout=config.clamd.timeout, max_size=config.clamd.max_size
            )
            if config.clamd.address
            else None
        ),
    )


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
    return LdapDirectory(ldap_settings(config.ldap), clock=SystemClock())


def close_ports(ports: Ports) -> None:
    """Closes what the ports hold open (state database, LDAP connection)."""
    for part in (ports.state, ports.recipients, ports.spam, ports.virus):
        close = getattr(part, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()


def listening_ips(config: Config) -> frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    ips = set()
    for entry in config.server.listen:
        host, _ = parse_host_port(entry)
        with contextlib.suppress(ValueError):
            ip = ipaddress.ip_address(host)
            if not ip.is_unspecified:
                ips.add(ip)
    return frozenset(ips)


def needs_steering(config: Config) -> bool:
    """Per-client counters (ratelimit rules) want each client on one worker. Without them every
    worker accepts from every socket, so even a single busy client is spread over the workers
    that are free, which is better."""
    return any(rule.check == "ratelimit" for rule in config.rules)


def build_router(config: Config) -> Router:
    next_hop = parse_host_port(config.delivery.next_hop) if config.delivery.next_hop else None
    return Router(
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


def build_runner(config: Config, spool: Spool, log: FileEventLog) -> QueueRunner:
    return QueueRunner(
        spool,
        build_router(config),
        log,
        retry_initial=config.delivery.retry_initial,
        retry_max_interval=config.delivery.retry_max_interval,
        max_age=config.delivery.max_age,
        concurrency=config.delivery.concurrency,
    )


class Gateway:
    """One process's share of the work: listening, delivering, or both."""

    def __init__(
        self, config: Config, config_path: Path | None, *, local_rates: bool = False
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.local_rates = local_rates
        self.log = FileEventLog(config.paths.log, json_lines=config.log.json, echo=config.log.echo)
        self.spool = Spool(config.paths.spool)
        self.stopping = asyncio.Event()
        self.policy: Policy = build_policy(config, self.log.panic)

    def make_context(self, submit: object) -> ServerContext:
        config = self.config
        tls = server_tls(config)
        return ServerContext(
            config=config,
            log=self.log,
            spool=self.spool,
            relay_policy=relay_policy(config, self.policy),
            tls_context=tls,
            queue_ids=QueueIdGenerator(),
            submit=submit,  # type: ignore[arg-type]
            policy=self.policy,
            ports=build_ports(config, local_rates=self.local_rates),
            our_ips=listening_ips(config),
        )

    def reload_and_probe(self, ctx: ServerContext) -> None:
        """SIGHUP in a listening process: reload, then probe the new rules' zones at once."""
        before = ctx.policy
        self.reload(ctx)
        if ctx.policy is not before and self.config.dns.dnsbl_probe_interval > 0:
            from palisade.server.probes import probe_once

            asyncio.get_running_loop().create_task(probe_once(ctx.policy, ctx.ports, self.log))

    def reload(self, ctx: ServerContext | None) -> None:
        """SIGHUP: a valid new config replaces the old; a broken one is refused and logged."""
        try:
            new = load_config(self.config_path)
            policy = build_policy(new, self.log.panic)
            tls = server_tls(new)
        except (ConfigError, OSError) as exc:
            self.log.panic(f"reload refused, old configuration stays in force: {exc}")
            return
        if new.server.listen != self.config.server.listen:
            self.log.main("listen addresses changed: they take effect at the next restart")
        self.config, self.policy = new, policy
        if ctx is not None:
            old_ports = ctx.ports
            ctx.config, ctx.relay_policy, ctx.tls_context = new, relay_policy(new, policy), tls
            ctx.policy, ctx.ports = policy, build_ports(new, local_rates=self.local_rates)
            close_ports(old_ports)  # sessions still holding the old ports get temporary errors
        self.log.main(f"configuration reloaded from {new.source}")

    def start_probes(self, ctx: ServerContext) -> asyncio.Task[None] | None:
        """DNSBL zone probes for this process's rules (each process holds its own policy)."""
        interval = self.config.dns.dnsbl_probe_interval
        if interval <= 0:
            return None
        from palisade.server.probes import probe_forever

        return asyncio.get_running_loop().create_task(
            probe_forever(lambda: (ctx.policy, ctx.ports), self.log, interval)
        )

    def install_signals(self, on_hup: object) -> None:
        """The loop's handlers; then acts on a signal that came before them."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, on_hup)  # type: ignore[arg-type]
        if startup_signals.stop:
            self.stopping.set()
        elif startup_signals.reload:
            startup_signals.reload = False
            on_hup()  # type: ignore[operator]


async def run_single(
    config: Config, config_path: Path | None, sockets: list[socket.socket]
) -> None:
    """workers = 1: listener and queue runner in one process."""
    gw = Gateway(config, config_path, local_rates=True)
    runner = build_runner(config, gw.spool, gw.log)
    ctx = gw.make_context(runner.submit)
    await runner.start()
    listener = Listener(ctx, sockets)
    await listener.start()
    probes = gw.start_probes(ctx)
    gw.install_signals(lambda: gw.reload_and_probe(ctx))
    gw.log.main(
        f"palisade daemon started: pid={os.getpid()}, listening on "
        f"{', '.join(config.server.listen)}, config {config.source}"
    )
    await gw.stopping.wait()
    gw.log.main("SIGTERM received: no longer accepting connections, finishing transactions")
    if probes is not None:
        probes.cancel()
    await listener.shutdown(SHUTDOWN_GRACE)
    await runner.stop()
    gw.spool.close()
    _close_state(ctx)
    gw.log.main("palisade daemon stopped")


async def run_worker(
    config: Config,
    config_path: Path | None,
    sockets: list[socket.socket],
    notify_fd: int,
    parent_fd: int,
    *,
    steered: bool,
    slot: int,
    counts: SharedCounts | None,
) -> None:
    """A listening worker: commits to the spool and tells the parent the queue id.

    ``steered``: the parent attached the steering program to the group, so every client of this
    worker comes to it alone and its rate counters can be kept in memory. ``parent_fd``: the
    read end of a pipe only the parent can write to; end of file on it means the parent is gone.
    ``counts``: the per-IP connection counts shared with the other workers, of which column
    ``slot`` is this worker's (None: this worker's own counts are exact)."""
    gw = Gateway(config, config_path, local_rates=steered)
    if needs_steering(config) and not steered:
        gw.log.main(
            "SO_REUSEPORT steering unavailable: rate counters are shared through the "
            "state store (exact, slower)"
        )

    def submit(queue_id: str) -> None:
        try:
            os.write(notify_fd, queue_id.encode() + b"\n")
        except BrokenPipeError:
            gw.log.panic(f"{queue_id} stays in the spool: the parent process is gone")
        except OSError as exc:  # the parent's periodic scan still finds the message
            gw.log.panic(f"{queue_id} could not notify the queue runner: {exc}")

    loop = asyncio.get_running_loop()
    parent_gone = False

    def on_parent_gone() -> None:
        nonlocal parent_gone
        parent_gone = True
        gw.stopping.set()

    def on_parent_pipe() -> None:
        try:
            if os.read(parent_fd, 64):
                return
        except BlockingIOError:
            return
        loop.remove_reader(parent_fd)
        on_parent_gone()

    os.set_blocking(parent_fd, False)
    loop.add_reader(parent_fd, on_parent_pipe)
    loop.add_signal_handler(PARENT_DEATH_SIGNAL, on_parent_gone)
    ctx = gw.make_context(submit)
    gw.install_signals(lambda: gw.reload_and_probe(ctx))
    if gw.stopping.is_set():  # SIGTERM, or the parent gone, while this worker started
        for sock in sockets:
            sock.close()
        gw.spool.close()
        _close_state(ctx)
        return
    shared = counts.for_slot(slot, gw.log.panic) if counts is not None else None
    listener = Listener(ctx, sockets, shared)
    await listener.start()
    probes = gw.start_probes(ctx)
    await gw.stopping.wait()
    if parent_gone:
        gw.log.panic(
            f"worker {os.getpid()}: the parent process is gone: no longer accepting "
            "connections, finishing transactions"
        )
    if probes is not None:
        probes.cancel()
    await listener.shutdown(SHUTDOWN_GRACE)
    gw.spool.close()
    _close_state(ctx)


async def run_parent(
    config: Config,
    config_path: Path | None,
    notify_read: int,
    workers: dict[int, int],
    spawn: object,
    listening: list[socket.socket],
    counts: SharedCounts | None = None,
) -> None:
    """The parent of workers: runs the queue runner, forwards signals, restarts dead workers.

    It holds the ``listening`` sockets for the workers it restarts, never accepts on them, and
    closes them when it stops. ``counts``: the per-IP table shared by unsteered workers; a dead
    worker's counts are cleared before its slot is started again."""
    gw = Gateway(config, config_path)

    def on_hup() -> None:
        gw.reload(None)
        for pid in workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    gw.install_signals(on_hup)
    runner = build_runner(config, gw.spool, gw.log)
    await runner.start(recover=False)  # serve() recovered the spool before forking the workers
    loop = asyncio.get_running_loop()
    pending = bytearray()

    def on_notify() -> None:
        try:
            chunk = os.read(notify_read, 65536)
        except BlockingIOError:
            return
        pending.extend(chunk)
        *lines, rest = bytes(pending).split(b"\n")
        pending[:] = rest
        for line in lines:
            runner.submit(line.decode("ascii", "replace"))

    os.set_blocking(notify_read, False)
    loop.add_reader(notify_read, on_notify)
    gw.log.main(
        f"palisade daemon started: pid={os.getpid()}, {len(workers)} workers listening on "
        f"{', '.join(config.server.listen)}, config {config.source}"
    )

    async def reap() -> None:
        while not gw.stopping.is_set():
            await asyncio.sleep(0.5)
            for slot, pid in list(workers.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done and not gw.stopping.is_set():
                    gw.log.panic(f"worker {pid} exited (status {status}); starting a new one")
                    if counts is not None:
                        counts.clear_slot(slot)
                    workers[slot] = spawn(slot)  # type: ignore[operator]

    reaper = loop.create_task(reap())
    await gw.stopping.wait()
    gw.log.main("SIGTERM received: stopping workers")
    for sock in listening:  # the workers' copies go as they stop accepting
        sock.close()
    for pid in workers.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in workers.values():
        await loop.run_in_executor(None, _wait_pid, pid)
    reaper.cancel()
    on_notify()
    await runner.stop()
    gw.spool.close()
    gw.log.main("palisade daemon stopped")


def _close_state(ctx: ServerContext) -> None:
    """Writes pending rate hits and closes the state database (and the LDAP connection)."""
    close_ports(ctx.ports)


def _wait_pid(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def serve(config_path: Path | None) -> int:
    """``palisade serve``: returns the process exit status."""
    startup_signals.install()  # before anything else: see StartupSignals
    try:
        config = load_config(config_path)
        policy = build_policy(config)  # every rule and list is checked before anything starts
    except ConfigError as exc:
        print(f"palisade: {exc}", file=sys.stderr)
        return 2
    group = config.paths.group
    if group is not None and os.geteuid() != 0 and group not in (os.getegid(), *os.getgroups()):
        print(
            f"palisade: {config.source}: paths.group: this user may not give files group {group}"
            " (run as root, or as a member of that group)",
            file=sys.stderr,
        )
        return 2
    from palisade.selfcheck import check_before_serving

    if check_before_serving(config, policy) is not None:  # paths, files, DNS, DNSBL zones, TLS
        return 1
    raise_fd_limit()
    install_fast_loop()
    for key, path, mode in (("spool", config.paths.spool, 0o700), ("log", config.paths.log, 0o750)):
        try:
            make_dirs(path, mode)
        except OSError as exc:
            print(f"palisade: paths.{key}: cannot create {path}: {exc}", file=sys.stderr)
            return 1
    # the Maildir root is made by MaildirDelivery, with the modes of [paths] group
    workers = config.server.workers
    try:  # with workers, one SO_REUSEPORT socket per worker and address, all made before fork
        groups = [
            [bind_socket(a, reuse_port=workers > 1) for a in config.server.listen]
            for _ in range(workers)
        ]
    except OSError as exc:
        print(
            f"palisade: cannot listen on {', '.join(config.server.listen)}: {exc}", file=sys.stderr
        )
        return 1
    if startup_signals.stop:  # SIGTERM while starting: nothing forked, nothing to recover
        return 0
    if workers == 1:
        asyncio.run(run_single(config, config_path, groups[0]))
        return 0
    # Without steering every worker accepts from every socket of the group: the kernel hashes
    # each new client to one socket's queue, and whichever worker is free first takes it, instead
    # of the hash handing it to a busy worker (p99 latency 18 % lower under the benchmark's load;
    # the group's queues together still hold a burst of 10,000 idle clients). With steering
    # (``ratelimit`` rules) worker ``slot`` accepts only from socket ``slot``, the one the
    # steering program picks for its clients. The parent keeps every socket open, so a restarted
    # worker takes over the same socket and the clients queued on it are not lost.
    steered = needs_steering(config)
    # Attached once, here, before any client can arrive; the group outlives restarted workers.
    attached = steered and all(steer_by_source(sock, workers) for sock in groups[0])
    every_socket = [sock for group in groups for sock in group]
    # Recovery empties tmp/: it must be over before any worker can write a message there.
    recovery_log = FileEventLog(config.paths.log)
    recovery_spool = Spool(config.paths.spool)
    recovery_spool.recover(recovery_log)
    recovery_spool.close()  # no commit thread may live across fork()
    recovery_log.close()
    notify_read, notify_write = os.pipe()
    parent_read, parent_write = os.pipe()  # the write end stays in the parent alone
    parent = os.getpid()
    # Unsteered, one client's connections reach several workers: they count them together.
    counts = None if attached else SharedCounts(workers, config.server.max_connections)

    def spawn(slot: int) -> int:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                startup_signals.install(worker=True)  # not the parent loop's, which wake it
                os.close(parent_write)
                die_with_parent(parent)
                os.close(notify_read)
                mine = groups[slot] if steered else every_socket
                for sock in every_socket:
                    if sock not in mine:  # another worker's: holding it would keep it open
                        sock.close()
                asyncio.run(
                    run_worker(
                        config,
                        config_path,
                        mine,
                        notify_write,
                        parent_read,
                        steered=attached,
                        slot=slot,
                        counts=counts,
                    )
                )
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            os._exit(code)
        return pid

    children = {}
    for slot in range(workers):
        if startup_signals.stop:  # SIGTERM already: run_parent stops the ones started
            break
        children[slot] = spawn(slot)
    asyncio.run(run_parent(config, config_path, notify_read, children, spawn, every_socket, counts))
    return 0
