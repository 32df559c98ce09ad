"""Process life: kill -9 and restart, SIGTERM, SIGHUP, bad configs, queue commands, workers."""

from __future__ import annotations

import os
import select
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    ROOT,
    NextHop,
    child_pids,
    free_port,
    gateway_sections,
    listening_sockets,
    open_connections,
    palisade,
    search,
    wait_for,
    write_config,
)
from tests.server.smtpclient import RawClient, transaction

QUEUE_ID = r"[0-9A-Za-z]{6}-[0-9A-Za-z]{6}-[0-9A-Za-z]{2}"
BODY = b"Subject: durable\r\nMessage-ID: <d1@outside.test>\r\n\r\nkeep me\r\n.\r\n"


def refuses(port: int) -> bool:
    """True when nothing listens on ``port`` (a connection is refused, not left in a backlog)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie nobody has reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid``, from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


def test_kill_9_after_250_then_restart_delivers_exactly_once(
    make_gateway: Any, next_hop: NextHop
) -> None:
    gw = make_gateway(
        domains={"relay": ["corp.test"]},
        delivery={
            "next_hop": f"127.0.0.1:{next_hop.port}",
            "retry_initial": 1,
            "retry_max_interval": 1,
        },
    )
    with RawClient(gw.port) as client:  # the next hop is down: the message waits in the spool
        code, text = transaction(client, "s@outside.test", "keep@corp.test", BODY)
    assert code == 250
    queue_id = search(QUEUE_ID, text).group(0)
    gw.kill()  # SIGKILL right after the 250: nothing graceful happens
    next_hop.start()
    gw.start()
    wait_for(lambda: next_hop.handler.messages, timeout=20)
    wait_for(lambda: f"{queue_id} Completed" in gw.mainlog(), timeout=20)
    assert len(next_hop.handler.messages) == 1
    assert b"keep me" in next_hop.handler.messages[0][2]
    assert not list((gw.spool_dir / "queue").glob("*"))


def test_kill_9_with_local_delivery_loses_and_duplicates_nothing(make_gateway: Any) -> None:
    gw = make_gateway()
    ids = []
    for n in range(5):
        with RawClient(gw.port) as client:
            code, text = transaction(
                client,
                "s@outside.test",
                "durable@example.test",
                b"Subject: n%d\r\n\r\nbody\r\n.\r\n" % n,
            )
            assert code == 250
            ids.append(search(QUEUE_ID, text).group(0))
    gw.kill()
    gw.start()
    messages = wait_for(
        lambda: (lambda m: m if len(m) >= 5 else None)(gw.maildir_messages("durable")), timeout=20
    )
    subjects = sorted(search(rb"Subject: (n\d)", m).group(1) for m in messages)
    assert subjects == [b"n0", b"n1", b"n2", b"n3", b"n4"]


def test_sigterm_exits_cleanly(gateway: Any) -> None:
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as client:
        client.noop()
    assert gateway.stop() == 0
    assert "palisade daemon stopped" in gateway.mainlog()


def test_sigterm_lets_an_open_transaction_finish(gateway: Any) -> None:
    client = RawClient(gateway.port)
    assert client.reply()[0] == 220
    client.command("EHLO t.test")
    client.command("MAIL FROM:<s@outside.test>")
    client.command("RCPT TO:<late@example.test>")
    assert client.command("DATA")[0] == 354
    gateway.signal(signal.SIGTERM)
    client.send(b"Subject: late\r\n\r\nstill accepted\r\n.\r\n")
    assert client.reply()[0] == 250
    client.close()
    assert gateway.proc.wait(20) == 0
    assert gateway.maildir_messages("late")


def test_sighup_reload_applies_good_config_and_keeps_old_on_broken(make_gateway: Any) -> None:
    gw = make_gateway()
    sections = dict(gw.sections)
    sections["domains"] = {"local": ["example.test", "added.test"], "relay": []}
    write_config(gw.config_path, sections)
    gw.signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in gw.mainlog())
    with RawClient(gw.port) as client:
        assert client.reply()[0] == 220
        client.command("EHLO r.test")
        client.command("MAIL FROM:<s@outside.test>")
        assert client.command("RCPT TO:<x@added.test>")[0] == 250
    gw.config_path.write_text(gw.config_path.read_text() + "\n[server]\nbogus_key = 1\n")
    gw.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in gw.paniclog())
    with RawClient(gw.port) as client:  # still serving with the old config
        assert client.reply()[0] == 220
        client.command("EHLO r.test")
        client.command("MAIL FROM:<s@outside.test>")
        assert client.command("RCPT TO:<y@added.test>")[0] == 250


def test_broken_config_names_file_key_and_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[server]\nhostname = "mx.example.test"\nlisten = "127.0.0.1:25"\n')
    result = palisade("serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert f"{config}:3: server.listen: expected a list" in result.stderr
    config.write_text("[limits]\nmax_recipients = 10\nmax_recipient = 5\n")
    result = palisade("config", "check", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2 and ":3: limits.max_recipient: unknown key" in result.stderr
    result = palisade("serve", "--config", str(tmp_path / "missing.toml"), cwd=tmp_path)
    assert (
        result.returncode == 2
        and "missing.toml" in result.stderr
        and "no such file" in result.stderr
    )
    config.write_text(
        '[tls]\ncertificate = "/nonexistent/cert.pem"\nprivate_key = "/nonexistent/k"\n'
    )
    result = palisade("serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2 and "tls.certificate: no such file" in result.stderr


def test_queue_commands(make_gateway: Any, next_hop: NextHop) -> None:
    gw = make_gateway(
        domains={"relay": ["corp.test"]}, delivery={"next_hop": f"127.0.0.1:{next_hop.port}"}
    )
    ids = []
    for rcpt in ("a@corp.test", "b@corp.test"):
        with RawClient(gw.port) as client:
            _code, text = transaction(client, "s@outside.test", rcpt, BODY)
            ids.append(search(QUEUE_ID, text).group(0))
    wait_for(lambda: "== b@corp.test" in gw.mainlog())
    listing = palisade("queue", "list", "--config", str(gw.config_path), cwd=gw.base)
    assert listing.returncode == 0, listing.stderr
    assert ids[0] in listing.stdout and ids[1] in listing.stdout and "a@corp.test" in listing.stdout
    shown = palisade("queue", "show", ids[0], "--config", str(gw.config_path), cwd=gw.base)
    assert shown.returncode == 0 and "Subject: durable" in shown.stdout
    deleted = palisade("queue", "delete", ids[1], "--config", str(gw.config_path), cwd=gw.base)
    assert deleted.returncode == 0
    bad = palisade(
        "queue", "show", "../../etc/passwd", "--config", str(gw.config_path), cwd=gw.base
    )
    assert bad.returncode == 1
    next_hop.start()
    retried = palisade("queue", "retry", ids[0], "--config", str(gw.config_path), cwd=gw.base)
    assert retried.returncode == 0
    wait_for(lambda: next_hop.handler.messages, timeout=30)
    assert [m[1] for m in next_hop.handler.messages] == [["a@corp.test"]]


def test_two_workers_share_the_port(make_gateway: Any) -> None:
    gw = make_gateway(server={"workers": 2})
    # Unsteered: the group has one socket per worker, and every worker accepts from both; the
    # parent keeps both for the workers it may have to start again.
    for pid in [gw.proc.pid, *child_pids(gw.proc.pid)]:
        assert listening_sockets(pid, gw.port) == 2, pid
    for n in range(10):
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
            client.sendmail("s@outside.test", ["w@example.test"], f"Subject: w{n}\r\n\r\nx\r\n")
    wait_for(lambda: len(gw.maildir_messages("w")) == 10, timeout=20)
    assert gw.stop() == 0


def test_a_stalled_worker_does_not_hold_up_new_clients(make_gateway: Any) -> None:
    """Without steering every worker accepts from every listening socket of the group, so while
    one worker is stopped (SIGSTOP: a worker busy with something long) the other greets every
    new client. With one socket per worker, the kernel's hash would leave about half of these
    clients waiting in the stopped worker's queue."""
    gw = make_gateway(server={"workers": 2})
    workers = child_pids(gw.proc.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGSTOP)
    try:
        for n in range(12):  # distinct source ports: the hash spreads them over both sockets
            with smtplib.SMTP("127.0.0.1", gw.port, timeout=5) as client:
                client.sendmail("s@outside.test", ["st@example.test"], f"Subject: {n}\r\n\r\nx\r\n")
    finally:
        os.kill(workers[0], signal.SIGCONT)
    wait_for(lambda: len(gw.maildir_messages("st")) == 12, timeout=20)
    assert gw.stop() == 0


def test_restarted_workers_serve_the_port_and_sigterm_closes_it(make_gateway: Any) -> None:
    """Workers started again after a crash accept on the port, and after SIGTERM a new client
    is refused, not left waiting in a backlog nobody reads."""
    gw = make_gateway(server={"workers": 2})
    first = child_pids(gw.proc.pid)
    assert len(first) == 2
    for pid in first:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: len(set(child_pids(gw.proc.pid)) - set(first)) == 2, timeout=20, interval=0.1)
    for n in range(6):
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
            client.sendmail("s@outside.test", ["r@example.test"], f"Subject: r{n}\r\n\r\nx\r\n")
    wait_for(lambda: len(gw.maildir_messages("r")) == 6, timeout=20)
    assert "starting a new one" in gw.paniclog()
    gw.signal(signal.SIGTERM)
    wait_for(lambda: "SIGTERM received" in gw.mainlog(), timeout=10)
    wait_for(lambda: refuses(gw.port), timeout=10, interval=0.1)
    assert gw.proc.wait(20) == 0


def test_workers_stop_when_the_parent_is_killed_and_the_restart_delivers_every_250(
    make_gateway: Any,
) -> None:
    """SIGKILL of the parent under load (the OOM killer): the workers notice at once, stop
    accepting, finish what is in flight and exit, so the port closes; the next start delivers
    every message that got its 250 (committed, but never handed to the dead queue runner)."""
    gw = make_gateway(server={"workers": 2})
    workers = child_pids(gw.proc.pid)
    assert len(workers) == 2
    accepted: list[str] = []
    stop = threading.Event()

    def sender(n: int) -> None:
        for i in range(10_000):
            if stop.is_set():
                return
            subject = f"k{n}-{i}"
            try:
                if n % 2:  # smtplib: sendmail() returns only after a 250 to DATA
                    with smtplib.SMTP("127.0.0.1", gw.port, timeout=15) as smtp:
                        smtp.sendmail(
                            "s@outside.test",
                            ["load@example.test"],
                            f"Subject: {subject}\r\n\r\nb\r\n",
                        )
                    code = 250
                else:
                    with RawClient(gw.port, timeout=15) as client:
                        code, _ = transaction(
                            client,
                            "s@outside.test",
                            "load@example.test",
                            f"Subject: {subject}\r\n\r\nbody\r\n.\r\n".encode(),
                        )
            except (OSError, smtplib.SMTPException, AssertionError, ValueError):
                continue  # refused, 421, closed: not accepted
            if code == 250:
                accepted.append(subject)

    clients = [threading.Thread(target=sender, args=(n,), daemon=True) for n in range(6)]
    for thread in clients:
        thread.start()
    try:
        wait_for(lambda: len(accepted) >= 30, timeout=30)
        gw.kill()  # SIGKILL, nothing graceful in the parent
        wait_for(lambda: refuses(gw.port), timeout=2.5, interval=0.05)  # bound: "at once"
    finally:
        stop.set()
        for thread in clients:
            thread.join(20)
    wait_for(lambda: not any(alive(pid) for pid in workers), timeout=15)
    assert "the parent process is gone" in gw.paniclog()
    gw.start()  # owns the port alone: only its own processes hold it
    for pid in [gw.proc.pid, *child_pids(gw.proc.pid)]:
        assert listening_sockets(pid, gw.port) == 2, pid

    def delivered() -> list[str]:
        return [
            search(rb"Subject: (k\d+-\d+)", m).group(1).decode()
            for m in gw.maildir_messages("load")
        ]

    wait_for(lambda: set(accepted) <= set(delivered()), timeout=30)
    assert len(delivered()) == len(set(delivered()))  # and none twice
    assert gw.stop() == 0


RATELIMIT = {
    "connect": [
        {
            "check": "ratelimit",
            "limit": 100_000,
            "window": "15m",
            "verb": "defer",
            "message": "Too many connections, slow down",
            "log_message": "DEFER - rate limit exceeded ($rate)",
        }
    ]
}


@pytest.mark.parametrize("steered", [False, True], ids=["plain", "ratelimit"])
@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2, 0.5, 1.0])
def test_sigterm_at_any_moment_of_start_up_ends_every_process(
    tmp_path: Path, delay: float, steered: bool
) -> None:
    """SIGTERM while ``serve`` starts (before, during and after forking the workers): the whole
    process group ends and nothing listens on the port. The sleep is the moment under test, not a
    wait for an event."""
    port = free_port()
    sections = gateway_sections(port, server={"workers": 2})
    if steered:
        sections["rules"] = RATELIMIT
    config = write_config(tmp_path / "palisade.toml", sections)
    proc = subprocess.Popen(
        [sys.executable, "-m", "palisade", "serve", "--config", str(config)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the workers are found by it
    )
    try:
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        wait_for(lambda: not group_members(proc.pid), timeout=10)
        assert refuses(port)
    finally:
        for pid in group_members(proc.pid):  # only what this test started, by id
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    "workers,steered", [(1, False), (2, False), (2, True)], ids=["one", "two", "two-steered"]
)
def test_max_connections_per_ip_counts_across_workers(
    make_gateway: Any, workers: int, steered: bool
) -> None:
    """30 idle connections from one address, limit 20: exactly 20 are greeted and 10 refused,
    however many workers accept them. (From 127.0.0.2: the connection that saw the gateway up
    came from 127.0.0.1, and its session may not have ended yet.)"""
    gw = make_gateway(
        server={"workers": workers, "max_connections_per_ip": 20},
        **({"rules": RATELIMIT} if steered else {}),
    )
    clients = [RawClient(gw.port, source="127.0.0.2") for _ in range(30)]
    try:
        replies = [client.reply() for client in clients]
        assert sum(code == 220 for code, _ in replies) == 20, replies
        refused = [text for code, text in replies if code == 421]
        assert len(refused) == 10 and all(t.startswith("4.7.0") for t in refused), replies
    finally:
        for client in clients:
            client.close()
    assert "too many connections from that IP address" in gw.rejectlog()


def test_connections_of_a_killed_worker_no_longer_count_for_their_ip(make_gateway: Any) -> None:
    """A worker killed with connections open does not leave them counted against the client:
    after it is started again, the address gets exactly as many new connections as it lost."""
    gw = make_gateway(server={"workers": 2, "max_connections_per_ip": 20})
    workers = child_pids(gw.proc.pid)
    clients = [RawClient(gw.port, source="127.0.0.2") for _ in range(20)]
    try:
        greetings = [client.reply() for client in clients]
        assert all(code == 220 for code, _ in greetings), greetings
        held = {pid: open_connections(pid, gw.port) for pid in workers}
        victim = max(held, key=lambda pid: held[pid])  # unsteered: often both hold some
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(set(child_pids(gw.proc.pid)) - set(workers)) == 1, timeout=20)
        # the kernel closed the dead worker's connections before the parent could reap it
        ready, _, _ = select.select([client.sock for client in clients], [], [], 1)
        lost = sum(client.closed(timeout=1) for client in clients if client.sock in ready)
        assert lost == held[victim] > 0, held
        more = [RawClient(gw.port, source="127.0.0.2") for _ in range(20)]
        clients += more
        codes = [client.reply()[0] for client in more]
        assert codes.count(220) == lost and codes.count(421) == 20 - lost, codes
    finally:
        for client in clients:
            client.close()


def test_config_check_shows_the_scanner_and_ldap_sections_without_secrets(tmp_path: Path) -> None:
    sections: dict[str, dict[str, Any]] = {
        "ldap": {
            "servers": ["ldap://127.0.0.1:3890"],
            "base_dn": "dc=example,dc=test",
            "bind_dn": "cn=palisade,dc=example,dc=test",
            "bind_password": "Sekrit-Bind-Pw-1",
        },
        "spamd": {"address": "127.0.0.1:7830"},
        "clamd": {"address": "127.0.0.1:3310"},
    }
    write_config(tmp_path / "p.toml", sections)
    result = palisade("config", "check", "--config", str(tmp_path / "p.toml"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for section in ("[ldap]", "[spamd]", "[rspamd]", "[clamd]", "[authentication]"):
        assert section in out
    assert 'servers = ["ldap://127.0.0.1:3890"]' in out
    assert 'address = "127.0.0.1:7830"' in out
    assert 'bind_password = "(set, not shown)"' in out
    assert 'password = ""' in out  # rspamd's, not set
    assert "Sekrit-Bind-Pw-1" not in out + result.stderr


def test_bundled_default_config_serves(tmp_path: Path) -> None:
    port = free_port()
    result = palisade("config", "check", cwd=tmp_path)
    assert result.returncode == 0 and "127.0.0.1:2525" in result.stdout
    write_config(tmp_path / "p.toml", {"server": {"listen": [f"127.0.0.1:{port}"]}})
    result = palisade("config", "check", "--config", str(tmp_path / "p.toml"), cwd=tmp_path)
    assert result.returncode == 0
    assert (ROOT / "src" / "palisade" / "config" / "default.toml").exists()
