"""Modes of the directories the gateway creates: made explicit, never left to the umask.

Owns: :func:`make_dirs`, which creates a directory and its missing parents and gives each one it
created the mode asked for (and a group, for the Maildir tree with ``[paths] group``). A
directory that already exists keeps the mode and group the operator gave it. The process runs
with umask 0077 (``palisade.cli.main``), so anything created without an explicit mode is private.
Modes used: spool and its subdirectories 0700, files 0600; log directory 0750, log files 0640;
Maildir 0700/0600, or 0750/0640 of the configured group; state database 0600.
Must not touch: files (each writer creates its own with ``os.open(..., mode)``).
Trust: paths come from the configuration or were validated by the caller.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["make_dirs"]


def make_dirs(path: Path, mode: int, gid: int | None = None) -> None:
    """``mkdir -p`` where every directory created gets ``mode`` (and group ``gid``) exactly."""
    missing: list[Path] = []
    current = Path(path)
    while not current.is_dir():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            if not directory.is_dir():
                raise  # a file in the way: the caller reports it
            continue  # made meanwhile by another process: its mode stands
        if gid is not None:
            os.chown(directory, -1, gid)
        os.chmod(directory, mode)  # the umask narrowed mkdir's mode
