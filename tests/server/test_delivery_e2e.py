"""End to end: real clients (smtplib, swaks) → gateway → Maildir or a real next hop."""

from __future__ import annotations

import json
import re
import shutil
import signal
import smtplib
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GatewayProcess, NextHop, child_pids, search, wait_for, write_config

QUEUE_ID = r"[0-9A-Za-z]{6}-[0-9A-Za-z]{6}-[0-9A-Za-z]{2}"
MESSAGE = (
    "From: Sender <sender@outside.test>\r\nTo: user@example.test\r\n"
    "Subject: hello\r\nMessage-ID: <m1@outside.test>\r\n\r\nBody line one.\r\n.dot line\r\n"
)


def test_smtplib_message_reaches_maildir_with_queue_id_in_reply_and_logs(
    gateway: GatewayProcess,
) -> None:
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as client:
        client.ehlo("client.outside.test")
        assert client.has_extn("pipelining") and client.has_extn("size")
        assert client.has_extn("8bitmime") and client.has_extn("enhancedstatuscodes")
        assert not client.has_extn("starttls")  # no certificate configured
        client.mail("sender@outside.test")
        client.rcpt("user@example.test")
        code, reply = client.data(MESSAGE.encode())
    assert code == 250
    queue_id = search(QUEUE_ID, reply.decode()).group(0)
    messages = wait_for(lambda: gateway.maildir_messages("user"))
    assert len(messages) == 1
    body = messages[0]
    assert body.startswith(b"Return-Path: <sender@outside.test>")
    assert b"Delivered-To: user@example.test" in body
    assert f"id {queue_id}".encode() in body
    assert b"\r\n.dot line\r\n" not in body and b"dot line" in body  # dot-unstuffed once
    log = wait_for(lambda: (lambda t: t if f"{queue_id} =>" in t else "")(gateway.mainlog()))
    assert re.search(
        rf"{queue_id} <= sender@outside.test H=\(client.outside.test\) \[127.0.0.1\]:\d+ "
        rf"P=esmtp S=\d+",
        log,
    )
    assert f"{queue_id} => user@example.test" in log
    assert f"{queue_id} Completed" in log
    records = [
        json.loads(line) for line in (gateway.log_dir / "main.jsonl").read_text().splitlines()
    ]
    assert any(r.get("queue_id") == queue_id for r in records)


@pytest.mark.skipif(
    shutil.which("swaks") is None and not __import__("os").environ.get("CI"),
    reason="swaks not installed (make test installs it)",
)
def test_swaks_delivers(gateway: GatewayProcess) -> None:
    result = subprocess.run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{gateway.port}",
            "--from",
            "a@outside.test",
            "--to",
            "swaks@example.test",
            "--helo",
            "swaks.outside.test",
            "--header",
            "Subject: swaks test",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"<-\s+250 2\.0\.0 Ok: queued as " + QUEUE_ID, result.stdout)
    messages = wait_for(lambda: gateway.maildir_messages("swaks"))
    assert b"Subject: swaks test" in messages[0]


def test_starttls_with_test_ca_records_cipher(make_gateway: Any, tls_files: Any) -> None:
    gw = make_gateway(
        tls={
            "certificate": str(tls_files["certificate"]),
            "private_key": str(tls_files["private_key"]),
        }
    )
    context = ssl.create_default_context(cafile=str(tls_files["ca"]))
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
        client.ehlo("tls.outside.test")
        assert client.has_extn("starttls")
        client.starttls(context=context)
        client.ehlo("tls.outside.test")
        assert not client.has_extn("starttls")  # not offered twice
        client.sendmail("s@outside.test", ["tlsuser@example.test"], MESSAGE)
    body = wait_for(lambda: gw.maildir_messages("tlsuser"))[0]
    assert re.search(rb"with ESMTPS \(TLS1\.[23]:[A-Z0-9_-]+:\d+\)", body)
    assert re.search(r"P=esmtps X=TLS1\.[23]:\S+:\d+ S=", gw.mainlog())


def _client_context(ca: Any, **kwargs: Any) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    for key, value in kwargs.items():
        setattr(context, key, value)
    return context


@pytest.mark.parametrize("weak", ["tls11", "cbc_sha1", "static_rsa"])
def test_weak_tls_is_refused(make_gateway: Any, tls_files: Any, weak: str) -> None:
    gw = make_gateway(
        tls={
            "certificate": str(tls_files["certificate"]),
            "private_key": str(tls_files["private_key"]),
        }
    )
    context = ssl.create_default_context(cafile=str(tls_files["ca"]))
    if weak == "tls11":
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("ALL:@SECLEVEL=0")
    else:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers("ECDHE-RSA-AES128-SHA" if weak == "cbc_sha1" else "AES128-GCM-SHA256")
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
        client.ehlo("weak.outside.test")
        with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError)):
            client.starttls(context=context)


def test_relay_domain_goes_to_next_hop(make_gateway: Any, next_hop: NextHop) -> None:
    next_hop.start()
    gw = make_gateway(
        domains={"relay": ["corp.test"]}, delivery={"next_hop": f"127.0.0.1:{next_hop.port}"}
    )
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
        client.sendmail("s@outside.test", ["boss@corp.test"], MESSAGE)
    wait_for(lambda: next_hop.handler.messages)
    sender, rcpts, content = next_hop.handler.messages[0]
    assert sender == "s@outside.test" and rcpts == ["boss@corp.test"]
    assert b"Received: from" in content and b"Subject: hello" in content
    assert wait_for(lambda: "=> boss@corp.test" in gw.mainlog())


def test_next_hop_down_then_up_is_retried(make_gateway: Any, next_hop: NextHop) -> None:
    gw = make_gateway(
        domains={"relay": ["corp.test"]},
        delivery={
            "next_hop": f"127.0.0.1:{next_hop.port}",
            "retry_initial": 1,
            "retry_max_interval": 2,
        },
    )
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
        client.sendmail("s@outside.test", ["later@corp.test"], MESSAGE)
    wait_for(lambda: "== later@corp.test" in gw.mainlog())
    next_hop.start()
    wait_for(lambda: next_hop.handler.messages, timeout=20)
    assert len(next_hop.handler.messages) == 1
    assert wait_for(lambda: "=> later@corp.test" in gw.mainlog())


def test_a_spool_that_cannot_commit_gets_451_and_keeps_nothing(gateway: GatewayProcess) -> None:
    """A real fault: queue/ replaced by a plain file, so the commit's rename fails (ENOTDIR)."""
    queue_dir = gateway.spool_dir / "queue"
    moved = gateway.spool_dir / "queue.moved"
    queue_dir.rename(moved)
    queue_dir.write_bytes(b"")
    try:
        with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as client:
            client.ehlo("client.outside.test")
            client.mail("sender@outside.test")
            client.rcpt("user@example.test")
            code, reply = client.data(MESSAGE.encode())
            assert (code, reply) == (451, b"4.3.0 Local error in processing")
            assert client.noop()[0] == 250  # the connection goes on, ready for a new MAIL
    finally:
        queue_dir.unlink()
        moved.rename(queue_dir)
    assert re.search(rf"{QUEUE_ID} spool commit failed: ", gateway.paniclog())
    assert list((gateway.spool_dir / "tmp").iterdir()) == []  # the aborted file is gone
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as client:
        assert client.sendmail("sender@outside.test", ["user@example.test"], MESSAGE) == {}
    assert len(wait_for(lambda: gateway.maildir_messages("user"))) == 1


def catches_sighup(pid: int) -> bool:
    """True once process ``pid`` has a SIGHUP handler (the SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    return False


@pytest.mark.parametrize("workers", [1, 2])
def test_a_local_domain_added_by_reload_is_delivered_by_the_route_decided_at_rcpt(
    make_gateway: Any, workers: int
) -> None:
    # Delivery used to route again with the domains it was started with, so mail accepted for
    # a domain added by SIGHUP got 250 and then "Unrouteable address" (issue 12). It follows
    # the route stored with the recipient at RCPT now.
    gw = make_gateway(server={"workers": workers})
    assert gw.proc is not None
    parent = gw.proc.pid

    def ready() -> list[int] | None:
        """The gateway's processes once each catches SIGHUP (a worker greets before it does;
        one that died at start-up is replaced by the parent)."""
        try:
            pids = [parent, *(child_pids(parent) if workers > 1 else [])]
            whole = len(pids) == (1 if workers == 1 else 1 + workers)
            return pids if whole and all(catches_sighup(pid) for pid in pids) else None
        except FileNotFoundError:
            return None

    pids = wait_for(ready)
    sections = dict(gw.sections)
    sections["domains"] = {"local": ["example.test", "new.test"], "relay": []}
    write_config(gw.config_path, sections)
    gw.signal(signal.SIGHUP)
    wait_for(lambda: gw.mainlog().count("configuration reloaded") == len(pids))
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
        client.ehlo("client.outside.test")
        client.mail("sender@outside.test")
        assert client.rcpt("amy@new.test")[0] == 250
        code, _reply = client.data(MESSAGE.encode())
    assert code == 250
    (message,) = wait_for(lambda: gw.maildir_messages("amy"))
    assert message.startswith(b"Return-Path: <sender@outside.test>\nDelivered-To: amy@new.test\n")
    assert "Unrouteable" not in gw.mainlog()
