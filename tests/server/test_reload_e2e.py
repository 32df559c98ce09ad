"""SIGHUP: one generation of config-derived parts, built whole and swapped in every process.

A real gateway subprocess, real clients (smtplib, raw sockets), Maildir delivery read back from
disk. Each test waits for the reload line of every process (the parent's and each worker's)
before it sends, so no assertion depends on timing.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    GatewayProcess,
    child_pids,
    free_port,
    gateway_sections,
    open_connections,
    wait_for,
    write_config,
)
from tests.server.smtpclient import RawClient

MESSAGE = b"Subject: after reload\r\nMessage-ID: <r1@outside.test>\r\n\r\nhello\r\n"


def processes(workers: int) -> int:
    """How many processes log a reload: the one, or the parent and each worker."""
    return 1 if workers == 1 else workers + 1


def reloaded(gw: GatewayProcess, count: int) -> bool:
    return gw.mainlog().count("configuration reloaded") >= count


def refused(gw: GatewayProcess, count: int) -> bool:
    return gw.paniclog().count("reload refused") >= count


def rewrite(gw: GatewayProcess, **changes: dict[str, Any]) -> None:
    sections = {name: dict(table) for name, table in gw.sections.items()}
    for name, table in changes.items():
        sections.setdefault(name, {}).update(table)
    write_config(gw.config_path, sections)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_local_domain_added_by_reload_is_delivered(make_gateway: Any, workers: int) -> None:
    """The defect: the sessions accepted the new domain, the queue runner's router still had
    the old domains and bounced the message as "Unrouteable address"."""
    gw = make_gateway(server={"workers": workers})
    rewrite(gw, domains={"local": ["example.test", "new.test"], "relay": []})
    gw.signal(signal.SIGHUP)
    wait_for(lambda: reloaded(gw, processes(workers)))
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
        client.sendmail("s@outside.test", ["amy@new.test"], MESSAGE)
    wait_for(lambda: "Completed" in gw.mainlog(), timeout=20)  # delivered or bounced
    assert "Unrouteable" not in gw.mainlog()
    messages = gw.maildir_messages("amy")
    assert messages and b"hello" in messages[0]
    with RawClient(gw.port) as client:  # a second kind of client, to the old domain
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert client.reply()[0] == 220
        client.command("EHLO raw.test")
        assert client.command("MAIL FROM:<s@outside.test>")[0] == 250
        assert client.command("RCPT TO:<bob@example.test>")[0] == 250
        assert client.command("DATA")[0] == 354
        client.send(MESSAGE + b".\r\n")
        assert client.reply()[0] == 250
    wait_for(lambda: gw.maildir_messages("bob"), timeout=20)


def in_event_loop(pid: int) -> bool:
    """``pid`` sleeps in epoll_wait: its event loop is running and waiting for work."""
    return Path(f"/proc/{pid}/wchan").read_text().strip() in ("do_epoll_wait", "ep_poll")


def test_a_transaction_in_flight_completes_under_the_generation_it_began_with(
    make_gateway: Any,
) -> None:
    gw = make_gateway()
    old = RawClient(gw.port)
    assert old.reply() == (220, "mx.example.test ESMTP Palisade")
    old.command("EHLO early.test")
    assert old.command("MAIL FROM:<late@outside.test>")[0] == 250
    # The reload renames the host and refuses this sender at MAIL.
    rewrite(
        gw,
        server={"hostname": "mx2.example.test"},
        rules={"mail": [{"check": "sender", "patterns": ["^late@"], "verb": "deny"}]},
    )
    gw.signal(signal.SIGHUP)
    wait_for(lambda: reloaded(gw, 1))
    assert old.command("RCPT TO:<bob@example.test>")[0] == 250
    assert old.command("DATA")[0] == 354
    old.send(MESSAGE + b".\r\n")
    assert old.reply()[0] == 250
    # The same session still runs on its first generation: no new rule, the old name.
    assert old.command("MAIL FROM:<late@outside.test>")[0] == 250
    assert old.command("RSET")[0] == 250
    assert old.command("QUIT") == (221, "2.0.0 mx.example.test closing connection")
    old.close()
    message = wait_for(lambda: gw.maildir_messages("bob"), timeout=20)[0]
    assert b"by mx.example.test (Palisade)" in message
    with RawClient(gw.port) as new:  # the next connection runs on the new generation
        assert new.reply() == (220, "mx2.example.test ESMTP Palisade")
        new.command("EHLO later.test")
        assert new.command("MAIL FROM:<late@outside.test>")[0] == 550


def test_a_broken_reload_keeps_the_old_generation_in_every_process(
    make_gateway: Any, tmp_path: Path
) -> None:
    """The new config parses but one of its parts cannot be built (the state database path is
    a directory): nothing of it may take effect, not even the parts built before."""
    gw = make_gateway(server={"workers": 2})
    workers = child_pids(gw.proc.pid)
    assert len(workers) == 2
    not_a_file = tmp_path / "state-is-a-directory"
    not_a_file.mkdir()
    rewrite(
        gw,
        domains={"local": ["example.test", "new.test"], "relay": []},
        paths={"state": str(not_a_file)},
    )
    gw.signal(signal.SIGHUP)
    wait_for(lambda: refused(gw, 3))
    assert "paths.state" in gw.paniclog() or "[paths] state" in gw.paniclog()
    assert "configuration reloaded" not in gw.mainlog()
    # Hold connections open until each worker has one, then use every one of them.
    clients: list[RawClient] = []
    try:
        for _ in range(4):  # bursts: an idle worker first in line would win every lone accept
            burst = [RawClient(gw.port) for _ in range(10)]
            clients += burst
            assert all(client.reply()[0] == 220 for client in burst)
            if all(open_connections(pid, gw.port) for pid in workers):
                break
        assert all(open_connections(pid, gw.port) for pid in workers), "one worker got them all"
        for n, client in enumerate(clients):
            client.command("EHLO several.test")
            assert client.command("MAIL FROM:<s@outside.test>")[0] == 250
            assert client.command("RCPT TO:<amy@new.test>")[0] == 550  # the old domains
            assert client.command(f"RCPT TO:<kept{n}@example.test>")[0] == 250
            assert client.command("DATA")[0] == 354
            client.send(MESSAGE + b".\r\n")
            assert client.reply()[0] == 250
    finally:
        for client in clients:
            client.close()
    for n in range(len(clients)):  # the parent's router is the old one as well
        wait_for(lambda n=n: gw.maildir_messages(f"kept{n}"), timeout=20)


def test_a_changed_listen_address_is_reported_as_needing_a_restart(make_gateway: Any) -> None:
    gw = make_gateway(server={"workers": 2})
    other = free_port()
    rewrite(gw, server={"listen": [f"127.0.0.1:{other}"], "hostname": "mx2.example.test"})
    gw.signal(signal.SIGHUP)
    wait_for(lambda: reloaded(gw, 3))
    panic = gw.paniclog()
    assert "server.listen changed" in panic and "restart" in panic
    assert panic.count("server.listen changed") == 1  # said once, by the parent
    with RawClient(gw.port) as client:  # still the old address, with the rest of the new config
        assert client.reply() == (220, "mx2.example.test ESMTP Palisade")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", other), timeout=2).close()


def test_config_check_marks_the_keys_a_reload_cannot_change(tmp_path: Path) -> None:
    config = write_config(tmp_path / "p.toml", gateway_sections(free_port()))
    command = [sys.executable, "-m", "palisade", "config", "check", "--no-dns"]
    shown = subprocess.run(
        [*command, "--config", str(config)], cwd=tmp_path, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    marked = [line for line in shown.stdout.splitlines() if "restart needed" in line]
    assert any(line.startswith("listen = ") for line in marked)
    assert any(line.startswith("workers = ") for line in marked)
    assert not any(line.startswith("hostname = ") for line in marked)
    tomllib.loads(shown.stdout)  # the notes are comments: still TOML
    as_json = subprocess.run(
        [*command, "--json", "--config", str(config)], cwd=tmp_path, capture_output=True, text=True
    )
    assert "server.listen" in json.loads(as_json.stdout)["restart_needed"]


def test_a_session_in_progress_keeps_its_clients_open_across_a_reload(make_gateway: Any) -> None:
    """The old generation's state database is closed when its last session ends, not at the
    reload: this session writes its pregreet pass there as it ends."""
    gw = make_gateway(server={"greeting_delay": 0.3})
    with RawClient(gw.port) as client:
        assert client.reply()[0] == 220  # it waited for the banner without talking
        assert client.command("EHLO polite.test")[0] == 250
        rewrite(gw, server={"hostname": "mx2.example.test"})
        gw.signal(signal.SIGHUP)
        wait_for(lambda: reloaded(gw, 1))
        assert client.command("QUIT")[0] == 221
    wait_for(lambda: "pregreet passed" in gw.mainlog())
    assert "pregreet passed, remembered for" in gw.mainlog(), gw.mainlog()


def test_a_worker_started_again_after_a_reload_runs_the_new_generation(
    make_gateway: Any,
) -> None:
    """The parent starts a dead worker again with its own newest config, not the one the
    gateway started with (the file may have changed since, or be broken by now)."""
    gw = make_gateway(server={"workers": 2})
    rewrite(gw, domains={"local": ["example.test", "new.test"], "relay": []})
    gw.signal(signal.SIGHUP)
    wait_for(lambda: reloaded(gw, 3))
    gw.config_path.write_text(gw.config_path.read_text() + "\n[server]\nbogus_key = 1\n")
    victim = child_pids(gw.proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: f"worker {victim} exited" in gw.paniclog())
    workers = wait_for(
        lambda: (lambda p: p if len(p) == 2 and victim not in p else None)(child_pids(gw.proc.pid))
    )
    clients: list[RawClient] = []
    try:
        # the new worker takes connections once its event loop waits (the old one, already
        # waiting, would win every accept until then)
        wait_for(lambda: all(in_event_loop(pid) for pid in workers), timeout=60)
        for _ in range(4):  # bursts: an idle worker first in line would win every lone accept
            burst = [RawClient(gw.port) for _ in range(10)]
            clients += burst
            assert all(client.reply()[0] == 220 for client in burst)
            if all(open_connections(pid, gw.port) for pid in workers):
                break
        assert all(open_connections(pid, gw.port) for pid in workers), "one worker got them all"
        for client in clients:
            client.command("EHLO again.test")
            assert client.command("MAIL FROM:<s@outside.test>")[0] == 250
            assert client.command("RCPT TO:<amy@new.test>")[0] == 250
    finally:
        for client in clients:
            client.close()
