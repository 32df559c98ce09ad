"""``palisade init``: choose features, write ``/etc/palisade/palisade.toml`` and its list files.

Owns: asking the questions of :data:`palisade.config.generate.QUESTIONS` on a terminal (each
shows its default in brackets; a wrong answer is asked again with the reason), or taking them
from ``--answers FILE`` and the flags; writing the config (0640, group ``palisade`` when it
exists), the list files (never overwriting one) and the answers used (0600: it may hold a DQS
key), never replacing an existing config without ``--force`` (``palisade.toml.new`` and a
unified diff instead); then the self-check of ``config check`` on what it wrote.
Exit status: 0 written and the self-check passed (warnings allowed), 1 the self-check found
errors, 2 bad usage or a bad answer (one line naming the key).
Trust: answers are the operator's, checked by ``config.generate`` before anything is written.
"""

from __future__ import annotations

import argparse
import difflib
import grp
import os
import socket
import sys
import tomllib
from pathlib import Path
from typing import Any

from palisade.config import ConfigError, load_config
from palisade.config.generate import (
    BY_KEY,
    CONFIG_PATH,
    QUESTIONS,
    Answers,
    AnswersError,
    Environment,
    Question,
    answers_toml,
    check_answer,
    check_type,
    generate,
    parse_text,
    resolve,
)

SERVICE_GROUP = "palisade"
_FLAGS = {"hostname": "--hostname", "domains": "--domain", "next_hop": "--next-hop"}


class _Abort(Exception):
    """Input ended or was interrupted: nothing is written."""


def add_arguments(commands: Any) -> argparse.ArgumentParser:
    init: argparse.ArgumentParser = commands.add_parser(
        "init",
        help="choose features and write the config (interactive, or --answers FILE / --yes)",
    )
    init.add_argument("--answers", type=Path, metavar="FILE", help="TOML of answers: no questions")
    init.add_argument("--yes", action="store_true", help="take every default: no questions")
    init.add_argument("--hostname", help="the gateway's host name")
    init.add_argument(
        "--domain",
        action="append",
        dest="domains",
        metavar="DOMAIN",
        help="a mail domain (repeatable)",
    )
    init.add_argument("--next-hop", metavar="HOST:PORT", help='internal server ("none": Maildir)')
    init.add_argument(
        "--output", type=Path, default=CONFIG_PATH, help=f"config to write (default {CONFIG_PATH})"
    )
    init.add_argument(
        "--answers-out",
        type=Path,
        metavar="FILE",
        help="where the answers used are written (default: init-answers.toml beside the config)",
    )
    init.add_argument(
        "--paths-root",
        type=Path,
        metavar="DIR",
        help="put the standard spool, state, log and Maildir paths under DIR (staging, tests)",
    )
    init.add_argument("--force", action="store_true", help="replace an existing config")
    init.add_argument("--no-dns", action="store_true", help="self-check without DNS queries")
    return init


def run(args: argparse.Namespace) -> int:
    output: Path = args.output
    answers_out: Path = args.answers_out or output.parent / "init-answers.toml"
    env = Environment(fqdn=socket.getfqdn(), paths_root=args.paths_root)
    flags = _flag_answers(args)
    try:
        if args.answers is not None or args.yes:
            given = _read_answers(args.answers) if args.answers is not None else {}
            answers = resolve({**given, **flags}, env)
        else:
            if not sys.stdin.isatty():
                return _usage("standard input is not a terminal: give --answers FILE or --yes")
            previous = _previous_answers(answers_out)
            answers = resolve(_ask(previous, flags, env), env)
    except AnswersError as exc:
        if exc.key in _FLAGS and exc.key in flags:
            return _usage(f"{_FLAGS[exc.key]}: {exc.problem}")
        where = f"answers file {args.answers}" if args.answers is not None else "answer"
        return _usage(f"{where}: {exc}")
    except _Abort as exc:
        return _usage(f"{exc}; nothing written")
    generated = generate(answers, config_path=output, answers_path=answers_out)
    try:
        target = _write_config(output, generated.config, force=args.force)
        for relative, text in generated.lists.items():
            _write_list(output.parent / relative, text)
        _write_private(answers_out, answers_toml(answers))
    except OSError as exc:
        print(f"palisade init: cannot write {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"palisade init: answers saved in {answers_out}")
    print(f"features: {', '.join(generated.features) or 'none'}")
    return _selfcheck(target, dns=not args.no_dns)


def _usage(message: str) -> int:
    print(f"palisade init: {message}", file=sys.stderr)
    return 2


def _flag_answers(args: argparse.Namespace) -> dict[str, Any]:
    flags: dict[str, Any] = {}
    if args.hostname is not None:
        flags["hostname"] = args.hostname
    if args.domains:
        flags["domains"] = [d for entry in args.domains for d in entry.split(",") if d]
    if args.next_hop is not None:
        flags["next_hop"] = "" if args.next_hop.lower() == "none" else args.next_hop
    return flags


def _read_answers(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise AnswersError("(file)", f"cannot be read: {reason}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AnswersError("(syntax)", f"not valid TOML: {exc}") from None


def _previous_answers(path: Path) -> dict[str, Any]:
    """The answers of the last run, as the defaults of this one (what no longer fits is
    dropped with a note: the question then shows its own default)."""
    if not path.is_file():
        return {}
    try:
        previous = _read_answers(path)
    except AnswersError as exc:
        print(f"palisade init: note: {path} not used: {exc}")
        return {}
    kept = {}
    for key, value in previous.items():
        question = BY_KEY.get(key)
        if question is None:
            print(f"palisade init: note: {path}: unknown answer {key!r} ignored")
            continue
        try:
            kept[key] = check_type(question, value)
        except ValueError as exc:
            print(f"palisade init: note: {path}: {key}: {exc}; its default is offered instead")
    if kept:
        print(f"palisade init: the defaults offered are your answers of last time ({path})")
    return kept


def _ask(previous: dict[str, Any], flags: dict[str, Any], env: Environment) -> Answers:
    """Asks every question that applies (flags are not asked again); the rest keep their
    earlier or default value."""
    print(
        "palisade init: answer each question, or press Enter to take the default shown in "
        "brackets ('none' empties a value)."
    )
    answers: Answers = {}
    for question in QUESTIONS:
        earlier = previous.get(question.key)
        if question.follows and previous.get(question.follows) != answers.get(question.follows):
            earlier = None  # e.g. spamd's levels of last time, and rspamd chosen now
        default = earlier if earlier is not None else question.default(answers, env)
        if question.key in flags:
            answers[question.key] = flags[question.key]
        elif question.asked(answers):
            answers[question.key] = _ask_one(question, default, answers)
        else:
            answers[question.key] = default
    return answers


def _ask_one(question: Question, default: Any, answers: Answers) -> Any:
    if question.help:
        print(question.help)
    prompt = f"{question.prompt} {_choices(question)}[{_shown(default)}]: "
    while True:
        try:
            text = input(prompt)
        except EOFError:
            print()
            raise _Abort("input ended") from None
        except KeyboardInterrupt:
            print()
            raise _Abort("interrupted") from None
        try:
            value = default if not text.strip() else parse_text(question, text)
            return check_answer(question, value, answers)
        except ValueError as exc:
            print(f"  not accepted: {exc}; please answer again")


def _choices(question: Question) -> str:
    if question.kind == "bool":
        return "(yes/no) "
    if question.choices:
        return f"({'/'.join(question.choices)}) "
    return ""


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(value) if value else "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) if value != "" else "none"


# -- files -----------------------------------------------------------------------------------


def _service_gid() -> int | None:
    """The ``palisade`` group's gid when it exists and we may give files to it (root)."""
    if os.geteuid() != 0:
        return None
    try:
        return grp.getgrnam(SERVICE_GROUP).gr_gid
    except KeyError:
        return None


def _write_file(path: Path, text: str, mode: int, gid: int | None) -> None:
    """``text`` into ``path`` atomically (a temporary file beside it, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if gid is not None:
                os.fchown(f.fileno(), -1, gid)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _make_dir(path: Path, gid: int | None) -> None:
    if path.is_dir():
        return
    path.mkdir(parents=True, mode=0o750)
    os.chmod(path, 0o750)  # mkdir's mode passes through the umask (0077)
    if gid is not None:
        os.chown(path, -1, gid)


def _write_config(output: Path, text: str, *, force: bool) -> Path:
    """Writes the config (or ``.new`` beside an existing one, with a diff); returns the path
    written."""
    gid = _service_gid()
    _make_dir(output.parent, gid)
    target = output
    if output.exists() and not force:
        old = output.read_text(encoding="utf-8", errors="replace")
        if old == text:
            print(f"palisade init: {output} is already what these answers make: unchanged")
            return output
        target = output.with_name(output.name + ".new")
        diff = list(
            difflib.unified_diff(
                old.splitlines(keepends=True),
                text.splitlines(keepends=True),
                fromfile=str(output),
                tofile=str(target),
            )
        )
        _write_file(target, text, 0o640, gid)
        print(f"palisade init: {output} exists: wrote {target} instead (--force replaces it)")
        sys.stdout.writelines(diff)
        return target
    _write_file(output, text, 0o640, gid)
    print(f"palisade init: wrote {output}")
    return target


def _write_list(path: Path, text: str) -> None:
    """A list file, unless one is there: it holds the operator's entries."""
    if path.exists():
        print(f"palisade init: kept {path} (it exists)")
        return
    gid = _service_gid()
    _make_dir(path.parent, gid)
    _write_file(path, text, 0o640, gid)
    print(f"palisade init: wrote {path}")


def _write_private(path: Path, text: str) -> None:
    _make_dir(path.parent, _service_gid())
    _write_file(path, text, 0o600, None)


def _selfcheck(path: Path, *, dns: bool) -> int:
    """``config check``'s checks on the file written; its findings on stderr."""
    from palisade.config.policy import build_policy
    from palisade.server.selfcheck import has_errors, run_selfcheck

    try:
        config = load_config(path)
        policy = build_policy(config)
    except ConfigError as exc:
        print(f"palisade init: the config written does not load: {exc}", file=sys.stderr)
        return 1
    findings = run_selfcheck(config, policy, dns=dns)
    for finding in findings:
        print(finding.line(), file=sys.stderr)
    errors = sum(f.level == "error" for f in findings)
    warnings = sum(f.level == "warning" for f in findings)
    print(f"self-check: {errors} error(s), {warnings} warning(s)", file=sys.stderr)
    if has_errors(findings):
        print(
            f"palisade init: {path} was written, but the self-check found errors: fix them, "
            f"then run: palisade config check --config {path}",
            file=sys.stderr,
        )
        return 1
    print(
        f"palisade init: {path} passes the self-check; start it with: "
        f"palisade serve --config {path}"
    )
    return 0
