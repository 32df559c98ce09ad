"""Several MX hosts on one Redis, end to end: real ``palisade serve`` processes (each its own
spool, logs and ``[paths] state``) on their own loopback ports sharing one real redis-server
started here; clients are smtplib and raw sockets from their own 127.0.0.x addresses.

- the 11th connection of a client limited to 10 per 15 minutes is refused by the *other* host;
- a client blocked through incidents on one host is refused by both;
- Redis killed (SIGKILL) during traffic: mail is still accepted, one panic-log line says so,
  another when the restarted Redis answers, and the counting is shared again (with the outage's
  events replayed);
- Redis hung (SIGSTOP): no session waits more than about the ``[state] timeout``; SIGCONT after;
- Redis with ``requirepass`` and a wrong password file: ``serve`` refuses to start and ``config
  check`` fails, naming the file, never the password.
"""

from __future__ import annotations

import signal
import smtplib
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GatewayProcess, palisade, wait_for, write_config
from tests.redisserver import RedisServer
from tests.server.smtpclient import RawClient

RATE = {
    "name": "connection rate",
    "check": "ratelimit",
    "limit": 10,
    "window": "15m",
    "verb": "deny",
    "message": "Too many connections, slow down",
}
HISTORY = {
    "name": "history",
    "check": "history",
    "threshold": 100,  # only a block refuses here
    "verb": "deny",
    "message": "Blocked until $until: $reason",
}
BOT_HELO = {
    "name": "bot-helo",
    "check": "helo",
    "patterns": ["^bot\\.test$"],
    "verb": "deny",
    "incident": 3,
    "message": "Access denied",
}
PREFIX = "pal:"


@pytest.fixture
def redis(tmp_path: Path) -> Any:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def node(make_gateway: Any, redis: RedisServer, *, rules: Any = None, **state: Any) -> Any:
    gw: GatewayProcess = make_gateway(
        state={
            "backend": "redis",
            "url": redis.url,
            "prefix": PREFIX,
            "timeout": 3.0,  # generous: a loaded machine must not look like an outage
            "retry_interval": 0.3,
            **state,
        },
        incidents={"protect_loopback": False},
        rules=rules if rules is not None else {"connect": [HISTORY, RATE], "helo": [BOT_HELO]},
    )
    return gw


def banner(gw: GatewayProcess, source: str) -> tuple[int, str]:
    """A raw connection from ``source``: the first reply, then QUIT."""
    with RawClient(gw.port, source=source) as client:
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code, text = client.reply()
        if code == 220:
            client.command("QUIT")
        return code, text


def send(gw: GatewayProcess, source: str, subject: str = "hi") -> None:
    with smtplib.SMTP("127.0.0.1", gw.port, source_address=(source, 0), timeout=15) as smtp:
        smtp.sendmail(
            "someone@outside.test",
            ["postmaster@example.test"],
            f"Subject: {subject}\r\n\r\nhello\r\n",
        )


def test_the_eleventh_connection_is_refused_by_the_other_host(
    make_gateway: Any, redis: RedisServer
) -> None:
    one, two = node(make_gateway, redis), node(make_gateway, redis)
    source = "127.0.0.61"
    before = redis.commandstats().get("evalsha", 0)
    for n in range(10):  # 1, 3, 5, ... on the first host; 2, 4, ... on the second
        code, _ = banner(one if n % 2 == 0 else two, source)
        assert code == 220, n
    assert redis.commandstats().get("evalsha", 0) - before >= 10
    code, text = banner(two, source)  # the second host saw only 5 of them itself
    assert code == 554 and "slow down" in text
    code, text = banner(one, source)
    assert code == 554 and "slow down" in text
    assert banner(one, "127.0.0.62")[0] == 220  # per client
    assert "rate limit" in two.rejectlog() or "connection rate" in two.rejectlog()
    # what a rate check costs: one script call (one round trip) per connection and rule
    calls_before = redis.commandstats()
    banner(two, "127.0.0.63")
    calls_after = redis.commandstats()
    script_calls = calls_after.get("evalsha", 0) - calls_before.get("evalsha", 0)
    assert script_calls == 2  # the history check's read and the rate check's hit


def test_a_client_blocked_on_one_host_is_refused_by_both(
    make_gateway: Any, redis: RedisServer
) -> None:
    one, two = node(make_gateway, redis), node(make_gateway, redis)
    source = "127.0.0.71"
    for _ in range(4):  # 4 x 3 = 12 >= block_at 10, all on the first host
        with RawClient(one.port, source=source) as client:
            assert client.reply()[0] == 220
            assert client.command("HELO bot.test") == (550, "5.7.1 Access denied")
            client.command("QUIT")

    def blocked_on_two() -> bool:
        return banner(two, source)[0] == 554

    wait_for(blocked_on_two, timeout=10)
    code, text = banner(two, source)
    assert code == 554 and "Blocked until" in text and "bot-helo x12" in text
    assert banner(one, source)[0] == 554
    assert banner(two, "127.0.0.72")[0] == 220
    # the operator's view, on either host's config: the shared record
    shown = palisade("history", "show", source, "--config", str(two.config_path), cwd=two.base)
    assert shown.returncode == 0, shown.stderr
    assert "12 incident(s)" in shown.stdout and "blocked since" in shown.stdout
    listed = palisade("history", "list", "--config", str(one.config_path), cwd=one.base)
    assert source in listed.stdout
    removed = palisade("history", "remove", source, "--config", str(one.config_path), cwd=one.base)
    assert removed.returncode == 0, removed.stderr
    assert banner(two, source)[0] == 220


def test_a_known_block_still_holds_while_redis_is_down(
    make_gateway: Any, redis: RedisServer
) -> None:
    one, two = node(make_gateway, redis), node(make_gateway, redis)
    source = "127.0.0.75"
    assert banner(two, source)[0] == 220  # the second host has met this client before
    for _ in range(4):
        with RawClient(one.port, source=source) as client:
            assert client.reply()[0] == 220
            assert client.command("HELO bot.test")[0] == 550
            client.command("QUIT")
    wait_for(lambda: banner(two, source)[0] == 554, timeout=10)  # learnt from Redis
    redis.kill()
    code, text = banner(two, source)  # from the last known history
    assert code == 554 and "bot-helo x12" in text
    assert banner(two, "127.0.0.76")[0] == 220  # and the others are let in
    wait_for(lambda: "state store:" in two.paniclog(), timeout=5)


def show_local(gw: GatewayProcess) -> str:
    """The host's own ``[paths] state`` file, as ``palisade history list`` shows it on SQLite."""
    local = gw.base / "local.toml"
    sections = {k: v for k, v in gw.sections.items() if k != "state"}
    write_config(local, sections)
    return palisade("history", "list", "--config", str(local), cwd=gw.base).stdout


def _traffic(gw: GatewayProcess, stop: threading.Event, results: list[Any]) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        started = time.monotonic()
        try:
            send(gw, f"127.0.1.{n % 200 + 1}", f"traffic {n}")
            results.append(("ok", time.monotonic() - started))
        except (smtplib.SMTPException, OSError) as exc:
            results.append((repr(exc), time.monotonic() - started))
        time.sleep(0.02)


@pytest.mark.timeout(120)
def test_redis_killed_during_traffic(make_gateway: Any, redis: RedisServer) -> None:
    gw = node(make_gateway, redis)
    stop = threading.Event()
    results: list[Any] = []
    sender = threading.Thread(target=_traffic, args=(gw, stop, results), daemon=True)
    sender.start()
    try:
        wait_for(lambda: len(results) >= 5, timeout=20)
        redis.kill()  # SIGKILL: connections reset, everything it held lost
        down_at = len(results)
        wait_for(lambda: "state store:" in gw.paniclog(), timeout=10)
        wait_for(lambda: len(results) >= down_at + 10, timeout=30)  # mail during the outage
        # the limit still counts, on this host: 10 connections, then refused
        codes = [banner(gw, "127.0.0.81")[0] for _ in range(11)]
        assert codes == [220] * 10 + [554]
        with RawClient(gw.port, source="127.0.0.85") as client:  # an incident, kept locally
            assert client.reply()[0] == 220
            assert client.command("HELO bot.test")[0] == 550
            client.command("QUIT")
        wait_for(lambda: "127.0.0.85" in show_local(gw), timeout=10)
        status = palisade("status", "--config", str(gw.config_path), cwd=gw.base)
        assert "redis: away since" in status.stdout, status.stdout + status.stderr
        redis.start()  # same port, empty
        wait_for(lambda: "is back after" in gw.paniclog(), timeout=15)
        back_at = len(results)
        wait_for(lambda: len(results) >= back_at + 5, timeout=20)
    finally:
        stop.set()
        sender.join(30)
    failures = [r for r in results if r[0] != "ok"]
    assert failures == [], failures[:5]
    panic = [line for line in gw.paniclog().splitlines() if "state store:" in line]
    assert len(panic) == 2, panic  # one line when it went, one when it came back
    assert "replayed" in panic[1]
    # the outage's events were replayed: Redis counts the 11 connections of 127.0.0.81
    members = redis.cli("ZCARD", f"{PREFIX}r:rate:10/900s:ip:127.0.0.81").strip()
    assert int(members) == 11
    assert banner(gw, "127.0.0.81")[0] == 554  # and the shared count goes on from there
    status = palisade("status", "--config", str(gw.config_path), cwd=gw.base)
    assert "state:" in status.stdout and "redis: shared" in status.stdout, status.stdout
    shown = palisade("history", "show", "127.0.0.85", "--config", str(gw.config_path), cwd=gw.base)
    assert "3 incident(s)" in shown.stdout, shown.stdout + shown.stderr  # replayed to Redis
    ttl = int(redis.cli("PTTL", f"{PREFIX}r:rate:10/900s:ip:127.0.0.81").strip())
    assert 0 < ttl <= 15 * 60 * 1000 + 1000  # every key expires


@pytest.mark.timeout(120)
def test_one_pair_of_lines_per_host_whatever_its_workers(
    make_gateway: Any, redis: RedisServer
) -> None:
    gw = node(make_gateway, redis, rules={"connect": [HISTORY, RATE]})
    gw.stop()
    gw.sections["server"]["workers"] = 3
    write_config(gw.config_path, gw.sections)
    gw.start()
    sources = [f"127.0.2.{n}" for n in range(1, 40)]
    for source in sources:  # every worker talks to Redis
        assert banner(gw, source)[0] == 220
    redis.kill()
    for source in sources:  # and every worker finds it gone
        assert banner(gw, source)[0] == 220
    wait_for(lambda: "state store:" in gw.paniclog(), timeout=5)
    marker = gw.base / "var" / "state.sqlite.redis-down"
    assert marker.exists()
    redis.start()
    wait_for(lambda: "is back after" in gw.paniclog(), timeout=15)
    time.sleep(1.0)  # the other workers' probes (retry_interval 0.3 s) have run by now
    for source in sources:
        assert banner(gw, source)[0] == 220
    panic = [line for line in gw.paniclog().splitlines() if "state store:" in line]
    assert len(panic) == 2, panic
    assert not marker.exists()
    # per source: the first connection was lost with the killed Redis (no persistence), the
    # one of the outage was replayed by the worker that counted it, the last one counted live
    counts = [int(redis.cli("ZCARD", f"{PREFIX}r:rate:10/900s:ip:{s}").strip()) for s in sources]
    assert counts == [2] * len(sources)


@pytest.mark.timeout(120)
def test_a_hung_redis_delays_no_session_for_long(make_gateway: Any, redis: RedisServer) -> None:
    gw = node(make_gateway, redis, timeout=0.5)
    send(gw, "127.0.0.91")
    redis.pause()  # SIGSTOP: the kernel still accepts, nothing answers
    try:
        durations = []
        for n in range(6):
            started = time.monotonic()
            send(gw, f"127.0.0.{92 + n}")
            durations.append(time.monotonic() - started)
        wait_for(lambda: "state store:" in gw.paniclog(), timeout=5)
        print("sessions with Redis stopped took", [f"{d:.2f}s" for d in durations])
        assert max(durations) < 3.0, durations  # each Redis call is bounded by the timeout
        assert sum(durations[2:]) < 2.0, durations  # and after the first, nobody waits for it
    finally:
        redis.resume()
    wait_for(lambda: "is back after" in gw.paniclog(), timeout=15)
    send(gw, "127.0.0.99")
    wait_for(lambda: len(gw.maildir_messages("postmaster")) == 8, timeout=20)


def test_redis_down_at_start_the_gateway_starts_and_joins_later(
    make_gateway: Any, tmp_path: Path
) -> None:
    later = RedisServer(tmp_path / "later")  # its port is free: nothing answers there yet
    gw = node(make_gateway, later)
    assert "until Redis answers" in gw.stderr()  # the start-up self-check's warning
    send(gw, "127.0.0.111")
    wait_for(lambda: "state store:" in gw.paniclog(), timeout=5)
    later.start()
    try:
        wait_for(lambda: "is back after" in gw.paniclog(), timeout=15)
        send(gw, "127.0.0.111")
        members = later.cli("ZCARD", f"{PREFIX}r:rate:10/900s:ip:127.0.0.111").strip()
        assert int(members) == 2  # the one counted locally, replayed, and the one after
    finally:
        later.stop()


def test_a_reload_moves_a_host_onto_redis(make_gateway: Any, redis: RedisServer) -> None:
    """``[state]`` is reloadable: SIGHUP with ``backend = "redis"`` and the next connections are
    counted in Redis (the SQLite counts stay in the host's file)."""
    gw: GatewayProcess = make_gateway(
        incidents={"protect_loopback": False}, rules={"connect": [HISTORY, RATE]}
    )
    assert banner(gw, "127.0.0.121")[0] == 220
    gw.sections["state"] = {"backend": "redis", "url": redis.url, "prefix": PREFIX}
    write_config(gw.config_path, gw.sections)
    gw.signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in gw.mainlog(), timeout=10)
    assert banner(gw, "127.0.0.121")[0] == 220
    assert redis.cli("ZCARD", f"{PREFIX}r:rate:10/900s:ip:127.0.0.121").strip() == "1"


def test_a_wrong_password_is_refused_at_start_without_showing_it(
    make_gateway: Any, tmp_path: Path
) -> None:
    secret = "s3cr3t-pass-word"
    server = RedisServer(tmp_path / "redis-auth", extra=("--requirepass", secret)).start()
    try:
        wrong = tmp_path / "redis.pass"
        wrong.write_text("not-the-password-xyz\n")
        gw = node(make_gateway, server, password_file=str(wrong))
    except AssertionError as exc:
        assert "authentication failed" in str(exc)
        assert "not-the-password-xyz" not in str(exc) and secret not in str(exc)
    else:
        raise AssertionError(f"the gateway started with a wrong password: {gw.paniclog()}")
    finally:
        pass
    try:
        config = next(tmp_path.glob("gw*/palisade.toml"))
        check = palisade("config", "check", "--config", str(config), cwd=config.parent)
        assert check.returncode == 1
        assert "authentication failed" in check.stderr and "password_file" in check.stderr
        everything = check.stdout + check.stderr
        assert "not-the-password-xyz" not in everything and secret not in everything
        # the right one: it starts, and still never shows it
        wrong.write_text(secret + "\n")
        check = palisade("config", "check", "--config", str(config), cwd=config.parent)
        assert check.returncode == 0, check.stderr
        assert secret not in check.stdout + check.stderr
    finally:
        server.stop()
