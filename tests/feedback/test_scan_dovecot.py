"""``palisade scan`` on the log of a real Dovecot driven with failed IMAP logins (imaplib and
a raw socket, each address a different loopback source): exact counts per address in the state
store, nothing counted twice across runs and across log rotation (rename + ``doveadm log
reopen``), the good login never counted, and the daemon: it follows the log as it grows and
rotates, reloads on SIGHUP and exits 0 on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from palisade.adapters.sqlite_state import SqliteStateStore
from tests.conftest import palisade, wait_for, write_config
from tests.dovecot import Dovecot


@pytest.fixture
def dovecot(tmp_path: Path) -> Iterator[Dovecot]:
    server = Dovecot(tmp_path / "log" / "dovecot.log")
    (tmp_path / "log").mkdir()
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _config(tmp_path: Path, log: Path, **scan: object) -> Path:
    return write_config(
        tmp_path / "scan.toml",
        {
            "paths": {"state": str(tmp_path / "var" / "state.sqlite")},
            "scan": {"files": [str(log)], **scan},
        },
    )


def _counts(tmp_path: Path) -> dict[str, int]:
    state = tmp_path / "var" / "state.sqlite"
    if not state.exists():
        return {}
    with SqliteStateStore(state) as store:
        return {i.key: i.count for i in store.list_incidents_sync()}


def _rules(tmp_path: Path, ip: str) -> set[str]:
    with SqliteStateStore(tmp_path / "var" / "state.sqlite") as store:
        return {e.rule for e in store.incident_events_sync(ip, time.time() - 3600)}


def _logged(log: Path, text: str, times: int) -> bool:
    return log.read_text(errors="replace").count(text) >= times


def test_once_counts_each_failed_login_per_address_and_never_twice(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    log = dovecot.log
    dovecot.fail("127.0.0.2", 3)
    dovecot.fail("127.0.0.2", 2)
    dovecot.fail_raw("127.0.0.3", 1)
    dovecot.succeed("127.0.0.4")
    wait_for(lambda: _logged(log, "(auth failed,", 3) and _logged(log, "rip=127.0.0.4", 1))
    config = _config(tmp_path, log)

    done = palisade("scan", "--once", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert _counts(tmp_path) == {"127.0.0.2": 5, "127.0.0.3": 1}
    assert _rules(tmp_path, "127.0.0.2") == {"dovecot-auth"}
    assert "scan: H=[127.0.0.2] dovecot-auth weight 3 count 3" in done.stdout
    assert "scan: H=[127.0.0.2] dovecot-auth weight 2 count 5" in done.stdout
    assert "scan: pass: 3 hit(s)" in done.stdout
    shown = palisade("history", "show", "127.0.0.2", "--config", str(config), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "127.0.0.2: 5 incident(s)" in shown.stdout
    assert shown.stdout.count("dovecot-auth") == 2  # one line per Dovecot line (3 and 2)

    again = palisade("scan", "--once", "--config", str(config), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "nothing new" in again.stdout
    assert _counts(tmp_path) == {"127.0.0.2": 5, "127.0.0.3": 1}

    # Rotation: the log is renamed; Dovecot writes on into the renamed file until it reopens
    # its log, then into a new file. Neither part is lost nor counted twice.
    os.rename(log, log.with_name("dovecot.log.1"))
    dovecot.fail("127.0.0.5", 1)
    wait_for(lambda: _logged(log.with_name("dovecot.log.1"), "rip=127.0.0.5", 1))
    dovecot.reopen_log()
    wait_for(log.exists)
    dovecot.fail("127.0.0.5", 2)
    dovecot.fail("127.0.0.3", 1)
    wait_for(lambda: _logged(log, "(auth failed,", 2))
    rotated = palisade("scan", "--once", "--config", str(config), cwd=tmp_path)
    assert rotated.returncode == 0, rotated.stderr
    assert "rotated" in rotated.stdout
    assert _counts(tmp_path) == {"127.0.0.2": 5, "127.0.0.3": 2, "127.0.0.5": 3}

    dovecot.fail("127.0.0.2", 1)
    wait_for(lambda: _logged(log, "rip=127.0.0.2", 1))
    last = palisade("scan", "--once", "--config", str(config), cwd=tmp_path)
    assert last.returncode == 0, last.stderr
    assert _counts(tmp_path) == {"127.0.0.2": 6, "127.0.0.3": 2, "127.0.0.5": 3}


def test_daemon_follows_growth_and_rotation_reloads_on_hup_and_stops_on_term(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    log = dovecot.log
    config = _config(tmp_path, log, interval="0.2s")
    output = tmp_path / "scan.out"
    with output.open("w") as out:
        scan = subprocess.Popen(
            [sys.executable, "-m", "palisade", "scan", "--config", str(config)],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        wait_for(lambda: "scan: started" in output.read_text())
        dovecot.fail("127.0.0.6", 2)
        wait_for(lambda: _counts(tmp_path).get("127.0.0.6") == 2)

        os.rename(log, log.with_name("dovecot.log.1"))
        dovecot.fail("127.0.0.6", 1)  # into the renamed file, still open in Dovecot
        wait_for(lambda: _counts(tmp_path).get("127.0.0.6") == 3)
        dovecot.reopen_log()
        dovecot.fail("127.0.0.7", 1)  # into the new file
        wait_for(lambda: _counts(tmp_path).get("127.0.0.7") == 1)

        scan.send_signal(signal.SIGHUP)
        wait_for(lambda: "scan: config reloaded" in output.read_text())
        dovecot.fail("127.0.0.6", 1)
        wait_for(lambda: _counts(tmp_path).get("127.0.0.6") == 4)

        scan.send_signal(signal.SIGTERM)
        assert scan.wait(20) == 0
    finally:
        if scan.poll() is None:
            scan.kill()
            scan.wait()
        assert scan.stderr is not None
        errors = scan.stderr.read()
        scan.stderr.close()
    assert errors == ""
    assert _counts(tmp_path) == {"127.0.0.6": 4, "127.0.0.7": 1}
    assert "scan: stopped, 4 hit(s) recorded" in output.read_text()
