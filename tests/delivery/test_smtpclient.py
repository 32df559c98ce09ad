"""The hand-written next-hop SMTP client: reply parsing, dot-stuffing, RFC 2920 pipelining.

Two kinds of next hop on loopback: aiosmtpd (with and without PIPELINING in its EHLO reply) and a
scripted server whose replies and timing each test chooses. The scripted server in pipelining
mode holds its replies until the end of a command group (DATA, QUIT, EHLO, the final dot), so a
client that waited for MAIL's reply before sending RCPT would hang and time out.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from palisade.delivery.nexthop import SmtpNextHop
from palisade.delivery.outcome import RecipientResult
from palisade.delivery.smtpclient import (
    Reply,
    SmtpDisconnected,
    SmtpProtocolError,
    _ReplyProtocol,
    data_payload,
    mailbox,
)
from tests.delivery.deliverykit import BODY, Handler, Hop, envelope, run

# -- the reply parser ---------------------------------------------------------------------------


def _feed(*chunks: bytes) -> _ReplyProtocol:
    proto = _ReplyProtocol()
    for chunk in chunks:
        proto.data_received(chunk)
    return proto


def test_single_and_multi_line_replies_in_any_chunking() -> None:
    wire = b"250-mx.test hello\r\n250-PIPELINING\r\n250 SIZE 1000\r\n354 go ahead\r\n221\r\n"
    expected = [Reply(250, "mx.test hello\nPIPELINING\nSIZE 1000"), Reply(354, "go ahead")]
    expected.append(Reply(221, ""))
    assert list(_feed(wire).replies) == expected
    assert list(_feed(*(wire[i : i + 1] for i in range(len(wire)))).replies) == expected
    assert list(_feed(wire[:7], wire[7:30], wire[30:]).replies) == expected


def test_bare_lf_line_ends_and_blanks_around_text_are_tolerated() -> None:
    assert list(_feed(b"250-a \n250  b\t\r\n").replies) == [Reply(250, "a\nb")]


_LONG_REPLY = b"".join(b"250-" + b"z" * 1000 + b"\r\n" for _ in range(70))


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"250-one\r\n550 two\r\n", "Inconsistent codes"),
        (b"hello there\r\n", "Malformed SMTP response line: hello there"),
        (b"25 short\r\n", "Malformed"),
        (b"250_x\r\n", "Malformed"),
        (b"650 six\r\n", "Malformed"),
        (b"250 " + b"x" * 9000 + b"\r\n", "Response too long"),
        (b"250 " + b"x" * 9000, "Response too long"),  # no line end at all
        (_LONG_REPLY, "Response too long"),  # endless continuation lines
    ],
)
def test_malformed_replies_are_protocol_errors(wire: bytes, message: str) -> None:
    proto = _feed(wire)
    assert isinstance(proto.error, SmtpProtocolError) and message in str(proto.error)
    assert not proto.replies
    proto.data_received(b"250 ok\r\n")  # nothing more is parsed on a broken connection
    assert not proto.replies


def test_eof_keeps_the_replies_already_complete() -> None:
    proto = _feed(b"421 4.3.2 shutting down\r\n")
    proto.eof_received()
    assert list(proto.replies) == [Reply(421, "4.3.2 shutting down")]
    assert isinstance(proto.error, SmtpDisconnected)


# -- the DATA payload and addresses -------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "sent"),
    [
        (b"a\r\n.b\r\n..c\r\n.\r\n", b"a\r\n..b\r\n...c\r\n..\r\n"),
        (b".first\r\nx", b"..first\r\nx\r\n"),
        (b"", b"\r\n"),
        (b"bare\nlf\rcr\r\n.dot\n", b"bare\r\nlf\r\ncr\r\n..dot\r\n"),
        (b"x\r\n\r\n.\r\n.\r\nend\r\n", b"x\r\n\r\n..\r\n..\r\nend\r\n"),
    ],
)
def test_data_payload_is_dot_stuffed_with_crlf_line_ends(body: bytes, sent: bytes) -> None:
    assert data_payload(body) == sent


@pytest.mark.parametrize(
    "address", ["a\r\nRCPT TO:<x@y>", "a b@x.test", "a>@x.test", "a@x.test> SIZE=1", "a\x00@x"]
)
def test_addresses_that_could_inject_are_refused(address: str) -> None:
    with pytest.raises(ValueError):
        mailbox(address, "ascii")


def test_ordinary_addresses() -> None:
    assert mailbox("", "ascii") == b"<>"
    assert mailbox('"a b"@x.test', "ascii") == b'<"a b"@x.test>'
    assert mailbox("ü@x.test", "utf-8") == "<ü@x.test>".encode()


# -- a scripted next hop ------------------------------------------------------------------------


@dataclass
class Scripted:
    """A next hop speaking from a script. ``replies`` maps a command (its first word, or the
    whole line for RCPT) to the reply bytes; ``pipelining`` holds replies until a group ends."""

    pipelining: bool = True
    ehlo: bytes = b"250-fake.test\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250 8BITMIME\r\n"
    greeting: bytes = b"220 fake.test ESMTP\r\n"
    replies: dict[bytes, bytes] = field(default_factory=dict)
    hang_on: bytes | None = None  # after this command, send its reply's first line only, stall
    close_on: bytes | None = None  # after this command, close without replying
    hang_after_data: bool = False  # no reply to the final dot
    refuse_reuse: bool = False  # a connection's second MAIL gets 421 and the connection closes
    commands: list[bytes] = field(default_factory=list)
    data: list[bytes] = field(default_factory=list)  # the raw (stuffed) message data received
    connections: int = 0
    server: asyncio.Server | None = None
    port: int = 0

    async def start(self) -> Scripted:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1)

    def _reply(self, line: bytes) -> bytes:
        word = line.split(b" ", 1)[0].split(b":", 1)[0].upper().strip()
        key = line.strip() if word == b"RCPT" else word
        default = {
            b"EHLO": self.ehlo,
            b"DATA": b"354 End data with <CR><LF>.<CR><LF>\r\n",
            b"QUIT": b"221 Bye\r\n",
        }.get(word, b"250 2.0.0 Ok\r\n")
        return self.replies.get(key, self.replies.get(word, default))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        held: list[bytes] = []
        mails = 0
        try:
            writer.write(self.greeting)
            while True:
                line = await reader.readline()
                if not line:
                    return
                self.commands.append(line)
                word = line.split(b" ", 1)[0].split(b":", 1)[0].upper().strip()
                if self.close_on is not None and word == self.close_on:
                    writer.close()
                    return
                reply = self._reply(line)
                mails += word == b"MAIL"
                if self.refuse_reuse and mails == 2:
                    writer.write(b"421 4.4.2 idle too long\r\n")
                    writer.close()
                    return
                if self.hang_on is not None and word == self.hang_on:
                    writer.write(b"".join(held) + reply.split(b"\n", 1)[0] + b"\n")
                    await asyncio.sleep(30)
                    return
                held.append(reply)
                group_ends = word in (b"DATA", b"QUIT", b"EHLO", b"STARTTLS", b"NOOP")
                if not self.pipelining or group_ends:
                    writer.write(b"".join(held))
                    held.clear()
                if word == b"DATA" and reply.startswith(b"354"):
                    raw = b""
                    while not raw.endswith(b"\r\n.\r\n") and raw != b".\r\n":
                        chunk = await reader.readline()
                        if not chunk:
                            return
                        raw += chunk
                    self.data.append(raw)
                    self.commands.append(b"<data>\r\n")
                    if self.hang_after_data:
                        await asyncio.sleep(30)
                        return
                    writer.write(self.replies.get(b".", b"250 2.0.0 Ok: queued as S1\r\n"))
                if word == b"QUIT":
                    writer.close()
                    return
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            writer.close()

    def verbs(self) -> list[str]:
        return [c.split(b" ", 1)[0].split(b":", 1)[0].decode().strip() for c in self.commands]


def _hop(port: int, **kwargs: Any) -> SmtpNextHop:
    kwargs.setdefault("command_timeout", 5)
    return SmtpNextHop("127.0.0.1", port, helo_name="mx.example.test", connect_timeout=5, **kwargs)


def _with_scripted(script: Scripted, go: Callable[[Scripted], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        await script.start()
        try:
            return await go(script)
        finally:
            await script.stop()

    return run(main())


def _deliver(
    script: Scripted, rcpts: tuple[str, ...], body: bytes = BODY, **kwargs: Any
) -> list[RecipientResult]:
    async def go(s: Scripted) -> list[RecipientResult]:
        hop = _hop(s.port, **kwargs)
        try:
            return await hop.deliver(envelope(recipients=rcpts), rcpts, body)
        finally:
            hop.close_idle()

    result: list[RecipientResult] = _with_scripted(script, go)
    return result


def test_pipelined_group_with_one_recipient_refused() -> None:
    script = Scripted(replies={b"RCPT TO:<bad@corp.test>": b"550 5.1.1 <bad@corp.test>: no\r\n"})
    rcpts = ("a@corp.test", "bad@corp.test", "c@corp.test")
    results = _deliver(script, rcpts, body=b"Subject: x\r\n\r\n.dot\r\nend\r\n")
    assert [r.outcome for r in results] == ["delivered", "failed", "delivered"]
    assert results[0].reply == "250 2.0.0 Ok: queued as S1"
    assert results[0].host == f"H=127.0.0.1 [127.0.0.1]:{script.port}"
    assert results[1].detail == (
        "SMTP error from remote mail server after RCPT TO:<bad@corp.test>: "
        "550 5.1.1 <bad@corp.test>: no"
    )
    assert results[1].status == "5.1.1" and results[1].errno == -44
    assert script.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "RCPT", "DATA", "<data>", "QUIT"]
    assert script.commands[1] == b"MAIL FROM:<alice@example.test> SIZE=25\r\n"
    assert script.data == [b"Subject: x\r\n\r\n..dot\r\nend\r\n.\r\n"]


def test_pipelined_all_recipients_refused_and_data_refused_sends_no_body() -> None:
    script = Scripted(
        replies={b"RCPT": b"550 5.1.1 no such user\r\n", b"DATA": b"554 5.5.1 no valid rcpts\r\n"}
    )
    results = _deliver(script, ("a@corp.test", "b@corp.test"))
    assert [r.outcome for r in results] == ["failed", "failed"]
    assert all("after RCPT TO:<" in r.detail and "550 5.1.1" in r.detail for r in results)
    assert script.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]
    assert script.data == []


def test_pipelined_all_recipients_refused_but_data_accepted_sends_a_lone_dot() -> None:
    script = Scripted(
        replies={b"RCPT": b"450 4.2.1 mailbox busy\r\n", b".": b"554 5.5.1 no recipients\r\n"}
    )
    results = _deliver(script, ("a@corp.test",))
    assert [r.outcome for r in results] == ["deferred"]
    assert results[0].status == "4.2.1"
    assert script.data == [b".\r\n"]  # RFC 2920, 3.1: a single dot, no message
    assert script.verbs()[-1] == "QUIT"


def test_data_not_answered_354_is_an_error_even_as_2xx() -> None:
    script = Scripted(pipelining=False, ehlo=b"250 fake.test\r\n")
    script.replies[b"DATA"] = b"250 2.0.0 whatever\r\n"
    (result,) = _deliver(script, ("a@corp.test",))
    assert result.outcome == "deferred" and script.data == []
    assert result.detail == (
        "SMTP error from remote mail server after end of data: 250 2.0.0 whatever"
    )


def test_pipelined_mail_refused() -> None:
    script = Scripted(replies={b"MAIL": b"553 5.7.1 sender refused\r\n"})
    results = _deliver(script, ("a@corp.test", "b@corp.test"))
    assert [r.outcome for r in results] == ["failed", "failed"]
    assert results[0].detail == (
        "SMTP error from remote mail server after MAIL FROM:<alice@example.test>: "
        "553 5.7.1 sender refused"
    )
    assert script.data == []


def test_without_pipelining_one_command_per_round_trip() -> None:
    script = Scripted(
        pipelining=False,
        ehlo=b"250-fake.test\r\n250 SIZE 100000\r\n",
        replies={b"RCPT TO:<bad@corp.test>": b"550 5.1.1 no\r\n"},
    )
    results = _deliver(script, ("a@corp.test", "bad@corp.test"))
    assert [r.outcome for r in results] == ["delivered", "failed"]
    assert script.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "<data>", "QUIT"]


def test_without_pipelining_a_refused_mail_ends_the_transaction() -> None:
    script = Scripted(pipelining=False, ehlo=b"250 fake.test\r\n")
    script.replies[b"MAIL"] = b"451 4.3.0 try again\r\n"
    results = _deliver(script, ("a@corp.test",))
    assert results[0].outcome == "deferred" and results[0].errno == -44
    assert script.verbs() == ["EHLO", "MAIL"]


def test_multi_line_replies_are_joined_into_one_line() -> None:
    script = Scripted(
        replies={
            b"RCPT TO:<b@corp.test>": b"550-5.1.1 first line\r\n550 5.1.1 second line\r\n",
            b".": b"250-2.0.0 queued\r\n250 2.0.0 as ABC\r\n",
        }
    )
    results = _deliver(script, ("a@corp.test", "b@corp.test"))
    assert results[0].reply == "250 2.0.0 queued 2.0.0 as ABC"
    assert results[1].diagnostic == "smtp; 550 5.1.1 first line 5.1.1 second line"


def test_a_reply_that_never_ends_is_a_timeout_deferral() -> None:
    script = Scripted(hang_on=b"DATA", replies={b"DATA": b"354-go\r\n354 ahead\r\n"})
    results = _deliver(script, ("a@corp.test",), command_timeout=0.3)
    assert results[0].outcome == "deferred"
    assert results[0].detail == "Timed out waiting for server response"
    assert results[0].errno == -1 and script.data == []


def test_a_server_that_hangs_mid_reply_without_pipelining() -> None:
    script = Scripted(pipelining=False, ehlo=b"250 fake.test\r\n", hang_on=b"MAIL")
    script.replies[b"MAIL"] = b"250-still\r\n250 thinking\r\n"
    results = _deliver(script, ("a@corp.test",), command_timeout=0.3)
    assert results[0].detail == "Timed out waiting for server response"
    assert script.verbs() == ["EHLO", "MAIL"]


def test_the_final_reply_waits_data_timeout() -> None:
    script = Scripted(hang_after_data=True)
    loop_time = []

    async def go(s: Scripted) -> list[RecipientResult]:
        hop = _hop(s.port, command_timeout=0.2, data_timeout=0.8)
        start = asyncio.get_running_loop().time()
        try:
            return await hop.deliver(envelope(), ["a@corp.test"], BODY)
        finally:
            loop_time.append(asyncio.get_running_loop().time() - start)
            hop.close_idle()

    results = _with_scripted(script, go)
    assert results[0].outcome == "deferred"
    assert results[0].detail == "Timed out waiting for server response"
    assert 0.7 < loop_time[0] < 3 and len(script.data) == 1


def test_a_server_closing_mid_transaction_defers() -> None:
    script = Scripted(close_on=b"DATA", pipelining=False, ehlo=b"250 fake.test\r\n")
    results = _deliver(script, ("a@corp.test",))
    assert results[0].outcome == "deferred"
    assert results[0].detail in ("Unexpected EOF received", "Connection lost")


def test_421_at_rcpt_defers_every_open_recipient() -> None:
    script = Scripted(
        replies={
            b"RCPT TO:<a@corp.test>": b"550 5.1.1 no\r\n",
            b"RCPT TO:<b@corp.test>": b"421 4.3.2 shutting down\r\n",
        }
    )
    results = _deliver(script, ("a@corp.test", "b@corp.test", "c@corp.test"))
    assert [r.outcome for r in results] == ["failed", "deferred", "deferred"]
    assert results[2].detail == (
        "SMTP error from remote mail server after RCPT TO:<b@corp.test>: 421 4.3.2 shutting down"
    )
    assert "QUIT" not in script.verbs()


def test_421_greeting_and_refused_ehlo() -> None:
    results = _deliver(Scripted(greeting=b"421 4.3.2 busy\r\n"), ("a@corp.test",))
    assert results[0].outcome == "deferred"
    assert results[0].detail == (
        "SMTP error from remote mail server after initial connection: 421 4.3.2 busy"
    )
    assert results[0].host == "H=127.0.0.1"
    results = _deliver(Scripted(ehlo=b"554 5.7.1 go away\r\n"), ("a@corp.test",))
    assert results[0].outcome == "failed"
    assert results[0].detail.endswith("after EHLO: 554 5.7.1 go away")


def test_a_malformed_reply_defers() -> None:
    script = Scripted(replies={b"MAIL": b"hello? 250\r\n"})
    results = _deliver(script, ("a@corp.test",))
    assert results[0].outcome == "deferred" and results[0].errno == -1
    assert results[0].detail.startswith("Malformed SMTP response line: hello?")


def test_8bitmime_and_smtputf8_options() -> None:
    script = Scripted(ehlo=b"250-fake.test\r\n250-8BITMIME\r\n250-PIPELINING\r\n250 SMTPUTF8\r\n")

    async def go(s: Scripted) -> list[RecipientResult]:
        hop = _hop(s.port)
        env = envelope(sender="andré@example.test", recipients=("zoë@corp.test",))
        try:
            return await hop.deliver(env, ["zoë@corp.test"], "Subject: é\r\n\r\nx\r\n".encode())
        finally:
            hop.close_idle()

    results = _with_scripted(script, go)
    assert results[0].outcome == "delivered"
    assert (
        script.commands[1] == "MAIL FROM:<andré@example.test> BODY=8BITMIME SMTPUTF8\r\n".encode()
    )
    assert script.commands[2] == "RCPT TO:<zoë@corp.test>\r\n".encode()


def test_pipelined_connection_is_reused() -> None:
    script = Scripted()

    async def go(s: Scripted) -> list[str]:
        hop = _hop(s.port)
        outcomes: list[str] = []
        for n in range(3):
            rcpt = f"r{n}@corp.test"
            outcomes += [r.outcome for r in await hop.deliver(envelope(), [rcpt], BODY)]
        hop.close_idle()
        return outcomes

    assert _with_scripted(script, go) == ["delivered"] * 3
    assert script.connections == 1
    assert script.verbs().count("EHLO") == 1 and len(script.data) == 3


def test_a_cached_connection_answering_421_is_replaced() -> None:
    script = Scripted(refuse_reuse=True)

    async def go(s: Scripted) -> list[RecipientResult]:
        hop = _hop(s.port)
        results = []
        for n in range(2):
            results += await hop.deliver(envelope(), [f"r{n}@corp.test"], BODY)
        hop.close_idle()
        return results

    results = _with_scripted(script, go)
    assert [r.outcome for r in results] == ["delivered", "delivered"]
    assert script.connections == 2 and len(script.data) == 2


# -- aiosmtpd, with PIPELINING in its EHLO reply ------------------------------------------------


class PipeliningHandler(Handler):
    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]


@pytest.fixture
def pipelining_hop() -> Iterator[Hop]:
    h = Hop(handler=PipeliningHandler())
    yield h
    h.stop()


@pytest.mark.parametrize("pipelining", [True, False])
def test_aiosmtpd_round_trip_with_dot_stuffing(
    pipelining: bool, pipelining_hop: Hop, hop: Hop
) -> None:
    h = pipelining_hop if pipelining else hop
    h.handler.rcpt_reply["bad@corp.test"] = "550 5.1.1 no such user"
    h.start()
    body = b"Subject: dots\r\n\r\n.\r\n..two\r\n.one\r\nlast line without CRLF"
    rcpts = ["a@corp.test", "bad@corp.test", "b@corp.test"]

    async def go() -> list[RecipientResult]:
        nexthop = _hop(h.port)
        try:
            return await nexthop.deliver(envelope(recipients=tuple(rcpts)), rcpts, body)
        finally:
            nexthop.close_idle()

    results = run(go())
    assert [r.outcome for r in results] == ["delivered", "failed", "delivered"]
    ((_sender, got_rcpts, content),) = h.handler.messages
    assert got_rcpts == ["a@corp.test", "b@corp.test"]
    assert content == body + b"\r\n"  # unstuffed by the server: exactly what was queued


def test_aiosmtpd_all_refused_with_pipelining(pipelining_hop: Hop) -> None:
    pipelining_hop.handler.rcpt_reply["a@corp.test"] = "550 5.1.1 no"
    pipelining_hop.start()

    async def go() -> list[RecipientResult]:
        nexthop = _hop(pipelining_hop.port)
        try:
            return await nexthop.deliver(envelope(), ["a@corp.test"], BODY)
        finally:
            nexthop.close_idle()

    (result,) = run(go())
    assert result.outcome == "failed" and result.status == "5.1.1"
    assert pipelining_hop.handler.messages == []


@pytest.fixture
def hop() -> Iterator[Hop]:
    h = Hop()
    yield h
    h.stop()


def test_starttls_then_pipelining(test_ca: Any) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    test_ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    test_ca.configure_trust(client_ctx)
    h = Hop(handler=PipeliningHandler(), tls_context=server_ctx).start()
    try:

        async def go() -> list[RecipientResult]:
            nexthop = _hop(h.port, require_tls=True, tls_context=client_ctx)
            rcpts = ["a@corp.test", "b@corp.test"]
            try:
                return await nexthop.deliver(envelope(recipients=tuple(rcpts)), rcpts, BODY)
            finally:
                nexthop.close_idle()

        results = run(go())
    finally:
        h.stop()
    assert [r.outcome for r in results] == ["delivered", "delivered"]
    assert re.fullmatch(
        rf"H=127\.0\.0\.1 \[127\.0\.0\.1\]:{h.port} X=TLS1\.[23]:[A-Z0-9_-]+:\d+", results[0].host
    )
    assert h.handler.tls_seen == [True] and h.handler.messages[0][2] == BODY
