"""``palisade install-system`` and ``uninstall-system``: the Debian layout of an installed server.

Owns what ``make install`` does after the program is in its venv: the ``palisade`` system user
and group; ``/etc/palisade`` (0750 root:palisade) with the config (0640 root:palisade, copied
from ``examples/perimeter.toml``), ``lists/`` (files 0640 root:palisade, from ``examples/lists``)
and ``keys/`` (0750 root:palisade); ``/var/spool/palisade``, ``/var/lib/palisade`` and
``/var/log/palisade`` (0750 palisade:palisade); the systemd unit
(``contrib/palisade.service``, its ``ExecStart`` pointed at ``--prefix``) and the logrotate
snippet (``contrib/palisade.logrotate``).
The example files and ``contrib/`` come from the checkout (``--source``, which ``make install``
passes): a non-editable install does not carry them.

Idempotent: the operator's files (config, lists) are copied only when missing and never
overwritten; a directory that exists keeps the mode and owner the operator gave it (a
difference is reported, not changed); the unit and the logrotate snippet are the program's and
are replaced when their content differs. A second run changes nothing (content, mode, owner,
mtime) and says so. ``uninstall-system`` removes the program's files (the venv at ``--prefix``,
the unit, the snippet) and never the config, spool, state, logs or the user.

``--root DIR`` prefixes every path (like DESTDIR) for tests and packaging; the user is still
created on this host (or not at all with ``--no-user``, which needs ``--user`` to exist).
Trust: the arguments are root's; nothing here reads network input. Only the standard library is
used, so ``make uninstall`` can run it from the checkout without the venv.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

USER = "palisade"
PREFIX = Path("/opt/palisade")
ETC = Path("/etc/palisade")
CONFIG = ETC / "palisade.toml"
DATA_DIRS = (Path("/var/spool/palisade"), Path("/var/lib/palisade"), Path("/var/log/palisade"))
UNIT = Path("/etc/systemd/system/palisade.service")
FIREWALL_UNIT = Path("/etc/systemd/system/palisade-firewall.service")
REPORTS_UNIT = Path("/etc/systemd/system/palisade-reports.service")
REPORTS_TIMER = Path("/etc/systemd/system/palisade-reports.timer")
LOGROTATE = Path("/etc/logrotate.d/palisade")
HOME = Path("/var/lib/palisade")
NOLOGIN = "/usr/sbin/nologin"


def add_arguments(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    install = commands.add_parser(
        "install-system",
        help="create the palisade user, /etc/palisade, the data directories and the unit",
    )
    uninstall = commands.add_parser(
        "uninstall-system",
        help="remove the program and its unit; keep config, spool, state, logs and the user",
    )
    for parser in (install, uninstall):
        parser.add_argument(
            "--prefix", type=Path, default=PREFIX, help=f"the program's venv (default {PREFIX})"
        )
        parser.add_argument(
            "--root", type=Path, default=Path("/"), help="prefix every path with DIR (DESTDIR)"
        )
    install.add_argument(
        "--source",
        type=Path,
        default=Path("."),
        help="the checkout with examples/ and contrib/ (default: the current directory)",
    )
    install.add_argument("--user", default=USER, help=f"the service user (default {USER})")
    install.add_argument(
        "--no-user", action="store_true", help="do not create the user: --user must exist"
    )


class InstallError(Exception):
    """The install cannot go on; ``str()`` is the operator's one line."""


@dataclass
class Installer:
    """One run: paths under ``root``, what it did (``changes``) and what it only looked at."""

    root: Path
    prefix: Path
    quiet: bool = False
    changes: list[str] = field(default_factory=list)

    def at(self, path: Path) -> Path:
        """``path`` under ``--root``."""
        return self.root / path.relative_to("/")

    def say(self, line: str, *, changed: bool) -> None:
        if changed:
            self.changes.append(line)
        if not self.quiet:
            print(line)

    # -- the user ------------------------------------------------------------------------------

    def user(self, name: str, *, create: bool) -> tuple[int, int]:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            entry = None
        if entry is None:
            if not create:
                raise InstallError(f"--no-user: the user {name!r} does not exist")
            if shutil.which("adduser") or os.path.exists("/usr/sbin/adduser"):
                command = [
                    "adduser", "--system", "--group", "--no-create-home", "--home", str(HOME),
                    "--shell", NOLOGIN, name,
                ]  # fmt: skip
            else:
                command = [
                    "useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
                    str(HOME), "--shell", NOLOGIN, name,
                ]  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise InstallError(
                    f"cannot create the user {name!r}: {' '.join(command)}: "
                    f"{result.stderr.strip() or result.returncode}"
                )
            entry = pwd.getpwnam(name)
            self.say(
                f"created system user and group {name} (uid {entry.pw_uid}, gid {entry.pw_gid}, "
                f"home {HOME}, shell {NOLOGIN})",
                changed=True,
            )
            return entry.pw_uid, entry.pw_gid
        group = grp.getgrgid(entry.pw_gid).gr_name
        self.say(f"user {name} exists (uid {entry.pw_uid}, group {group})", changed=False)
        return entry.pw_uid, entry.pw_gid

    # -- directories ---------------------------------------------------------------------------

    def directory(self, path: Path, mode: int, uid: int, gid: int) -> None:
        """``path`` made with ``mode`` and owner when missing (parents as root 0755); an
        existing one is kept as it is, a difference reported."""
        target = self.at(path)
        if target.is_dir():
            st = target.stat()
            now = _describe(st.st_mode, st.st_uid, st.st_gid)
            want = _describe(mode, uid, gid)
            if now == want:
                self.say(f"{path}: exists ({now})", changed=False)
            else:
                self.say(
                    f"{path}: exists, kept as it is ({now}; install-system makes it {want})",
                    changed=False,
                )
            return
        if target.exists() or target.is_symlink():
            raise InstallError(f"{target} exists and is not a directory")
        _parents(target)
        target.mkdir(mode)
        os.chown(target, uid, gid)
        target.chmod(mode)
        self.say(f"{path}: created ({_describe(mode, uid, gid)})", changed=True)

    # -- files ---------------------------------------------------------------------------------

    def operator_file(self, source: Path, path: Path, mode: int, uid: int, gid: int) -> None:
        """The operator's file: copied only when missing, never overwritten."""
        target = self.at(path)
        if target.exists() or target.is_symlink():
            self.say(f"{path}: exists, not overwritten", changed=False)
            return
        _write(target, source.read_bytes(), mode, uid, gid)
        self.say(f"{path}: copied from {source} ({_describe(mode, uid, gid)})", changed=True)

    def program_file(self, content: bytes, path: Path, what: str) -> bool:
        """The program's file (0644 root:root): written when missing or different. True if
        written."""
        target = self.at(path)
        try:
            st = target.lstat()
            same = target.read_bytes() == content and (st.st_mode & 0o7777, st.st_uid) == (
                0o644,
                0,
            )
        except FileNotFoundError:
            same, st = False, None
        if same:
            self.say(f"{path}: unchanged ({what})", changed=False)
            return False
        _parents(target)
        _write(target, content, 0o644, 0, 0)
        self.say(f"{path}: {'installed' if st is None else 'updated'} ({what})", changed=True)
        return True

    def remove(self, path: Path, what: str) -> None:
        target = self.at(path)
        if target.exists() or target.is_symlink():
            target.unlink()
            self.say(f"{path}: removed ({what})", changed=True)
        else:
            self.say(f"{path}: not there ({what})", changed=False)


def _parents(target: Path) -> None:
    """The missing parents of ``target`` (/etc, /var/lib under --root), 0755 root:root as
    Debian has them, whatever the umask."""
    missing = [p for p in target.parents if not p.exists()]
    for directory in reversed(missing):
        directory.mkdir()
        directory.chmod(0o755)


def _describe(mode: int, uid: int, gid: int) -> str:
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return f"{mode & 0o7777:04o} {user}:{group}"


def _write(target: Path, content: bytes, mode: int, uid: int, gid: int) -> None:
    """``target`` replaced in one rename, with its mode and owner set before it appears."""
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.chown(temporary, uid, gid)
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


_EXEC_START = re.compile(r"^(ExecStart=)(\S*?)(/bin/palisade\b.*)$", re.M)


def unit_for(text: str, prefix: Path, name: str = "palisade.service") -> str:
    """The unit with ``ExecStart``'s program under ``prefix``."""
    if not _EXEC_START.search(text):
        raise InstallError(f"contrib/{name} has no ExecStart=.../bin/palisade line")
    return _EXEC_START.sub(lambda m: f"{m[1]}{prefix}{m[3]}", text)


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def daemon_reload(installer: Installer) -> None:
    if installer.root != Path("/"):
        installer.say("systemctl daemon-reload: not run (--root)", changed=False)
    elif not systemd_running():
        installer.say("systemctl daemon-reload: not run (systemd is not running)", changed=False)
    else:
        subprocess.run(["systemctl", "daemon-reload"], check=True)
        installer.say("systemctl daemon-reload: done", changed=True)


def install(args: argparse.Namespace) -> int:
    source = args.source.resolve()
    example = source / "examples" / "perimeter.toml"
    unit_source = source / "contrib" / "palisade.service"
    for needed in (example, unit_source):
        if not needed.is_file():
            raise InstallError(
                f"--source {args.source}: no {needed.relative_to(source)} (run it from the "
                "checkout, or give --source CHECKOUT)"
            )
    step = Installer(root=args.root.resolve(), prefix=args.prefix)
    uid, gid = step.user(args.user, create=not args.no_user)
    step.directory(ETC, 0o750, 0, gid)
    step.operator_file(example, CONFIG, 0o640, 0, gid)
    step.directory(ETC / "lists", 0o750, 0, gid)
    for listed in sorted((source / "examples" / "lists").iterdir()):
        if listed.is_file():
            step.operator_file(listed, ETC / "lists" / listed.name, 0o640, 0, gid)
    step.directory(ETC / "keys", 0o750, 0, gid)
    for path in DATA_DIRS:
        step.directory(path, 0o750, uid, gid)
    unit = unit_for(unit_source.read_text(), args.prefix)
    unit_changed = step.program_file(unit.encode(), UNIT, "systemd unit")
    firewall_source = source / "contrib" / FIREWALL_UNIT.name
    if firewall_source.is_file():  # `palisade firewall`, as root: enabled by the operator
        firewall = unit_for(firewall_source.read_text(), args.prefix, FIREWALL_UNIT.name)
        if step.program_file(firewall.encode(), FIREWALL_UNIT, "systemd unit (firewall)"):
            unit_changed = True
    reports_source = source / "contrib" / REPORTS_UNIT.name
    timer_source = source / "contrib" / REPORTS_TIMER.name
    if reports_source.is_file() and timer_source.is_file():  # daily DMARC / TLS reports
        reports = unit_for(reports_source.read_text(), args.prefix, REPORTS_UNIT.name)
        if step.program_file(reports.encode(), REPORTS_UNIT, "systemd unit (reports)"):
            unit_changed = True
        if step.program_file(timer_source.read_bytes(), REPORTS_TIMER, "systemd timer (reports)"):
            unit_changed = True
    rotate = source / "contrib" / "palisade.logrotate"
    if rotate.is_file():
        step.program_file(rotate.read_bytes(), LOGROTATE, "logrotate")
    else:
        step.say(f"{LOGROTATE}: not installed (no contrib/palisade.logrotate)", changed=False)
    if unit_changed:
        daemon_reload(step)
    if step.changes:
        print(f"install-system: {len(step.changes)} change(s); config in {CONFIG}")
    else:
        print("install-system: nothing changed (already installed)")
    return 0


def uninstall(args: argparse.Namespace) -> int:
    step = Installer(root=args.root.resolve(), prefix=args.prefix)
    prefix = step.at(args.prefix)
    if (prefix / "pyvenv.cfg").is_file() and (prefix / "bin" / "palisade").exists():
        shutil.rmtree(prefix)
        step.say(f"{args.prefix}: removed (the program's venv)", changed=True)
    elif prefix.exists():
        raise InstallError(
            f"--prefix {args.prefix}: not removed: it is not a venv with bin/palisade in it"
        )
    else:
        step.say(f"{args.prefix}: not there (the program's venv)", changed=False)
    units = (UNIT, FIREWALL_UNIT, REPORTS_UNIT, REPORTS_TIMER)
    unit_was = any(step.at(path).exists() for path in units)
    step.remove(UNIT, "systemd unit")
    step.remove(FIREWALL_UNIT, "systemd unit (firewall)")
    step.remove(REPORTS_UNIT, "systemd unit (reports)")
    step.remove(REPORTS_TIMER, "systemd timer (reports)")
    step.remove(LOGROTATE, "logrotate")
    if unit_was:
        daemon_reload(step)
    kept = [str(CONFIG.parent), *(str(p) for p in DATA_DIRS)]
    print(f"uninstall-system: kept {', '.join(kept)} and the user {USER} (remove them by hand)")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return install(args) if args.command == "install-system" else uninstall(args)
    except InstallError as exc:
        print(f"palisade {args.command}: {exc}", file=sys.stderr)
        return 1
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"palisade {args.command}: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """``python -m palisade.cli.install COMMAND``: the same commands without the rest of the
    program (``make uninstall`` runs it from the checkout, with or without a venv)."""
    parser = argparse.ArgumentParser(prog="palisade")
    commands = parser.add_subparsers(dest="command", required=True)
    add_arguments(commands)
    args = parser.parse_args(argv)
    os.umask(0o077)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
