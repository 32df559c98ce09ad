"""``palisade scan`` on the log of a real Postfix (a private instance, bench/postfix_instance.py,
logging to a file through postlogd): refused relaying, a refused HELO, improper pipelining and
an early talker are counted per address (smtplib and raw sockets, each from its own loopback
address); accepted mail is not."""

from __future__ import annotations

import os
import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench.postfix_instance import PostfixInstance

from palisade.adapters.sqlite_state import SqliteStateStore
from tests.conftest import free_port, palisade, wait_for, write_config
from tests.services import need_program


@pytest.fixture
def postfix() -> Iterator[PostfixInstance]:
    need_program("postfix", "postfix")
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("a private Postfix instance needs root")
        pytest.skip("a private Postfix instance needs root")
    instance = PostfixInstance(  # its own directory under /tmp: pytest's are 0700, root's
        port=free_port(),
        sink_port=free_port(),
        extra_settings={
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_helo_required": "yes",
            "smtpd_helo_restrictions": "reject_invalid_helo_hostname",
            "smtpd_peername_lookup": "no",  # no DNS: every client is unknown[ip]
        },
    )
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
        instance.cleanup()


def _raw(port: int, source: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), 10, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _smtp(port: int, source: str) -> smtplib.SMTP:
    client = smtplib.SMTP(timeout=10)
    client.connect("127.0.0.1", port, source_address=(source, 0))
    return client


def test_postfix_refusals_counted_per_address(postfix: PostfixInstance, tmp_path: Path) -> None:
    port = postfix.port
    with _smtp(port, "127.0.0.2") as client:  # two refused relay attempts
        client.ehlo("client.example")
        client.mail("a@client.example")
        assert client.rcpt("victim@elsewhere.example")[0] == 554
        assert client.rcpt("other@elsewhere.example")[0] == 554
    with _smtp(port, "127.0.0.3") as client:  # an invalid HELO name
        assert client.helo("bad_helo!")[0] == 501
    sock = _raw(port, "127.0.0.4")  # pipelining after HELO, then a refused relay
    assert sock.recv(512).startswith(b"220")
    sock.sendall(b"HELO x.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n")
    reply = b""
    while b"554" not in reply:
        reply += sock.recv(512)
    sock.sendall(b"QUIT\r\n")
    sock.recv(512)
    sock.close()
    early = _raw(port, "127.0.0.5")  # talks before the greeting
    early.sendall(b"EHLO early.example\r\n")
    assert early.recv(512).startswith(b"220")
    early.close()
    with _smtp(port, "127.0.0.6") as client:  # accepted mail counts nothing
        client.ehlo("good.example")
        client.sendmail("a@good.example", ["someone@bench.test"], b"Subject: hi\r\n\r\nhello\r\n")
    log = postfix.log
    wait_for(lambda: "127.0.0.5]" in log.read_text() and "lost connection" in log.read_text())
    wait_for(lambda: "disconnect from unknown[127.0.0.6]" in log.read_text())

    config = write_config(
        tmp_path / "scan.toml",
        {
            "paths": {"state": str(tmp_path / "var" / "state.sqlite")},
            "scan": {"files": [str(log)], "formats": ["postfix"]},
        },
    )
    done = palisade("scan", "--once", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with SqliteStateStore(tmp_path / "var" / "state.sqlite") as store:
        counts = {i.key: i.count for i in store.list_incidents_sync()}
        rules = {
            ip: sorted(e.rule for e in store.incident_events_sync(ip, time.time() - 3600))
            for ip in counts
        }
    assert counts == {"127.0.0.2": 2, "127.0.0.3": 1, "127.0.0.4": 2, "127.0.0.5": 1}
    assert rules["127.0.0.4"] == ["postfix-pipelining", "postfix-reject"]
    assert rules["127.0.0.5"] == ["postfix-pipelining"]
