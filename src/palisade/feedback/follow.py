"""Follows log files across rotation and remembers where it stopped: lines in, in order, once.

Owns: reading the operator's ``[scan] files`` in bounded chunks, the offsets file (``[scan]
state``, JSON, replaced atomically: write, fsync, rename, fsync of the directory) and the
rules that decide where reading resumes. Knows nothing of what a line means (see
:mod:`palisade.feedback.logscan`) nor of the store.

Per path it remembers the file it reads (device, inode, offset, and the first bytes of the file
as a fingerprint) and the one before it (the rotated file, device, inode, offset):

* same inode, same first bytes, size at least the offset: read on from the offset;
* same inode but smaller than the offset, or other first bytes (``copytruncate``, or a new file
  that got the old inode number): the file was truncated or replaced: read it from 0;
* another inode at the path (rotated by rename): the old file is read to its end first (through
  the descriptor still open in daemon mode, else found again by inode among its siblings
  ``NAME.1``, ``NAME-20261202``..., not compressed), then the new one from 0; the old file is
  read again on later passes while it can be found (a writer that has not yet reopened its log
  keeps appending to it) and forgotten at the next rotation or once deleted;
* a path that does not exist (yet, or between rotation and reopen) is skipped quietly;
* a file never seen before is read from its start.

Only whole lines are handed on: a last line without its line break waits for the next pass
(the writer is in the middle of it), except in a rotated file, whose end is final. A line longer
than ``max_line`` bytes is skipped whole, however long, and the state says so if a pass stops
inside it, so that its tail is never taken for a line of its own.

Trust: the files' contents are untrusted (decoded as UTF-8 with replacement, lengths bounded);
the offsets file is ours, but a damaged or foreign one is an error naming it, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

__all__ = ["CHUNK", "FileState", "Follower", "OffsetsError", "PassStats"]

CHUNK = 1 << 20  # bytes read at a time
HEAD = 64  # bytes of a file's start kept as its fingerprint
STATE_VERSION = 1
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".Z", ".zip")


class OffsetsError(Exception):
    """The offsets file cannot be read or written; ``str()`` names it."""


@dataclass(frozen=True, slots=True)
class FileState:
    """Where reading of one file stands."""

    dev: int
    ino: int
    offset: int
    head: str = ""  # hex of the file's first bytes (up to HEAD), as read
    skipping: bool = False  # inside an overlong line: skip to the next line break


@dataclass(slots=True)
class PassStats:
    """What one pass over one path did (for the pass's summary line)."""

    path: str
    lines: int = 0
    overlong: int = 0
    bytes: int = 0
    rotated: bool = False
    truncated: bool = False


LineHandler = Callable[[str, list[str]], Awaitable[None]]


@dataclass(slots=True)
class _Track:
    current: FileState | None = None
    previous: FileState | None = None
    previous_name: str = ""


class Follower:
    """The files of ``paths``, their offsets kept in ``offsets`` (a JSON file).

    ``await run_pass(handle)`` reads what is new in every file and calls ``await handle(path,
    lines)`` with batches of whole lines (at most one chunk's worth), saving the offsets after
    each batch has been handled: a line is handed on again only if the process dies between
    the handler's return and that save. ``keep_open``: hold descriptors between passes (the
    daemon: a rotated file is finished through its descriptor even when renamed out of reach).
    """

    def __init__(
        self,
        paths: list[Path],
        offsets: Path,
        *,
        max_line: int = 8192,
        chunk: int = CHUNK,
        keep_open: bool = False,
    ) -> None:
        self.paths = [str(p) for p in paths]
        self.offsets = offsets
        self.max_line = max_line
        self.chunk = max(chunk, max_line + 1)
        self.keep_open = keep_open
        self._fds: dict[tuple[int, int], int] = {}
        self._tracks: dict[str, _Track] = self._load()

    # --- the offsets file ----------------------------------------------------------------------

    def _load(self) -> dict[str, _Track]:
        try:
            text = self.offsets.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            raise OffsetsError(f"cannot read the offsets file {self.offsets}: {exc}") from None
        try:
            data = json.loads(text)
            if data.get("version") != STATE_VERSION:
                raise ValueError(f"unknown version {data.get('version')!r}")
            tracks = {}
            for path, entry in data["files"].items():
                current = entry.get("current")
                previous = entry.get("previous")
                tracks[str(path)] = _Track(
                    FileState(**current) if current else None,
                    FileState(**previous) if previous else None,
                    str(entry.get("previous_name", "")),
                )
            return tracks
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise OffsetsError(
                f"the offsets file {self.offsets} is damaged ({exc}); remove it to read every "
                "file again from its start"
            ) from None

    def save(self) -> None:
        """Write the offsets file atomically (a crash leaves the old or the new one)."""
        files = {}
        for path, track in self._tracks.items():
            files[path] = {
                "current": asdict(track.current) if track.current else None,
                "previous": asdict(track.previous) if track.previous else None,
                "previous_name": track.previous_name,
            }
        text = json.dumps({"version": STATE_VERSION, "files": files}, indent=1, sort_keys=True)
        tmp = self.offsets.with_name(self.offsets.name + ".tmp")
        try:
            self.offsets.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, text.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.offsets)
            dfd = os.open(self.offsets.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            raise OffsetsError(
                f"cannot write the offsets file {self.offsets}: {exc.strerror or exc}"
            ) from None

    def state(self, path: str | Path) -> FileState | None:
        """Where reading of ``path``'s current file stands (for tests and the summary)."""
        track = self._tracks.get(str(path))
        return track.current if track else None

    # --- passes --------------------------------------------------------------------------------

    async def run_pass(self, handle: LineHandler) -> list[PassStats]:
        """Read what is new in every path; returns one :class:`PassStats` per path."""
        results = []
        for path in self.paths:
            stats = PassStats(path)
            await self._follow(path, handle, stats)
            results.append(stats)
        if self.keep_open:
            self._prune_fds()
        else:
            self.close()
        return results

    def close(self) -> None:
        """Close every descriptor held between passes."""
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def _prune_fds(self) -> None:
        wanted = {
            (s.dev, s.ino)
            for t in self._tracks.values()
            for s in (t.current, t.previous)
            if s is not None
        }
        for key in [k for k in self._fds if k not in wanted]:
            with contextlib.suppress(OSError):
                os.close(self._fds.pop(key))

    async def _follow(self, path: str, handle: LineHandler, stats: PassStats) -> None:
        track = self._tracks.setdefault(path, _Track())
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = -1
        except OSError as exc:
            raise OffsetsError(f"cannot open {path}: {exc.strerror or exc}") from None
        try:
            st = os.fstat(fd) if fd >= 0 else None
            if st is not None and not stat.S_ISREG(st.st_mode):
                raise OffsetsError(f"{path} is not a regular file")
            current = track.current
            if (
                st is not None
                and current is not None
                and (current.dev, current.ino) != (st.st_dev, st.st_ino)
            ):
                # Rotated: the file we read becomes the previous one, finished first.
                track.previous, track.previous_name = current, path
                track.current = None
                stats.rotated = True
            await self._drain_previous(path, track, handle, stats)
            if fd < 0 and track.current is not None:
                # Renamed away and no new file yet: the writer may still append to the one we
                # hold open (daemon mode).
                held = self._fds.get((track.current.dev, track.current.ino))
                if held is not None:
                    fd = os.dup(held)
                    st = os.fstat(fd)
            if fd < 0 or st is None:
                return
            current = track.current
            if current is None or not self._same_file(fd, st.st_size, current):
                if current is not None:
                    stats.truncated = True
                current = FileState(st.st_dev, st.st_ino, 0)
            track.current = current
            key = (st.st_dev, st.st_ino)
            if self.keep_open and key not in self._fds:
                self._fds[key] = os.dup(fd)

            def commit(state: FileState) -> None:
                track.current = state

            await self._read(fd, current, path, handle, stats, commit, final=False)
        finally:
            if fd >= 0:
                os.close(fd)

    def _same_file(self, fd: int, size: int, state: FileState) -> bool:
        if size < state.offset:
            return False
        if state.head:
            expected = bytes.fromhex(state.head)
            if os.pread(fd, len(expected), 0) != expected:
                return False
        return True

    async def _drain_previous(
        self, path: str, track: _Track, handle: LineHandler, stats: PassStats
    ) -> None:
        previous = track.previous
        if previous is None:
            return
        key = (previous.dev, previous.ino)
        held = self._fds.get(key)
        fd = os.dup(held) if held is not None else self._find_sibling(path, previous)
        if fd < 0:  # compressed or deleted since: nothing more can be read from it
            track.previous, track.previous_name = None, ""
            self.save()
            return
        try:
            st = os.fstat(fd)
            if st.st_size < previous.offset:  # truncated after rotation: nothing to finish
                track.previous = None
                self.save()
                return

            def commit(state: FileState) -> None:
                track.previous = state

            await self._read(fd, previous, path, handle, stats, commit, final=True)
            if st.st_nlink == 0:  # deleted: nobody can find it to write to it any more
                track.previous, track.previous_name = None, ""
                self.save()
        finally:
            os.close(fd)

    def _find_sibling(self, path: str, state: FileState) -> int:
        """An open descriptor of the file with ``state``'s inode next to ``path`` (rotated
        names: ``NAME.1``, ``NAME-20261202``, ``NAME.0``...), or -1."""
        directory, name = os.path.split(path)
        candidates = [f"{name}.1", f"{name}.0"]
        try:
            with os.scandir(directory or ".") as entries:
                for entry in entries:
                    if (
                        entry.name.startswith((name + ".", name + "-"))
                        and not entry.name.endswith(_COMPRESSED)
                        and entry.name not in candidates
                    ):
                        candidates.append(entry.name)
        except OSError:
            return -1
        for candidate in candidates[:64]:
            full = os.path.join(directory, candidate)
            try:
                fd = os.open(full, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (state.dev, state.ino) and stat.S_ISREG(st.st_mode):
                return fd
            os.close(fd)
        return -1

    async def _read(
        self,
        fd: int,
        state: FileState,
        path: str,
        handle: LineHandler,
        stats: PassStats,
        commit: Callable[[FileState], None],
        *,
        final: bool,
    ) -> None:
        """Hand on the whole lines of ``fd`` after ``state.offset``, committing (and saving)
        the new state after each batch. ``final``: a last line without a line break counts too
        (a rotated file's end)."""
        while True:
            data = os.pread(fd, self.chunk, state.offset)
            if not data:
                return
            at_end = len(data) < self.chunk
            lines, used, skipping, overlong = self._lines(data, state.skipping, final and at_end)
            if used == 0:
                return  # an unfinished line: wait for the rest of it
            if len(state.head) < 2 * HEAD:
                state = replace(state, head=os.pread(fd, HEAD, 0).hex())
            stats.overlong += overlong
            stats.bytes += used
            if lines:
                stats.lines += len(lines)
                await handle(path, lines)
            state = replace(state, offset=state.offset + used, skipping=skipping)
            commit(state)
            self.save()
            if at_end:
                return

    def _lines(self, data: bytes, skipping: bool, final: bool) -> tuple[list[str], int, bool, int]:
        """The whole lines at the start of ``data``: (lines, bytes used, inside an overlong
        line at the end, overlong lines skipped). ``final``: ``data`` ends the file for good."""
        overlong = 0
        pos = 0
        if skipping:
            newline = data.find(b"\n")
            if newline < 0:
                return [], len(data), True, 0
            pos = newline + 1
        last = data.rfind(b"\n", pos)
        end = last + 1
        tail = len(data) - end if last >= 0 else len(data) - pos
        if tail > self.max_line:  # an unfinished line already too long: skip it to its end
            overlong += 1
            lines: list[str] = []
            if last >= pos:
                lines, _, _, more = self._lines(data[pos:end], False, False)
                overlong += more
            return lines, len(data), True, overlong
        if final and tail:
            end = len(data)
        elif last < pos:
            return [], pos, False, 0
        lines = []
        for raw in data[pos:end].split(b"\n"):
            if len(raw) > self.max_line:
                overlong += 1
                continue
            lines.append(raw.removesuffix(b"\r").decode("utf-8", "replace"))
        if data[end - 1 : end] == b"\n":
            lines.pop()  # the empty piece after the last line break
        return lines, end, False, overlong
