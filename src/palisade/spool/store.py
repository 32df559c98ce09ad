"""The durable queue: message files, delivery-state files, commit and start-up recovery.

Owns: the directory tree under the spool root and every file in it::

    tmp/<id>            a message being received (never delivered, deleted at recovery)
    free/<id>           a delivered message's file kept for reuse (palisade.spool.recycle)
    queue/<id>          a committed message: header record, body bytes, END record
    state/<id>.json     its delivery state (absent = nothing attempted yet)
    state/<id>.tmp      a state file being replaced (deleted at recovery)
    corrupt/<id>        a queue file that failed validation at recovery (kept for the operator)

Record format of ``queue/<id>`` (version 3; version 2 files, without the LATE record, and
version 1 files, without the ADD record either, are still read)::

    PALISADE-SPOOL 3 {"queue_id": ..., ...envelope JSON, ASCII, one line...}\n
    <body bytes, exactly as handed to SpoolWriter.write>
    <added header lines, as handed to SpoolWriter.prepend (may be empty)>
    <late envelope fields: a JSON object, ASCII, or nothing>
    \nLATE <length of the late fields, 20 decimal digits>\n
    \nADD <length of the added lines, 20 decimal digits>\n
    \nEND <body length, 20 decimal digits> sha256=<64 hex digits over body and added lines>\n

The END record has a fixed length (98 bytes) and must end the file exactly where the lengths
say; a file without it is incomplete. The late fields are envelope fields learnt from the
message itself, after the first record was written: today only ``message_id`` (the client's
Message-ID, cleaned and bounded by the session). An empty LATE record, or a version 1 or 2 file,
means "unknown"; a ``message_id`` in the late fields replaces the first record's. The added
lines are header fields that are known only after the whole message was read
(Authentication-Results, X-Spam-Status): like Postfix's pointer records they are stored after
the body and delivered *before* it, so the message is never copied to insert them. A message
counts only once it has been renamed into ``queue/`` and the directory fsynced
(``SpoolWriter.commit`` returns only then): that rename is the commit point, and the server
must not answer 250 before it.

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
Must not touch: SMTP, MIME, routing, logging policy (only ``recover`` logs, via the given log).
Trust: queue ids are validated with ``is_queue_id`` before any path is built; no path is ever
built from other input. Files read back from disk are parsed defensively: any damage raises
:class:`CorruptMessage`, and ``recover`` moves such files aside instead of delivering them.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from palisade.obs.files import make_dirs
from palisade.obs.log import EventLog, escape
from palisade.obs.queueid import is_queue_id
from palisade.spool.commit import CommitJob, CommitStats, GroupCommitter, rename_noreplace
from palisade.spool.envelope import DeliveryState, Envelope, merge_late
from palisade.spool.recycle import FilePool

MAGIC = b"PALISADE-SPOOL 1 "  # version 1: no ADD record (still read)
MAGIC_V2 = b"PALISADE-SPOOL 2 "  # version 2: no LATE record (still read)
MAGIC_V3 = b"PALISADE-SPOOL 3 "
MAX_HEADER = 4 * 1024 * 1024
TRAILER_LEN = len(b"\nEND ") + 20 + len(b" sha256=") + 64 + 1
ADD_LEN = len(b"\nADD ") + 20 + 1
LATE_LEN = len(b"\nLATE ") + 20 + 1
MAX_LATE = 64 * 1024  # the late fields are small (a bounded Message-ID): more is damage
_TRAILER_RE = re.compile(rb"\nEND ([0-9]{20}) sha256=([0-9a-f]{64})\n")
_ADD_RE = re.compile(rb"\nADD ([0-9]{20})\n")
_LATE_RE = re.compile(rb"\nLATE ([0-9]{20})\n")


class SpoolError(Exception):
    """Base class of the spool's own errors."""


class UnknownMessage(SpoolError, KeyError):
    """No committed message with that id (or the id is malformed)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown message"


class CorruptMessage(SpoolError, ValueError):
    """A queue file or state file failed validation."""


FILE_MODE = 0o600  # every file of the spool (the umask cannot widen it; recycled ones are checked)
DIR_MODE = 0o700  # every directory the spool creates
SMALL_FILE = 256 * 1024  # queue files up to this size are read whole for delivery


def _trailer(length: int, digest: str) -> bytes:
    return b"\nEND %020d sha256=%s\n" % (length, digest.encode("ascii"))


def _late_fields(message_id: str) -> bytes:
    """The LATE record's JSON object (one string encoded, not a dict: this runs per message)."""
    return b'{"message_id":%s}' % json.dumps(message_id, ensure_ascii=True).encode("ascii")


@dataclass(frozen=True)
class Records:
    """Where the records of a committed file lie, found without parsing the envelope."""

    envelope_json: bytes
    body_start: int
    body_length: int
    added_length: int  # the added lines start at body_start + body_length
    sha256: str
    late_json: bytes  # the late envelope fields (after the added lines); b"": none

    @property
    def message_length(self) -> int:
        """What a reader of the message gets: added lines, then the body."""
        return self.added_length + self.body_length


@dataclass(frozen=True)
class Layout(Records):
    """The records and the parsed envelope."""

    envelope: Envelope


class MessageReader:
    """Reads the added header lines, then the body, from one open queue file (as one stream)."""

    def __init__(self, f: BinaryIO, records: Records) -> None:
        self._f = f
        end = records.body_start + records.body_length
        # (offset, length) segments in reading order
        self._segments = [(end, records.added_length), (records.body_start, records.body_length)]
        self._current = 0
        self._left = 0
        self._next_segment()

    def _next_segment(self) -> None:
        while self._segments and self._left == 0:
            offset, self._left = self._segments.pop(0)
            self._f.seek(offset)

    def read(self, size: int = -1) -> bytes:
        parts: list[bytes] = []
        want = size if size >= 0 else None
        while self._left and (want is None or want > 0):
            n = self._left if want is None else min(want, self._left)
            chunk = self._f.read(n)
            if not chunk:
                raise CorruptMessage("message shorter than recorded")
            parts.append(chunk)
            self._left -= len(chunk)
            if want is not None:
                want -= len(chunk)
            self._next_segment()
        return b"".join(parts)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> MessageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class QueueEntry:
    """One line of ``spool.list()``: a queued message as the runner and the operator see it."""

    queue_id: str
    envelope: Envelope
    state: DeliveryState
    size: int
    age: float


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_records(f: IO[bytes], size: int) -> Records:
    f.seek(0)
    first = f.readline(MAX_HEADER + 1)
    if first.startswith(MAGIC_V3):
        version, magic = 3, MAGIC_V3
    elif first.startswith(MAGIC_V2):
        version, magic = 2, MAGIC_V2
    else:
        version, magic = 1, MAGIC
    if not first.startswith(magic) or not first.endswith(b"\n"):
        raise CorruptMessage("missing or oversized header record")
    body_start = len(first)
    late_rec = LATE_LEN if version == 3 else 0
    tail = TRAILER_LEN + (ADD_LEN if version >= 2 else 0) + late_rec
    if size < body_start + tail:
        raise CorruptMessage("no END record (file too short)")
    f.seek(size - tail)
    end = f.read(tail)
    match = _TRAILER_RE.fullmatch(end, tail - TRAILER_LEN)
    if match is None:
        raise CorruptMessage("no END record")
    body_length = int(match.group(1))
    added_length = late_length = 0
    if version >= 2:
        added = _ADD_RE.fullmatch(end, late_rec, late_rec + ADD_LEN)
        if added is None:
            raise CorruptMessage("no ADD record")
        added_length = int(added.group(1))
    if version == 3:
        late = _LATE_RE.fullmatch(end, 0, LATE_LEN)
        if late is None:
            raise CorruptMessage("no LATE record")
        late_length = int(late.group(1))
        if late_length > MAX_LATE:
            raise CorruptMessage("LATE record too long")
    if body_start + body_length + added_length + late_length + tail != size:
        raise CorruptMessage("END record does not match the file length")
    late_json = b""
    if late_length:
        f.seek(body_start + body_length + added_length)
        late_json = f.read(late_length)
        if len(late_json) != late_length:
            raise CorruptMessage("LATE record shorter than recorded")
    digest = match.group(2).decode("ascii")
    return Records(first[len(magic) : -1], body_start, body_length, added_length, digest, late_json)


def read_layout(f: IO[bytes], size: int, *, verify: bool = False) -> Layout:
    """Parse and validate a queue file opened for reading; raise CorruptMessage when damaged."""
    records = _read_records(f, size)
    try:
        fields = json.loads(records.envelope_json)
        if records.late_json:
            fields = merge_late(fields, json.loads(records.late_json))
        envelope = Envelope.from_json(fields)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptMessage(f"bad envelope: {exc}") from None
    if verify:
        h = hashlib.sha256()
        f.seek(records.body_start)
        remaining = records.message_length
        while remaining:
            chunk = f.read(min(remaining, 1 << 20))
            if not chunk:
                raise CorruptMessage("body shorter than recorded")
            h.update(chunk)
            remaining -= len(chunk)
        if h.hexdigest() != records.sha256:
            raise CorruptMessage("body checksum mismatch")
    return Layout(**vars(records), envelope=envelope)


def _checked(layout: Layout, queue_id: str) -> Layout:
    if layout.envelope.queue_id != queue_id:
        raise CorruptMessage("envelope queue id does not match the file name")
    return layout


class ReceivedMessage:
    """The message being received, read back from the tmp file (a ``MessageSource``).

    Scanners and DKIM read it from disk after the final dot, before the commit; the writer
    flushes first, so what they read is exactly what was written.
    """

    def __init__(self, path: str | Path, start: int, size: int) -> None:
        self._path, self._start, self._size = path, start, size

    @property
    def size(self) -> int:
        return self._size

    def open(self) -> BinaryIO:
        f = open(self._path, "rb")  # noqa: SIM115 (returned to the caller)
        f.seek(self._start)
        return f


class SpoolWriter:
    """One message being received. ``write`` appends body bytes; ``commit`` makes it durable."""

    def __init__(self, spool: Spool, envelope: Envelope) -> None:
        self._spool = spool
        self.envelope = envelope
        self.queue_id = envelope.queue_id
        self._tmp_path = f"{spool.tmp_dir}/{envelope.queue_id}"
        self._final_path = f"{spool.queue_dir}/{envelope.queue_id}"
        # An id already in queue/ is caught at the commit (rename_noreplace), never replaced.
        # A recycled file still holds an old message: it is overwritten from the start and cut
        # to length at the commit (see palisade.spool.recycle).
        self._recycled = spool.pool.claim(self._tmp_path)
        if self._recycled:  # never through a link, whatever were put in free/
            fd = os.open(self._tmp_path, os.O_RDWR | os.O_NOFOLLOW)
            self._file: BinaryIO | None = open(fd, "r+b")  # noqa: SIM115 (kept open)
        else:  # 0600 whatever the umask: mail is nobody else's business
            fd = os.open(self._tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            self._file = open(fd, "wb")  # noqa: SIM115 (kept open)
        self._hash = hashlib.sha256()
        self.size = 0
        self._added: list[bytes] = []
        self._committed = False
        # The message's Message-ID, when the session found one (stored in the LATE record).
        self.message_id: str | None = None
        first = MAGIC_V3 + envelope.dumps().encode("ascii") + b"\n"
        self._body_start = len(first)
        try:
            self._file.write(first)
        except BaseException:
            self.abort()
            raise

    def write(self, data: bytes) -> None:
        """Append body bytes (buffered; the message is never held whole in memory)."""
        if self._file is None:
            raise ValueError("writer is closed")
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    def prepend(self, lines: bytes) -> None:
        """Header lines to deliver before the body (known only after the final dot)."""
        self._added.append(lines)

    def received(self) -> ReceivedMessage:
        """The body written so far, readable from disk (flushes the buffer first)."""
        if self._file is None:
            raise ValueError("writer is closed")
        self._file.flush()
        return ReceivedMessage(self._tmp_path, self._body_start, self.size)

    async def commit(self) -> None:
        """Write the END record, fsync, rename into queue/, fsync the directory.

        Returns only when the message is durable; raises (and leaves nothing in queue/) if not.
        Concurrent commits are batched by the spool's group committer.
        """
        f = self._file
        if f is None:
            raise ValueError("writer is closed")
        try:
            added = b"".join(self._added)
            self._hash.update(added)
            late = b"" if self.message_id is None else _late_fields(self.message_id)
            f.write(added)
            f.write(
                late
                + b"\nLATE %020d\n\nADD %020d\n" % (len(late), len(added))
                + _trailer(self.size, self._hash.hexdigest())
            )
            if self._recycled:
                f.truncate()  # what is left of the file's previous message goes
            f.flush()
            if not self._spool.fsync:
                rename_noreplace(self._tmp_path, self._final_path)
            else:
                loop = asyncio.get_running_loop()
                future: asyncio.Future[None] = loop.create_future()
                job = CommitJob(f.fileno(), self._tmp_path, self._final_path, loop, future)
                self._spool.committer.submit(job)
                try:
                    await asyncio.shield(future)
                except asyncio.CancelledError:
                    # The thread still owns the descriptor: let it finish before closing.
                    await asyncio.wait([future])
                    if future.exception() is None:
                        self._committed = True
                    raise
        except BaseException:
            self._close()
            raise
        self._committed = True
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            with contextlib.suppress(OSError):
                f.close()

    def abort(self) -> None:
        """Forget the message: remove the tmp file. Idempotent; safe after a failed commit."""
        self._close()
        if not self._committed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp_path)

    @property
    def committed(self) -> bool:
        return self._committed


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
            _fsync_dir(self.root / "state")

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

    def _read(self, queue_id: str) -> tuple[Layout, bytes | None]:
        """The file's layout and, when the file is small, the message as delivered.

        A small file (most mail) is read with one system call and parsed in memory: the
        delivering process used to make some twenty calls per message through buffered file
        objects (seek, read, isatty, fstat) for the same bytes. A large one is parsed from the
        file and its message left on disk (None), to be streamed.
        """
        try:
            fd = os.open(self._queue_path(queue_id), os.O_RDONLY)
        except FileNotFoundError:
            raise UnknownMessage(queue_id) from None
        try:
            size = os.fstat(fd).st_size
            data = os.pread(fd, size, 0) if size <= SMALL_FILE else None
        finally:
            os.close(fd)
        if data is None:
            return self._layout(queue_id), None
        f = io.BytesIO(data)
        layout = _checked(read_layout(f, len(data)), queue_id)
        return layout, MessageReader(f, layout).read()

    def _layout(self, queue_id: str, *, verify: bool = False) -> Layout:
        """Reads only the first line and the END records (unless ``verify``): listing a queue
        of large messages must not read them whole."""
        path = self._queue_path(queue_id)
        try:
            with open(path, "rb") as f:
                layout = read_layout(f, os.fstat(f.fileno()).st_size, verify=verify)
        except FileNotFoundError:
            raise UnknownMessage(queue_id) from None
        return _checked(layout, queue_id)

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

    def load_for_delivery(
        self, queue_id: str, *, fresh: bool = False
    ) -> tuple[Envelope, DeliveryState, bytes | None]:
        """As :meth:`load`, plus the message as delivered when the file is small (else None:
        read it with :meth:`open_body`), all from one read of the file."""
        layout, message = self._read(queue_id)
        envelope = layout.envelope
        if fresh:
            return envelope, DeliveryState.fresh(envelope.recipients), message
        return envelope, self.load_state(queue_id, envelope), message

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
            # The envelope is not parsed again here: the deliverer loaded it just before.
            records = _read_records(f, os.fstat(f.fileno()).st_size)
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

    def list(self, now: float | None = None) -> list[QueueEntry]:
        """Every committed, readable message, oldest id first. Damaged ones are skipped."""
        now = time.time() if now is None else now
        entries = []
        for name in sorted(os.listdir(self.root / "queue")):
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

    # -- start-up ----------------------------------------------------------------------------

    def recover(self, log: EventLog, *, verify_checksum: bool = True) -> builtins.list[str]:
        """Clean up after a crash and return the ids to deliver, oldest first.

        Deletes everything in tmp/ (never acknowledged), files in free/ beyond the pool's limit
        and half-written state files; validates every queue file (END record, and the body
        checksum unless ``verify_checksum=False``); moves damaged ones to corrupt/ with a panic
        log line; deletes orphan state files.
        Call it before anything writes to the spool.
        """
        self.pool.trim()
        tmp_dir = self.root / "tmp"
        for name in os.listdir(tmp_dir):
            try:
                os.unlink(tmp_dir / name)
            except IsADirectoryError:
                log.panic(f"spool: unexpected directory in tmp/: {escape(name, 64)}")
            except FileNotFoundError:
                pass
        ready: builtins.list[str] = []
        for name in sorted(os.listdir(self.root / "queue")):
            if not is_queue_id(name):
                log.panic(f"spool: ignoring unexpected file queue/{escape(name, 64)}")
                continue
            try:
                layout = self._layout(name, verify=verify_checksum)
            except UnknownMessage:
                continue
            except (CorruptMessage, OSError) as exc:
                os.replace(self.root / "queue" / name, self.root / "corrupt" / name)
                log.panic(f"{name} spool file corrupt ({escape(str(exc))}): moved to corrupt/")
                continue
            try:
                self.load_state(name, layout.envelope)
            except CorruptMessage as exc:
                os.replace(self._state_path(name), self.root / "corrupt" / f"{name}.state.json")
                log.panic(
                    f"{name} delivery state corrupt ({escape(str(exc))}): moved to corrupt/,"
                    " all recipients will be retried"
                )
            ready.append(name)
        queued = set(ready)
        state_dir = self.root / "state"
        for name in os.listdir(state_dir):
            stem, _, suffix = name.rpartition(".")
            if suffix == "tmp" or (suffix == "json" and is_queue_id(stem) and stem not in queued):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(state_dir / name)
        if self.fsync:
            for sub in ("queue", "state", "corrupt"):
                _fsync_dir(self.root / sub)
        return ready
