"""What the submission tests share: a gateway with a 587 (STARTTLS) and a 465 (implicit TLS)
listener beside its port 25, users made by the real ``palisade passwd add``, a senders map,
DKIM keys made by ``palisade dkim keygen`` and published by the loopback DNS server, and a real
next hop (aiosmtpd)."""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from loopback.dnsserver import ZoneServer, start_zone_server
from tests.conftest import GatewayProcess, NextHop, free_port
from tests.outbound.dkimkit import keygen, publish

USERS = {"alice@example.org": "correct horse battery", "bob": "b0b's secret: p@ss"}
SENDERS = "# user  addresses it may send as\nbob  bob@example.org, @bob.example\n"
KEYS = [
    {"domain": "example.org", "selector": "r2026", "file": "example.org.r2026.rsa.key"},
    {"domain": "example.org", "selector": "e2026", "file": "example.org.e2026.ed25519.key"},
]


@dataclass
class Submission:
    """A started gateway and its submission ports."""

    gateway: GatewayProcess
    port: int  # 587-style: STARTTLS, then AUTH
    tls_port: int  # 465-style: implicit TLS
    ca: Path
    keygen_output: str

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


def plain(user: str, password: str, authzid: str = "") -> str:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def passwd_add(base: Path, user: str, password: str) -> None:
    """``palisade passwd add USER --stdin``, the password on standard input only."""
    result = subprocess.run(
        [sys.executable, "-m", "palisade", "passwd", "add", user, "--stdin",
         "--config", "palisade.toml"],
        cwd=base, input=password + "\n", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert password not in result.stdout + result.stderr


class TlsLine:
    """A raw client over TLS (TCP_NODELAY): what it sends is exactly what goes on the wire."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext, *, starttls: bool) -> None:
        raw = socket.create_connection((host, port), timeout=15)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.sock: socket.socket = raw
        if starttls:
            self.banner = self.reply()
            self.send(b"EHLO client.example.org\r\n")
            self.reply()
            self.send(b"STARTTLS\r\n")
            assert self.reply().startswith(b"220 ")
            self.buffer = b""
            self.sock = context.wrap_socket(raw, server_hostname="mx.example.test")
        else:
            self.sock = context.wrap_socket(raw, server_hostname="mx.example.test")
            self.banner = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        """One whole reply (all its lines)."""
        while True:
            lines = self.buffer.split(b"\r\n")
            for index, line in enumerate(lines[:-1]):
                if line[3:4] == b" ":
                    cut = sum(len(x) + 2 for x in lines[: index + 1])
                    reply, self.buffer = self.buffer[:cut], self.buffer[cut:]
                    return reply
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(self.buffer)
            self.buffer += data

    def closed(self) -> bool:
        """The server closed the connection (after whatever is buffered)."""
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, ssl.SSLError):
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def zones() -> Iterator[ZoneServer]:
    server = start_zone_server()
    server.add_zone("example.org")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_submission(
    make_gateway: Any, tls_files: dict[str, Path], next_hop: NextHop, zones: ZoneServer
) -> Any:
    """Factory: a started gateway with submission listeners; ``submission`` keys override."""

    def factory(
        senders: str | None = SENDERS,
        sections: dict[str, Any] | None = None,
        files: dict[str, str] | None = None,
        **submission: Any,
    ) -> Submission:
        """``sections``: more config sections (``rules``, ``server``...), ``files`` beside it."""
        next_hop.start()
        port, tls_port = free_port(), free_port()
        settings: dict[str, Any] = {
            "listen": [f"127.0.0.1:{port}"],
            "listen_tls": [f"127.0.0.1:{tls_port}"],
            "password_file": "passwd",
            "failure_delay": 0.2,
            "failure_delay_max": 0.8,
        }
        if senders is not None:
            settings["senders"] = "senders"
        settings.update(submission)
        gateway: GatewayProcess = make_gateway(
            start=False,
            files={"senders": senders or "", **(files or {})},
            tls={"certificate": str(tls_files["certificate"]),
                 "private_key": str(tls_files["private_key"])},
            delivery={"next_hop": f"127.0.0.1:{next_hop.port}"},
            dns={"nameservers": [f"127.0.0.1:{zones.port}"]},
            dkim={"keys_dir": "keys", "keys": KEYS},
            submission=settings,
            **(sections or {}),
        )  # fmt: skip
        for user, password in USERS.items():
            passwd_add(gateway.base, user, password)
        output = ""
        for key in KEYS:
            extra = ("--ed25519",) if key["file"].endswith(".ed25519.key") else ()
            output += keygen(gateway.base, key["domain"], key["selector"], *extra)
        publish(zones, output)
        gateway.start()
        return Submission(gateway, port, tls_port, tls_files["ca"], output)

    return factory
