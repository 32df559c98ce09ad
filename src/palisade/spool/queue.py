"""The queue: the spool directory, its committed messages, their delivery state.

Owns: the directory tree under the spool root and every file in it::

    tmp/<id>            a message being received (palisade.spool.writer; deleted at recovery)
    free/<id>           a delivered message's file kept for reuse (palisade.spool.recycle)
    queue/<id>          a committed message (records: palisade.spool.format)
    state/<id>.json     its delivery state (absent = nothing attempted yet)
    state/<id>.tmp      a state file being replaced (deleted at recovery)
    corrupt/<id>        a queue file that failed validation at recovery (kept for the operator)

:class:`Spool` is the one public face of the package: it opens writers, loads a message for
delivery once into a :class:`palisade.spool.message.Message` handle, saves delivery state,
removes, lists, and recovers at start-up (palisade.spool.recovery).

Durability and duplicates. Nothing acknowledged is lost: the file is fsynced before the rename
and the directory after it; the delivery state is replaced atomically (tmp, fsync, rename, fsync
dir) after an attempt that leaves work to do (a message finished at its first attempt is removed
without one); ``remove`` unlinks the message (no directory fsync: see ``remove``) before the
state file, so a crash in between leaves an orphan state file (deleted at recovery), never a
message without its record of done recipients. There is exactly ONE window where a recipient may
get the message twice: after a delivery succeeded (the next hop said 250, or the Maildir file was
renamed into new/) and before the state file recording it was renamed into place (or the message
removed), a kill makes the next run deliver that recipient again; Maildir recognises its own copy
by name, so in practice this concerns the SMTP next hop. That is unavoidable without a two-phase
protocol with the next hop, and it is the acceptable side: duplicating beats losing. (The
SMTP-level window, a kill after the commit and before the client read 250, makes the client
send again; RFC 1047.)

Modes: every file 0600, every directory the spool creates 0700 (given explicitly, whatever the
umask); a file recycled from ``free/`` with a wider mode (written by an older version) is
narrowed before reuse. The ``[paths] group`` option never applies here.
Must not touch: SMTP, MIME, routing (a recipient's route is stored, never read), logging policy
(only recovery logs, via the given log).
Trust: queue ids are validated with ``is_queue_id`` before any path is built; no path is ever
built from other input. Files read back from disk are parsed defensively: any damage raises
:class:`CorruptMessage`, and recovery moves such files aside instead of delivering them.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from palisade.obs.files import make_dirs
from palisade.obs.log import EventLog, escape
from palisade.obs.queueid import QUEUE_ID_RE, is_queue_id
from palisade.spool.commit import CommitStats, GroupCommitter
from palisade.spool.envelope import DeliveryState, Envelope
from palisade.spool.errors import CorruptMessage, SpoolError, UnknownMessage
from palisade.spool.format import Layout, checked, read_layout, read_records
from palisade.spool.message import SMALL_FILE, Message, MessageReader
from palisade.spool.recovery import recover
from palisade.spool.recycle import FilePool
from palisade.spool.writer import DIR_MODE, FILE_MODE, SpoolWriter, fsync_dir


@dataclass(frozen=True)
class QueueEntry:
    """One line of ``spool.list()``: a queued message as the runner and the operator see it."""

    queue_id: str
    envelope: Envelope
    state: DeliveryState
    size: int
    age: float


class Spool:
    """The queue under ``root``. ``fsync=False`` skips every fsync (tests, benchmarks)."""

    SUBDIRS = ("tmp", "queue", "state", "corrupt", "free")

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.tmp_dir = str(self.root / "tmp")
        self.queue_dir = str(self.root / "queue")
        self._state_dir = str(self.root / "state")
        for sub in self.SUBDIRS:
            make_dirs(self.root / sub, DIR_MODE)
        self.committer = GroupCommitter(self.root / "queue")
        self.pool = FilePool(str(self.root / "free"))

    @property
    def commit_stats(self) -> CommitStats:
        return self.committer.stats

    def close(self) -> None:
        """Stop the committer thread (after the batch in progress)."""
        self.committer.close()

    # -- paths -------------------------------------------------------------------------------

    def _check(self, queue_id: str) -> str:
        if not isinstance(queue_id, str) or not is_queue_id(queue_id):
            raise UnknownMessage(f"malformed queue id: {escape(str(queue_id), 64)}")
        return queue_id

    # Paths are plain strings: the delivering process builds several per message, and pathlib
    # objects cost it measurably more CPU (profile of 2026-11-23).
    def _queue_path(self, queue_id: str) -> str:
        return f"{self.queue_dir}/{self._check(queue_id)}"

    def _state_path(self, queue_id: str) -> str:
        return f"{self._state_dir}/{self._check(queue_id)}.json"

    # -- writing -----------------------------------------------------------------------------

    def open_message(self, envelope: Envelope) -> SpoolWriter:
        self._check(envelope.queue_id)
        return SpoolWriter(self, envelope)

    def save_state(self, queue_id: str, state: DeliveryState) -> None:
        """Replace ``state/<id>.json`` atomically. Raises UnknownMessage if the message is gone."""
        qpath = self._queue_path(queue_id)
        if not os.path.exists(qpath):
            raise UnknownMessage(queue_id)
        final = self._state_path(queue_id)
        tmp = final.removesuffix(".json") + ".tmp"
        data = json.dumps(state.to_json(), separators=(",", ":")).encode("utf-8")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        os.rename(tmp, final)
        if self.fsync:
            fsync_dir(self._state_dir)

    def remove(self, queue_id: str, *, state_file: bool = True, recycle: bool = False) -> bool:
        """Delete the message, then its state file. Returns False if it was not queued.

        ``state_file=False``: the caller knows there is none (a message delivered at its first
        attempt); an orphan left anyway would be deleted by ``recover``.
        ``recycle=True`` (the delivering process, for a message it finished with): the file goes
        to ``free/`` for reuse instead of being unlinked, when the pool takes it
        (palisade.spool.recycle). Either way it leaves ``queue/`` in one step.

        The unlink is not followed by a directory fsync: if power fails before the kernel writes
        the directory, the message reappears and is delivered again (a duplicate, never a loss),
        which is the trade Postfix makes too.
        """
        qpath = self._queue_path(queue_id)
        try:
            if not (recycle and self.pool.recycle(qpath, queue_id)):
                os.unlink(qpath)
            existed = True
        except FileNotFoundError:
            existed = False
        if state_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._state_path(queue_id))
        return existed

    # -- reading -----------------------------------------------------------------------------

    def _load_message(self, queue_id: str) -> tuple[Layout, Message]:
        """The file's layout and its message handle, from one open of the file.

        A small file (most mail) is read with one system call and parsed in memory: the
        delivering process used to make some twenty calls per message through buffered file
        objects (seek, read, isatty, fstat) for the same bytes. A large one is parsed from the
        file, and the handle keeps the descriptor to read the message from (caller closes).
        A small file's handle holds no descriptor, so the file may be recycled at once.
        """
        try:
            fd = os.open(self._queue_path(queue_id), os.O_RDONLY)
        except FileNotFoundError:
            raise UnknownMessage(queue_id) from None
        try:
            size = os.fstat(fd).st_size
            if size > SMALL_FILE:
                with open(fd, "rb", closefd=False) as f:
                    layout = checked(read_layout(f, size), queue_id)
                message = Message.on_file(fd, layout)
                fd = -1  # the handle owns it now
                return layout, message
            data = os.pread(fd, size, 0)
        finally:
            if fd >= 0:
                os.close(fd)
        layout = checked(read_layout(io.BytesIO(data), len(data)), queue_id)
        (added_at, added_length), (body_start, body_length) = layout.segments
        body = data[body_start : body_start + body_length]
        if added_length:
            body = data[added_at : added_at + added_length] + body
        return layout, Message.in_memory(body)

    def _layout(self, queue_id: str, *, verify: bool = False) -> Layout:
        """Reads only the first line and the END records (unless ``verify``): listing a queue
        of large messages must not read them whole."""
        path = self._queue_path(queue_id)
        try:
            with open(path, "rb") as f:
                layout = read_layout(f, os.fstat(f.fileno()).st_size, verify=verify)
        except FileNotFoundError:
            raise UnknownMessage(queue_id) from None
        return checked(layout, queue_id)

    def load_state(self, queue_id: str, envelope: Envelope) -> DeliveryState:
        try:
            with open(self._state_path(queue_id), "rb") as f:
                return DeliveryState.from_json(json.loads(f.read()))
        except FileNotFoundError:
            return DeliveryState.fresh(envelope.recipients)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptMessage(f"bad state file: {exc}") from None

    def load(self, queue_id: str) -> tuple[Envelope, DeliveryState]:
        """The envelope and delivery state (reads only the records, not the message)."""
        envelope = self._layout(queue_id).envelope
        return envelope, self.load_state(queue_id, envelope)

    def open_for_delivery(
        self, queue_id: str, *, fresh: bool = False
    ) -> tuple[Envelope, DeliveryState, Message]:
        """The envelope, the delivery state and the message handle that every reader of this
        delivery attempt uses (close it after the attempt). ``fresh``: never attempted, so the
        state file is not looked for."""
        layout, message = self._load_message(queue_id)
        envelope = layout.envelope
        try:
            state = (
                DeliveryState.fresh(envelope.recipients)
                if fresh
                else self.load_state(queue_id, envelope)
            )
        except BaseException:
            message.close()
            raise
        return envelope, state, message

    def load_for_delivery(
        self, queue_id: str, *, fresh: bool = False
    ) -> tuple[Envelope, DeliveryState, bytes | None]:
        """As :meth:`load`, plus the message as delivered when the file is small (else None:
        read it with :meth:`open_body`), all from one read of the file."""
        envelope, state, message = self.open_for_delivery(queue_id, fresh=fresh)
        message.close()
        return envelope, state, message.data

    def exists(self, queue_id: str) -> bool:
        return os.path.exists(self._queue_path(queue_id))

    def open_body(self, queue_id: str) -> tuple[MessageReader, int]:
        """A reader of the message as delivered (added header lines, then the body) and its
        length. Caller closes it."""
        path = self._queue_path(queue_id)
        try:
            f = open(path, "rb")  # noqa: SIM115 (returned to the caller)
        except FileNotFoundError:
            raise UnknownMessage(queue_id) from None
        try:
            # The envelope is not parsed here: only the records are needed.
            records = read_records(f, os.fstat(f.fileno()).st_size)
            return MessageReader(f, records), records.message_length
        except BaseException:
            f.close()
            raise

    def iter_body(self, queue_id: str, chunk_size: int = 64 * 1024) -> Iterator[bytes]:
        """The body in chunks of at most ``chunk_size`` bytes (blocking file reads)."""
        f, remaining = self.open_body(queue_id)
        with f:
            while remaining:
                chunk = f.read(min(chunk_size, remaining))
                if not chunk:
                    raise CorruptMessage("body shorter than recorded")
                remaining -= len(chunk)
                yield chunk

    def read_body(self, queue_id: str, limit: int | None = None) -> bytes:
        """The body, or its first ``limit`` bytes (for header extraction)."""
        f, length = self.open_body(queue_id)
        with f:
            return f.read(length if limit is None else min(limit, length))

    def list(self, now: float | None = None) -> builtins.list[QueueEntry]:
        """Every committed, readable message, oldest id first. Damaged ones are skipped."""
        now = time.time() if now is None else now
        entries = []
        for name in sorted(os.listdir(self.queue_dir)):
            if not is_queue_id(name):
                continue
            try:
                layout = self._layout(name)
                state = self.load_state(name, layout.envelope)
            except SpoolError:
                continue
            env = layout.envelope
            entries.append(
                QueueEntry(name, env, state, layout.message_length, now - env.received_at)
            )
        return entries

    def census(self) -> tuple[int, str | None]:
        """How many messages are queued, and the id of the oldest (an id begins with the second
        it was made in, and ids sort by it), from one listing of ``queue/`` that opens no file,
        so it costs the same whatever the messages' sizes. ``palisade status`` runs it in a
        thread; the names are filtered and compared in C, so the thread holds the interpreter
        lock for about 2 ms per 10,000 messages (the directory read itself releases it)."""
        ids = list(filter(QUEUE_ID_RE.fullmatch, os.listdir(self.queue_dir)))
        return len(ids), min(ids, default=None)

    # -- start-up ----------------------------------------------------------------------------

    def recover(self, log: EventLog, *, verify_checksum: bool = True) -> builtins.list[str]:
        """Clean up after a crash and return the ids to deliver, oldest first (see
        :func:`palisade.spool.recovery.recover`). Call it before anything writes to the spool."""
        return recover(self, log, verify_checksum=verify_checksum)
