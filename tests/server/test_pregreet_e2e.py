"""Pregreet with a pass cache: a client that waited for the banner and behaved is remembered in
the state store and greeted at once next time; early talkers, refused clients and expired passes
wait again; whitelisted clients never wait. A real gateway, raw sockets from chosen loopback
addresses.

The timing checks are behaviour, not performance: "the banner did not come before the delay"
(with 0.2 s of slack) and "it came well before the delay".
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from typing import Any

from tests.conftest import GatewayProcess, child_pids, wait_for
from tests.server.smtpclient import RawClient

DELAY = 1.5


def greeted_after(gw: GatewayProcess, source: str) -> tuple[float, RawClient]:
    """Connects from ``source``; (seconds until the 220 banner, the open client)."""
    started = time.monotonic()
    client = RawClient(gw.port, source=source)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    code, _ = client.reply()
    assert code == 220
    return time.monotonic() - started, client


def polite(gw: GatewayProcess, source: str) -> float:
    """A well-behaved visit: banner, EHLO, NOOP, QUIT. Returns the time to banner."""
    waited, client = greeted_after(gw, source)
    with client:
        assert client.command("EHLO polite.test")[0] == 250
        assert client.command("NOOP")[0] == 250
        assert client.command("QUIT")[0] == 221
    return waited


def remembered(gw: GatewayProcess, source: str) -> int:
    return len(
        re.findall(
            rf"\[{re.escape(source)}\]:\d+ pregreet passed, remembered for \d+s", gw.mainlog()
        )
    )


def test_a_polite_client_waits_once_then_is_greeted_at_once(make_gateway: Any) -> None:
    gw = make_gateway(server={"greeting_delay": DELAY})
    assert polite(gw, "127.0.0.81") >= DELAY - 0.2
    wait_for(lambda: remembered(gw, "127.0.0.81") == 1)
    assert re.search(
        r"H=\(polite\.test\) \[127\.0\.0\.81\]:\d+ pregreet passed, remembered for 86400s",
        gw.mainlog(),
    )
    for _ in range(2):  # the pass is not used up
        assert polite(gw, "127.0.0.81") < DELAY / 2
    skipped = re.findall(
        r"H=\[127\.0\.0\.81\]:\d+ pregreet skipped: passed before \(until "
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\)",
        gw.mainlog(),
    )
    assert len(skipped) == 2
    assert remembered(gw, "127.0.0.81") == 1  # a skipped visit does not extend the pass
    assert polite(gw, "127.0.0.82") >= DELAY - 0.2  # another address has no pass


def test_early_talkers_and_refused_clients_are_not_remembered(make_gateway: Any) -> None:
    gw = make_gateway(server={"greeting_delay": DELAY})
    with RawClient(gw.port, source="127.0.0.83") as eager:
        eager.send(b"EHLO eager.test\r\n")
        assert eager.reply()[0] == 554
        assert eager.closed()
    waited, client = greeted_after(gw, "127.0.0.84")  # waits, then gets a refusal
    with client:
        assert client.command("EHLO refused.test")[0] == 250
        assert client.command("MAIL FROM:<a@outside.test>")[0] == 250
        assert client.command("RCPT TO:<victim@elsewhere.test>")[0] == 550
        assert client.command("QUIT")[0] == 221
    assert waited >= DELAY - 0.2
    waited, client = greeted_after(gw, "127.0.0.85")  # waits, then leaves in the middle
    with client:
        assert client.command("EHLO gone.test")[0] == 250
        assert client.command("MAIL FROM:<a@outside.test>")[0] == 250
    wait_for(lambda: "unexpected disconnection" in gw.mainlog())
    for source in ("127.0.0.83", "127.0.0.84", "127.0.0.85"):
        assert polite(gw, source) >= DELAY - 0.2, source
    wait_for(lambda: all(remembered(gw, s) == 1 for s in ("127.0.0.83", "127.0.0.84")))


def test_a_pass_expires_after_its_ttl(make_gateway: Any) -> None:
    gw = make_gateway(server={"greeting_delay": DELAY, "pregreet_pass_ttl": "3s"})
    assert polite(gw, "127.0.0.86") >= DELAY - 0.2
    wait_for(lambda: remembered(gw, "127.0.0.86") == 1)
    remembered_at = time.time()
    assert "remembered for 3s" in gw.mainlog()
    assert polite(gw, "127.0.0.86") < DELAY / 2
    time.sleep(max(0.0, remembered_at + 3.1 - time.time()))  # the expiry is a point in time
    assert polite(gw, "127.0.0.86") >= DELAY - 0.2


def test_a_zero_ttl_disables_the_cache(make_gateway: Any) -> None:
    gw = make_gateway(server={"greeting_delay": DELAY, "pregreet_pass_ttl": 0})
    assert polite(gw, "127.0.0.87") >= DELAY - 0.2
    assert polite(gw, "127.0.0.87") >= DELAY - 0.2
    assert "pregreet" not in gw.mainlog()


def test_whitelisted_clients_never_wait(make_gateway: Any) -> None:
    gw = make_gateway(
        server={"greeting_delay": DELAY},
        files={"lists/whitelist": "127.0.0.88\n"},
        lists={"whitelist_connect_hosts": {"type": "ip", "file": "lists/whitelist"}},
        rules={
            "connect": [
                {
                    "check": "ip_list",
                    "list": "whitelist_connect_hosts",
                    "verb": "accept",
                    "log_message": "ACCEPT - whitelisted",
                }
            ]
        },
    )
    assert polite(gw, "127.0.0.88") < DELAY / 2
    assert polite(gw, "127.0.0.89") >= DELAY - 0.2  # not whitelisted


def serving_pid(gw: GatewayProcess, client: RawClient) -> int:
    """The worker process that holds the server side of ``client``'s connection (from /proc:
    the kernel's socket table and the workers' descriptors)."""
    assert gw.proc is not None
    port = client.sock.getsockname()[1]
    inodes = set()
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if (
                int(local.rsplit(":", 1)[1], 16) == gw.port
                and int(remote.split(":")[1], 16) == port
            ):
                inodes.add(f"socket:[{fields[9]}]")
    for pid in child_pids(gw.proc.pid):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(FileNotFoundError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return pid
    raise AssertionError("no worker holds the connection")


def test_the_pass_is_shared_by_every_worker(make_gateway: Any) -> None:
    gw = make_gateway(server={"greeting_delay": DELAY, "workers": 2})
    assert polite(gw, "127.0.0.90") >= DELAY - 0.2
    wait_for(lambda: remembered(gw, "127.0.0.90") == 1)
    # without a ratelimit rule whichever worker is free takes the client: visit until both
    # workers have served it, each greeting it at once from the pass in the one SQLite file
    served: set[int] = set()
    for _ in range(40):
        waited, client = greeted_after(gw, "127.0.0.90")
        with client:
            served.add(serving_pid(gw, client))
            assert client.command("QUIT")[0] == 221
        assert waited < DELAY / 2
        if len(served) == 2:
            break
    assert len(served) == 2, served
