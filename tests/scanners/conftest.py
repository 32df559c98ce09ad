"""Fixtures for the scanner tests: real spamd, rspamd and clamd on loopback (started once per
session, spamd being the slow one), messages as spool-like files, and ports around the real
adapters.

With ``CI=true`` a missing spamd, rspamd or clamd fails the tests (``tests/services.py``), never
skips.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from palisade.policy.rules import Facts, MessageFacts, Ports
from palisade.ports import SpamScanner, VirusScanner
from tests.messages import FileSource
from tests.scanners.clamd import ClamdProcess, start_clamd
from tests.scanners.rspamd import RspamdProcess, start_rspamd
from tests.scanners.spamd import SpamdProcess, start_spamd
from tests.unused_ports import NoState

T = TypeVar("T")

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def message_bytes(body: str, subject: str = "Minutes of the Tuesday meeting") -> bytes:
    """A plain, well-formed message (with a Received trace header first, as in our spool)."""
    head = (
        "Received: from mail.example.org (mail.example.org [192.0.2.10])\r\n"
        "\tby gateway.example.net with ESMTP id 4AbCdEfGhJ; Tue, 3 Jun 2025 10:15:02 +0000\r\n"
        "Date: Tue, 3 Jun 2025 10:14:58 +0000\r\n"
        "From: Alice Martin <alice@example.org>\r\n"
        "To: Bob Keller <bob@example.net>\r\n"
        f"Subject: {subject}\r\n"
        "Message-ID: <20250603101458.4711@mail.example.org>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    )
    return (head + body.replace("\n", "\r\n")).encode()


HAM_BODY = """Hello Bob,

thank you for joining the meeting on Tuesday. As agreed, Carol will send the revised
budget to the team by Friday, and we will meet again next week to go through the
numbers together. Please bring the notes from your visit to the Lyon office.

Best regards,
Alice
"""


def write_message(tmp_path: Path, data: bytes, name: str = "message.eml") -> FileSource:
    path = tmp_path / name
    path.write_bytes(data)
    return FileSource(path)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class NoResolver:
    async def query(self, name: str, rdtype: str) -> Any:
        raise AssertionError("unexpected DNS query")

    async def ptr(self, ip: str) -> Any:
        raise AssertionError("unexpected PTR query")


class NoClock:
    def now(self) -> float:
        return 0.0

    def monotonic(self) -> float:
        return 0.0


def make_ports(spam: SpamScanner | None = None, virus: VirusScanner | None = None) -> Ports:
    return Ports(
        resolver=NoResolver(),
        state=NoState(),
        clock=NoClock(),
        spam=spam,
        virus=virus,
    )


def make_facts(source: FileSource) -> Facts:
    facts = Facts(client_ip=ipaddress.ip_address("192.0.2.10"), client_port=4321)
    facts.sender = "alice@example.org"
    facts.recipients = ["bob@example.net"]
    facts.message = MessageFacts(headers=(), source=source, size=source.size)
    return facts


class SilentServer:
    """A loopback TCP server that accepts connections, reads what comes, and never answers
    (a hung daemon, without stopping a real one)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self._conns:
            conn.close()


@pytest.fixture(scope="session")
def spamd() -> Iterator[SpamdProcess]:
    process = start_spamd()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def rspamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RspamdProcess]:
    process = start_rspamd(tmp_path_factory.mktemp("rspamd"))
    yield process
    process.stop()


@pytest.fixture(scope="session")
def clamd() -> Iterator[ClamdProcess]:
    process = start_clamd()
    yield process
    process.stop()


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


class ScriptedServer:
    """A loopback TCP server that reads a request (until EOF or until the bytes ``until``
    end it), answers ``reply`` and closes: to see how an adapter takes replies that no
    well-behaved daemon sends. Every request it read is kept in ``requests``."""

    def __init__(self, reply: bytes, until: bytes | None = None) -> None:
        self.reply = reply
        self.until = until
        self.requests: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while not (self.until and data.endswith(self.until)):
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    self.requests.append(data)
                    conn.sendall(self.reply)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()
