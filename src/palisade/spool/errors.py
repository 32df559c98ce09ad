"""The spool's own exceptions (shared by the record format, the writer, the queue and recovery).

Owns: the three error classes callers of :mod:`palisade.spool` catch. Must not touch: anything.
"""

from __future__ import annotations


class SpoolError(Exception):
    """Base class of the spool's own errors."""


class UnknownMessage(SpoolError, KeyError):
    """No committed message with that id (or the id is malformed)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown message"


class CorruptMessage(SpoolError, ValueError):
    """A queue file or state file failed validation."""
