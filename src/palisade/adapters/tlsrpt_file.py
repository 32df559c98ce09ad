"""TLS-RPT result files: the ``TlsResultSink`` port as JSON lines, one file per UTC day.

Owns: appending each ``TlsResult`` (RFC 8460's raw material) as one JSON object per line to
``<directory>/YYYY-MM-DD.jsonl`` (the UTC day of the result's ``time``), for ``palisade tlsrpt
send-reports`` to aggregate once a day.

Must not touch: the report format itself (aggregation, JSON of RFC 8460 section 4, mailing: the
reports side does that), any other project module than ``palisade.ports``.

Concurrency: several worker processes write the same day's file. Each line is written with one
``os.write`` on a descriptor opened with ``O_APPEND``; the kernel appends such a write whole
(a regular file on a local file system), so lines never interleave. The line is bounded (a
result's texts are cut) so it stays one write.

Failure: ``record`` never raises and never blocks for long (a local file append). A failure
(directory gone, disk full, permissions) is told to ``on_error`` (the panic log) at most once a
minute, and the result is lost: a delivery never waits for its report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from palisade.ports import TlsResult

__all__ = ["TlsResultFiles"]

FILE_MODE = 0o640
ERROR_INTERVAL = 60.0
MAX_TEXT = 1000  # characters of ``detail`` and of each policy string kept


class TlsResultFiles:
    """Appends results to ``directory/YYYY-MM-DD.jsonl`` (``directory`` made when missing)."""

    def __init__(
        self,
        directory: Path,
        *,
        on_error: Callable[[str], None] | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.directory = Path(directory)
        self._on_error = on_error
        self._wall = wall
        self._last_error = -ERROR_INTERVAL
        self._fd: int | None = None
        self._day = ""

    def path_for(self, when: float) -> Path:
        """The file of the UTC day of ``when`` (epoch seconds)."""
        return self.directory / (time.strftime("%Y-%m-%d", time.gmtime(when)) + ".jsonl")

    def record(self, result: TlsResult) -> None:
        """Appends ``result`` (its ``time`` set to now when 0); never raises."""
        try:
            when = result.time or self._wall()
            fields = dataclasses.asdict(result)
            fields["time"] = when
            fields["detail"] = str(fields["detail"])[:MAX_TEXT]
            fields["policy_strings"] = [str(s)[:MAX_TEXT] for s in result.policy_strings[:100]]
            line = (json.dumps(fields, ensure_ascii=True, sort_keys=True) + "\n").encode()
            os.write(self._descriptor(when), line)
        except Exception as exc:  # never raise into a delivery: tell the operator, once a minute
            self._complain(exc)

    def _descriptor(self, when: float) -> int:
        day = time.strftime("%Y-%m-%d", time.gmtime(when))
        if self._fd is not None and day == self._day and os.path.exists(self.path_for(when)):
            return self._fd
        self.close()
        self.directory.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._fd = os.open(self.path_for(when), flags, FILE_MODE)
        self._day = day
        return self._fd

    def _complain(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_error < ERROR_INTERVAL:
            return
        self._last_error = now
        if self._on_error is not None:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            with contextlib.suppress(Exception):
                self._on_error(
                    f"TLS-RPT results: cannot write to {self.directory}: {reason}"
                    " (results are lost until this is fixed; said at most once a minute)"
                )

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
