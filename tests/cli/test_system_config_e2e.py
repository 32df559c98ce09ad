"""Without ``--config`` every command reads the system config (/etc/palisade/palisade.toml, or
the file ``PALISADE_CONFIG`` names), and the bundled demo only when that file does not exist;
``serve`` then says so. The tests point ``PALISADE_CONFIG`` at files of their own (conftest
points it at a file that never exists), so a real /etc/palisade is never read or touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from palisade.config.loader import SYSTEM_CONFIG, system_config_path
from tests.conftest import (
    NO_SYSTEM_CONFIG,
    GatewayProcess,
    free_port,
    gateway_sections,
    wait_for,
    write_config,
)


def run(*args: str, cwd: Path, system: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "palisade", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PALISADE_CONFIG=str(system)),
    )


def test_the_system_config_is_etc_palisade_unless_the_environment_names_another() -> None:
    assert Path("/etc/palisade/palisade.toml") == SYSTEM_CONFIG
    assert system_config_path() == Path(NO_SYSTEM_CONFIG)  # conftest's
    saved = os.environ.pop("PALISADE_CONFIG")
    try:
        assert system_config_path() == SYSTEM_CONFIG
    finally:
        os.environ["PALISADE_CONFIG"] = saved


def test_every_command_reads_the_system_config_when_no_config_is_given(tmp_path: Path) -> None:
    port = free_port()
    sections = gateway_sections(port, server={"hostname": "mx.system-config.test"})
    (tmp_path / "etc").mkdir()
    system = write_config(tmp_path / "etc" / "palisade.toml", sections)
    work = tmp_path / "work"
    work.mkdir()
    check = run("config", "check", "--no-dns", cwd=work, system=system)
    assert check.returncode == 0, check.stderr
    assert f"# palisade config check: {system} is valid" in check.stdout
    assert 'hostname = "mx.system-config.test"' in check.stdout
    queue = run("queue", "list", cwd=work, system=system)  # the spool of the system config
    assert f"no spool at [paths] spool {Path('var/spool')}" in queue.stderr
    history = run("history", "list", cwd=work, system=system)
    assert history.returncode == 0, history.stderr
    gw = GatewayProcess(base=work, port=port, config_path=system, sections=sections)
    gw.proc = subprocess.Popen(
        [sys.executable, "-m", "palisade", "serve"],
        cwd=work,
        env=dict(os.environ, PALISADE_CONFIG=str(system)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert wait_for(lambda: f"config {system}" in gw.mainlog(), timeout=15)
    finally:
        gw.proc.send_signal(signal.SIGTERM)
        _, stderr = gw.proc.communicate(timeout=30)
    assert "bundled demo" not in stderr.decode()


def test_serve_says_when_it_runs_the_bundled_demo(tmp_path: Path) -> None:
    absent = tmp_path / "etc" / "palisade.toml"
    check = run("config", "check", "--no-dns", cwd=tmp_path, system=absent)
    assert "# palisade config check: <bundled default.toml> is valid" in check.stdout
    proc = subprocess.Popen(
        [sys.executable, "-m", "palisade", "serve"],
        cwd=tmp_path,
        env=dict(os.environ, PALISADE_CONFIG=str(absent)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    mainlog = tmp_path / "var" / "log" / "mainlog"
    line = (
        f"no --config given and no {absent}: running the bundled demo config (listening on "
        "127.0.0.1:2525, domain example.test, files under ./var)"
    )
    try:  # said before the port is bound: whether 2525 is free here does not matter
        assert wait_for(lambda: mainlog.exists() and line in mainlog.read_text(), timeout=15)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert f"palisade: {line}\n" in stderr.decode()
    assert mainlog.read_text().count("bundled demo") == 1
