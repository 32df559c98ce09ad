"""Recovery: what start-up does to a spool a crash (or a kill at any moment) may have left.

Owns: the clean-up rules. Everything in ``tmp/`` goes (it was never acknowledged); files in
``free/`` beyond the pool's limit go; half-written state files (``state/<id>.tmp``) go; every
queue file is validated (its records, and the body checksum unless ``verify_checksum=False``)
and a damaged one is moved to ``corrupt/`` with a panic log line, never delivered; a damaged
state file is moved aside too (its recipients are all retried: a duplicate, never a loss);
state files without their message (an orphan left by a kill inside ``Spool.remove``) go.
Must run before anything writes to the spool: it empties ``tmp/``, so never while a listener
may be writing there (the parent recovers before it forks its workers).
Must not touch: a message it did not find damaged; it moves files, it never rewrites one.
Trust: file names are checked with ``is_queue_id`` before a path is built from them; file
contents are parsed by palisade.spool.format, which raises on any damage.
"""

from __future__ import annotations

import builtins
import contextlib
import os
from typing import TYPE_CHECKING

from palisade.obs.log import EventLog, escape
from palisade.obs.queueid import is_queue_id
from palisade.spool.errors import CorruptMessage, UnknownMessage
from palisade.spool.writer import fsync_dir

if TYPE_CHECKING:
    from palisade.spool.queue import Spool


def recover(spool: Spool, log: EventLog, *, verify_checksum: bool = True) -> builtins.list[str]:
    """Clean up after a crash and return the ids to deliver, oldest first."""
    root = spool.root
    spool.pool.trim()
    tmp_dir = root / "tmp"
    for name in os.listdir(tmp_dir):
        try:
            os.unlink(tmp_dir / name)
        except IsADirectoryError:
            log.panic(f"spool: unexpected directory in tmp/: {escape(name, 64)}")
        except FileNotFoundError:
            pass
    ready: builtins.list[str] = []
    for name in sorted(os.listdir(root / "queue")):
        if not is_queue_id(name):
            log.panic(f"spool: ignoring unexpected file queue/{escape(name, 64)}")
            continue
        try:
            layout = spool._layout(name, verify=verify_checksum)
        except UnknownMessage:
            continue
        except (CorruptMessage, OSError) as exc:
            os.replace(root / "queue" / name, root / "corrupt" / name)
            log.panic(f"{name} spool file corrupt ({escape(str(exc))}): moved to corrupt/")
            continue
        try:
            spool.load_state(name, layout.envelope)
        except CorruptMessage as exc:
            os.replace(spool._state_path(name), root / "corrupt" / f"{name}.state.json")
            log.panic(
                f"{name} delivery state corrupt ({escape(str(exc))}): moved to corrupt/,"
                " all recipients will be retried"
            )
        ready.append(name)
    queued = set(ready)
    state_dir = root / "state"
    for name in os.listdir(state_dir):
        stem, _, suffix = name.rpartition(".")
        if suffix == "tmp" or (suffix == "json" and is_queue_id(stem) and stem not in queued):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(state_dir / name)
    if spool.fsync:
        for sub in ("queue", "state", "corrupt"):
            fsync_dir(root / sub)
    return ready
