"""sd_notify: a real gateway subprocess tells the socket in ``$NOTIFY_SOCKET`` what it does.

The test is the service manager: it binds the AF_UNIX datagram socket (a path, or a name in the
abstract namespace, as systemd uses), starts ``palisade serve`` with ``NOTIFY_SOCKET`` naming
it, and reads each datagram with the sender's credentials (SO_PASSCRED), so it also checks that
only the main process speaks (the unit's ``NotifyAccess=main``).
"""

from __future__ import annotations

import signal
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GatewayProcess, wait_for, write_config

CREDENTIALS = struct.Struct("iII")  # struct ucred: pid, uid, gid


class NotifySocket:
    """The receiving end of ``$NOTIFY_SOCKET``."""

    def __init__(self, address: str) -> None:
        self.address = address  # as NOTIFY_SOCKET spells it
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(20)

    def receive(self) -> tuple[int, dict[str, str]]:
        """The next datagram: the sender's pid and its fields."""
        data, ancillary, _flags, _address = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pids = [
            CREDENTIALS.unpack(cdata[: CREDENTIALS.size])[0]
            for level, kind, cdata in ancillary
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
        ]
        assert len(pids) == 1, ancillary
        lines = data.decode().splitlines()
        return pids[0], dict(line.split("=", 1) for line in lines)

    def pending(self) -> list[bytes]:
        """Datagrams waiting now (none expected once the gateway is gone)."""
        self.sock.setblocking(False)
        waiting = []
        while True:
            try:
                waiting.append(self.sock.recv(4096))
            except BlockingIOError:
                return waiting


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: Any, tmp_path: Path) -> Iterator[NotifySocket]:
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
    else:
        address = f"@palisade-test-{uuid.uuid4().hex}"
    receiver = NotifySocket(address)
    yield receiver
    receiver.sock.close()


def greets(gw: GatewayProcess) -> bytes:
    """Connects once, at once (no retry): the port must already accept."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client.recv(512)


@pytest.mark.parametrize("workers", [1, 2])
def test_ready_reloading_stopping_from_the_main_process_only(
    make_gateway: Any, notify_socket: NotifySocket, workers: int
) -> None:
    gw = make_gateway(start=False, server={"workers": workers})
    gw.start(env={"NOTIFY_SOCKET": notify_socket.address}, greet=False)
    assert gw.proc is not None
    main = gw.proc.pid

    sender, fields = notify_socket.receive()
    assert sender == main
    assert fields["READY"] == "1"
    assert fields["MAINPID"] == str(main)
    assert "generation 1" in fields["STATUS"]
    assert greets(gw).startswith(b"220 ")  # READY came after the port accepts

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    gw.signal(signal.SIGHUP)
    sender, fields = notify_socket.receive()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sender == main
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after
    sender, fields = notify_socket.receive()
    assert (sender, fields["READY"]) == (main, "1")
    assert "generation 2" in fields["STATUS"]
    assert "generation 2" in gw.mainlog()  # READY came after the swap

    gw.config_path.write_text("[server]\nworkers = \n")  # broken: the reload is refused
    gw.signal(signal.SIGHUP)
    sender, fields = notify_socket.receive()
    assert (sender, fields["RELOADING"]) == (main, "1")
    sender, fields = notify_socket.receive()
    assert (sender, fields["READY"]) == (main, "1")
    assert "reload refused, generation 2 stays in force" in fields["STATUS"]
    write_config(gw.config_path, gw.sections)

    gw.signal(signal.SIGTERM)
    sender, fields = notify_socket.receive()
    assert (sender, fields["STOPPING"]) == (main, "1")
    assert gw.proc.wait(20) == 0
    assert notify_socket.pending() == []  # nothing from a worker, nothing twice


def test_a_notify_socket_nobody_listens_on_changes_nothing(
    make_gateway: Any, tmp_path: Path
) -> None:
    """The manager gone (or a stale NOTIFY_SOCKET): every send fails, the gateway serves,
    reloads and stops as ever."""
    gw = make_gateway(start=False)
    gw.start(env={"NOTIFY_SOCKET": str(tmp_path / "nobody.sock")})
    assert greets(gw).startswith(b"220 ")
    gw.signal(signal.SIGHUP)
    wait_for(lambda: "generation 2" in gw.mainlog())
    assert greets(gw).startswith(b"220 ")
    assert gw.stop() == 0
    assert "Traceback" not in gw.stderr()
