"""The password-file back end of SMTP AUTH: ``user:$argon2id$...`` lines, Argon2id hashes.

Owns: the file format (one ``user:hash`` per line, ``#`` comments and blank lines ignored; the
hash is argon2-cffi's PHC string, Argon2id only), reading it again when it changes (at most one
``stat`` every two seconds, on use), checking a password against it (:class:`PasswordFile`, the
``ports.Authenticator``), and the edits ``palisade passwd`` makes (:func:`set_password`,
:func:`remove_user`, written whole to a temporary file and renamed, mode 0640, the owner and
group of the file it replaces).

A password is checked in a worker thread (Argon2id takes tens of milliseconds and 64 MiB by
design), at most two at a time per process. An unknown user costs the same as a known one: the
password is checked against a dummy hash, so the time of a reply does not tell which users exist.

Must not touch: the SMTP side (replies, delays, logs are the conversation's).
Trust: the file is the operator's, read as UTF-8; a line that is not ``user:$argon2id$...`` is
skipped and named once through ``on_error`` (line number, never its content: it may hold a
hash). Passwords come from the network: never logged, never put in an exception text.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import argon2

from palisade.ports import AuthAttempt, ServiceTempError

__all__ = [
    "PasswordFile",
    "hash_password",
    "read_entries",
    "remove_user",
    "set_password",
    "valid_user_name",
]

_HASHER = argon2.PasswordHasher()  # argon2-cffi's defaults: Argon2id, RFC 9106 low-memory
_USER_RE = re.compile(r"[^\s:#\x00-\x1f\x7f]{1,255}")
_MODE = 0o640
_dummy: str | None = None


def valid_user_name(name: str) -> bool:
    """A user name the file can hold: 1-255 characters, no blank, colon, '#' or control."""
    return bool(_USER_RE.fullmatch(name))


def hash_password(password: str) -> str:
    """The Argon2id PHC string of ``password`` (a new random salt each time)."""
    return _HASHER.hash(password)


def _dummy_hash() -> str:
    global _dummy
    if _dummy is None:
        _dummy = _HASHER.hash("palisade: no such user")
    return _dummy


def read_entries(path: Path) -> tuple[dict[str, str], list[int]]:
    """(user -> hash, numbers of the lines skipped as malformed); OSError when unreadable."""
    entries: dict[str, str] = {}
    bad: list[int] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, hashed = line.partition(":")
            if not sep or not valid_user_name(user) or not hashed.startswith("$argon2id$"):
                bad.append(number)
                continue
            entries[user] = hashed
    return entries, bad


def _write(path: Path, entries: dict[str, str], header: list[str]) -> None:
    """Replaces ``path`` with ``entries`` (atomically, 0640, keeping its owner and group)."""
    owner: tuple[int, int] | None = None
    with contextlib.suppress(FileNotFoundError):
        st = path.stat()
        owner = (st.st_uid, st.st_gid)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, _MODE)
        if owner is not None:
            with contextlib.suppress(PermissionError):
                os.fchown(fd, *owner)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for line in header:
                f.write(line + "\n")
            for user, hashed in entries.items():
                f.write(f"{user}:{hashed}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _comments(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n") for line in f if line.lstrip().startswith("#")]
    except FileNotFoundError:
        return ["# palisade passwd: user:Argon2id hash, one per line (palisade passwd add USER)"]


def set_password(path: Path, user: str, password: str) -> bool:
    """Adds ``user`` or replaces its hash; True when the user was new. The comments stay."""
    try:
        entries, _ = read_entries(path)
    except FileNotFoundError:
        entries = {}
    new = user not in entries
    entries[user] = hash_password(password)
    _write(path, entries, _comments(path))
    return new


def remove_user(path: Path, user: str) -> bool:
    """Removes ``user``; False when it was not there."""
    entries, _ = read_entries(path)
    if user not in entries:
        return False
    del entries[user]
    _write(path, entries, _comments(path))
    return True


class PasswordFile:
    """``ports.Authenticator`` over a password file, read again when it changes."""

    def __init__(
        self,
        path: Path,
        *,
        check_interval: float = 2.0,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.path = path
        self.check_interval = check_interval
        self.on_error = on_error
        self._entries: dict[str, str] | None = None
        self._stamp: tuple[int, int, float, int] | None = None
        self._checked = 0.0
        self._slots: asyncio.Semaphore | None = None

    def _current(self) -> dict[str, str]:
        now = time.monotonic()
        if self._entries is not None and now - self._checked < self.check_interval:
            return self._entries
        self._checked = now
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_size, st.st_mtime, st.st_ctime_ns)
            if self._entries is None or stamp != self._stamp:
                entries, bad = read_entries(self.path)
                self._entries, self._stamp = entries, stamp
                if bad and self.on_error is not None:
                    lines = ", ".join(map(str, bad[:10]))
                    self.on_error(
                        f"password file {self.path}: line(s) {lines} skipped: expected "
                        "user:$argon2id$... (palisade passwd add USER writes them)"
                    )
        except OSError as exc:
            self._entries = None  # unreadable now: nobody may log in until it is back
            raise ServiceTempError(
                f"password file {self.path}: {exc.strerror or type(exc).__name__}"
            ) from None
        return self._entries

    async def authenticate(self, attempt: AuthAttempt) -> str | None:
        entries = self._current()
        hashed = entries.get(attempt.authcid)
        if self._slots is None:
            self._slots = asyncio.Semaphore(2)
        async with self._slots:
            ok = await asyncio.to_thread(_verify, hashed or _dummy_hash(), attempt.password)
        if not ok or hashed is None:
            return None
        if attempt.authzid and attempt.authzid != attempt.authcid:
            return None  # acting as another user is not supported
        return attempt.authcid


def _verify(hashed: str, password: str) -> bool:
    try:
        return _HASHER.verify(hashed, password)
    except argon2.exceptions.VerificationError:
        return False
    except argon2.exceptions.InvalidHashError:
        return False
