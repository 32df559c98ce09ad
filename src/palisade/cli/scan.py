"""``palisade scan``: other programs' logs (Dovecot, Postfix, exim, the operator's patterns) read
into the incident store, as a daemon or ``--once``.

Owns: the command's loop, its signals (SIGTERM and SIGINT stop it cleanly between two batches of
lines, offsets saved; SIGHUP reloads the config at the end of the current pass, a bad new
config is one error line and the old one stays), its output (one line per hit in the main log's
shape, with the rule, the weight, the address's count and a new block; one summary line per
pass that read anything) and its exit status: 0 done (or stopped by a signal); 1 an unusable
file, offsets file or state store; 2 a bad config (from ``palisade.cli.main``).

Every hit goes through :func:`palisade.feedback.incidents.record` with the config's block policy
and protection (a protected address is counted, never blocked). A hit stamped older than the
``[incidents] window`` is not recorded (it would count for nothing); a time stamp in the future
is taken as now. A line is recorded at most once: offsets are saved after each batch, so only a
crash between the store's commit of a batch and the save of its offsets can repeat that batch.
In the daemon a store that fails is retried each second (the batch is not given up, so it is
not counted twice); ``--once`` stops with status 1 and leaves that batch for the next run.

Trust: the lines are untrusted (see :mod:`palisade.feedback.logscan`); what is printed of them
is the validated address and our own rule names, escaped anyway.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from palisade.config import Config, ConfigError, load_config
from palisade.config.feedback import block_policy, build_protection
from palisade.config.policy import build_policy
from palisade.feedback.follow import Follower, OffsetsError, PassStats
from palisade.feedback.incidents import describe_block, record, stamp
from palisade.feedback.logscan import LineParser, compile_pattern
from palisade.feedback.protect import Protection
from palisade.obs.log import escape
from palisade.ports import BlockPolicy, StateTempError

__all__ = ["add_arguments", "run"]


def add_arguments(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``scan`` to ``subparsers`` (the caller adds ``--config``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "scan",
        help="read Dovecot, Postfix and exim logs into the incident store (daemon, or --once)",
    )
    parser.add_argument(
        "--once", action="store_true", help="read what is new in each file, then exit"
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no line per hit")
    parser.add_argument(
        "files", nargs="*", type=Path, metavar="FILE", help="read these instead of [scan] files"
    )
    return parser


@dataclass(slots=True)
class _Setup:
    config: Config
    parser: LineParser
    policy: BlockPolicy
    protection: Protection
    files: list[Path]


def _setup(config: Config, files: list[Path]) -> _Setup:
    """Everything a pass needs from ``config``; ConfigError when the config cannot be used."""
    scan = config.scan
    patterns = [compile_pattern(p.rule, p.regex, p.weight) for p in scan.patterns]
    parser = LineParser(dict(scan.weights), patterns, max_line=scan.max_line, families=scan.formats)
    protection = build_protection(config, build_policy(config))
    return _Setup(config, parser, block_policy(config), protection, files or list(scan.files))


class _Stopped(Exception):
    """A signal asked the scan to stop: the batch at hand is left for the next run."""


class _Scan:
    def __init__(
        self, setup: _Setup, store: Any, *, once: bool, quiet: bool, out: TextIO, err: TextIO
    ) -> None:
        self.setup = setup
        self.store = store
        self.once = once
        self.quiet = quiet
        self.out, self.err = out, err
        self.stop = asyncio.Event()
        self.wake = asyncio.Event()
        self.reload = False
        self.hits = 0
        self.old = 0
        self.pass_hits = 0

    async def handle(self, path: str, lines: list[str]) -> None:
        if self.stop.is_set():
            raise _Stopped
        setup = self.setup
        now = time.time()
        horizon = now - setup.policy.window
        parse = setup.parser.parse
        for line in lines:
            hit = parse(line, now)
            if hit is None:
                continue
            at = now if hit.at is None or hit.at > now else hit.at
            if at <= horizon:
                self.old += 1
                continue
            outcome = await self._record(hit.ip, hit.weight, hit.rule, at)
            self.hits += 1
            self.pass_hits += 1
            if self.quiet and not outcome.new_block:
                continue
            text = (
                f"{stamp(time.time())} scan: H=[{hit.ip}] {escape(hit.rule)} weight "
                f"{hit.weight} count {outcome.count} ({escape(path)})"
            )
            if outcome.new_block and outcome.block is not None:
                text += f" blocked {describe_block(outcome.block)}"
            elif outcome.count >= setup.policy.block_at and outcome.block is None:
                why = setup.protection.why(hit.ip)
                if why:
                    text += f" not blocked: protected ({escape(why)})"
            self.out.write(text + "\n")
        self.out.flush()

    async def _record(self, ip: str, weight: int, rule: str, at: float) -> Any:
        setup = self.setup
        while True:
            try:
                return await record(
                    self.store, ip, weight, rule, setup.policy, setup.protection, at
                )
            except StateTempError as exc:
                if self.once:
                    raise
                self.err.write(
                    f"{stamp(time.time())} scan: state store unavailable: "
                    f"{escape(exc.reason)}; retrying\n"
                )
                self.err.flush()
                try:
                    await asyncio.wait_for(self.stop.wait(), 1.0)
                except TimeoutError:
                    continue
                raise _Stopped from None

    def summary(self, results: list[PassStats]) -> None:
        parts = []
        for stats in results:
            if not (stats.lines or stats.overlong or stats.rotated or stats.truncated):
                continue
            if not (
                self.once or self.pass_hits or stats.overlong or stats.rotated or stats.truncated
            ):
                continue  # the daemon is quiet about passes that found nothing
            notes = [f"{stats.lines} lines"]
            if stats.overlong:
                notes.append(f"{stats.overlong} too long, skipped")
            if stats.rotated:
                notes.append("rotated")
            if stats.truncated:
                notes.append("truncated, read from the start")
            parts.append(f"{escape(stats.path)} ({', '.join(notes)})")
        if parts or self.once:
            old = f", {self.old} older than the window" if self.old else ""
            self.out.write(
                f"{stamp(time.time())} scan: pass: {self.pass_hits} hit(s){old}; "
                f"{'; '.join(parts) or 'nothing new'}\n"
            )
            self.out.flush()
        self.pass_hits = 0
        self.old = 0


def run(
    args: argparse.Namespace,
    config: Config,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Execute ``palisade scan``; returns the exit status."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        setup = _setup(config, list(args.files))
    except ConfigError as exc:
        err.write(f"palisade: {exc}\n")
        return 2
    if not setup.files:
        err.write(
            "palisade scan: no files to read: set [scan] files in the config "
            f"({config.source}) or name them on the command line\n"
        )
        return 1
    from palisade.adapters.sqlite_state import SchemaError
    from palisade.server.generation import build_shared_store

    state = config.paths.state
    try:
        store = build_shared_store(config)  # Redis: the incidents of every MX host
    except ConfigError as exc:
        err.write(f"palisade: {exc}\n")
        return 2
    except (StateTempError, SchemaError, OSError) as exc:
        err.write(f"palisade scan: cannot open the state database {state}: {exc}\n")
        return 1
    try:
        follower = Follower(
            setup.files,
            config.scan.offsets_path(state),
            max_line=config.scan.max_line,
            keep_open=not args.once,
        )
        scan = _Scan(setup, store, once=args.once, quiet=args.quiet, out=out, err=err)
        return asyncio.run(_main(scan, follower, args))
    except OffsetsError as exc:
        err.write(f"palisade scan: {exc}\n")
        return 1
    except StateTempError as exc:
        err.write(f"palisade scan: state store unavailable: {escape(exc.reason)}\n")
        return 1
    finally:
        store.close()


async def _main(scan: _Scan, follower: Follower, args: argparse.Namespace) -> int:
    if args.once:
        try:
            scan.summary(await follower.run_pass(scan.handle))
        finally:
            follower.close()
        return 0
    loop = asyncio.get_running_loop()

    def stop() -> None:
        scan.stop.set()
        scan.wake.set()

    def hup() -> None:
        scan.reload = True
        scan.wake.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    loop.add_signal_handler(signal.SIGHUP, hup)
    files = ", ".join(escape(str(p)) for p in scan.setup.files)
    scan.out.write(
        f"{stamp(time.time())} scan: started, every {scan.setup.config.scan.interval:g}s: {files}\n"
    )
    scan.out.flush()
    try:
        while not scan.stop.is_set():
            try:
                scan.summary(await follower.run_pass(scan.handle))
            except _Stopped:
                break
            if scan.reload:
                scan.reload = False
                follower = _reload(scan, follower, args)
            if scan.stop.is_set():
                break
            scan.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(scan.wake.wait(), scan.setup.config.scan.interval)
            if scan.reload:
                scan.reload = False
                follower = _reload(scan, follower, args)
    finally:
        follower.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    scan.out.write(f"{stamp(time.time())} scan: stopped, {scan.hits} hit(s) recorded\n")
    scan.out.flush()
    return 0


def _reload(scan: _Scan, follower: Follower, args: argparse.Namespace) -> Follower:
    """The config read again (SIGHUP): patterns, weights, files, block policy, protection. The
    state database and offsets file stay those the scan started with (a restart changes
    them)."""
    source = scan.setup.config.source
    try:
        config = load_config(None if source.startswith("<") else Path(source))
        setup = _setup(config, list(args.files))
    except ConfigError as exc:
        scan.err.write(f"{stamp(time.time())} scan: reload failed, old config kept: {exc}\n")
        scan.err.flush()
        return follower
    old = scan.setup
    setup.files = setup.files or old.files
    scan.setup = setup
    scan.out.write(f"{stamp(time.time())} scan: config reloaded from {escape(source)}\n")
    scan.out.flush()
    if [str(p) for p in setup.files] == follower.paths:
        return follower
    follower.close()
    return Follower(
        setup.files,
        old.config.scan.offsets_path(old.config.paths.state),
        max_line=setup.config.scan.max_line,
        keep_open=True,
    )
