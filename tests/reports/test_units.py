"""The shipped report service and timer pass ``systemd-analyze verify``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.services import need_program

ROOT = Path(__file__).resolve().parents[2]


def test_report_units_verify(tmp_path: Path) -> None:
    analyze = need_program("systemd-analyze", "systemd")
    program = shutil.which("palisade", path=str(Path(sys.executable).parent))
    assert program is not None
    for name in ("palisade-reports.service", "palisade-reports.timer"):
        text = (ROOT / "contrib" / name).read_text()
        (tmp_path / name).write_text(text.replace("/opt/palisade/bin/palisade", program))
    service = (ROOT / "contrib" / "palisade-reports.service").read_text()
    assert "palisade dmarc send-reports --config" in service
    assert "palisade tlsrpt send-reports --config" in service
    done = subprocess.run(
        [
            analyze,
            "verify",
            str(tmp_path / "palisade-reports.timer"),
            str(tmp_path / "palisade-reports.service"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    problems = [ln for ln in done.stderr.splitlines() if "palisade-reports" in ln]
    assert problems == [], done.stderr
