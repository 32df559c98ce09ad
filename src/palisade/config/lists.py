"""List files on disk: loaded at start, reloaded when they change and on SIGHUP.

Owns: reading the operator's list files and noticing changes (at most one ``stat`` per list every
``check_interval`` seconds, on use). A file that breaks after start-up keeps the last good
contents and reports the error once through ``on_error`` (the panic log); a file that is broken at
start-up is a ConfigError, so the server does not start on a half-read whitelist.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from palisade.policy.lists import ListKind, OperatorList, parse_list
from palisade.policy.senders import SenderMap, parse_senders


@dataclass
class ListHandle:
    """One named list; ``current()`` is what checks call."""

    name: str
    kind: ListKind
    path: Path | None
    value: OperatorList
    check_interval: float = 2.0
    on_error: Callable[[str], None] | None = None
    _mtime: float = 0.0
    _checked: float = field(default=0.0)

    @classmethod
    def load(cls, name: str, kind: ListKind, path: Path, **kwargs: object) -> ListHandle:
        """Reads the file; ValueError with file and line when it is missing or bad."""
        try:
            stat = path.stat()
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"list {name!r}: cannot read {path}: {exc.strerror or exc}") from None
        try:
            value = parse_list(text, kind)
        except ValueError as exc:
            raise ValueError(f"list {name!r}: {path}: {exc}") from None
        handle = cls(name, kind, path, value, **kwargs)  # type: ignore[arg-type]
        handle._mtime = stat.st_mtime
        handle._checked = time.monotonic()
        return handle

    @classmethod
    def inline(cls, name: str, kind: ListKind, text: str) -> ListHandle:
        """A list given in the config itself (never reloaded)."""
        return cls(name, kind, None, parse_list(text, kind))

    def current(self) -> OperatorList:
        if self.path is not None:
            now = time.monotonic()
            if now - self._checked >= self.check_interval:
                self._checked = now
                self.reload_if_changed()
        return self.value

    def reload_if_changed(self) -> bool:
        """Re-reads the file when its mtime changed; True when the contents were replaced."""
        if self.path is None:
            return False
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError as exc:
            self._report(f"list {self.name!r}: cannot read {self.path}: {exc}; keeping the old one")
            return False
        if mtime == self._mtime:
            return False
        try:
            self.value = parse_list(self.path.read_text(encoding="utf-8"), self.kind)
        except (OSError, ValueError) as exc:
            self._report(f"list {self.name!r}: {self.path}: {exc}; keeping the old contents")
            self._mtime = mtime
            return False
        self._mtime = mtime
        return True

    def _report(self, text: str) -> None:
        if self.on_error is not None:
            self.on_error(text)


@dataclass
class SendersFile:
    """The ``[submission] senders`` map, read again when the file changes (as the lists are):
    the instance is what ``Ports.senders`` calls. Broken after start-up: the last good map
    stays and ``on_error`` is told once per change."""

    path: Path
    value: SenderMap
    check_interval: float = 2.0
    on_error: Callable[[str], None] | None = None
    _mtime: float = 0.0
    _checked: float = 0.0

    @classmethod
    def load(cls, path: Path, **kwargs: object) -> SendersFile:
        """Reads the file; ValueError naming the file (and line) when it is missing or bad."""
        try:
            stat = path.stat()
            value = parse_senders(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(
                f"submission.senders: cannot read {path}: {exc.strerror or exc}"
            ) from None
        except ValueError as exc:
            raise ValueError(f"submission.senders: {path}: {exc}") from None
        handle = cls(path, value, **kwargs)  # type: ignore[arg-type]
        handle._mtime = stat.st_mtime
        handle._checked = time.monotonic()
        return handle

    def __call__(self) -> SenderMap:
        now = time.monotonic()
        if now - self._checked >= self.check_interval:
            self._checked = now
            try:
                mtime = os.stat(self.path).st_mtime
                if mtime != self._mtime:
                    self._mtime = mtime
                    self.value = parse_senders(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                if self.on_error is not None:
                    self.on_error(
                        f"submission.senders: {self.path}: {exc}; keeping the old contents"
                    )
        return self.value
