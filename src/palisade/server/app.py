"""The processes: builds each one's generation (:mod:`.generation`, the composition root), runs
its listener and queue runner, handles its signals.

Owns: process layout and signals. With ``workers = 1`` one process listens and delivers. With
more, the parent binds one SO_REUSEPORT socket per worker and address, forks workers that accept
from them (see :func:`serve`) and send the queue id of every committed message down a
pipe; the parent alone runs the queue runner, so no message is ever delivered by two processes.
SIGTERM: stop accepting, finish or tempfail transactions in flight, stop delivery, exit 0.
SIGHUP: every process (the parent forwards it to the workers) builds a whole new generation
from the config file and swaps it in one assignment: new sessions and the parent's next delivery
attempt use it, sessions in progress keep the one they began with, and the old one's clients are
closed when its last session ends. A config or a part that fails is refused whole, with a
paniclog line, and the old generation stays in every process. Keys that cannot change live
(``config.model.RESTART_KEYS``: listen addresses, workers, spool and log paths...) are named in
paniclog as needing a restart. SIGUSR1: every process (the parent forwards it too) reopens its
log files (:mod:`palisade.obs.log`). The parent, or the single process, tells systemd READY,
RELOADING and STOPPING (:mod:`.notify`).

Signals are handled from the first moment of ``serve`` (:class:`StartupSignals` remembers one that
comes before the event loop is started, the kernel holds one that comes while it starts, and each
is acted on once when the loop's handlers are in place), so a SIGTERM during start-up never kills
the parent alone. Workers never outlive the parent: each asks the kernel for SIGUSR2 when the
parent dies (``PR_SET_PDEATHSIG``; a signal of its own, so the worker knows why it stops: the
parent's thread that forked may die before the process, and ``getppid()`` still names it then)
and also watches a pipe whose write end only the parent holds (end of file: the parent is gone,
however it died); either way the worker stops accepting and ends like after SIGTERM. Messages it
committed meanwhile stay in the spool, and the next start delivers them.

The parent (or the single process) makes the control socket before it binds a port and answers
``palisade status`` on it, asking each worker over a socketpair made at its fork (:mod:`.control`).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from palisade.config import Config, ConfigError, load_config
from palisade.config.model import keep_running, restart_needed
from palisade.config.policy import build_policy
from palisade.delivery import QueueRunner
from palisade.feedback.incidents import IncidentRecorder
from palisade.obs.factsfile import FactsFile
from palisade.obs.files import make_dirs
from palisade.obs.log import FileEventLog
from palisade.obs.metrics import Metrics
from palisade.obs.queueid import QueueIdGenerator
from palisade.server import control, notify, privileges
from palisade.server.conncount import SharedCounts
from palisade.server.context import ServerContext
from palisade.server.generation import (
    Generation,
    GenerationError,
    build_generation,
    close_ports,
)
from palisade.server.listener import Listener, bind_socket, listen_addresses
from palisade.server.metrics import serve_metrics, start_metrics, worker_gone
from palisade.server.service import open_event_log, remove_pid_file, write_pid_file
from palisade.server.steering import steer_by_source
from palisade.spool import Spool

SHUTDOWN_GRACE = 10.0
INCIDENT_DRAIN = 5.0  # at shutdown, seconds the incidents still queued get to reach the store
PR_SET_PDEATHSIG = 1
PARENT_DEATH_SIGNAL = signal.SIGUSR2  # what a worker gets from the kernel when the parent dies


HELD_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, PARENT_DEATH_SIGNAL}


class StartupSignals:
    """SIGTERM, SIGINT and SIGHUP that arrive before a process's event loop handles them.

    Installed at the start of ``serve`` and again in each worker right after fork (the parent's
    loop handlers would write to the parent's wake-up pipe); :meth:`Gateway.install_signals`
    then acts on what was remembered.

    Remembering works only while no event loop runs: a running loop has its wake-up fd set
    (uvloop sets it as it starts, asyncio with its first handler), and a signal that came then
    would be both remembered and written to that fd, and acted on twice once the handlers are in
    (two reloads, the restart-needed lines twice). So :meth:`hold` blocks the signals before a
    process starts its loop (a forked worker is born with them blocked: see ``spawn``); the
    kernel keeps them pending, and :meth:`Gateway.install_signals` unblocks them once the loop's
    handlers are in place, which then get each exactly once."""

    def __init__(self) -> None:
        self.stop = False
        self.reload = False

    def install(self, *, worker: bool = False) -> None:
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._remember)
        signal.signal(signal.SIGUSR1, self._ignore)  # reopen logs: those opened later are new
        if worker:  # what the parent remembered is the parent's to act on
            self.stop = self.reload = False
            signal.signal(PARENT_DEATH_SIGNAL, self._remember)

    @staticmethod
    def hold() -> set[int | signal.Signals]:
        """Blocks the signals until :meth:`release`; returns the mask before."""
        return signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)

    @staticmethod
    def release() -> None:
        """The loop's handlers are in: the signals held meanwhile are delivered to them now."""
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)

    def stopping(self) -> bool:
        """SIGTERM or SIGINT came, remembered or held."""
        return self.stop or bool({signal.SIGTERM, signal.SIGINT} & signal.sigpending())

    @staticmethod
    def _ignore(_signum: int, _frame: object) -> None:
        pass

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


def needs_steering(config: Config) -> bool:
    """Per-client counters (ratelimit rules) want each client on one worker. Without them every
    worker accepts from every socket, so even a single busy client is spread over the workers
    that are free, which is better."""
    return any(rule.check == "ratelimit" for rule in config.rules)


def build_runner(generation: Generation, spool: Spool, log: FileEventLog) -> QueueRunner:
    assert generation.router is not None
    delivery = generation.config.delivery
    return QueueRunner(
        spool,
        generation.router,
        log,
        retry_initial=delivery.retry_initial,
        retry_max_interval=delivery.retry_max_interval,
        max_age=delivery.max_age,
        concurrency=delivery.concurrency,
    )


def deliver_with(runner: QueueRunner, generation: Generation) -> None:
    """The queue runner delivers with the newest generation from its next attempt on (an
    attempt in flight finishes with the router it began with)."""
    assert generation.router is not None
    delivery = generation.config.delivery
    runner.router = generation.router
    runner.retry_initial = delivery.retry_initial
    runner.retry_max_interval = delivery.retry_max_interval
    runner.max_age = delivery.max_age


class Gateway:
    """One process's share of the work: listening, delivering, or both.

    ``generation`` is the one place this process keeps what the config decides; :meth:`reload`
    replaces it in one assignment. ``listening``: sessions run here (the generation gets the
    checks' clients); ``delivering``: the queue runner runs here (it gets the router);
    ``announces``: this process reports the keys that need a restart (the parent, or the single
    process: the workers would only repeat it)."""

    def __init__(
        self,
        config: Config,
        config_path: Path | None,
        *,
        local_rates: bool = False,
        listening: bool = True,
        delivering: bool = True,
        announces: bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        self.config_path = config_path
        self.metrics = metrics
        self.local_rates = local_rates
        self.listening = listening
        self.delivering = delivering
        self.announces = announces
        self.log = open_event_log(config, None if metrics is None else metrics.observe)
        self.facts = FactsFile(on_error=self.log.panic)  # [record] facts, when a config sets it
        self.spool = Spool(config.paths.spool)
        self.stopping = asyncio.Event()
        self.runner: QueueRunner | None = None
        self.generation = self._build(config, number=1)

    @property
    def config(self) -> Config:
        return self.generation.config

    def _build(self, config: Config, *, number: int, check: bool = False) -> Generation:
        return build_generation(
            config,
            number=number,
            listening=self.listening,
            delivering=self.delivering,
            local_rates=self.local_rates,
            on_list_error=self.log.panic,
            check_environment=check,
            timed_by=None if self.metrics is None else self.log,
        )

    def make_context(self, submit: Callable[[str], None]) -> ServerContext:
        return ServerContext(
            log=self.log,
            spool=self.spool,
            queue_ids=QueueIdGenerator(),
            submit=submit,
            current=lambda: self.generation,
            incidents=IncidentRecorder(self.log),
            facts=self.facts,
        )

    def start_runner(self) -> QueueRunner:
        self.runner = build_runner(self.generation, self.spool, self.log)
        return self.runner

    def reload_and_probe(self) -> None:
        """SIGHUP in a listening process: reload, then probe the new rules' zones at once."""
        new = self.reload()
        if new is not None and new.config.dns.dnsbl_probe_interval > 0:
            from palisade.server.probes import probe_once

            asyncio.get_running_loop().create_task(
                probe_once(new.policy, new.session_ports, self.log)
            )

    def reload(self) -> Generation | None:
        """SIGHUP: builds a whole new generation from the config file and swaps it in; a config
        or a part that fails is refused with a panic-log line and the old generation stays in
        force, whole. Sessions in progress keep the generation they began with; the old one is
        closed when the last of them ends. Returns the new generation, or None."""
        old = self.generation
        if self.announces:  # the process systemd watches: RELOADING=1, then READY=1 either way
            notify.reloading()
        try:
            loaded = load_config(self.config_path)
            config = keep_running(old.config, loaded)  # restart keys keep their running values
            new = self._build(config, number=old.number + 1, check=True)
        except (ConfigError, GenerationError, OSError) as exc:
            self.log.panic(f"reload refused, old configuration stays in force: {exc}")
            if self.announces:
                notify.ready(f"reload refused, generation {old.number} stays in force: {exc}")
            return None
        if self.announces:
            for key in restart_needed(old.config, loaded):
                self.log.panic(
                    f"reload: {key} changed in {new.config.source}: restart needed for it to "
                    "take effect (the running value stays in force until then)"
                )
        self.generation = new  # the swap: new sessions and the next delivery attempt use it
        if self.runner is not None:
            deliver_with(self.runner, new)
        old.retire()
        self.log.main(f"configuration reloaded from {new.config.source} (generation {new.number})")
        if self.announces:
            notify.ready(f"serving, generation {new.number} from {new.config.source}")
        return new

    def start_probes(self) -> asyncio.Task[None] | None:
        """DNSBL zone probes for this process's rules (each process holds its own policy)."""
        interval = self.config.dns.dnsbl_probe_interval
        if interval <= 0:
            return None
        from palisade.server.probes import probe_forever

        return asyncio.get_running_loop().create_task(
            probe_forever(
                lambda: (self.generation.policy, self.generation.session_ports), self.log, interval
            )
        )

    def close(self) -> None:
        """At the end: the spool and the current generation's clients (the router is closed by
        the queue runner's stop)."""
        self.spool.close()
        self.facts.close()
        close_ports_of(self.generation)

    def reopen_logs(self) -> None:
        """SIGUSR1: the log files and the facts file opened again at their paths."""
        self.log.reopen()
        self.facts.reopen()

    def install_signals(
        self, on_hup: Callable[[], None], on_usr1: Callable[[], None] | None = None
    ) -> None:
        """The loop's handlers (SIGUSR1: ``on_usr1``, by default reopen the logs); then acts on
        a signal remembered before the loop started, and releases those held since (see
        :class:`StartupSignals`)."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, on_usr1 or self.reopen_logs)
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        if startup_signals.stop:
            self.stopping.set()
        elif startup_signals.reload:
            startup_signals.reload = False
            on_hup()
        startup_signals.release()


def close_ports_of(generation: Generation) -> None:
    """Writes pending rate hits and closes the state database, the LDAP connection and the
    scanners of ``generation`` (at shutdown, whoever still holds it)."""
    if generation.ports is not None:
        close_ports(generation.ports)


async def run_single(
    config: Config,
    config_path: Path | None,
    sockets: list[socket.socket],
    ctl: control.ControlSocket | None = None,
    metrics: Metrics | None = None,
    metrics_socket: socket.socket | None = None,
) -> None:
    """workers = 1: listener and queue runner in one process; it answers ``ctl`` too, and
    serves ``/metrics`` on ``metrics_socket``."""
    gw = Gateway(config, config_path, local_rates=True, metrics=metrics)
    runner = gw.start_runner()
    ctx = gw.make_context(runner.submit)
    await runner.start()
    listener = Listener(ctx, sockets)
    await listener.start()
    probes = gw.start_probes()
    status = (
        None
        if ctl is None
        else control.serve_status(ctl, gw, connections=lambda: len(listener.sessions))
    )
    endpoint = await serve_metrics(metrics_socket, gw.spool)
    gw.install_signals(gw.reload_and_probe)
    gw.log.main(
        f"palisade daemon started: pid={os.getpid()}, listening on "
        f"{', '.join(listen_addresses(config))}, config {config.source}"
    )
    notify.ready(
        f"serving on {', '.join(listen_addresses(config))}, generation {gw.generation.number}"
    )
    await gw.stopping.wait()
    notify.stopping()
    gw.log.main("SIGTERM received: no longer accepting connections, finishing transactions")
    if probes is not None:
        probes.cancel()
    await listener.shutdown(SHUTDOWN_GRACE)
    await ctx.incidents.drain(INCIDENT_DRAIN)
    await runner.stop()
    if status is not None:
        await status.close()
    if endpoint is not None:
        await endpoint.close()
    gw.close()
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
    channel: socket.socket | None = None,
    metrics: Metrics | None = None,
) -> None:
    """A listening worker: commits to the spool and tells the parent the queue id.

    ``steered``: the parent attached the steering program to the group, so every client of this
    worker comes to it alone and its rate counters can be kept in memory. ``parent_fd``: the
    read end of a pipe only the parent can write to; end of file on it means the parent is gone.
    ``counts``: the per-IP connection counts shared with the other workers, of which column
    ``slot`` is this worker's (None: this worker's own counts are exact). ``channel``: where the
    parent asks for this worker's part of ``palisade status`` (:mod:`.control`)."""
    gw = Gateway(
        config,
        config_path,
        local_rates=steered,
        delivering=False,
        announces=False,
        metrics=metrics,
    )
    gw.spool.pool.share(slot, config.server.workers)  # free/: see FilePool.share
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
    gw.install_signals(gw.reload_and_probe)
    if gw.stopping.is_set():  # SIGTERM, or the parent gone, while this worker started
        for sock in sockets:
            sock.close()
        gw.close()
        return
    shared = counts.for_slot(slot, gw.log.panic) if counts is not None else None
    listener = Listener(ctx, sockets, shared)
    await listener.start()
    probes = gw.start_probes()
    answering = (
        None
        if channel is None
        else loop.create_task(control.answer_parent(channel, gw, lambda: len(listener.sessions)))
    )
    await gw.stopping.wait()
    if parent_gone:
        gw.log.panic(
            f"worker {os.getpid()}: the parent process is gone: no longer accepting "
            "connections, finishing transactions"
        )
    if probes is not None:
        probes.cancel()
    if answering is not None:
        answering.cancel()
    await listener.shutdown(SHUTDOWN_GRACE)
    await ctx.incidents.drain(INCIDENT_DRAIN)
    gw.close()


async def run_parent(
    config: Config,
    config_path: Path | None,
    notify_read: int,
    workers: dict[int, int],
    spawn: Callable[[int, Config], int],
    listening: list[socket.socket],
    counts: SharedCounts | None = None,
    ctl: control.ControlSocket | None = None,
    channels: control.WorkerChannels | None = None,
    metrics: Metrics | None = None,
    metrics_socket: socket.socket | None = None,
) -> None:
    """The parent of workers: runs the queue runner, forwards signals, restarts dead workers.

    It holds the ``listening`` sockets for the workers it restarts, never accepts on them, and
    closes them when it stops. ``counts``: the per-IP table shared by unsteered workers; a dead
    worker's counts are cleared before its slot is started again. A worker started again gets
    the parent's newest config (the one its generation was built from), not the file as it is
    now nor the one the gateway started with. ``ctl``: the control socket the parent answers,
    asking the workers over ``channels``. ``metrics_socket``: where it serves ``/metrics``, the
    sum of every process's counts (``palisade.obs.metrics``)."""
    gw = Gateway(config, config_path, listening=False, metrics=metrics)

    def on_hup() -> None:
        gw.reload()
        for pid in workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    def on_usr1() -> None:
        gw.log.reopen()
        for pid in workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)

    gw.install_signals(on_hup, on_usr1)
    runner = gw.start_runner()
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
        f"{', '.join(listen_addresses(config))}, config {config.source}"
    )

    async def reap() -> None:
        while not gw.stopping.is_set():
            await asyncio.sleep(0.5)
            for slot, pid in list(workers.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done and not gw.stopping.is_set():
                    gw.log.panic(f"worker {pid} exited (status {status}); starting a new one")
                    if metrics is not None:
                        worker_gone(pid)
                    if counts is not None:
                        counts.clear_slot(slot)
                    workers[slot] = spawn(slot, gw.config)

    reaper = loop.create_task(reap())
    notify.ready(
        f"serving on {', '.join(listen_addresses(config))} with {len(workers)} workers, "
        f"generation {gw.generation.number}"
    )
    status = (
        None if ctl is None else control.serve_status(ctl, gw, workers=workers, channels=channels)
    )
    endpoint = await serve_metrics(metrics_socket, gw.spool)
    await gw.stopping.wait()
    notify.stopping()
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
    if status is not None:
        await status.close()
    if endpoint is not None:
        await endpoint.close()
    gw.close()
    gw.log.main("palisade daemon stopped")


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
    try:  # root without [server] user on port 25, or a user this process cannot become
        account = privileges.service_account(config)  # and the paths it cannot make itself
    except privileges.Refused:
        return 2
    from palisade.server.selfcheck import check_before_serving

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
    try:  # before the ports: a daemon already running is found here, even on SO_REUSEPORT
        ctl = control.create_control_socket(
            config.server.control_socket,
            uid=None if account is None else account.uid,
            gid=None if account is None else account.gid,
        )
    except control.ControlSocketError as exc:
        print(f"palisade: {exc}", file=sys.stderr)
        return 1
    atexit.register(ctl.remove)  # at a clean stop, in this process only (workers use _exit)
    workers = config.server.workers
    try:  # with workers, one SO_REUSEPORT socket per worker and address, all made before fork
        groups = [
            [bind_socket(a, reuse_port=workers > 1) for a in listen_addresses(config)]
            for _ in range(workers)
        ]
    except OSError as exc:
        print(
            f"palisade: cannot listen on {', '.join(listen_addresses(config))}: {exc}",
            file=sys.stderr,
        )
        return 1
    metrics_socket = None
    if config.metrics.listen:
        try:
            metrics_socket = bind_socket(config.metrics.listen, reuse_port=False)
        except OSError as exc:
            print(
                f"palisade: {config.source}: metrics.listen: cannot listen on "
                f"{config.metrics.listen}: {exc.strerror or exc}",
                file=sys.stderr,
            )
            return 1
    try:  # before the drop: /run/palisade may be root's (systemd's RuntimeDirectory)
        write_pid_file(config)
    except OSError as exc:
        print(
            f"palisade: {config.source}: server.pid_file: cannot write "
            f"{config.server.pid_file}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    if not privileges.drop(config, config_path, account):  # from here on, never root again
        remove_pid_file(config)
        return 1
    if startup_signals.stop:  # SIGTERM while starting: nothing forked, nothing to recover
        remove_pid_file(config)
        return 0
    try:  # as the service user: the processes' files are its own
        metrics = start_metrics(config, policy)
    except OSError as exc:
        print(
            f"palisade: {config.source}: metrics.dir: cannot use "
            f"{config.metrics.directory(config.paths.spool)}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        remove_pid_file(config)
        return 1
    try:
        return _serve_bound(config, config_path, groups, ctl, metrics, metrics_socket)
    finally:
        remove_pid_file(config)


def _serve_bound(
    config: Config,
    config_path: Path | None,
    groups: list[list[socket.socket]],
    ctl: control.ControlSocket,
    metrics: Metrics | None = None,
    metrics_socket: socket.socket | None = None,
) -> int:
    """``serve`` once the listeners are bound: the single process, or the parent's workers."""
    workers = config.server.workers
    # From here on a signal waits in the kernel until a loop's handlers take it (StartupSignals):
    # the workers forked below are born with the same mask.
    startup_signals.hold()
    if workers == 1:
        asyncio.run(run_single(config, config_path, groups[0], ctl, metrics, metrics_socket))
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
    recovery_log = open_event_log(config)
    recovery_spool = Spool(config.paths.spool)
    recovery_spool.recover(recovery_log)
    recovery_spool.close()  # no commit thread may live across fork()
    recovery_log.close()
    notify_read, notify_write = os.pipe()
    parent_read, parent_write = os.pipe()  # the write end stays in the parent alone
    parent = os.getpid()
    # Unsteered, one client's connections reach several workers: they count them together.
    counts = None if attached else SharedCounts(workers, config.server.max_connections)
    channels = control.WorkerChannels()

    def spawn(slot: int, config: Config) -> int:
        """Starts worker ``slot`` on ``config`` (the parent's newest)."""
        before = startup_signals.hold()  # the worker is born with them held (StartupSignals)
        channels.pair(slot)
        try:
            pid = os.fork()
        finally:
            if os.getpid() == parent:  # the parent goes on with the mask it had
                signal.pthread_sigmask(signal.SIG_SETMASK, before)
        if pid == 0:
            code = 0
            try:
                startup_signals.install(worker=True)  # not the parent loop's, which wake it
                os.close(parent_write)
                die_with_parent(parent)
                os.close(notify_read)
                ctl.close_in_child()
                if metrics_socket is not None:  # the parent's alone
                    metrics_socket.close()
                channel = channels.in_worker()
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
                        channel=channel,
                        metrics=metrics,
                    )
                )
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            os._exit(code)
        channels.forked()
        return pid

    children = {}
    for slot in range(workers):
        if startup_signals.stopping():  # SIGTERM already: run_parent stops the ones started
            break
        children[slot] = spawn(slot, config)
    asyncio.run(
        run_parent(
            config,
            config_path,
            notify_read,
            children,
            spawn,
            every_socket,
            counts,
            ctl,
            channels,
            metrics,
            metrics_socket,
        )
    )
    return 0
