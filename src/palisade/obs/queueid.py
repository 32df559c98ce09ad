"""Queue ids in exim's modern shape: ``1vA2bC-0001Xy-7Q`` (time, process, sequence; base 62).

Unique per host as long as one process makes fewer than 3,844 ids in one second; past that the
generator waits for the next second rather than repeat an id.
"""

from __future__ import annotations

import os
import re
import threading
import time

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
QUEUE_ID_RE = re.compile(r"^[0-9A-Za-z]{6}-[0-9A-Za-z]{6}-[0-9A-Za-z]{2}$")


def _base62(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        value, digit = divmod(value, 62)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


class _Sequence:
    """The per-second sequence, one per process: every generator in a process must share it,
    or two of them (the sessions' and the queue runner's, for bounces) repeat each other's ids."""

    lock = threading.Lock()
    second = 0
    value = 0


_pid = os.getpid()  # cached (getpid is a system call), renewed in every forked child


def _renew_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_renew_pid)


class QueueIdGenerator:
    """Makes ids; thread-safe. ``pid`` may be given so that forked workers differ."""

    def __init__(self, pid: int | None = None) -> None:
        self._pid = pid

    def new(self) -> str:
        pid = _pid if self._pid is None else self._pid
        with _Sequence.lock:
            while True:
                now = int(time.time())
                if now != _Sequence.second:
                    _Sequence.second, _Sequence.value = now, 0
                if _Sequence.value < 62 * 62:
                    break
                time.sleep(0.001)
            seq = _Sequence.value
            _Sequence.value += 1
        return f"{_base62(now, 6)}-{_base62(pid, 6)}-{_base62(seq, 2)}"


def is_queue_id(text: str) -> bool:
    """True when ``text`` has the shape of a queue id (safe to use as a file name)."""
    return QUEUE_ID_RE.fullmatch(text) is not None


def queue_id_time(queue_id: str) -> int:
    """The second (epoch) in which ``queue_id`` was made: its first six base-62 digits. Ids of
    the same width sort as their seconds do (the alphabet is in ASCII order)."""
    value = 0
    for char in queue_id[:6]:
        value = value * 62 + _ALPHABET.index(char)
    return value
