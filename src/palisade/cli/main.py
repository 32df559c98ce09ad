"""The ``palisade`` command: serve, queue administration, config checking.

Owns argument parsing and the process umask (0077, set before any command runs); each command is a
thin call into the public API of the other packages. Exit status: 0 success; 1 operational failure
(an unusable path, an error found by the start-up self-check); 2 bad usage or a bad config file;
``status`` adds the LSB's 3 (not running) and 4 (unknown: permission denied, no answer).
Every failure is one line on stderr naming the file or key, never a traceback. A standard output
closed early (``palisade queue list | head -1``) ends the command quietly with status 0 (the reader
had what it wanted; ``config check`` keeps its own status), without a message.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from palisade import installed_version
from palisade.config import Config, ConfigError, load_config
from palisade.config.loader import resolve_config_path
from palisade.config.model import RESTART_KEYS
from palisade.policy.policy import Policy


def _parser() -> argparse.ArgumentParser:
    from palisade.cli import status as status_cli

    parser = argparse.ArgumentParser(
        prog="palisade", description="Palisade: a hardened SMTP spam perimeter."
    )
    parser.add_argument("--version", action="version", version=f"palisade {installed_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the SMTP gateway")
    serve.add_argument(
        "--config",
        type=Path,
        help="TOML config (default: /etc/palisade/palisade.toml if it exists, else the demo)",
    )

    commands.add_parser("version", help="print the installed version")
    status = status_cli.add_arguments(commands)
    status.add_argument("--config", type=Path)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a config and print it")
    check.add_argument("--config", type=Path)
    check.add_argument(
        "--json", action="store_true", help="print the effective config as JSON (for tools)"
    )
    check.add_argument(
        "--no-dns", action="store_true", help="skip the resolver and DNSBL probes of the self-check"
    )

    from palisade.cli import checkhost, install, replay, tlscheck
    from palisade.cli import dkim as dkim_cli
    from palisade.cli import dns as dns_cli
    from palisade.cli import firewall as firewall_cli
    from palisade.cli import history as history_cli
    from palisade.cli import init as init_cli
    from palisade.cli import passwd as passwd_cli
    from palisade.cli import queue as queue_cli
    from palisade.cli import recipients as recipients_cli
    from palisade.cli import scan as scan_cli
    from palisade.cli import stats as stats_cli

    checkhost.add_arguments(commands)
    replay.add_arguments(commands)
    install.add_arguments(commands)
    tlscheck.add_arguments(commands)
    init_cli.add_arguments(commands)
    history = history_cli.add_arguments(commands)
    history.add_argument("--config", type=Path)
    _config_after_subcommand(history)
    queue = queue_cli.add_arguments(commands)
    queue.add_argument("--config", type=Path)
    _config_after_subcommand(queue)
    for tool in (dkim_cli, dns_cli, passwd_cli):
        command = tool.add_arguments(commands)
        command.add_argument("--config", type=Path)
        _config_after_subcommand(command)
    firewall_cli.add_arguments(commands)
    recipients = recipients_cli.add_arguments(commands)
    recipients.add_argument("--config", type=Path)
    _config_after_subcommand(recipients)
    scan = scan_cli.add_arguments(commands)
    scan.add_argument("--config", type=Path)
    stats = stats_cli.add_arguments(commands)
    stats.add_argument("--config", type=Path)
    from palisade.cli import reports as reports_cli

    for command in reports_cli.add_arguments(commands):
        command.add_argument("--config", type=Path)
        _config_after_subcommand(command)
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
    try:
        status = _main(argv)
        sys.stdout.flush()  # inside the try: a closed pipe is often only seen here
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    return status


def _quiet_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so the interpreter's final flush cannot fail again
    (the idiom of the Python documentation, "Note on SIGPIPE")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    os.umask(UMASK)
    if args.command == "version":
        print(f"palisade {installed_version()}")
        return 0
    if hasattr(args, "config"):  # no --config: /etc/palisade/palisade.toml if it exists
        args.config = resolve_config_path(args.config)
    if args.command == "serve":
        from palisade.server.app import serve

        return serve(args.config)
    if args.command == "check-host":
        from palisade.cli import checkhost

        return checkhost.main(args)
    if args.command == "replay":
        from palisade.cli import replay

        return replay.main(args)
    if args.command in ("install-system", "uninstall-system"):
        from palisade.cli import install

        return install.run(args)
    if args.command == "tls":
        from palisade.cli import tlscheck

        return tlscheck.run(args)
    if args.command == "init":
        from palisade.cli import init as init_cli

        return init_cli.run(args)
    if args.command in ("dmarc", "tlsrpt") and args.reports_command == "report":
        from palisade.cli import reports as reports_cli

        return reports_cli.run_report(
            args.command, args.paths, as_json=args.json, domain=args.domain
        )
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"palisade: {exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        return _config_check(config, as_json=args.json, dns=not args.no_dns)
    if args.command == "recipients":
        from palisade.cli import recipients as recipients_cli

        return recipients_cli.run(args, config)
    if args.command == "status":
        from palisade.cli import status as status_cli

        return status_cli.run(args, config.server.control_socket)
    if args.command == "dkim":
        from palisade.cli import dkim as dkim_cli

        return dkim_cli.run(args, config)
    if args.command == "passwd":
        from palisade.cli import passwd as passwd_cli

        return passwd_cli.run(args, config)
    if args.command == "dns":
        from palisade.cli import dns as dns_cli

        return dns_cli.run(args, config)
    if args.command == "scan":
        from palisade.cli import scan as scan_cli

        return scan_cli.run(args, config)
    if args.command == "stats":
        from palisade.cli import stats as stats_cli

        return stats_cli.run(args, config)
    if args.command == "history":
        return _history(args, config)
    if args.command in ("dmarc", "tlsrpt"):
        from palisade.cli import reports as reports_cli

        return reports_cli.run_send(args, config)
    if args.command == "firewall":
        from palisade.cli import firewall as firewall_cli

        return firewall_cli.run(args, config)
    return _queue(args, config.paths.spool, config.paths.log)


def _history(args: argparse.Namespace, config: Config) -> int:
    from palisade.adapters.sqlite_state import SchemaError, SqliteStateStore
    from palisade.cli import history as history_cli
    from palisade.config.feedback import block_policy, build_protection
    from palisade.config.policy import build_policy
    from palisade.ports import StateTempError

    state = config.paths.state
    policy = block_policy(config)
    try:  # the connect whitelists are lists: their files must load to say who is protected
        protection = build_protection(config, build_policy(config))
    except ConfigError as exc:
        print(
            f"palisade: note: {exc}; only loopback and [relay] relay_from_hosts are known to "
            "be protected",
            file=sys.stderr,
        )
        protection = build_protection(config)
    # list, show and remove only read (remove of an absent record): a missing database is an
    # empty one, in memory, so that a read never creates the file or its directory.
    read_only = args.history_command in ("list", "show", "remove") and not state.exists()
    store: Any
    try:
        if config.state.backend == "redis":  # the shared store itself, not one host's file
            from palisade.server.generation import build_shared_store

            store = build_shared_store(config)
        else:
            store = SqliteStateStore(Path(":memory:") if read_only else state, policy=policy)
    except ConfigError as exc:
        print(f"palisade: {exc}", file=sys.stderr)
        return 2
    except (StateTempError, SchemaError, OSError) as exc:
        from palisade.server.selfcheck import state_problem

        print(
            f"palisade: {state_problem(state, f'state database {state}: {exc}')}", file=sys.stderr
        )
        return 1
    try:
        return history_cli.run(args, store, policy=policy, protection=protection)
    finally:
        store.close()


def _queue(args: argparse.Namespace, spool_path: Path, log_path: Path) -> int:
    from palisade.cli import queue as queue_cli
    from palisade.obs.log import FileEventLog, MemoryEventLog
    from palisade.spool import Spool

    if not spool_path.is_dir():  # nothing was ever queued here: create nothing
        if args.queue_command == "list":
            print(
                f"palisade: note: no spool at [paths] spool {spool_path} (nothing was ever "
                "queued here; is --config right?)",
                file=sys.stderr,
            )
            print("0 message(s) in the queue")
            return 0
        print(f"palisade queue: no spool at [paths] spool {spool_path}", file=sys.stderr)
        return 1
    try:
        spool = Spool(spool_path)
    except OSError as exc:
        print(
            f"palisade: cannot open [paths] spool {spool_path}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    try:  # only delete writes a log line
        log = FileEventLog(log_path) if args.queue_command == "delete" else MemoryEventLog()
    except OSError as exc:
        spool.close()
        print(
            f"palisade: cannot create [paths] log {log_path}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    try:
        return queue_cli.run(args, spool, log)
    finally:
        spool.close()
        if isinstance(log, FileEventLog):
            log.close()


# Keys whose value is a secret: config check says whether they are set, never what they are.
_SECRET_KEYS = frozenset({"bind_password", "password", "dqs_key"})
_NOT_SHOWN = "(set, not shown)"
_SECTIONS = (
    "server", "limits", "tls", "domains", "relay", "delivery", "paths", "log", "dns", "policy",
    "ldap", "spamd", "rspamd", "clamd", "authentication", "dkim", "dmarc", "submission",
    "incidents", "scan", "firewall", "metrics", "record", "state", "outbound",
)  # fmt: skip


def _config_check(config: Config, *, as_json: bool = False, dns: bool = True) -> int:
    from palisade.config.policy import build_policy
    from palisade.server.selfcheck import has_errors, run_selfcheck

    try:
        policy = build_policy(config)
    except ConfigError as exc:
        print(f"palisade: {exc}", file=sys.stderr)
        return 2
    findings = run_selfcheck(config, policy, dns=dns)
    status = 1 if has_errors(findings) else 0
    for finding in findings:
        print(finding.line(), file=sys.stderr)
    errors = sum(f.level == "error" for f in findings)
    warnings = sum(f.level == "warning" for f in findings)
    print(f"self-check: {errors} error(s), {warnings} warning(s)", file=sys.stderr)
    effective = effective_config(config)
    try:
        if as_json:
            document = {
                "source": config.source,
                "valid": status == 0,
                "findings": [f.as_dict() for f in findings],
                "config": effective,
                "restart_needed": list(RESTART_KEYS),  # what a reload cannot change
            }
            print(json.dumps(document, indent=2))
        else:
            verdict = "is valid" if status == 0 else "is valid, but the self-check found errors"
            print(f"# palisade config check: {config.source} {verdict}")
            print(to_toml(effective, policy))
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
    return status


def _redact(key: str, value: Any) -> Any:
    """``value`` with every secret replaced, at any depth (an option may be a table)."""
    if key in _SECRET_KEYS and value:
        return _NOT_SHOWN
    if isinstance(value, dict):
        return {k: _redact(k, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact("", v) for v in value]
    return value


def _plain(value: Any) -> Any:
    """A config value as a TOML/JSON value: paths and networks as strings, tuples as lists."""
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # [dkim] keys items
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return str(value)  # Path, IPv4Network, IPv6Network


def effective_config(config: Config) -> dict[str, Any]:
    """The config with every default filled in, secrets replaced by "(set, not shown)", in the
    shape the file is written in; ``None`` for a setting that is not set."""
    out: dict[str, Any] = {}
    for section in _SECTIONS:
        value = getattr(config, section)
        out[section] = {
            name: _redact(name, _plain(getattr(value, name))) for name in value.__dataclass_fields__
        }
    out["scan"]["weights"] = dict(config.scan.weights)
    out["outbound"]["domains"] = {
        domain: _plain(level) for domain, level in config.outbound.domains
    }
    out["scan"]["patterns"] = [
        {"rule": p.rule, "regex": p.regex, "weight": p.weight} for p in config.scan.patterns
    ]
    lists: dict[str, Any] = {}
    for spec in config.lists:
        entry: dict[str, Any] = {"type": spec.kind}
        if spec.file is not None:
            entry["file"] = str(spec.file)
        else:
            entry["entries"] = list(spec.entries)
        lists[spec.name] = entry
    out["lists"] = lists
    rules: dict[str, list[dict[str, Any]]] = {}
    for rule in config.rules:
        table: dict[str, Any] = {"check": rule.check, "verb": rule.verb}
        for name in (
            "name", "message", "log_message", "observe", "on_error", "timeout", "negate", "code",
            "enhanced", "recipient_domains", "incident",
        ):  # fmt: skip
            table[name] = _plain(getattr(rule, name))
        for key, option in rule.options:
            table[key] = _redact(key, _plain(option))
        rules.setdefault(rule.stage, []).append(table)
    out["rules"] = rules
    return out


def _toml_key(key: str) -> str:
    if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key):
        return key
    return _toml_string(key)


def _toml_string(text: str) -> str:
    # JSON's escapes are TOML's (ensure_ascii=False: no surrogate pairs); DEL must be escaped.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        items = ", ".join(
            f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None
        )
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"no TOML form for {value!r}")


RESTART_NOTE = "  # a reload does not change it: restart needed"


def _toml_table(table: dict[str, Any], restart: frozenset[str] = frozenset()) -> list[str]:
    """``restart``: the keys a reload cannot change, marked with :data:`RESTART_NOTE`."""
    lines = []
    for key, value in table.items():
        note = RESTART_NOTE if key in restart else ""
        if value is None:  # TOML has no null: say it is not set, in a comment
            lines.append(f"# {key} is not set{note}")
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}{note}")
    return lines


def to_toml(effective: dict[str, Any], policy: Policy) -> str:
    """``effective_config`` as TOML that ``tomllib`` reads back to the same values (``None``
    settings left out); rules as ``[[rules.<stage>]]`` tables in evaluation order, each under a
    comment with its number and description; the DATA rules ``[clamd]`` and ``[spamd]`` or
    ``[rspamd]`` imply (before and after the operator's) as comments; the keys a reload cannot
    change (``RESTART_KEYS``) each with a comment saying so."""
    from palisade.policy.rules import Stage
    from palisade.server.selfcheck import entries

    lines: list[str] = []
    for section in _SECTIONS:
        restart = frozenset(k.split(".")[1] for k in RESTART_KEYS if k.startswith(f"{section}."))
        lines += ["", f"[{section}]", *_toml_table(effective[section], restart)]
    lines += ["", "[lists]"]
    for name, entry in effective["lists"].items():
        loaded = policy.lists.handles.get(name)
        count = f"  # {entries(len(loaded.value))}" if loaded is not None else ""
        lines.append(f"{_toml_key(name)} = {_toml_value(entry)}{count}")
    for stage in Stage:
        tables = iter(effective["rules"].get(stage.value, []))
        rules = policy.for_stage(stage)
        if not rules:
            continue
        lines += ["", f"# rules.{stage.value}, in evaluation order:"]
        implied_before = 1 if stage is Stage.DATA and effective["clamd"]["address"] else 0
        written = len(effective["rules"].get(stage.value, []))
        for number, rule in enumerate(rules, 1):
            if number <= implied_before or number > implied_before + written:
                lines.append(f"# {number}. {rule.describe()} (implied by its section)")
                continue
            lines += ["", f"# {number}. {rule.describe()}", f"[[rules.{stage.value}]]"]
            lines += _toml_table(next(tables))
    return "\n".join(lines).lstrip("\n")
