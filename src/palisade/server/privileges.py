"""Who the gateway runs as: the service account of ``[server] user`` and the one-way drop to it.

Owns the decision and the drop (README, "Running unprivileged"). ``serve`` calls
:func:`service_account` before the self-check (it decides, refuses, and makes the paths the
user cannot make itself) and :func:`drop` right after binding the listeners, before the spool
recovery and the fork of the workers: the parent drops, and every worker it forks is born with
the service account's ids, so no process reads a byte from a client, or a spool file, with
root's.

As root the parent only binds the listeners, runs the start-up self-check and creates what the
service user cannot create itself: the missing directories of ``[paths]`` (spool, log, the
state file's directory, the Maildir root), owned by the user; and it hands over to the user the
log and state files a run as root left (only those, by name, in those directories). Everything
read after the drop (config, lists, TLS certificate and key, LDAP password file) must be
readable by the user or its group, because a reload (SIGHUP) reads them again as the user: right
after the drop the config is loaded again and the self-check's file and path checks run again as
the user, so a file it cannot read stops the start with its name.

Also says, in one line on stderr and in mainlog, when ``serve`` runs the bundled demo config
(no ``--config`` and no system config): an installed server that finds no
``/etc/palisade/palisade.toml`` must not quietly look like it works.

Decision when started as root without ``user``: a listen port below 1024 means a real server,
which must not run as root: refused (exit 2, stderr and paniclog) with the line to add. Only
high ports (tests, ``make run``): it keeps running as root, with one warning line. Not root
with ``user`` naming another account: refused (only root can switch). Trust: the config was
validated by the loader (the user and group exist); the ids come from the system databases.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from palisade.config import Config, parse_host_port
from palisade.config.loader import BUNDLED_SOURCE
from palisade.obs.log import FileEventLog

__all__ = ["Account", "Refused", "drop", "say_bundled", "service_account"]

PRIVILEGED_PORTS = 1024
# The files of the log and state directories a run as root may have left behind, by name.
_LOG_FILES = ("mainlog", "rejectlog", "paniclog", "main.jsonl")
_STATE_SUFFIXES = ("", "-wal", "-shm", "-journal")


class Refused(Exception):
    """``serve`` must not start; the reason was printed on stderr and written to paniclog."""


@dataclass(frozen=True, slots=True)
class Account:
    """The service account: user name (for initgroups), uid and gid (``[server] group`` or the
    user's primary group)."""

    name: str
    uid: int
    gid: int


def _log(config: Config, line: str, *, panic: bool = False) -> None:
    """One line in paniclog (``panic``) or mainlog, if the log directory can be used (if not,
    the self-check says why)."""
    try:
        log = FileEventLog(config.paths.log, json_lines=config.log.json)
    except OSError:
        return
    try:
        (log.panic if panic else log.main)(line)
    finally:
        log.close()


def _say(config: Config, line: str, *, panic: bool = True) -> None:
    """One line on stderr and in paniclog (``panic``) or mainlog."""
    print(f"palisade: {line}", file=sys.stderr)
    _log(config, line, panic=panic)


def _refuse(config: Config, line: str) -> Refused:
    _say(config, f"not starting: {line}")
    return Refused(line)


def service_account(config: Config) -> Account | None:
    """The account to drop to (its paths prepared), or None to stay as this process is. Raises
    :class:`Refused` (after saying why) for root without ``user`` on a port below 1024, and for
    a ``user`` this process cannot become. Says first when the config is the bundled demo."""
    if config.source == BUNDLED_SOURCE:
        say_bundled(config)
    server = config.server
    where = f"{config.source}: server.user"
    if server.user is None:
        if os.geteuid() != 0:
            return None
        submission = (*config.submission.listen, *config.submission.listen_tls)  # 587, 465
        low = [a for a in (*server.listen, *submission) if parse_host_port(a)[1] < PRIVILEGED_PORTS]
        if low:
            raise _refuse(
                config,
                f"{where} is not set and palisade runs as root with {', '.join(low)} in "
                'server.listen (a port below 1024): set [server] user = "palisade" (make '
                "install creates that user) so that every process drops to it after binding",
            )
        # mainlog only: stderr stays one line per problem for the tests and scripts that run
        # the gateway as root on a high port
        _log(
            config,
            f"warning: running as root ({where} is not set; only ports above 1023 are used): "
            'set [server] user = "palisade" to run unprivileged',
        )
        return None
    entry = pwd.getpwnam(server.user)  # the loader checked that it exists
    gid = server.group if server.group is not None else entry.pw_gid
    account = Account(server.user, entry.pw_uid, gid)
    if os.geteuid() != 0:
        if (os.getuid(), os.geteuid(), os.getegid()) == (account.uid, account.uid, account.gid):
            return None  # already the service account (started by systemd with User=)
        raise _refuse(
            config,
            f"{where} is {server.user!r} but palisade runs as "
            f"{pwd.getpwuid(os.geteuid()).pw_name!r}, not root: only root can switch to the "
            "service account (start it as root, or as that user and group)",
        )
    maildir_group = config.paths.group
    if maildir_group is not None and maildir_group not in os.getgrouplist(account.name, gid):
        name = grp.getgrgid(maildir_group).gr_name
        raise _refuse(
            config,
            f"{config.source}: paths.group: the service user {account.name!r} is not a member "
            f"of group {name!r}, so it could not give the Maildir tree that group "
            f"(usermod -aG {name} {account.name})",
        )
    try:
        prepare(config, account)
    except OSError as exc:
        raise _refuse(
            config, f"cannot prepare the paths for server.user {account.name!r}: {exc}"
        ) from None
    return account


def _owned_dirs(path: Path, mode: int, account: Account, gid: int | None = None) -> None:
    """``mkdir -p`` where every directory created gets ``mode`` and the account as owner (group
    ``gid`` if given); existing directories are left as the operator made them. Each is changed
    through a descriptor opened without following links: a parent the user already owns cannot
    make root chown something else."""
    missing: list[Path] = []
    current = path
    while not current.is_dir():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        os.mkdir(directory, mode)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            os.fchown(fd, account.uid, account.gid if gid is None else gid)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)


def _hand_over(path: Path, account: Account) -> None:
    """``path``, a regular file a run as root left, becomes the account's (group too). Opened
    without following links, and only with one link: the directory is the user's, and a link
    planted there must not make root give the user another file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symbolic link: not ours to hand over
            return
        raise
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid != account.uid:
            os.fchown(fd, account.uid, account.gid)
    finally:
        os.close(fd)


def prepare(config: Config, account: Account) -> None:
    """As root: the directories of ``[paths]`` the user cannot create, owned by the user; the
    user's log and state files from an earlier run as root handed over."""
    paths = config.paths
    _owned_dirs(paths.spool, 0o700, account)
    _owned_dirs(paths.log, 0o750, account)
    _owned_dirs(paths.state.parent, 0o750, account)
    group = paths.group
    _owned_dirs(paths.mail, 0o700 if group is None else 0o750, account, group)
    for name in _LOG_FILES:
        _hand_over(paths.log / name, account)
    for suffix in _STATE_SUFFIXES:
        _hand_over(paths.state.with_name(paths.state.name + suffix), account)


def _switch(account: Account) -> None:
    """setgroups (the user's groups), setgid, setuid: real, effective, saved and file-system
    ids all the account's; then checks that there is no way back."""
    os.initgroups(account.name, account.gid)
    os.setresgid(account.gid, account.gid, account.gid)
    os.setresuid(account.uid, account.uid, account.uid)
    if os.getresuid() != (account.uid,) * 3 or os.getresgid() != (account.gid,) * 3:
        raise OSError(f"the ids are {os.getresuid()}/{os.getresgid()} after the switch")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise OSError("setuid(0) still succeeds after the switch")


def drop(config: Config, config_path: Path | None, account: Account | None) -> bool:
    """After the listeners are bound: drops to ``account`` for good (None: nothing to do), then
    checks as the user what a reload will read again and where it writes. False (after saying
    why) if the process must not go on."""
    if account is None:
        return True
    try:
        prepare(config, account)  # again: the self-check may have written log lines as root
    except OSError as exc:
        _say(config, f"not starting: cannot prepare the paths for {account.name!r}: {exc}")
        return False
    try:
        _switch(account)
    except OSError as exc:
        # the process may be half switched: stop at once, whatever state it is in
        print(f"palisade: not starting: cannot drop to {account.name!r}: {exc}", file=sys.stderr)
        os._exit(1)
    problems = _problems_as_user(config_path)
    for problem in problems:
        _say(config, f"not starting: as server.user {account.name!r}: {problem}")
    return not problems


def _problems_as_user(config_path: Path | None) -> list[str]:
    """What the service user cannot do that the gateway will: read the config, its lists and
    password files (a reload reads them again), the TLS certificate and key; write in the spool,
    log, state and Maildir directories. DNS is not asked again (the self-check did, as root)."""
    from palisade.config import ConfigError, load_config
    from palisade.config.policy import build_policy
    from palisade.server.selfcheck import run_selfcheck

    try:
        config = load_config(config_path)
        policy = build_policy(config)
    except ConfigError as exc:
        return [str(exc)]
    return [f.message for f in run_selfcheck(config, policy, dns=False) if f.level == "error"]


def say_bundled(config: Config) -> None:
    """``serve`` on the bundled demo: one line on stderr and in mainlog saying so."""
    from palisade.config.loader import system_config_path

    _say(
        config,
        f"no --config given and no {system_config_path()}: running the bundled demo config "
        f"(listening on {', '.join(config.server.listen)}, domain "
        f"{', '.join(config.domains.local)}, files under ./var)",
        panic=False,
    )
