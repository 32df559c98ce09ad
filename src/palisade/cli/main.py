"""The ``palisade`` command: serve, queue administration, config checking.

Owns argument parsing only; each command is a thin call into the public API of the other
packages. Exit status: 0 success, 1 operational failure, 2 bad usage or bad config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from palisade import __version__
from palisade.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="palisade", description="Palisade: a hardened SMTP spam perimeter."
    )
    parser.add_argument("--version", action="version", version=f"palisade {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the SMTP gateway")
    serve.add_argument("--config", type=Path, help="TOML config (default: the bundled demo)")

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a config and print it")
    check.add_argument("--config", type=Path)

    from palisade.cli import queue as queue_cli

    queue = queue_cli.add_arguments(commands)
    queue.add_argument("--config", type=Path)
    for action in queue._subparsers._group_actions if queue._subparsers else ():
        for leaf in getattr(action, "choices", {}).values():
            # also accepted after the sub-command: ``palisade queue list --config FILE``
            leaf.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from palisade.server.app import serve

        return serve(args.config)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"palisade: {exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        return _config_check(config)
    from palisade.cli import queue as queue_cli
    from palisade.obs.log import FileEventLog
    from palisade.spool import Spool

    spool = Spool(config.paths.spool)
    log = FileEventLog(config.paths.log)
    try:
        return queue_cli.run(args, spool, log)
    finally:
        spool.close()
        log.close()


def _config_check(config: object) -> int:
    from palisade.config import Config

    assert isinstance(config, Config)
    print(f"configuration {config.source} is valid")
    for section in ("server", "limits", "tls", "domains", "relay", "delivery", "paths", "log"):
        print(f"[{section}]")
        value = getattr(config, section)
        for name in value.__dataclass_fields__:
            print(f"  {name} = {getattr(value, name)!r}")
    return 0
