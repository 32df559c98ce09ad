"""The DMARC evaluations the gateway made, kept as JSON lines for the daily aggregate report.

Owns: ``<[dmarc] state>/records/YYYY-MM-DD.jsonl`` (one file per UTC day, shared by every
process of the gateway): :class:`DmarcRecordFile`, the ``ports.DmarcEvaluationSink`` one
process uses. Each evaluation is one line (``dataclasses.asdict`` of ``ports.DmarcEvaluation``)
written with ONE ``write`` on a descriptor opened ``O_APPEND``: the kernel puts each line at
the end whole, so processes appending at once never interleave. No fsync: a report is a
statistic, and a line lost to a power cut costs nothing the sender relies on. A file that
cannot be written costs the line, never the SMTP reply: the error goes to ``on_error`` (the
panic log) at most once a minute, and the message goes on.
Must not touch: reading or aggregating the lines (``palisade.reports.dmarc_send``).
Trust: the values were cleaned by the DMARC check; JSON encoding escapes the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from palisade.ports import DmarcEvaluation

__all__ = ["DmarcRecordFile", "day_of", "records_dir"]

FILE_MODE = 0o600
DIR_MODE = 0o700


def records_dir(state: Path) -> Path:
    """The directory of the day files under ``[dmarc] state``."""
    return Path(state) / "records"


def day_of(stamp: float) -> str:
    """The UTC day of a time stamp, as the file name has it."""
    return time.strftime("%Y-%m-%d", time.gmtime(stamp))


class DmarcRecordFile:
    """Appends evaluations to the day's file under ``directory`` (created when first used)."""

    def __init__(self, directory: Path, on_error: Callable[[str], None] | None = None) -> None:
        self.directory = Path(directory)
        self._on_error = on_error
        self._day = ""
        self._fd = -1
        self._last_error = 0.0
        self.lost = 0  # lines that could not be written

    def record(self, evaluation: DmarcEvaluation) -> None:
        line = json.dumps(dataclasses.asdict(evaluation), separators=(",", ":")) + "\n"
        try:
            fd = self._file(day_of(evaluation.time))
            os.write(fd, line.encode("utf-8"))
        except OSError as exc:
            self.lost += 1
            self._close()
            now = time.monotonic()
            if self._on_error is not None and now - self._last_error >= 60.0:
                self._last_error = now
                self._on_error(
                    f"DMARC report records: cannot write under {self.directory}: "
                    f"{exc.strerror or exc} ({self.lost} evaluation(s) lost so far)"
                )

    def _file(self, day: str) -> int:
        if day != self._day or self._fd < 0:
            self._close()
            os.makedirs(self.directory, DIR_MODE, exist_ok=True)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            self._fd = os.open(self.directory / f"{day}.jsonl", flags, FILE_MODE)
            self._day = day
        return self._fd

    def _close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        self._close()
