"""Incidents end to end: a real gateway records its refusals and the non-rule events in its real
SQLite state file, blocks a client past ``block_at``, refuses it with the ``history`` rule's
block message, tells why through ``palisade history show``, never blocks a protected client,
and keeps its refusal when the store cannot be written.

Clients: smtplib and raw sockets (TCP_NODELAY), each from its own 127.0.0.x source address
(the incident key); the gateways here set ``[incidents] protect_loopback = false`` where a
loopback client must be blockable (loopback is protected by default).
"""

from __future__ import annotations

import re
import smtplib
import socket
import sqlite3
from typing import Any

from tests.conftest import GatewayProcess, palisade, search, wait_for
from tests.server.smtpclient import RawClient

HISTORY = {
    "name": "history",
    "check": "history",
    "threshold": 100,  # only a block refuses here
    "verb": "deny",
    "message": "Blocked until $until: $reason",
    "log_message": "DENY - history: blocked until $until (block $times): $reason",
}
BOT_HELO = {
    "name": "bot-helo",
    "check": "helo",
    "patterns": ["^bot\\.test$"],
    "verb": "deny",
    "incident": 3,
    "message": "Access denied",
}


def blocking_gateway(make_gateway: Any, **incidents: Any) -> GatewayProcess:
    gw: GatewayProcess = make_gateway(
        incidents={"protect_loopback": False, **incidents},
        rules={"connect": [HISTORY], "helo": [BOT_HELO]},
    )
    return gw


def show(gw: GatewayProcess, ip: str) -> str:
    result = palisade("history", "show", ip, "--config", str(gw.config_path), cwd=gw.base)
    assert result.returncode in (0, 1), result.stderr
    return result.stdout


def refused_by_smtplib(gw: GatewayProcess, source: str) -> None:
    with smtplib.SMTP("127.0.0.1", gw.port, source_address=(source, 0), timeout=10) as smtp:
        code, text = smtp.ehlo("bot.test")
        assert (code, text) == (550, b"5.7.1 Access denied")


def refused_by_raw_client(gw: GatewayProcess, source: str) -> None:
    with RawClient(gw.port, source=source) as client:
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert client.reply()[0] == 220
        assert client.command("HELO bot.test") == (550, "5.7.1 Access denied")
        assert client.command("QUIT")[0] == 221


def test_a_client_refused_four_times_is_blocked(make_gateway: Any) -> None:
    gw = blocking_gateway(make_gateway)
    source = "127.0.0.91"
    for refuse in (refused_by_smtplib, refused_by_raw_client, refused_by_smtplib):
        refuse(gw, source)
    wait_for(lambda: "incident(s)" in show(gw, source) and "9 incident" in show(gw, source))
    assert "not blocked" in show(gw, source)
    refused_by_raw_client(gw, source)  # the fourth: 12 >= 10
    shown = wait_for(lambda: (lambda out: "blocked since" in out and out)(show(gw, source)))
    lines = shown.splitlines()
    assert lines[0] == "127.0.0.91: 12 incident(s) in the last 7d (blocked at 10)"
    until = search(r"^blocked since [\d: -]{19} until ([\d: -]{19}) \(first block, 1d\): "
                   r"bot-helo x12$", lines[1]).group(1)  # fmt: skip
    assert lines[2].split() == ["time", "weight", "rule"]
    assert [line.split()[2:] for line in lines[3:]] == [["3", "bot-helo"]] * 4
    search(
        rf"incident block: 127\.0\.0\.91 blocked until {until} \(first block, 1d\): "
        r"bot-helo x12 \(12 incidents in 7d\)",
        gw.mainlog(),
    )
    # the next connection is refused at connect by the history rule, with the block's texts
    with RawClient(gw.port, source=source) as client:
        assert client.reply() == (554, f"5.7.1 Blocked until {until}: bot-helo x12")
    search(
        rf"\[127\.0\.0\.91\]:\d+ rejected connection in \"connect\" ACL: DENY - history: "
        rf"blocked until {until} \(block 1\): bot-helo x12",
        gw.rejectlog(),
    )
    # another address is not concerned; palisade history list shows the block
    with smtplib.SMTP("127.0.0.1", gw.port, source_address=("127.0.0.92", 0), timeout=10) as s:
        assert s.ehlo("good.test")[0] == 250
    listed = palisade("history", "list", "--config", str(gw.config_path), cwd=gw.base)
    assert listed.returncode == 0, listed.stderr
    row = listed.stdout.splitlines()[1]
    assert row.split()[:2] == ["127.0.0.91", "12"] and row.endswith(f"{until}  bot-helo x12")
    # remove lifts the block at once
    removed = palisade("history", "remove", source, "--config", str(gw.config_path), cwd=gw.base)
    assert removed.stdout == "127.0.0.91: removed (incidents forgotten, block lifted)\n"
    with RawClient(gw.port, source=source) as client:
        assert client.reply()[0] == 220
    assert gw.paniclog() == ""


def pipelining_violation(gw: GatewayProcess, source: str) -> None:
    with RawClient(gw.port, source=source) as client:
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert client.reply()[0] == 220
        client.send(b"HELO p.test\r\nMAIL FROM:<a@outside.test>\r\n")  # HELO: no PIPELINING
        codes = [client.reply()[0]]
        if codes[0] == 250:  # the HELO may be answered before the core sees the MAIL
            codes.append(client.reply()[0])
        assert codes[-1] == 554, codes


def test_protected_clients_are_recorded_never_blocked(make_gateway: Any) -> None:
    """Loopback (protected by default), relay_from_hosts and a connect whitelist: their
    incidents are recorded (show tells), they are never blocked."""
    loopback: GatewayProcess = make_gateway(rules={"connect": [HISTORY], "helo": [BOT_HELO]})
    for _ in range(4):
        refused_by_raw_client(loopback, "127.0.0.93")
    others: GatewayProcess = make_gateway(
        relay={"relay_from_hosts": ["127.0.0.94/32"]},
        incidents={"protect_loopback": False, "protocol_violation": 5},
        lists={"trusted": {"type": "ip", "entries": ["127.0.0.99"]}},
        rules={
            "connect": [
                {"check": "ip_list", "list": "trusted", "verb": "accept_all"},
                HISTORY,
            ],
            "helo": [BOT_HELO],
        },
    )
    for _ in range(4):
        refused_by_raw_client(others, "127.0.0.94")
    for _ in range(2):
        pipelining_violation(others, "127.0.0.99")
    for gw, source, count, why in (
        (loopback, "127.0.0.93", 12, "loopback"),
        (others, "127.0.0.94", 12, "relay_from_hosts"),
        (others, "127.0.0.99", 10, "connect whitelist trusted"),
    ):
        shown = wait_for(
            lambda g=gw, s=source, c=count: (lambda out: f"{c} incident" in out and out)(show(g, s))
        )
        assert "not blocked\n" in shown and f"protected ({why}): never blocked\n" in shown
        with RawClient(gw.port, source=source) as client:
            assert client.reply()[0] == 220
        assert "incident block:" not in gw.mainlog()


def test_pregreet_protocol_violation_and_smuggling_weights(make_gateway: Any) -> None:
    gw: GatewayProcess = make_gateway(
        server={"greeting_delay": 1.0, "pregreet_pass_ttl": 0},
        incidents={
            "protect_loopback": False,
            "pregreet": 4,
            "protocol_violation": 3,
            "smuggling": 6,
        },
    )
    with RawClient(gw.port, source="127.0.0.95") as eager:
        eager.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        eager.send(b"EHLO eager.test\r\n")
        assert eager.reply()[0] == 554
    pipelining_violation(gw, "127.0.0.96")
    with smtplib.SMTP("127.0.0.1", gw.port, source_address=("127.0.0.97", 0), timeout=10) as s:
        s.ehlo("smuggler.test")
        s.mail("a@outside.test")
        s.rcpt("user@example.test")
        code, _ = s.data(b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<b@outside.test>\r\n")
        assert code == 550
    for source, weight, rule in (
        ("127.0.0.95", 4, "pregreet"),
        ("127.0.0.96", 3, "pipelining"),
        ("127.0.0.97", 6, "smuggling"),
    ):
        shown = wait_for(lambda s=source: (lambda out: "incident(s)" in out and out)(show(gw, s)))
        assert shown.splitlines()[0].startswith(f"{source}: {weight} incident(s)"), shown
        assert re.search(rf"^[\d: -]{{19}} +{weight}  {rule}$", shown, re.M), shown


def test_a_store_that_cannot_be_written_keeps_the_refusal(make_gateway: Any) -> None:
    """The test holds the state database's write lock (a real lock, beyond the gateway's 2 s
    busy timeout): the refusal is answered at once, the lost incident is one paniclog line."""
    gw = blocking_gateway(make_gateway)
    state = gw.base / "var" / "state.sqlite"
    holder = sqlite3.connect(state, isolation_level=None, timeout=0)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        refused_by_raw_client(gw, "127.0.0.98")
        assert gw.paniclog() == ""  # answered before the store gave up
        line = wait_for(lambda: gw.paniclog())
        assert re.search(
            r"incident not recorded \(bot-helo for 127\.0\.0\.98\): state store: state database "
            r"incident update: database is locked; the refusal stands",
            line,
        ), line
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    refused_by_smtplib(gw, "127.0.0.98")  # the store is back: this one is recorded
    shown = wait_for(lambda: (lambda out: "incident(s)" in out and out)(show(gw, "127.0.0.98")))
    assert shown.startswith("127.0.0.98: 3 incident(s)")
