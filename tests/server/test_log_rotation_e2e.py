"""Log rotation under a running gateway: rename noticed without a signal, SIGUSR1 reopening
every file in every process, a real ``logrotate`` run with the shipped snippet, and the
``[log] syslog`` copy of every line.

A real gateway subprocess (with workers: the parent writes delivery lines, the workers the
refusals), clients over TCP (smtplib, raw sockets), the files read back from disk, the open
descriptors of every process read from /proc.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    ROOT,
    GatewayProcess,
    child_pids,
    free_port,
    gateway_sections,
    palisade,
    wait_for,
    write_config,
)
from tests.server.smtpclient import RawClient

SNIPPET = ROOT / "contrib" / "palisade.logrotate"
MESSAGE = b"Subject: rotated\r\n\r\nhello\r\n"


def refuse_relay(gw: GatewayProcess, rcpt: str) -> None:
    """One refusal line (relay attempt) from whichever worker takes the connection."""
    with RawClient(gw.port) as client:
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert client.reply()[0] == 220
        client.command("EHLO raw.test")
        assert client.command("MAIL FROM:<s@outside.test>")[0] == 250
        assert client.command(f"RCPT TO:<{rcpt}>")[0] == 550
        client.command("QUIT")


def deliver(gw: GatewayProcess, local_part: str) -> None:
    """A message accepted by a worker and delivered by the parent (its ``=>`` line)."""
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
        client.sendmail("s@outside.test", [f"{local_part}@example.test"], MESSAGE)
    wait_for(lambda: f"=> {local_part}@example.test" in "".join(all_logs(gw)), timeout=20)


def all_logs(gw: GatewayProcess) -> list[str]:
    return [path.read_text() for path in sorted(gw.log_dir.glob("mainlog*"))]


def processes(gw: GatewayProcess) -> list[int]:
    assert gw.proc is not None
    return [gw.proc.pid, *child_pids(gw.proc.pid)]


def open_logs(pid: int) -> set[str]:
    """The log files process ``pid`` has open (by the names the kernel knows them by now)."""
    names = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if "/var/log/" in target:
            names.add(target.rsplit("/", 1)[1])
    return names


def test_a_renamed_mainlog_is_noticed_without_a_signal(make_gateway: Any) -> None:
    gw = make_gateway(server={"workers": 2})
    refuse_relay(gw, "before@elsewhere.test")
    wait_for(lambda: "before@elsewhere.test" in gw.mainlog())
    (gw.log_dir / "mainlog").rename(gw.log_dir / "mainlog.1")
    (gw.log_dir / "rejectlog").rename(gw.log_dir / "rejectlog.1")

    refuse_relay(gw, "after@elsewhere.test")  # a worker's line
    wait_for(lambda: "after@elsewhere.test" in gw.mainlog())
    deliver(gw, "amy")  # the parent's line
    assert "=> amy@example.test" in gw.mainlog()
    assert "after@elsewhere.test" in gw.rejectlog()
    old = (gw.log_dir / "mainlog.1").read_text()
    assert "before@elsewhere.test" in old
    assert "after@elsewhere.test" not in old and "amy@example.test" not in old
    assert "before@elsewhere.test" not in gw.mainlog()
    assert "after" not in (gw.log_dir / "rejectlog.1").read_text()
    assert oct((gw.log_dir / "mainlog").stat().st_mode & 0o777) == "0o640"
    assert gw.stop() == 0


def test_sigusr1_reopens_every_log_in_every_process(make_gateway: Any) -> None:
    """After a rename, before any process writes, SIGUSR1 to the parent alone: the parent and
    each worker (the parent passes it on) let go of the renamed files and hold new ones."""
    gw = make_gateway(server={"workers": 2})
    pids = processes(gw)
    assert len(pids) == 3
    for pid in pids:
        assert {"mainlog", "rejectlog", "paniclog"} <= open_logs(pid)
    for name in ("mainlog", "rejectlog", "paniclog", "main.jsonl"):
        (gw.log_dir / name).rename(gw.log_dir / f"{name}.1")
    for pid in pids:  # nothing written yet: every process still holds the renamed files
        assert "mainlog.1" in open_logs(pid)

    gw.signal(signal.SIGUSR1)
    for pid in pids:
        wait_for(
            lambda pid=pid: open_logs(pid) == {"mainlog", "rejectlog", "paniclog", "main.jsonl"}
        )
    assert (gw.log_dir / "mainlog").exists() and (gw.log_dir / "paniclog").exists()
    refuse_relay(gw, "after@elsewhere.test")
    wait_for(lambda: "after@elsewhere.test" in gw.rejectlog())
    assert processes(gw) == pids  # nobody died of the signal
    assert gw.stop() == 0
    assert "Traceback" not in gw.stderr()


@pytest.mark.parametrize("workers", [1, 2])
def test_sigusr1_while_starting_kills_no_process(make_gateway: Any, workers: int) -> None:
    """SIGUSR1's default action ends a process: from the moment ``serve`` handles signals (the
    pid file is written after that, and logrotate reads it) it is held like SIGHUP, so one sent
    while the loop starts and the workers are forked is harmless."""
    gw = make_gateway(start=False, server={"workers": workers, "pid_file": "var/run/palisade.pid"})
    gw.start(greet=False)
    pid_file = gw.base / "var" / "run" / "palisade.pid"
    wait_for(pid_file.exists, timeout=15)
    for _ in range(50):
        gw.signal(signal.SIGUSR1)
    wait_for(lambda: "palisade daemon started" in gw.mainlog(), timeout=15)
    if workers > 1:
        wait_for(lambda: len(processes(gw)) == workers + 1)
    for pid in processes(gw):
        os.kill(pid, signal.SIGUSR1)
    refuse_relay(gw, "still@elsewhere.test")
    assert gw.proc is not None and gw.proc.poll() is None
    assert gw.stop() == 0
    assert "worker" not in gw.paniclog()  # no worker died and was started again


def test_logrotate_with_the_shipped_snippet(make_gateway: Any, tmp_path: Path) -> None:
    """``logrotate -f`` on the snippet in contrib/, its paths rewritten to the test's: the
    logs are rotated, the postrotate script signals the gateway through its pid file (the
    branch taken without systemd), and the next lines land in new files."""
    logrotate = shutil.which("logrotate") or "/usr/sbin/logrotate"
    if not os.path.exists(logrotate):
        if os.environ.get("CI") == "true":
            pytest.fail("logrotate is not installed (Makefile APT_PACKAGES)")
        pytest.skip("logrotate is not installed")
    gw = make_gateway(start=False, server={"workers": 2, "pid_file": "var/run/palisade.pid"})
    gw.start()
    pid_file = gw.base / "var" / "run" / "palisade.pid"
    assert pid_file.read_text() == f"{gw.proc.pid}\n"
    refuse_relay(gw, "before@elsewhere.test")
    wait_for(lambda: "before@elsewhere.test" in gw.rejectlog())

    owner = f"{os.getuid()} {os.getgid()}"
    lines = [line for line in SNIPPET.read_text().splitlines() if not line.startswith("#")]
    text = "\n".join(lines) + "\n"
    for shipped, here in (
        ("create 0640 palisade palisade", f"create 0640 {owner}"),
        ("/var/log/palisade/", f"{gw.log_dir}/"),
        ("/run/palisade/palisade.pid", str(pid_file)),
        ("/run/systemd/system", str(tmp_path / "no-systemd")),  # the branch without systemd
    ):
        assert shipped in text
        text = text.replace(shipped, here)
    config = tmp_path / "palisade.logrotate"
    config.write_text(text)
    os.chmod(config, 0o644)  # logrotate refuses a config writable by others
    done = subprocess.run(
        [logrotate, "-f", "-s", str(tmp_path / "logrotate.state"), str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr

    rotated = (gw.log_dir / "mainlog.1").read_text()
    assert "before@elsewhere.test" in rotated
    assert "before@elsewhere.test" in (gw.log_dir / "rejectlog.1").read_text()
    # SIGUSR1 from postrotate: every process holds the new files, before writing anything
    for pid in processes(gw):
        wait_for(lambda pid=pid: "mainlog.1" not in open_logs(pid) and "mainlog" in open_logs(pid))
    refuse_relay(gw, "after@elsewhere.test")
    wait_for(lambda: "after@elsewhere.test" in gw.mainlog())
    assert "after@elsewhere.test" not in (gw.log_dir / "mainlog.1").read_text()
    assert oct((gw.log_dir / "mainlog").stat().st_mode & 0o777) == "0o640"
    assert gw.stop() == 0
    assert not pid_file.exists()  # removed at exit


class SyslogReceiver:
    """A unix datagram socket standing in for /dev/log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(20)
        self.lines: list[str] = []

    def until(self, pattern: str) -> re.Match[str]:
        """Receives lines until one matches ``pattern``."""
        while True:
            for line in self.lines:
                found = re.search(pattern, line)
                if found:
                    return found
            self.lines.append(self.sock.recv(65536).decode())


def test_every_line_also_goes_to_syslog(make_gateway: Any, tmp_path: Path) -> None:
    receiver = SyslogReceiver(tmp_path / "log.sock")
    gw = make_gateway(
        start=False,
        server={"workers": 2},
        log={"syslog": True, "syslog_socket": str(receiver.path)},
    )
    gw.start()
    assert gw.proc is not None
    parent = gw.proc.pid
    receiver.until(rf"^<22>palisade\[{parent}\]: palisade daemon started: pid={parent}, 2 workers")
    refuse_relay(gw, "relay@elsewhere.test")
    refusal = receiver.until(r"^<22>palisade\[(\d+)\]: H=.*rejected RCPT <relay@elsewhere.test>")
    assert int(refusal[1]) in child_pids(parent)  # the worker's own pid
    deliver(gw, "amy")
    receiver.until(rf"^<22>palisade\[{parent}\]: \S+ => amy@example.test")

    gw.config_path.write_text("[server]\nworkers = \n")  # a refused reload: a panic line
    gw.signal(signal.SIGHUP)
    receiver.until(rf"^<19>palisade\[{parent}\]: reload refused, old configuration stays")
    write_config(gw.config_path, gw.sections)
    assert all("\n" not in line and not re.match(r"<\d+>\d{4}-", line) for line in receiver.lines)
    assert "rejected RCPT <relay@elsewhere.test>" in gw.mainlog()  # the files as ever
    assert gw.stop() == 0
    receiver.sock.close()


def test_syslog_facility_and_a_missing_socket(make_gateway: Any, tmp_path: Path) -> None:
    """Facility local3 (19*8+6 = <158>); a syslog socket that is not there does not stop the
    gateway (the files stay the record), and one that appears later is used."""
    path = tmp_path / "log.sock"
    gw = make_gateway(
        log={"syslog": True, "syslog_facility": "local3", "syslog_socket": str(path)},
    )
    refuse_relay(gw, "nobody-hears@elsewhere.test")
    wait_for(lambda: "nobody-hears@elsewhere.test" in gw.mainlog())
    receiver = SyslogReceiver(path)

    def heard() -> bool:  # the sink reconnects at most once a second: lines until one arrives
        refuse_relay(gw, "heard@elsewhere.test")
        receiver.sock.settimeout(0.2)
        try:
            receiver.lines.append(receiver.sock.recv(65536).decode())
        except TimeoutError:
            return False
        return True

    wait_for(heard, timeout=10)
    receiver.sock.settimeout(20)
    receiver.until(r"^<158>palisade\[\d+\]: H=.*rejected RCPT <heard@elsewhere.test>")
    assert gw.stop() == 0
    receiver.sock.close()


def test_a_pid_file_that_cannot_be_written_stops_the_start(tmp_path: Path) -> None:
    """One line naming the file and the key, exit 1, nothing left listening."""
    port = free_port()
    (tmp_path / "taken").write_text("a file where the pid file's directory should be")
    config = write_config(
        tmp_path / "palisade.toml",
        gateway_sections(port, server={"pid_file": "taken/palisade.pid"}),
    )
    done = palisade("serve", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr == (
        f"palisade: {config}: server.pid_file: cannot write taken/palisade.pid: Not a directory\n"
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # released


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("syslog_facility", "kern", "log.syslog_facility: expected one of 'mail', 'user'"),
        ("syslog", "yes", "log.syslog: expected"),
    ],
)
def test_bad_syslog_keys_are_refused_with_the_key_named(
    tmp_path: Path, key: str, value: str, expected: str
) -> None:
    config = write_config(
        tmp_path / "palisade.toml", gateway_sections(free_port(), log={key: value})
    )
    done = palisade("config", "check", "--config", str(config), "--no-dns", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr and "Traceback" not in done.stderr
