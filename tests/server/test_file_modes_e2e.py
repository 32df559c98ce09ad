"""End to end: every file and directory the gateway writes has its documented mode, even when
the gateway is started with umask 022 (a service manager's or shell's usual default)."""

from __future__ import annotations

import grp
import os
import re
import smtplib
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GatewayProcess, free_port, search, wait_for

QUEUE_ID = r"[0-9A-Za-z]{6}-[0-9A-Za-z]{6}-[0-9A-Za-z]{2}"
MESSAGE = "From: s@outside.test\r\nSubject: modes\r\nMessage-ID: <modes@outside.test>\r\n\r\nx\r\n"


def start_with_umask_022(make_gateway: Any, **sections: Any) -> GatewayProcess:
    gw: GatewayProcess = make_gateway(
        start=False,
        domains={"local": ["example.test"], "relay": ["corp.test"]},
        delivery={"next_hop": f"127.0.0.1:{free_port()}", "retry_initial": 600},  # down
        **sections,
    )
    old = os.umask(0o022)  # the subprocess inherits it, as from a shell
    try:
        gw.start()
    finally:
        os.umask(old)
    return gw


def send(gw: GatewayProcess, rcpt: str) -> str:
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
        client.ehlo("client.outside.test")
        client.mail("s@outside.test")
        client.rcpt(rcpt)
        code, reply = client.data(MESSAGE.encode())
    assert code == 250, reply
    return search(QUEUE_ID, reply.decode()).group(0)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_everything(gw: GatewayProcess) -> tuple[str, str]:
    """A message delivered to Maildir (its file recycled into free/) and one held in queue/ with
    its state file written."""
    # The held one first: a message received after the delivered one completed would take its
    # file back out of free/ (FilePool.claim) and leave free/ empty.
    held = send(gw, "later@corp.test")
    delivered = send(gw, "user@example.test")
    wait_for(lambda: f"{delivered} Completed" in gw.mainlog())
    wait_for(lambda: f"{held} == later@corp.test" in gw.mainlog())
    # The deferral is logged before its state file is written (in a thread, after the line):
    # the file the checks below stat exists only once that write is done.
    wait_for(lambda: (gw.spool_dir / "state" / f"{held}.json").exists())
    wait_for(lambda: list((gw.spool_dir / "free").iterdir()))
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:  # a line in the reject log
        client.ehlo("client.outside.test")
        client.mail("s@outside.test")
        assert client.rcpt("x@elsewhere.test")[0] == 550
    return delivered, held


def maildir_paths(gw: GatewayProcess) -> tuple[list[Path], list[Path]]:
    box = gw.mail_dir / "user"
    dirs = [gw.mail_dir, box, box / "tmp", box / "new", box / "cur"]
    files = list((box / "new").iterdir())
    assert len(files) == 1
    return dirs, files


def spool_paths(gw: GatewayProcess, held: str) -> tuple[list[Path], list[Path]]:
    spool = gw.spool_dir
    dirs = [spool, *(spool / sub for sub in ("tmp", "queue", "state", "corrupt", "free"))]
    files = [spool / "queue" / held, spool / "state" / f"{held}.json"]
    files += list((spool / "free").iterdir())
    return dirs, files


def state_files(gw: GatewayProcess) -> list[Path]:
    state = gw.base / "var" / "state.sqlite"
    files = [state, state.with_name("state.sqlite-wal"), state.with_name("state.sqlite-shm")]
    assert all(f.exists() for f in files)  # WAL mode: all three exist while the gateway runs
    return files


def log_files(gw: GatewayProcess) -> list[Path]:
    return [gw.log_dir / name for name in ("mainlog", "rejectlog", "paniclog", "main.jsonl")]


def test_every_file_and_directory_is_private_under_umask_022(make_gateway: Any) -> None:
    gw = start_with_umask_022(make_gateway)
    _, held = write_everything(gw)
    assert gw.proc is not None
    status = Path(f"/proc/{gw.proc.pid}/status").read_text()
    assert re.search(r"^Umask:\s+0077$", status, re.M)  # set by the gateway itself
    spool_dirs, spool_files = spool_paths(gw, held)
    mail_dirs, mail_files = maildir_paths(gw)
    modes = {path: mode(path) for path in [*spool_dirs, *mail_dirs]}
    assert modes == {path: 0o700 for path in modes}
    modes = {path: mode(path) for path in [*spool_files, *mail_files, *state_files(gw)]}
    assert modes == {path: 0o600 for path in modes}
    assert len(modes) == 3 + 1 + 3  # queue, state, free; Maildir; state.sqlite and -wal, -shm
    modes = {path: mode(path) for path in log_files(gw)}
    assert modes == {path: 0o640 for path in modes}
    assert mode(gw.log_dir) == 0o750
    assert "rejected RCPT <x@elsewhere.test>" in (gw.log_dir / "rejectlog").read_text()


@pytest.mark.skipif(
    os.geteuid() != 0 and not os.environ.get("CI"),
    reason="giving files another group needs root (CI runs as root)",
)
def test_paths_group_opens_the_maildir_tree_and_nothing_else(make_gateway: Any) -> None:
    mail = grp.getgrnam("mail").gr_gid  # a group Debian always has
    gw = start_with_umask_022(make_gateway, paths={"group": "mail"})
    _, held = write_everything(gw)
    mail_dirs, mail_files = maildir_paths(gw)
    assert {p: (mode(p), p.stat().st_gid) for p in mail_dirs} == {
        p: (0o750, mail) for p in mail_dirs
    }
    assert {p: (mode(p), p.stat().st_gid) for p in mail_files} == {
        p: (0o640, mail) for p in mail_files
    }
    spool_dirs, spool_files = spool_paths(gw, held)
    for path in [*spool_dirs, *spool_files, *state_files(gw), gw.log_dir, *log_files(gw)]:
        assert path.stat().st_gid != mail, path
    assert {mode(p) for p in spool_dirs} == {0o700}
    assert {mode(p) for p in [*spool_files, *state_files(gw)]} == {0o600}


def test_unknown_group_is_a_config_error_naming_the_key(make_gateway: Any) -> None:
    gw: GatewayProcess = make_gateway(start=False, paths={"group": "no-such-group-palisade"})
    result = subprocess.run(
        [sys.executable, "-m", "palisade", "serve", "--config", str(gw.config_path)],
        cwd=gw.base,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert re.fullmatch(
        r"palisade: config error in \S+palisade.toml:\d+: paths.group: "
        r"no such group on this host: 'no-such-group-palisade'\n",
        result.stderr,
    )
    assert not (gw.base / "var").exists()
