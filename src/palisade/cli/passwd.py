"""``palisade passwd add|remove|list``: the users of the password-file AUTH back end.

Owns: the command line around ``adapters.password_file`` (which owns the file format and the
edits): reading the new password from the terminal (asked twice, not echoed) or from standard
input with ``--stdin`` (one line), never from the command line; creating the file 0640, owned by
root and the service user's group (``palisade``) when we are root and that group exists, so the
unprivileged daemon can read it and not write it.
Trust: the operator's arguments; the user name is checked (no blank, colon or control
character) so a line of the file can never be forged. No password is ever printed.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import grp
import os
import sys
from pathlib import Path
from typing import Any

from palisade.adapters.password_file import read_entries, remove_user, set_password, valid_user_name
from palisade.config import Config

SERVICE_GROUP = "palisade"


def add_arguments(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "passwd", help="users of the submission password file ([submission] password_file)"
    )
    sub = parser.add_subparsers(dest="passwd_command", required=True)
    add = sub.add_parser("add", help="add a user or change its password")
    add.add_argument("user", metavar="USER")
    add.add_argument(
        "--stdin", action="store_true", help="read the password from standard input (one line)"
    )
    remove = sub.add_parser("remove", help="remove a user")
    remove.add_argument("user", metavar="USER")
    sub.add_parser("list", help="list the users")
    return parser


def _read_password(from_stdin: bool) -> str | None:
    if from_stdin:
        line = sys.stdin.readline()
        return line.removesuffix("\n").removesuffix("\r")
    if not sys.stdin.isatty():
        print("palisade passwd: no terminal to ask on: use --stdin", file=sys.stderr)
        return None
    first = getpass.getpass("New password: ")
    second = getpass.getpass("Retype new password: ")
    if first != second:
        print("palisade passwd: the passwords do not match; nothing changed", file=sys.stderr)
        return None
    return first


def _new_file_owner(path: Path) -> None:
    """A file just created by root: root and the service group may read it (0640)."""
    if os.geteuid() != 0:
        return
    with contextlib.suppress(KeyError, OSError):
        os.chown(path, 0, grp.getgrnam(SERVICE_GROUP).gr_gid)


def run(args: argparse.Namespace, config: Config) -> int:
    path = config.submission.password_file
    where = f"{config.source}: submission.password_file {path}"
    command = args.passwd_command
    if command == "list":
        try:
            entries, bad = read_entries(path)
        except OSError as exc:
            print(f"palisade passwd: {where}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        for user in sorted(entries):
            print(user)
        if bad:
            print(
                f"palisade passwd: {path}: line(s) {', '.join(map(str, bad))} are not "
                "user:$argon2id$... and are ignored",
                file=sys.stderr,
            )
        return 0
    user = args.user
    if not valid_user_name(user):
        print(
            f"palisade passwd: {user!r} is not a user name the file can hold (1-255 characters, "
            "no blank, ':', '#' or control character)",
            file=sys.stderr,
        )
        return 2
    if command == "remove":
        try:
            removed = remove_user(path, user)
        except OSError as exc:
            print(f"palisade passwd: {where}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        if not removed:
            print(f"palisade passwd: no user {user} in {path}", file=sys.stderr)
            return 1
        print(f"palisade passwd: removed {user} from {path}")
        return 0
    password = _read_password(args.stdin)
    if password is None:
        return 1
    if not password:
        print("palisade passwd: an empty password is refused; nothing changed", file=sys.stderr)
        return 1
    existed = path.exists()
    try:
        new = set_password(path, user, password)
    except OSError as exc:
        print(f"palisade passwd: {where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if not existed:
        _new_file_owner(path)
    print(f"palisade passwd: {'added' if new else 'changed the password of'} {user} in {path}")
    return 0
