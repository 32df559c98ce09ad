"""Local delivery into Maildir: ``root/<local-part>/{tmp,new,cur}``, atomic tmp -> new.

Owns: the files it creates under ``root``. For each recipient it writes ``Return-Path`` and
``Delivered-To`` lines and then the spooled body (CRLF line ends turned into LF, as Maildir readers
expect) into ``tmp/`` under a unique name, fsyncs it, renames it into ``new/`` and fsyncs ``new/``.
The name is derived from the queue id and the recipient, so when a crash falls between the rename
and the spool's record of the delivery, the redelivery finds the file in ``new/`` and does not
write it twice (a copy a mail reader already moved to ``cur/`` in that window is not looked for).
Files and directories it creates are 0600 and 0700; with ``group`` (``[paths] group``, for a
delivery agent such as Dovecot that reads the tree) 0640 and 0750, of that group. Existing
directories keep their modes.
Must not touch: the spool (it only reads the body chunks handed to it), anything outside ``root``.
Trust: the recipient address comes from the network (validated by the SMTP session, but not
trusted here): the mailbox name is derived from its local part, lowercased, and anything that
could escape ``root`` or hide a file (``/``, NUL, control characters, whitespace, a leading ``.``,
``..``) is refused as a permanent failure. No ``+extension`` handling.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
import threading
from collections.abc import Iterable
from pathlib import Path

from palisade.obs.files import make_dirs
from palisade.spool import Envelope


class MailboxRefused(ValueError):
    """The recipient cannot be mapped to a safe mailbox name (a permanent failure)."""


def mailbox_name(rcpt: str) -> str:
    """The mailbox directory for ``rcpt``: its lowercased local part, if that is safe."""
    local, at, _domain = rcpt.rpartition("@")
    if not at:
        local = rcpt
    local = local.lower()
    if not local:
        raise MailboxRefused("empty local part")
    if local.startswith(".") or ".." in local:
        raise MailboxRefused("local part starts with a dot or contains '..'")
    if any(c == "/" or c == "\\" or ord(c) < 33 or ord(c) == 127 for c in local):
        raise MailboxRefused("local part contains '/', whitespace or control characters")
    if len(local.encode("utf-8")) > 200:
        raise MailboxRefused("local part too long for a mailbox name")
    return local


def _crlf_to_lf(chunks: Iterable[bytes]) -> Iterable[bytes]:
    """Turn CRLF into LF across chunk boundaries; lone CRs are kept."""
    carry = False
    for chunk in chunks:
        data = b"\r" + chunk if carry else chunk
        carry = data.endswith(b"\r")
        if carry:
            data = data[:-1]
        if data:
            yield data.replace(b"\r\n", b"\n")
    if carry:
        yield b"\r"


class MaildirDelivery:
    """Writes one message per recipient; blocking file I/O (run it in a worker thread)."""

    _counter = itertools.count()
    _counter_lock = threading.Lock()

    def __init__(self, root: Path, *, fsync: bool = True, group: int | None = None) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.group = group
        # Private unless a delivery agent's group is named ([paths] group): then it may read.
        self.dir_mode, self.file_mode = (0o700, 0o600) if group is None else (0o750, 0o640)
        make_dirs(self.root, self.dir_mode, group)
        host = socket.gethostname() or "localhost"
        self._host = host.replace("/", "\\057").replace(":", "\\072")

    def _unique(self, envelope: Envelope, rcpt: str) -> str:
        """A name fixed by (queue id, recipient), so a redelivery after a crash is recognised.

        The Maildir convention only asks for uniqueness; queue ids are unique per host and the
        recipient hash separates recipients of one message.
        """
        digest = hashlib.sha256(rcpt.encode("utf-8", "surrogateescape")).hexdigest()[:12]
        return f"{int(envelope.received_at)}.P{envelope.queue_id}R{digest}.{self._host}"

    def deliver(self, envelope: Envelope, rcpt: str, body: Iterable[bytes]) -> Path:
        """Deliver to ``rcpt``; return the file in new/. MailboxRefused = permanent, OSError =
        temporary."""
        if any(ord(c) < 32 or ord(c) == 127 for c in envelope.sender + rcpt):
            raise MailboxRefused("control characters in the envelope")
        box = self.root / mailbox_name(rcpt)
        for sub in ("tmp", "new", "cur"):
            make_dirs(box / sub, self.dir_mode, self.group)
        name = self._unique(envelope, rcpt)
        tmp, final = box / "tmp" / name, box / "new" / name
        if final.exists():
            # Delivered before a crash that came before the spool recorded it: not again.
            return final
        tmp.unlink(missing_ok=True)  # a torn write from before a crash
        header = f"Return-Path: <{envelope.sender}>\nDelivered-To: {rcpt}\n".encode(
            "utf-8", "surrogateescape"
        )
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, self.file_mode)
            with open(fd, "wb") as f:
                if self.group is not None:
                    os.fchown(fd, -1, self.group)
                    os.fchmod(fd, self.file_mode)  # the umask (0077) narrowed it
                f.write(header)
                for chunk in _crlf_to_lf(body):
                    f.write(chunk)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            os.rename(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if self.fsync:
            fd = os.open(box / "new", os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return final
