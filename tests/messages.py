"""Messages for DATA-stage tests: the ``MessageSource`` port over a file, and the header
fields exactly as the session hands them to the checks (through the real ``HeaderSplitter``).
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from palisade.policy.rules import MessageFacts
from palisade.smtp.headers import HeaderSplitter


class FileSource:
    """The MessageSource port over a file, as the spool gives it to checks and scanners."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.opened = 0

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    def open(self) -> BinaryIO:
        self.opened += 1
        return self.path.open("rb")


def header_fields(raw: bytes) -> tuple[tuple[str, str], ...]:
    """The header fields of ``raw`` as the session collects them while DATA streams in."""
    splitter = HeaderSplitter()
    splitter.feed(raw)
    splitter.finish()
    return tuple(splitter.fields)


def message_facts(path: Path, raw: bytes) -> MessageFacts:
    """Writes ``raw`` to ``path`` and wraps it as the session would after the final dot."""
    path.write_bytes(raw)
    return MessageFacts(header_fields(raw), FileSource(path), len(raw))
