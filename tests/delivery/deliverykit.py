"""Helpers for the delivery tests: a real aiosmtpd next hop (optionally with STARTTLS), spool."""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from palisade.delivery import QueueRunner, Router
from palisade.obs.log import MemoryEventLog
from palisade.obs.queueid import QueueIdGenerator
from palisade.spool import Envelope, Spool
from tests.conftest import free_port

IDS = QueueIdGenerator()
BODY = (
    b"From: Alice <alice@example.test>\r\nTo: bob@corp.test\r\nSubject: hello\r\n"
    b"Message-ID: <m1@example.test>\r\n\r\nline one\r\n.leading dot\r\n"
)


class Handler:
    """Records messages; ``rcpt_reply`` / ``data_reply`` let a test make the hop refuse."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.rcpt_reply: dict[str, str] = {}
        self.data_reply = "250 2.0.0 Ok: queued as NEXT1"
        self.tls_seen: list[bool] = []
        self.peers: list[Any] = []  # the client address of each accepted message

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        reply = self.rcpt_reply.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.tls_seen.append(session.ssl is not None)
        self.peers.append(session.peer)
        if self.data_reply.startswith("250"):
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return self.data_reply


@dataclass
class Hop:
    port: int = field(default_factory=free_port)
    handler: Handler = field(default_factory=Handler)
    tls_context: ssl.SSLContext | None = None
    controller: Controller | None = None

    def start(self) -> Hop:
        self.controller = Controller(
            self.handler, hostname="127.0.0.1", port=self.port, tls_context=self.tls_context
        )
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None


def envelope(
    sender: str = "alice@example.test",
    recipients: tuple[str, ...] = ("bob@corp.test",),
    received_at: float | None = None,
) -> Envelope:
    return Envelope(
        queue_id=IDS.new(),
        sender=sender,
        recipients=recipients,
        received_at=time.time() if received_at is None else received_at,
        client_ip="192.0.2.1",
        client_port=40000,
        helo="client.outside.test",
        client_name=None,
        protocol="esmtp",
        tls=None,
        message_id="<m1@example.test>",
    )


async def queue(spool: Spool, env: Envelope, body: bytes = BODY) -> str:
    writer = spool.open_message(env)
    writer.write(body)
    await writer.commit()
    return env.queue_id


@dataclass
class Setup:
    spool: Spool
    router: Router
    log: MemoryEventLog
    mail: Path

    def runner(self, **kwargs: Any) -> QueueRunner:
        return QueueRunner(self.spool, self.router, self.log, **kwargs)

    def lines(self) -> list[str]:
        return [line for _kind, line in self.log.lines]

    def maildir(self, local: str) -> list[bytes]:
        new = self.mail / local / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


def setup(
    tmp_path: Path,
    hop: Hop | None = None,
    *,
    require_tls: bool = False,
    tls_context: ssl.SSLContext | None = None,
) -> Setup:
    spool = Spool(tmp_path / "spool", fsync=False)
    router = Router(
        local_domains=frozenset({"Example.TEST"}),
        relay_domains=frozenset({"corp.test"}),
        maildir_root=tmp_path / "mail",
        next_hop=None if hop is None else ("127.0.0.1", hop.port),
        helo_name="mx.example.test",
        require_tls=require_tls,
        tls_context=tls_context,
        connect_timeout=5,
        command_timeout=5,
        data_timeout=5,
        maildir_fsync=False,
    )
    return Setup(spool, router, MemoryEventLog(), tmp_path / "mail")


def run(coro: Any) -> Any:
    return asyncio.run(coro)
