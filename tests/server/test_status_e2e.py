"""``palisade status``: a real gateway subprocess answers on its control socket, and the real CLI
asks it (``python -m palisade status``), with both process layouts (one process; a parent and
two workers).

Each fact is checked against what can be seen from outside: the connections each process holds
(from /proc), the generation after a SIGHUP (the reload lines in mainlog), the messages in the
queue (``palisade queue list``), a DNSBL zone that a loopback DNS server makes fail the RFC 5782
probe (the panic line), the socket file and its mode (``os.stat``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loopback.dnsserver import ZoneServer, start_zone_server
from tests.conftest import (
    GatewayProcess,
    child_pids,
    free_port,
    open_connections,
    palisade,
    wait_for,
    write_config,
)
from tests.server.smtpclient import RawClient

MESSAGE = b"Subject: queued\r\nMessage-ID: <q@outside.test>\r\n\r\nhello\r\n"


def status(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return palisade("status", *args, "--config", str(gw.config_path), cwd=gw.base)


def status_json(gw: GatewayProcess) -> dict[str, Any]:
    result = status(gw, "--json")
    assert result.returncode == 0, (result.stdout, result.stderr)
    reply: dict[str, Any] = json.loads(result.stdout)
    return reply


def socket_path(gw: GatewayProcess) -> Path:
    return gw.base / "var" / "run" / "control.sock"


def processes(gw: GatewayProcess, workers: int) -> list[int]:
    """The pids that hold client connections: the one process, or each worker."""
    assert gw.proc is not None
    return [gw.proc.pid] if workers == 1 else sorted(child_pids(gw.proc.pid))


@pytest.mark.parametrize("workers", [1, 2])
def test_status_reports_the_connections_each_process_holds(make_gateway: Any, workers: int) -> None:
    gw = make_gateway(server={"workers": workers})
    assert gw.proc is not None
    clients = []
    for _ in range(5):
        client = RawClient(gw.port)
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert client.reply()[0] == 220  # its session runs: it holds a connection now
        clients.append(client)
    pids = processes(gw, workers)

    def agrees() -> dict[str, Any] | None:
        held = {str(pid): open_connections(pid, gw.port) for pid in pids}
        reply = status_json(gw)
        if sum(held.values()) != 5 or reply["connections"]["per_worker"] != held:
            return None
        return reply

    reply = wait_for(agrees)  # the harness's readiness connection may take a moment to end
    assert reply["connections"]["total"] == 5
    assert reply["connections"]["complete"] is True
    assert reply["pid"] == gw.proc.pid
    assert sorted(w["pid"] for w in reply["workers"]) == pids
    assert all(w["answered"] and w["generation"] == 1 for w in reply["workers"])
    assert reply["config"] == str(gw.config_path)
    assert reply["generation"] == 1
    assert 0 < reply["uptime"] < 120
    assert abs(reply["started"] - time.time()) < 120
    assert reply["started_iso"] == time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(reply["started"])
    )
    from importlib import metadata

    assert reply["version"] == metadata.version("palisade")
    text = status(gw)
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[0] == (
        f"palisade {reply['version']} is running (pid {gw.proc.pid})"
    )
    assert "connections: 5 open" in text.stdout
    for client in clients[:2]:
        client.command("QUIT")
        client.sock.close()
    wait_for(lambda: status_json(gw)["connections"]["total"] == 3)
    for client in clients[2:]:
        client.sock.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_status_after_sighup_shows_the_new_generation(make_gateway: Any, workers: int) -> None:
    gw = make_gateway(server={"workers": workers})
    before = status_json(gw)
    assert before["generation"] == 1
    gw.signal(signal.SIGHUP)
    reloads = 1 if workers == 1 else workers + 1  # the parent's line and each worker's
    wait_for(lambda: gw.mainlog().count("configuration reloaded") >= reloads)
    after = status_json(gw)
    assert after["generation"] == 2
    assert after["loaded_at"] > before["loaded_at"]
    assert after["started"] == before["started"]
    assert [w["generation"] for w in after["workers"]] == [2] * workers
    assert "generation:  2, loaded" in status(gw).stdout


def test_status_counts_the_queue_and_its_oldest_message(make_gateway: Any) -> None:
    dead = free_port()  # nothing listens there: every attempt is refused, the messages stay
    gw = make_gateway(
        domains={"local": ["example.test"], "relay": ["corp.test"]},
        delivery={"next_hop": f"127.0.0.1:{dead}", "retry_initial": "1h"},
    )
    assert status_json(gw)["queue"] == {"size": 0, "oldest_age": None}
    first = time.time()
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
        for n in range(3):
            client.sendmail("s@outside.test", [f"r{n}@corp.test"], MESSAGE)
    wait_for(lambda: gw.mainlog().count("== r") == 3)  # each deferred once, kept for an hour
    reply = status_json(gw)
    listed = palisade("queue", "list", "--config", str(gw.config_path), cwd=gw.base)
    assert "3 message(s) in the queue" in listed.stdout
    assert reply["queue"]["size"] == 3
    assert 0 < reply["queue"]["oldest_age"] <= time.time() - first + 1
    assert "queue:       3 message(s), oldest" in status(gw).stdout


@pytest.fixture
def broken_zone() -> Iterator[ZoneServer]:
    """bad.test lists everything (127.0.0.1 too: it fails the probe); good.test is sane."""
    server = start_zone_server()
    for zone in ("good.test", "bad.test"):
        server.add_zone(zone)
        server.list_address(zone, "127.0.0.2", "127.0.0.2")
    server.list_address("bad.test", "127.0.0.1", "127.0.0.2")
    yield server
    server.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_status_shows_a_dnsbl_zone_disabled_by_the_probe(
    make_gateway: Any, broken_zone: ZoneServer, workers: int
) -> None:
    gw = make_gateway(
        server={"workers": workers},
        dns={"nameservers": [f"127.0.0.1:{broken_zone.port}"], "timeout": 1, "retries": 0},
        rules={
            "rcpt": [
                {"check": "dnsbl", "zones": ["good.test", "bad.test"], "verb": "deny"},
            ]
        },
    )
    pids = processes(gw, workers)

    def disabled() -> dict[str, Any] | None:
        zones = {z["zone"]: z for z in status_json(gw)["dnsbl"]["zones"]}
        bad = zones["bad.test"]
        return zones if sorted(bad.get("disabled_in", [])) == pids else None

    zones = wait_for(disabled)  # every listening process probes for itself
    assert zones["good.test"]["state"] == "healthy"
    bad = zones["bad.test"]
    assert bad["state"] == "disabled"
    assert bad["reason"] == "127.0.0.1 listed (zone lists everything)"
    assert time.time() - 120 < bad["since"] <= time.time()
    assert "DNSBL zone bad.test disabled" in gw.paniclog()
    text = status(gw).stdout
    assert "good.test: healthy" in text
    assert "bad.test: disabled since" in text and "(zone lists everything)" in text


def test_status_of_a_gateway_that_is_not_running_exits_3(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "palisade.toml", {"server": {"control_socket": "run/control.sock"}}
    )
    result = palisade("status", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    assert result.stdout == "palisade is not running (no control socket at run/control.sock)\n"
    assert result.stderr == ""


@pytest.mark.parametrize("workers", [1, 2])
def test_a_clean_stop_removes_the_socket_and_the_socket_is_0600(
    make_gateway: Any, workers: int
) -> None:
    gw = make_gateway(server={"workers": workers})
    info = os.stat(socket_path(gw))
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert (info.st_uid, info.st_gid) == (os.getuid(), os.getgid())
    assert gw.stop() == 0
    assert not socket_path(gw).exists()
    result = status(gw)
    assert result.returncode == 3
    assert "no control socket at var/run/control.sock" in result.stdout


def test_a_killed_daemons_stale_socket_is_replaced_at_start(make_gateway: Any) -> None:
    gw = make_gateway()
    gw.kill()  # SIGKILL: nothing is cleaned up
    assert socket_path(gw).exists()
    result = status(gw)
    assert result.returncode == 3
    assert result.stdout == (
        "palisade is not running (connection refused: stale socket var/run/control.sock)\n"
    )
    gw.start()
    assert gw.proc is not None
    assert status_json(gw)["pid"] == gw.proc.pid
    assert stat.S_IMODE(os.stat(socket_path(gw)).st_mode) == 0o600


def test_a_second_daemon_on_the_same_socket_refuses_to_start(make_gateway: Any) -> None:
    gw = make_gateway(server={"workers": 2})  # SO_REUSEPORT: the port alone would not stop it
    assert gw.proc is not None
    second = palisade("serve", "--config", str(gw.config_path), cwd=gw.base)
    assert second.returncode == 1
    assert second.stderr == (
        "palisade: [server] control_socket var/run/control.sock: another palisade daemon "
        f"(pid {gw.proc.pid}) answers on it: stop it first, or give this one another "
        "control_socket\n"
    )
    assert status_json(gw)["pid"] == gw.proc.pid  # the first one's socket is untouched


def test_a_file_that_is_not_a_socket_stops_the_start(make_gateway: Any) -> None:
    gw = make_gateway(start=False)
    socket_path(gw).parent.mkdir(parents=True)
    socket_path(gw).write_text("an operator's file\n")
    result = palisade("serve", "--config", str(gw.config_path), cwd=gw.base)
    assert result.returncode == 1
    assert result.stderr == (
        "palisade: error: [server] control_socket var/run/control.sock exists and is not a "
        "socket: remove it or choose another path\n"
        "palisade: not starting: the self-check found errors\n"
    )
    assert socket_path(gw).read_text() == "an operator's file\n"


def test_config_check_refuses_a_control_socket_path_too_long(tmp_path: Path) -> None:
    path = tmp_path / ("d" * 120) / "control.sock"
    config = write_config(tmp_path / "palisade.toml", {"server": {"control_socket": str(path)}})
    result = palisade("config", "check", "--no-dns", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 1
    size = len(str(path))
    assert (
        f"error: [server] control_socket {path} is too long for a Unix socket ({size} bytes, "
        "at most 107): choose a shorter path\n"
    ) in result.stderr
    ok = palisade(
        "config",
        "check",
        "--no-dns",
        "--config",
        str(write_config(tmp_path / "ok.toml", {"server": {"control_socket": "run/control.sock"}})),
        cwd=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr
    assert "ok: [server] control_socket run/control.sock can be created\n" in ok.stderr


def test_status_into_a_closed_pipe_ends_quietly(gateway: GatewayProcess) -> None:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte: EPIPE on the first write
    try:
        result = palisade(
            "status", "--config", str(gateway.config_path), cwd=gateway.base, stdout=write
        )
    finally:
        os.close(write)
    assert result.returncode == 0
    assert result.stderr == ""
    shell = subprocess.run(
        f"{sys.executable} -m palisade status --config {gateway.config_path} | head -1",
        shell=True,
        cwd=gateway.base,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert gateway.proc is not None
    assert shell.stdout == f"palisade {status_json(gateway)['version']} is running " + (
        f"(pid {gateway.proc.pid})\n"
    )
    assert shell.stderr == ""


def test_status_without_permission_on_the_socket_exits_4(make_gateway: Any) -> None:
    """The daemon's socket is root's, 0600; the client runs as ``nobody`` (a forked child of
    the test that drops to it and runs the CLI's ``main``: this interpreter lives under /root,
    which nobody may read, so it cannot be started as nobody)."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("this test needs root (CI=true)")
        pytest.skip("needs root to run the client as another user")
    import pwd

    import palisade.server.control  # noqa: F401 (what the child imports, imported before it drops)
    from palisade.cli.main import _parser, main

    _parser()  # imports every command's module

    public = Path(tempfile.mkdtemp(prefix="palisade-status-"))  # short, and nobody may enter
    try:
        public.chmod(0o755)
        gw = make_gateway(start=False, server={"control_socket": str(public / "control.sock")})
        shutil.copy(gw.config_path, public / "palisade.toml")
        (public / "palisade.toml").chmod(0o644)
        gw.start()
        config = str(public / "palisade.toml")
        assert status_json(gw)["connections"]["total"] >= 0  # it answers root
        out = public / "out"
        nobody = pwd.getpwnam("nobody")
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            code = 99
            try:
                fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                sys.stdout = sys.stderr = open(fd, "w")  # noqa: SIM115 (pytest replaced both)
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                code = main(["status", "--config", config])
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
        _, wait_status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(wait_status) == 4, out.read_text()
        assert out.read_text() == (
            f"palisade status: permission denied on {public}/control.sock "
            "(run as root or as the service user)\n"
        )
        assert gw.stop() == 0
    finally:
        shutil.rmtree(public, ignore_errors=True)


def ask_raw(path: Path, data: bytes, *, close_write: bool = False) -> bytes:
    """What the daemon sends back to ``data`` on a raw Unix socket, until it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(data)
        if close_write:
            sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        return reply


def test_the_control_socket_answers_only_its_one_request(gateway: GatewayProcess) -> None:
    path = socket_path(gateway)
    assert json.loads(ask_raw(path, b"shutdown\n")) == {
        "error": "unknown request (the one request is: status)"
    }
    too_long = ask_raw(path, b"x" * 100)  # 100 bytes: the daemon reads them all, so no reset
    assert json.loads(too_long) == {"error": "request line longer than 64 bytes"}
    assert json.loads(ask_raw(path, b"", close_write=True)) == {
        "error": "unknown request (the one request is: status)"
    }
    reply = ask_raw(path, b"status\r\n")  # one JSON line, then the daemon closes
    assert reply.endswith(b"\n") and reply.count(b"\n") == 1
    assert gateway.proc is not None and json.loads(reply)["pid"] == gateway.proc.pid
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(str(path))  # says nothing: closed after the request timeout
        silent.settimeout(10)
        assert silent.recv(1) == b""
    assert gateway.proc.poll() is None


def test_a_restarted_worker_answers_for_itself(make_gateway: Any) -> None:
    gw = make_gateway(server={"workers": 2})
    assert gw.proc is not None
    first = sorted(child_pids(gw.proc.pid))
    os.kill(first[0], signal.SIGKILL)

    def replaced() -> dict[str, Any] | None:
        reply = status_json(gw)
        pids = sorted(w["pid"] for w in reply["workers"])
        answered = all(w["answered"] for w in reply["workers"])
        return reply if first[0] not in pids and answered else None

    reply = wait_for(replaced, timeout=20)
    assert sorted(w["pid"] for w in reply["workers"]) == sorted(child_pids(gw.proc.pid))
