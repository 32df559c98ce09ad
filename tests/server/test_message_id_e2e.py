"""End to end: the client's Message-ID in the arrival log, the queue, ``queue show`` and a DSN."""

from __future__ import annotations

import email
import email.policy
import json
import re
import smtplib
import subprocess
import sys
from typing import Any

from palisade.spool import Spool
from tests.conftest import GatewayProcess, NextHop, search, wait_for

QUEUE_ID = r"[0-9A-Za-z]{6}-[0-9A-Za-z]{6}-[0-9A-Za-z]{2}"
LONG = "\r\n ".join(["y" * 900] * 6)  # folded: 5,400 characters, no line over the limit


def message(message_id: str | None) -> str:
    header = f"Message-ID: {message_id}\r\n" if message_id is not None else ""
    return (
        "From: Sender <sender@example.test>\r\nTo: later@corp.test\r\n"
        f"Subject: held\r\n{header}\r\nBody.\r\n"
    )


def send(gw: GatewayProcess, content: str, rcpt: str = "later@corp.test") -> str:
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
        client.ehlo("client.outside.test")
        client.mail("sender@example.test")
        client.rcpt(rcpt)
        code, reply = client.data(content.encode("latin-1"))
    assert code == 250, reply
    return search(QUEUE_ID, reply.decode()).group(0)


def queue_show(gw: GatewayProcess, queue_id: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "palisade", "queue", "show", queue_id, "--config", "palisade.toml"],
        cwd=gw.base,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def arrival(gw: GatewayProcess, queue_id: str) -> str:
    line: str = wait_for(
        lambda: next((x for x in gw.mainlog().splitlines() if f"{queue_id} <= " in x), "")
    )
    return line


def relay_gateway(make_gateway: Any, next_hop: NextHop) -> GatewayProcess:
    gw: GatewayProcess = make_gateway(
        domains={"relay": ["corp.test"]},
        delivery={
            "next_hop": f"127.0.0.1:{next_hop.port}",
            "retry_initial": 1,
            "retry_max_interval": 1,
        },
    )
    return gw


def test_message_id_is_logged_shown_while_held_and_quoted_by_the_dsn(
    make_gateway: Any, next_hop: NextHop
) -> None:
    gw = relay_gateway(make_gateway, next_hop)  # the next hop is down: the message waits
    queue_id = send(gw, message("<m1.held@outside.test>"))
    assert re.search(
        rf"{queue_id} <= sender@example.test H=\(client.outside.test\) \[127.0.0.1\]:\d+ "
        r"P=esmtp S=\d+ id=m1.held@outside.test T=<later@corp.test>$",
        arrival(gw, queue_id),
    )
    records = [json.loads(x) for x in (gw.log_dir / "main.jsonl").read_text().splitlines()]
    assert [
        r["message_id"] for r in records if r.get("queue_id") == queue_id and "<=" in r["line"]
    ] == ["<m1.held@outside.test>"]
    wait_for(lambda: f"{queue_id} == later@corp.test" in gw.mainlog())
    assert "Message-ID: <m1.held@outside.test>\n" in queue_show(gw, queue_id)
    # The next hop comes up and refuses for good: the DSN to the (local) sender quotes the id.
    next_hop.handler.reply = "550 5.1.1 <later@corp.test>: no such user"
    next_hop.start()
    (raw,) = wait_for(lambda: gw.maildir_messages("sender"), timeout=20)
    dsn = email.message_from_bytes(raw, policy=email.policy.default)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn["In-Reply-To"] == "<m1.held@outside.test>"
    assert dsn["References"] == "<m1.held@outside.test>"
    assert re.search(rb"\nIn-Reply-To: <m1.held@outside.test>\n", raw)


def test_message_without_message_id_is_queued_and_delivered(
    make_gateway: Any, next_hop: NextHop
) -> None:
    gw = relay_gateway(make_gateway, next_hop)
    queue_id = send(gw, message(None))
    line = arrival(gw, queue_id)
    assert " id=" not in line and re.search(r" S=\d+ T=<later@corp.test>$", line)
    wait_for(lambda: f"{queue_id} == later@corp.test" in gw.mainlog())
    assert "Message-ID: -\n" in queue_show(gw, queue_id)
    next_hop.handler.reply = "550 5.1.1 no such user"
    next_hop.start()
    (raw,) = wait_for(lambda: gw.maildir_messages("sender"), timeout=20)
    dsn = email.message_from_bytes(raw, policy=email.policy.default)
    assert dsn["In-Reply-To"] is None and dsn["References"] is None


def test_hostile_message_id_is_cleaned_bounded_and_escaped(gateway: GatewayProcess) -> None:
    hostile = "<a\x1b[31m\x07 H=[10.0.0.1] \\x" + LONG + "@x.test>"
    queue_id = send(gateway, message(hostile), rcpt="user@example.test")
    line = arrival(gateway, queue_id)
    assert "\x1b" not in line and "\x07" not in line
    # control characters became spaces when it was received; spaces and backslashes are escaped
    # in the log line: nothing there looks like another field
    assert re.search(r" id=a\\x20\\x5b31m\\x20H=\\x5b10\.0\.0\.1\\x5d\\x20\\\\xy+\.\.\. T=", line)
    assert len(line) < 600
    assert wait_for(lambda: f"{queue_id} Completed" in gateway.mainlog())
    (delivered,) = gateway.maildir_messages("user")
    assert b"Message-ID: <a\x1b[31m\x07 H=[10.0.0.1]" in delivered  # the message is untouched


def test_hostile_message_id_is_bounded_in_the_spool(make_gateway: Any, next_hop: NextHop) -> None:
    gw = relay_gateway(make_gateway, next_hop)
    hostile = "<a\x1b\x07\t b" + LONG + "@x.test>"
    queue_id = send(gw, message(hostile))
    wait_for(lambda: f"{queue_id} == later@corp.test" in gw.mainlog())
    spool = Spool(gw.spool_dir)
    try:
        env, _ = spool.load(queue_id)
    finally:
        spool.close()
    assert env.message_id is not None and len(env.message_id) == 998
    assert env.message_id.startswith("<a byyy")
    shown = queue_show(gw, queue_id)
    assert "\x1b" not in shown and "Message-ID: <a byyy" in shown
