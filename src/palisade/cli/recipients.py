"""``palisade recipients sync``: LDAP's addresses written into the static recipients file.

Owns: fetching every address LDAP knows (the filter with ``*`` as the value; the adapter's
settings come from ``server.generation.ldap_settings``, as the server's do), and replacing the file
atomically: a temporary file in the same directory, fsync, rename over the old one, fsync of
the directory, so a gateway reloading the list sees the old file or the new one, never half of
one. The file is sorted, one address per line, under a comment header, and keeps the mode of the
file it replaces.
Safety: an empty result, or one that shrank by more than ``--max-shrink`` (a fraction, default
0.5) compared with the entries of the existing file, is refused (exit 1, the file untouched)
unless ``--force``: a wrong base DN or filter must not empty the fallback the gateway relies on
when LDAP is down.
Exit status: 0 written; 1 LDAP unreachable or a refused / failed write; 2 bad usage (no
``[ldap]`` servers, no output file).
Must not touch: the running gateway (it notices the changed file by itself), any other list.
Trust: addresses come from the directory and were filtered by the adapter (``local@domain``
values only, lower-cased); an address with a character that would break the list format (``#``
or white space) is skipped. Messages name servers and files, never the bind password.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from palisade.config.model import Config
from palisade.policy.lists import ListKind, parse_list
from palisade.ports import ServiceTempError

LIST_NAME = "recipients"  # the list whose file is the default output


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1: {value}")
    return value


def add_arguments(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``recipients`` and its sub-commands to ``subparsers`` (from ``add_subparsers()``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "recipients", help="valid recipients: export LDAP's addresses to the static file"
    )
    sub = parser.add_subparsers(dest="recipients_command", required=True)
    sync = sub.add_parser("sync", help="write LDAP's addresses into the recipients file")
    sync.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help=f"the file to write (default: the file of the list {LIST_NAME!r} in [lists])",
    )
    sync.add_argument(
        "--force", action="store_true", help="write even an empty or much shorter list"
    )
    sync.add_argument(
        "--max-shrink",
        type=_fraction,
        default=0.5,
        metavar="FRACTION",
        help="refuse a list that lost more than this fraction of the entries (default 0.5)",
    )
    return parser


def default_output(config: Config) -> Path | None:
    for spec in config.lists:
        if spec.name == LIST_NAME and spec.file is not None:
            return spec.file
    return None


def run(
    args: argparse.Namespace,
    config: Config,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Execute ``recipients sync``; returns the exit status."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if getattr(args, "recipients_command", None) != "sync":
        err.write("palisade recipients: unknown command\n")
        return 2
    output: Path | None = args.output or default_output(config)
    if output is None:
        err.write(
            f"palisade recipients sync: no --output and no list {LIST_NAME!r} with a file "
            "in [lists]\n"
        )
        return 2
    if not config.ldap.servers:
        err.write("palisade recipients sync: no [ldap] servers configured\n")
        return 2
    from palisade.server.generation import ldap_settings  # ldap3 only when this command runs

    try:
        settings = ldap_settings(config.ldap)
    except ValueError as exc:
        err.write(f"palisade recipients sync: {exc}\n")
        return 2
    from palisade.adapters.ldap_directory import LdapDirectory

    directory = LdapDirectory(settings)
    try:
        addresses = directory.all_addresses_sync()
    except ServiceTempError as exc:
        err.write(f"palisade recipients sync: LDAP unreachable, nothing written: {exc.reason}\n")
        return 1
    finally:
        directory.close()
    addresses = [a for a in addresses if _writable(a)]
    before = _existing_count(output)
    problem = _refusal(len(addresses), before, args.max_shrink)
    if problem and not args.force:
        err.write(f"palisade recipients sync: refusing to write {output}: {problem}\n")
        err.write("palisade recipients sync: use --force to write it anyway\n")
        return 1
    header = [
        "# Valid recipients for palisade, written by `palisade recipients sync`.",
        f"# Source: {', '.join(settings.servers)} base {settings.base_dn!r},"
        f" filter {settings.filter.replace('%s', '*')!r}, attributes"
        f" {', '.join(settings.attributes)}.",
        f"# Written {time.strftime('%Y-%m-%d %H:%M:%S %z')}: {len(addresses)} address(es)."
        " Do not edit: the next sync replaces this file.",
    ]
    try:
        write_atomically(output, "\n".join([*header, *addresses]) + "\n")
    except OSError as exc:
        err.write(f"palisade recipients sync: cannot write {output}: {exc.strerror or exc}\n")
        return 1
    was = "new file" if before is None else f"was {before}"
    out.write(f"wrote {len(addresses)} address(es) to {output} ({was})\n")
    return 0


def _writable(address: str) -> bool:
    return bool(address) and "#" not in address and not any(c.isspace() for c in address)


def _existing_count(path: Path) -> int | None:
    """Entries of the current file; None when there is none (a first sync). A file that cannot
    be parsed counts as empty: it is no list worth protecting."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return 0
    try:
        return len(parse_list(text, ListKind.ADDRESS))
    except ValueError:
        return 0


def _refusal(count: int, before: int | None, max_shrink: float) -> str | None:
    if count == 0:
        return "LDAP returned no addresses (check base_dn, filter and attributes)"
    if before and count < before * (1.0 - max_shrink):
        lost = 1.0 - count / before
        return (
            f"the list would shrink from {before} to {count} entries ({lost:.0%}, more than"
            f" --max-shrink {max_shrink:g})"
        )
    return None


def write_atomically(path: Path, text: str) -> None:
    """Replaces ``path`` with ``text``: temporary file in the same directory, fsync, rename,
    fsync of the directory. The old file's mode is kept (0644 for a new file)."""
    directory = path.parent if str(path.parent) else Path(".")
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
