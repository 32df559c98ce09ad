"""The ``palisade`` command: serve, queue administration, config checking.

Owns argument parsing and the process umask (0077, set before any command runs); each command is
a thin call into the public API of the other packages. Exit status: 0 success, 1 operational
failure, 2 bad usage or bad config.
"""

from __future__ import annotations

import argparse
import os
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

    from palisade.cli import checkhost
    from palisade.cli import history as history_cli
    from palisade.cli import queue as queue_cli
    from palisade.cli import recipients as recipients_cli

    checkhost.add_arguments(commands)
    history = history_cli.add_arguments(commands)
    history.add_argument("--config", type=Path)
    _config_after_subcommand(history)
    queue = queue_cli.add_arguments(commands)
    queue.add_argument("--config", type=Path)
    _config_after_subcommand(queue)
    recipients = recipients_cli.add_arguments(commands)
    recipients.add_argument("--config", type=Path)
    _config_after_subcommand(recipients)
    return parser


def _config_after_subcommand(parser: argparse.ArgumentParser) -> None:
    """Also accept ``--config`` after the sub-command: ``palisade queue list --config FILE``."""
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        for leaf in getattr(action, "choices", {}).values():
            leaf.add_argument("--config", type=Path, default=argparse.SUPPRESS)


# Mail, queue files and the state database are nobody else's business, whatever umask the
# service manager or the operator's shell hands down: every command that may write starts with
# this one. Modes wider than 0600/0700 are given explicitly where they are wanted (logs 0640,
# the Maildir tree with ``[paths] group``).
UMASK = 0o077


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.umask(UMASK)
    if args.command == "serve":
        from palisade.server.app import serve

        return serve(args.config)
    if args.command == "check-host":
        from palisade.cli import checkhost

        return checkhost.main(args)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"palisade: {exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        return _config_check(config)
    if args.command == "recipients":
        from palisade.cli import recipients as recipients_cli

        return recipients_cli.run(args, config)
    if args.command == "history":
        from palisade.adapters.sqlite_state import SchemaError, SqliteStateStore
        from palisade.cli import history as history_cli
        from palisade.ports import StateTempError

        try:
            store = SqliteStateStore(config.paths.state)
        except (StateTempError, SchemaError) as exc:
            print(f"palisade: state database {config.paths.state}: {exc}", file=sys.stderr)
            return 1
        try:
            return history_cli.run(args, store)
        finally:
            store.close()
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


# Fields whose value is a secret: config check says whether they are set, never what they are.
_SECRET_FIELDS = frozenset({"bind_password", "password"})


def _config_check(config: object) -> int:
    from palisade.config import Config
    from palisade.config.policy import build_policy
    from palisade.policy.rules import Stage

    assert isinstance(config, Config)
    try:
        policy = build_policy(config)
    except ConfigError as exc:
        print(f"palisade: {exc}", file=sys.stderr)
        return 2
    print(f"configuration {config.source} is valid")
    for section in (
        "server",
        "limits",
        "tls",
        "domains",
        "relay",
        "delivery",
        "paths",
        "log",
        "dns",
        "policy",
        "ldap",
        "spamd",
        "rspamd",
        "clamd",
        "authentication",
    ):
        print(f"[{section}]")
        value = getattr(config, section)
        for name in value.__dataclass_fields__:
            shown = getattr(value, name)
            if name in _SECRET_FIELDS and shown:
                shown = "(set, not shown)"
            print(f"  {name} = {shown!r}")
    print("[lists]")
    for name, handle in policy.lists.handles.items():
        where = handle.path or "inline"
        print(f"  {name}: {handle.kind.value} list, {len(handle.value)} entries ({where})")
    print("rule order:")
    for stage in Stage:
        rules = policy.for_stage(stage)
        print(f"  {stage.value}:" + ("" if rules else " (none)"))
        for number, rule in enumerate(rules, 1):
            print(f"    {number}. {rule.describe()}")
    return 0
