"""``palisade firewall`` as an operator meets it outside the kernel: config errors named by key,
``backend = "none"``, and the shipped systemd unit checked by ``systemd-analyze verify``.
(Everything that touches nftables runs in a network namespace: test_firewall_netns.py.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, palisade, write_config
from tests.services import need_program

UNIT = ROOT / "contrib" / "palisade-firewall.service"


@pytest.mark.parametrize(
    ("firewall", "key", "problem"),
    [
        ({"ports": [25, 0]}, "firewall.ports", "expected TCP port numbers (1-65535), got 0"),
        ({"ports": []}, "firewall.ports", "expected at least one TCP port"),
        ({"ports": ["smtp"]}, "firewall.ports", "expected a whole number"),
        ({"table": "pal isade"}, "firewall.table", "expected an nftables name"),
        ({"backend": "iptables"}, "firewall.backend", "expected one of 'nftables', 'none'"),
        ({"interval": "0s"}, "firewall.interval", "at least 0.5 seconds"),
    ],
)
def test_bad_firewall_settings_are_named(
    tmp_path: Path, firewall: dict[str, object], key: str, problem: str
) -> None:
    config = write_config(tmp_path / "palisade.toml", {"firewall": firewall})
    done = palisade("firewall", "--once", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 2
    assert key in done.stderr and problem in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_backend_none_does_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path / "palisade.toml", {"firewall": {"backend": "none"}})
    for args in (["--once"], ["--flush"], []):
        done = palisade("firewall", *args, "--config", str(config), cwd=tmp_path)
        assert done.returncode == 0
        assert '[firewall] backend is "none": nothing to do' in done.stderr


def test_interval_must_be_a_number(tmp_path: Path) -> None:
    done = palisade("firewall", "--interval", "soon", cwd=tmp_path)
    assert done.returncode == 2
    assert "not a number of seconds: 'soon'" in done.stderr


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """The shipped unit, with ExecStart pointed at this checkout's palisade (systemd-analyze
    checks that the program exists), passes ``systemd-analyze verify`` without a warning."""
    analyze = need_program("systemd-analyze", "systemd")
    program = shutil.which("palisade", path=str(Path(sys.executable).parent))
    assert program is not None
    text = UNIT.read_text()
    assert "ExecStart=/opt/palisade/bin/palisade firewall " in text
    unit = tmp_path / "palisade-firewall.service"
    unit.write_text(text.replace("/opt/palisade/bin/palisade", program))
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "palisade-firewall.service" not in done.stderr, done.stderr
    for line in ("CapabilityBoundingSet=CAP_NET_ADMIN", "Type=simple", "User=root"):
        assert line in text


def test_config_check_shows_firewall_and_reads_back(tmp_path: Path) -> None:
    firewall = {"ports": [25, 465, 587, 143, 993], "table": "mx_blocks", "interval": "10s"}
    config = write_config(tmp_path / "palisade.toml", {"firewall": firewall})
    shown = palisade("config", "check", "--no-dns", "--config", str(config), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    section = shown.stdout[shown.stdout.index("[firewall]") :].split("\n\n")[0]
    assert section.splitlines() == [
        "[firewall]",
        'backend = "nftables"',
        "ports = [25, 465, 587, 143, 993]",
        'table = "mx_blocks"',
        "interval = 10.0",
    ]
    again = tmp_path / "again.toml"
    again.write_text(section + "\n")
    reread = palisade("config", "check", "--no-dns", "--config", str(again), cwd=tmp_path)
    assert reread.returncode == 0, reread.stderr
    assert section in reread.stdout
