"""``palisade firewall``: the state store's active blocks kept in nftables (run as root).

Owns: the daemon's life (start, sync every ``[firewall] interval``, SIGHUP reload, SIGTERM and
SIGINT stop), ``--once`` (one sync, for cron) and ``--flush`` (remove the table), their exit
status and their lines on stderr (the journal, or cron's mail). The sync itself is
:class:`palisade.feedback.firewall.FirewallSync`; the kernel side is
:class:`palisade.adapters.nftables.NftablesFirewall`.

Start: the table is rebuilt whole from the store (blocks written while no daemon ran are in the
sets before the first sync). Stop: the table and its sets stay as they are, so a restart (or a
crash) does not open the door; each element ends by itself at its block's end. ``--flush`` is
how the operator removes the table (every block and the rule). A reload (SIGHUP) reads the
config again: new ports, another table name (the old table is removed), another state file, a
new protection list; a config that does not load is named on stderr and the old one stays;
``backend = "none"`` stops the daemon (the table stays: ``--flush`` removes it).
Exit status: 0 done (or stopped by a signal); 1 the first rebuild, a ``--once`` sync or a
``--flush`` failed (nft missing, no permission: run as root); 2 bad usage (main). A failure
after the start is logged and retried at the next interval.

Trust: the config is the operator's (validated by the loader); the store is ours (its keys are
validated again by the adapter). The state file is not created here: while it is missing (no
gateway has run yet) there is nothing blocked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from palisade.adapters.nftables import NftablesFirewall
from palisade.adapters.sqlite_state import SchemaError, SqliteStateStore
from palisade.clock import SYSTEM_CLOCK
from palisade.config import Config, ConfigError, load_config
from palisade.feedback.firewall import FirewallSync
from palisade.obs.log import escape
from palisade.ports import Block, FirewallError, StateStore, StateTempError
from palisade.server.generation import build_shared_store

if TYPE_CHECKING:
    from palisade.adapters.redis_state import RedisStateStore


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.1 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"must be between 0.1 and 86400 seconds: {value:g}")
    return value


def add_arguments(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``firewall`` to ``subparsers`` (from ``add_subparsers()``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "firewall", help="keep the active blocks in nftables (as root; a daemon, or --once)"
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--once", action="store_true", help="sync once and exit (for cron)")
    what.add_argument(
        "--flush", action="store_true", help="remove Palisade's nftables table and exit"
    )
    parser.add_argument(
        "--interval",
        type=_seconds,
        metavar="S",
        help="seconds between syncs (default: [firewall] interval)",
    )
    parser.add_argument("--config", type=Path)
    return parser


class _EmptyStore:
    """The state file does not exist yet: nothing is blocked (and nothing is created)."""

    async def active_blocks(self, now: float) -> list[Block]:
        return []


def _protection(config: Config) -> Callable[[str], str | None]:
    """``Protection.why`` of ``config``: loopback, relay_from_hosts, the connect whitelists
    (their list files as they are now and after each change). ConfigError if a list is bad."""
    from palisade.config.feedback import build_protection
    from palisade.config.policy import build_policy

    return build_protection(config, build_policy(config)).why


class _Daemon:
    def __init__(self, config: Config, interval: float | None, err: TextIO) -> None:
        self.err = err
        self.interval_override = interval
        self.config = config
        self.store: SqliteStateStore | RedisStateStore | None = None
        self.store_of: object = None
        self.firewall = self._firewall(config)
        self.sync = self._sync(config, _protection(config))

    def log(self, line: str) -> None:
        self.err.write(f"palisade {line}\n")
        self.err.flush()

    @property
    def interval(self) -> float:
        return self.interval_override or self.config.firewall.interval

    @staticmethod
    def _firewall(config: Config) -> NftablesFirewall:
        return NftablesFirewall(table=config.firewall.table, ports=config.firewall.ports)

    def _open_store(self, config: Config) -> StateStore | _EmptyStore:
        state = config.paths.state
        where = (config.state.backend, config.state) if config.state.backend == "redis" else state
        if self.store is not None and self.store_of == where:
            return self.store
        if self.store is not None:
            self.store.close()
            self.store = None
        if config.state.backend != "redis" and not state.exists():
            return _EmptyStore()
        self.store = build_shared_store(config)  # Redis: the blocks of every MX host
        self.store_of = where
        return self.store

    def _sync(self, config: Config, protected: Callable[[str], str | None]) -> FirewallSync:
        store: Any = self._open_store(config)
        return FirewallSync(
            store,
            self.firewall,
            protected=protected,
            log=self.log,
            clock=SYSTEM_CLOCK,
        )

    def _refresh_store(self) -> None:
        """The state file appeared since the start (the gateway's first run): open it."""
        if self.store is None and (
            self.config.state.backend == "redis" or self.config.paths.state.exists()
        ):
            self.sync.store = self._open_store(self.config)  # type: ignore[assignment]

    async def once(self, rebuild: bool) -> bool:
        try:
            self._refresh_store()
            if rebuild:
                await self.sync.start()
            else:
                await self.sync.step()
        except FirewallError as exc:
            self.log(f"firewall: nftables: {escape(exc.reason)}")
            return False
        except StateTempError as exc:
            self.log(f"firewall: state store {self.config.paths.state}: {escape(exc.reason)}")
            return False
        except (SchemaError, OSError) as exc:
            self.log(f"firewall: state store {self.config.paths.state}: {escape(str(exc))}")
            return False
        return True

    def reload(self, path: Path | None) -> bool:
        try:
            config = load_config(path)
            protected = _protection(config)
        except ConfigError as exc:
            self.log(f"firewall: reload refused, the old config stays: {exc}")
            return False
        old = self.firewall
        self.config = config
        self.firewall = self._firewall(config)
        self.sync = self._sync(config, protected)
        if old.table != self.firewall.table:
            try:
                old.remove()
                self.log(
                    f"firewall: table inet {old.table} removed (now inet {config.firewall.table})"
                )
            except FirewallError as exc:
                self.log(f"firewall: table inet {old.table} not removed: {escape(exc.reason)}")
        self.log(f"firewall: config reloaded from {config.source}")
        return True

    async def run(self, path: Path | None) -> int:
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        pending: set[int] = set()

        def on_signal(signum: int) -> None:
            pending.add(signum)
            wake.set()

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(signum, on_signal, signum)
        if not await self.once(rebuild=True):
            return 1
        self.log(
            f"firewall: started: table inet {self.firewall.table}, ports"
            f" {', '.join(map(str, self.firewall.ports))}, sync every {self.interval:g}s"
        )
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.interval)
            wake.clear()
            if pending & {signal.SIGTERM, signal.SIGINT}:
                self.log(f"firewall: stopped; table inet {self.firewall.table} left in place")
                return 0
            if signal.SIGHUP in pending:
                pending.discard(signal.SIGHUP)
                if self.reload(path):
                    if self.config.firewall.backend == "none":
                        self.log(
                            'firewall: [firewall] backend is now "none": stopped; table inet'
                            f" {self.firewall.table} left in place (palisade firewall --flush)"
                        )
                        return 0
                    await self.once(rebuild=True)
                    continue
            await self.once(rebuild=False)


def run(args: argparse.Namespace, config: Config, *, err: TextIO | None = None) -> int:
    """Execute ``palisade firewall``; returns the exit status."""
    err = sys.stderr if err is None else err
    if config.firewall.backend == "none":
        err.write('palisade firewall: [firewall] backend is "none": nothing to do\n')
        return 0
    try:
        daemon = _Daemon(config, args.interval, err)
    except ConfigError as exc:
        err.write(f"palisade: {exc}\n")
        return 2
    except (StateTempError, SchemaError, OSError) as exc:
        err.write(f"palisade firewall: state store {config.paths.state}: {escape(str(exc))}\n")
        return 1
    try:
        if args.flush:
            try:
                removed = daemon.firewall.remove()
            except FirewallError as exc:
                daemon.log(f"firewall: nftables: {escape(exc.reason)}")
                return 1
            table = f"table inet {config.firewall.table}"
            daemon.log(f"firewall: {table} removed" if removed else f"firewall: no {table}")
            return 0
        if args.once:
            return 0 if asyncio.run(daemon.once(rebuild=False)) else 1
        return asyncio.run(daemon.run(args.config))
    finally:
        if daemon.store is not None:
            daemon.store.close()
