"""The conversation without a socket: SMTP bytes in through its SMTP core, replies, log lines and
spool requests out, as the server's session and ``check-host`` drive it.

Real parts: the DNS server on loopback (``loopback/dnsserver.py``) behind the real resolver, the
SQLite state store and a spool in a temporary directory; the log is the in-memory ``EventLog``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from loopback.dnsserver import ZoneServer, start_zone_server
from palisade.config import load_config
from palisade.conversation import Conversation, Step
from palisade.feedback.incidents import IncidentRecorder
from palisade.obs.log import MemoryEventLog
from palisade.obs.queueid import QueueIdGenerator
from palisade.server.context import ServerContext
from palisade.server.generation import Generation, build_generation
from palisade.smtp import NEED_DATA, PAUSED, events
from palisade.spool import Spool
from tests.conftest import gateway_sections, write_config

ZONE = "zen.spamhaus.org"


@pytest.fixture
def dns() -> Iterator[ZoneServer]:
    server = start_zone_server()
    server.add_zone(ZONE)
    server.list_address(ZONE, "127.0.0.21", "127.0.0.4", txt="listed")
    yield server
    server.stop()


class Server(ServerContext):
    """The server's own context, with what it logged and queued kept for the test."""

    log: MemoryEventLog
    submitted: list[str]
    generation: Generation


@pytest.fixture
def ctx(dns: ZoneServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.chdir(tmp_path)  # the config's relative paths (state, spool) land here
    sections = gateway_sections(2525)
    sections["dns"] = {"nameservers": [f"127.0.0.1:{dns.port}"], "timeout": 1, "retries": 0}
    sections["policy"] = {"delay_reject": True}
    sections["rules"] = {
        "connect": [
            {
                "name": "zen",
                "check": "dnsbl",
                "zones": [{"zone": ZONE, "codes": ["127.0.0.2-127.0.0.11"]}],
                "verb": "deny",
                "message": "$ip is listed at $zone",
                "log_message": "DENY - listed at $zone ($codes)",
                "incident": 3,
            }
        ],
        "rcpt": [
            {
                "name": "who",
                "check": "recipient",
                "list": "users",
                "ldap": False,
                "verb": "deny",
                "code": 550,
                "enhanced": "5.1.1",
            }
        ],
    }
    sections["lists"] = {
        "users": {"type": "address", "entries": ["user@example.test", "other@example.test"]}
    }
    sections["incidents"] = {"unknown_recipients_burst": 2, "unknown_recipients": 4}
    config = load_config(write_config(tmp_path / "palisade.toml", sections))
    generation = build_generation(config, delivering=False)  # the server's composition root
    submitted: list[str] = []
    context = Server(
        log=MemoryEventLog(),
        spool=Spool(tmp_path / "spool", fsync=False),
        queue_ids=QueueIdGenerator(),
        submit=submitted.append,
        current=lambda: generation,
        incidents=IncidentRecorder(MemoryEventLog()),
    )
    context.submitted = submitted
    context.generation = generation
    yield context
    generation.close()
    context.spool.close()


async def talk(ctx: Server, ip: str, *client: bytes) -> tuple[Conversation, bytes]:
    """What the session does, without the socket: each piece of ``client`` arrives when the
    conversation waits for input (then the end of input)."""
    conversation = Conversation(ctx, ctx.generation, ip, 4000)
    sent: list[bytes] = []
    if await conversation.connect():
        conversation.greet()
        conn = conversation.conn
        pieces = list(client)
        while True:
            event = conn.next_event()
            if event is NEED_DATA or event is PAUSED:
                conn.receive_data(pieces.pop(0) if pieces else b"")  # b"": the end of input
                continue
            if isinstance(event, events.DataChunk):
                conversation.content(event.data)
                continue
            step = await conversation.handle(event)
            if step is Step.OPEN_SPOOL:
                assert conversation.tx.envelope is not None
                conversation.spool_opened(ctx.spool.open_message(conversation.tx.envelope))
            elif step is Step.CLOSE:
                break
    sent.extend(conversation.out)
    return conversation, b"".join(sent)


def test_a_pipelined_transaction_is_answered_logged_and_spooled(ctx: Server) -> None:
    pipelined = b"MAIL FROM:<a@outside.test>\r\nRCPT TO:<user@example.test>\r\nDATA\r\n"
    message = b"Subject: hi\r\nMessage-ID: <1@outside.test>\r\n\r\nhello\r\n.\r\nQUIT\r\n"
    conversation, replies = asyncio.run(
        talk(ctx, "127.0.0.30", b"EHLO client.test\r\n", pipelined, message)
    )
    lines = replies.decode().split("\r\n")
    queue_id = ctx.submitted[0]
    assert lines == [
        "220 mx.example.test ESMTP Palisade",
        "250-mx.example.test",
        "250-PIPELINING",
        "250-SIZE 26214400",
        "250-8BITMIME",
        "250-ENHANCEDSTATUSCODES",
        "250 HELP",
        "250 2.1.0 Ok",
        "250 2.1.5 Ok",
        "354 End data with <CR><LF>.<CR><LF>",
        f"250 2.0.0 Ok: queued as {queue_id}",
        "221 2.0.0 mx.example.test closing connection",
        "",
    ]
    log = ctx.log.lines
    assert log == [
        (
            "main",
            f"{queue_id} <= a@outside.test H=(client.test) [127.0.0.30]:4000 P=esmtp S=52 "
            "id=1@outside.test T=<user@example.test>",
        )
    ]
    body = ctx.spool.read_body(queue_id)
    assert body.startswith(b"Received: from client.test ([127.0.0.30])\r\n\tby mx.example.test")
    assert body.endswith(b"Subject: hi\r\nMessage-ID: <1@outside.test>\r\n\r\nhello\r\n")
    assert conversation.behaved() is False  # it never waited for a banner delay


def test_delay_reject_answers_a_listed_client_at_rcpt_with_the_envelope_in_the_log(
    ctx: Server,
) -> None:
    commands = b"MAIL FROM:<a@outside.test>\r\nRCPT TO:<user@example.test>\r\nQUIT\r\n"
    conversation, replies = asyncio.run(talk(ctx, "127.0.0.21", b"EHLO client.test\r\n", commands))
    lines = replies.decode().split("\r\n")
    assert lines[0] == "220 mx.example.test ESMTP Palisade"  # the refusal waits for RCPT
    assert "250 2.1.0 Ok" in lines
    assert "554 5.7.1 127.0.0.21 is listed at zen.spamhaus.org" in lines
    assert conversation.delayed is not None
    assert ctx.log.lines == [
        (
            "reject",
            "H=(client.test) [127.0.0.21]:4000 F=<a@outside.test> rejected RCPT "
            "<user@example.test>: DENY - listed at zen.spamhaus.org (127.0.0.4)",
        )
    ]
    assert ctx.submitted == []


# ------------------------------------------------------------------------------ incidents


def test_a_refusal_is_an_incident_once_per_connection(ctx: Server) -> None:
    """delay_reject answers the listed client at every RCPT: one incident for the rule."""
    commands = (
        b"MAIL FROM:<a@outside.test>\r\nRCPT TO:<user@example.test>\r\n"
        b"RCPT TO:<other@example.test>\r\nQUIT\r\n"
    )
    conversation, replies = asyncio.run(talk(ctx, "127.0.0.21", b"EHLO client.test\r\n", commands))
    assert replies.count(b"554 5.7.1") == 2
    assert conversation.incidents == [("zen", 3)]


def test_a_clean_conversation_has_no_incident(ctx: Server) -> None:
    commands = b"MAIL FROM:<a@outside.test>\r\nRCPT TO:<user@example.test>\r\nQUIT\r\n"
    conversation, _ = asyncio.run(talk(ctx, "127.0.0.30", b"EHLO client.test\r\n", commands))
    assert conversation.incidents == []


def test_unknown_recipients_count_as_a_burst(ctx: Server) -> None:
    one = b"MAIL FROM:<a@outside.test>\r\nRCPT TO:<nobody@example.test>\r\n"
    conversation, _ = asyncio.run(talk(ctx, "127.0.0.30", b"EHLO c.test\r\n", one + b"QUIT\r\n"))
    assert conversation.incidents == []  # one unknown recipient is a typo
    more = one + b"RCPT TO:<nobody2@example.test>\r\nRCPT TO:<nobody3@example.test>\r\nQUIT\r\n"
    conversation, replies = asyncio.run(talk(ctx, "127.0.0.30", b"EHLO c.test\r\n", more))
    assert replies.count(b"550 5.1.1") == 3
    assert conversation.incidents == [("unknown-recipients", 4)]


def test_smuggling_and_too_many_errors(ctx: Server) -> None:
    envelope = b"MAIL FROM:<a@outside.test>\r\nRCPT TO:<user@example.test>\r\nDATA\r\n"
    smuggled = b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<b@outside.test>\r\n.\r\n"
    errors = b"".join(b"BOGUS\r\n" for _ in range(12))
    conversation, replies = asyncio.run(
        talk(ctx, "127.0.0.30", b"EHLO c.test\r\n", envelope, smuggled, errors)
    )
    assert b"550 5.6.0 Message refused: bare CR or LF (SMTP smuggling attempt)" in replies
    assert conversation.incidents == [("smuggling", 5), ("too-many-errors", 2)]


def test_a_pipelining_violation(ctx: Server) -> None:
    early = b"MAIL FROM:<a@outside.test>\r\nRCPT TO:<user@example.test>\r\nDATA\r\nx\r\n"
    conversation, replies = asyncio.run(talk(ctx, "127.0.0.30", b"EHLO c.test\r\n", early))
    assert b"554 5.5.0 Error: SMTP protocol synchronization" in replies
    assert conversation.incidents == [("pipelining", 2)]


def test_pregreet_is_an_incident(ctx: Server) -> None:
    conversation = Conversation(ctx, ctx.generation, "127.0.0.30", 4000)
    conversation.pregreet_spoke(b"EHLO early\r\n")
    conversation.auth_failed()
    assert conversation.incidents == [("pregreet", 3), ("auth-failure", 1)]
