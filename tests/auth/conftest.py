"""Fixtures for the authentication tests (DKIM, DMARC, Authentication-Results, iprev).

A real DNS server on loopback (``loopback/dnsserver.py``) serves DKIM keys, DMARC and SPF records
and PTR names; the checks reach it through a real ``DnsResolver`` (``tests/checks/harness.py``).
Messages come from ``tests/data/dkim`` (see its README) or are built and signed here with the
test key; ``MessageFacts`` is filled from the message bytes written to a temporary file.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import dkim
import pytest

from loopback.dnsserver import ZoneServer, start_zone_server
from palisade.policy.rules import Facts, Key, MessageFacts, Ports, memo
from tests.checks.harness import make_ports
from tests.messages import message_facts

T = TypeVar("T")

DATA = Path(__file__).resolve().parent.parent / "data" / "dkim"
ZONES = ("example.com", "example.org", "example.net", "in-addr.arpa")


def data(name: str) -> bytes:
    return (DATA / name).read_bytes()


def key_record(name: str) -> str:
    return data(name).decode("ascii").strip()


def crlf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class Messages:
    """Writes messages to files and wraps them as MessageFacts."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = 0

    def facts(self, raw: bytes) -> MessageFacts:
        self.count += 1
        raw = crlf(raw)
        return message_facts(self.root / f"msg{self.count}.eml", raw)


@pytest.fixture
def messages(tmp_path: Path) -> Messages:
    return Messages(tmp_path)


@pytest.fixture
def dns() -> Iterator[ZoneServer]:
    server = start_zone_server()
    for apex in ZONES:
        server.add_zone(apex, negative_ttl=60)
    yield server
    server.stop()


@pytest.fixture
def ports(dns: ZoneServer) -> Ports:
    return make_ports(dns)


def make_facts(
    message: MessageFacts | None = None,
    *,
    ip: str = "192.0.2.1",
    sender: str | None = "user@example.com",
    helo: str | None = "mail.example.com",
) -> Facts:
    return Facts(
        client_ip=ipaddress.ip_address(ip),
        client_port=1,
        helo=helo,
        sender=sender,
        message=message,
    )


def plain_message(
    from_header: str = "Alice <alice@example.com>", body: str = "Hello.\n", extra: str = ""
) -> bytes:
    return (
        f"{extra}From: {from_header}\n"
        "To: bob@example.net\n"
        "Subject: lunch\n"
        "Date: Mon, 23 Nov 2026 10:00:00 +0000\n"
        "Message-ID: <1@example.com>\n"
        "\n"
        f"{body}"
    ).encode()


def sign(raw: bytes, domain: str, selector: str = "test") -> bytes:
    """``raw`` with a DKIM-Signature by ``domain`` made with the test RSA key on top."""
    raw = crlf(raw)
    header = dkim.sign(
        raw,
        selector.encode(),
        domain.encode(),
        data("test.private"),
        include_headers=[b"from", b"to", b"subject", b"date"],
    )
    return bytes(header) + raw


def publish_key(dns: ZoneServer, domain: str, selector: str = "test", record: str = "") -> None:
    dns.set(f"{selector}._domainkey.{domain}", "TXT", [record or key_record("test.txt")])


def run(coro_factory: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro_factory()

    return asyncio.run(main())


async def remember(facts: Facts, key: str, value: object) -> None:
    """Stores a finding in ``facts.tx`` as if it had been computed (for header tests). The key's
    value type is left open: a test may store a stand-in for the real outcome."""

    async def compute() -> object:
        return value

    await memo(facts, Key[object](key), compute)


async def remember_failure(facts: Facts, key: str) -> None:
    async def compute() -> object:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await memo(facts, Key[object](key), compute)
