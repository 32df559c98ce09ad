"""The record format of a queue file: what ``queue/<id>`` holds and how it is checked when read.

Owns: the byte layout below, the functions that write its records and the parser that finds
them again (``read_records``, ``read_layout``). Version 3; version 2 files, without the LATE
record, and version 1 files, without the ADD record either, are still read::

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
the body and delivered *before* it, so the message is never copied to insert them. The envelope
(palisade.spool.envelope) carries each recipient's route as a field of the first record; files
written by 0.4.0 and before have none and are still read.
Must not touch: files beyond the reader handed in, directories, the delivery state.
Trust: a file read back from disk may be torn by a crash or damaged by hand: every length is
checked against the file's size before it is used, and any damage raises
:class:`palisade.spool.errors.CorruptMessage`, never a half-valid layout.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import IO

from palisade.spool.envelope import Envelope, merge_late
from palisade.spool.errors import CorruptMessage

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


# -- writing (the writer calls these; it owns the file) ---------------------------------------


def first_record(envelope: Envelope) -> bytes:
    """The header record: magic, the envelope as one line of ASCII JSON, newline."""
    return MAGIC_V3 + envelope.dumps().encode("ascii") + b"\n"


def late_fields(message_id: str) -> bytes:
    """The LATE record's JSON object (one string encoded, not a dict: this runs per message)."""
    return b'{"message_id":%s}' % json.dumps(message_id, ensure_ascii=True).encode("ascii")


def trailer(length: int, digest: str) -> bytes:
    return b"\nEND %020d sha256=%s\n" % (length, digest.encode("ascii"))


def tail_records(late: bytes, added_length: int, body_length: int, digest: str) -> bytes:
    """What follows the added lines: the late fields, the LATE, ADD and END records."""
    return (
        late
        + b"\nLATE %020d\n\nADD %020d\n" % (len(late), added_length)
        + trailer(body_length, digest)
    )


# -- reading ----------------------------------------------------------------------------------


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

    @property
    def segments(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(offset, length) of the message's two parts in reading order: added lines, body."""
        end = self.body_start + self.body_length
        return (end, self.added_length), (self.body_start, self.body_length)


@dataclass(frozen=True)
class Layout(Records):
    """The records and the parsed envelope."""

    envelope: Envelope


def read_records(f: IO[bytes], size: int) -> Records:
    """Find the records of a file of ``size`` bytes open for reading; CorruptMessage if torn."""
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
    records = read_records(f, size)
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


def checked(layout: Layout, queue_id: str) -> Layout:
    """``layout``, if its envelope belongs to the file named ``queue_id``."""
    if layout.envelope.queue_id != queue_id:
        raise CorruptMessage("envelope queue id does not match the file name")
    return layout
