"""Delivery against real SMTP servers on loopback and a real Maildir: routes, TLS, retries, DSNs."""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import email
import email.policy
import os
import re
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from palisade.delivery import MailboxRefused, mailbox_name
from palisade.ports import Route
from tests.delivery.deliverykit import BODY, Hop, envelope, queue, run, setup


@pytest.fixture
def hop() -> Iterator[Hop]:
    h = Hop()
    yield h
    h.stop()


@pytest.fixture
def tls_hop(test_ca: Any) -> Iterator[Hop]:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    test_ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    h = Hop(tls_context=server_ctx)
    yield h
    h.stop()


@pytest.fixture
def client_ctx(test_ca: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    test_ca.configure_trust(ctx)
    return ctx


def test_maildir_delivery(tmp_path: Path) -> None:
    s = setup(tmp_path)
    env = envelope(recipients=("Bob@EXAMPLE.test",))

    async def go() -> None:
        await queue(s.spool, env)
        assert await s.runner().run_once() == 1

    run(go())
    (msg,) = s.maildir("bob")
    assert msg.startswith(b"Return-Path: <alice@example.test>\nDelivered-To: Bob@EXAMPLE.test\n")
    assert msg.endswith(b"\nline one\n.leading dot\n") and b"\r" not in msg
    assert not list((tmp_path / "mail" / "bob" / "tmp").iterdir())
    assert (tmp_path / "mail" / "bob" / "cur").is_dir()
    name = next((tmp_path / "mail" / "bob" / "new").iterdir()).name
    assert re.fullmatch(r"\d+\.P[0-9A-Za-z-]{16}R[0-9a-f]{12}\..+", name)
    assert s.lines() == [
        f"{env.queue_id} => Bob@EXAMPLE.test R=local_maildir T=maildir",
        f"{env.queue_id} Completed",
    ]
    assert s.spool.list() == []


@pytest.mark.parametrize(
    "rcpt",
    [
        "../x@example.test",
        ".hidden@example.test",
        "a/b@example.test",
        "a\x00b@example.test",
        "a..b@example.test",
        "@example.test",
    ],
)
def test_unsafe_local_parts_are_refused(rcpt: str) -> None:
    with pytest.raises(MailboxRefused):
        mailbox_name(rcpt)


class OpenWatch:
    """Counts the opens of each file in a directory, as the kernel reports them (inotify).

    Closes are watched too: inotify merges an event into an identical one still unread, so
    open, close, open is three events where open, open would be one.
    """

    IN_CLOSE_NOWRITE = 0x10
    IN_OPEN = 0x20

    def __init__(self, directory: Path) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        mask = self.IN_OPEN | self.IN_CLOSE_NOWRITE
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(directory), mask)
        assert wd >= 0, os.strerror(ctypes.get_errno())

    def opens(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return counts
        offset = 0
        while offset < len(data):
            _wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
            name = data[offset + 16 : offset + 16 + length].rstrip(b"\0").decode()
            if mask & self.IN_OPEN:
                counts[name] = counts.get(name, 0) + 1
            offset += 16 + length
        return counts

    def close(self) -> None:
        os.close(self.fd)


@pytest.mark.parametrize("lines", [1, 400], ids=["small", "large"])
def test_an_attempt_reads_the_queue_file_once_for_maildir_copies_and_the_dsn(
    tmp_path: Path, lines: int
) -> None:
    # Two Maildir copies and a DSN (the third recipient's mailbox name is refused) used to
    # reopen the queue file once per recipient and once more for the DSN's headers.
    s = setup(tmp_path)
    body = BODY + (b"y" * 998 + b"\r\n") * lines
    rcpts = ("bob@example.test", "carol@example.test", ".bad@example.test")
    env = envelope(sender="alice@example.test", recipients=rcpts)
    counts: dict[str, int] = {}

    async def go() -> None:
        await queue(s.spool, env, body)
        watch = OpenWatch(tmp_path / "spool" / "queue")
        try:
            runner = s.runner()
            await runner.attempt(env.queue_id, fresh=True)
            counts.update(watch.opens())
            await runner.wait_idle()  # the bounce
        finally:
            watch.close()

    run(go())
    assert counts.get(env.queue_id) == 1
    for box in ("bob", "carol"):
        (copy,) = s.maildir(box)
        assert copy.endswith(body.replace(b"\r\n", b"\n"))
    (dsn,) = s.maildir("alice")
    assert "Subject: hello" in _parts(dsn)["text/rfc822-headers"]
    assert f"{env.queue_id} Completed" in s.lines()


def test_unsafe_mailbox_fails_permanently_with_a_dsn(tmp_path: Path) -> None:
    s = setup(tmp_path)
    env = envelope(sender="alice@example.test", recipients=("../etc@example.test",))

    async def go() -> None:
        await queue(s.spool, env)
        runner = s.runner()
        await runner.run_once()
        await runner.wait_idle()

    run(go())
    assert not (tmp_path / "etc").exists()
    (dsn,) = s.maildir("alice")
    assert b"Final-Recipient: rfc822; ../etc@example.test" in dsn
    assert any(line.startswith(f"{env.queue_id} ** ../etc@example.test") for line in s.lines())


def test_relay_in_cleartext(tmp_path: Path, hop: Hop) -> None:
    hop.start()
    s = setup(tmp_path, hop)
    env = envelope(recipients=("bob@corp.test", "carol@Corp.Test"))

    async def go() -> None:
        await queue(s.spool, env)
        await s.runner().run_once()

    run(go())
    ((sender, rcpts, content),) = hop.handler.messages
    assert sender == "alice@example.test" and rcpts == ["bob@corp.test", "carol@Corp.Test"]
    assert content.replace(b"\r\n", b"\n") == BODY.replace(b"\r\n", b"\n")
    assert hop.handler.tls_seen == [False]
    lines = s.lines()
    assert lines[0] == (
        f"{env.queue_id} => bob@corp.test R=relay T=smtp H=127.0.0.1 [127.0.0.1]:{hop.port}"
        ' C="250 2.0.0 Ok: queued as NEXT1"'
    )
    assert lines[-1] == f"{env.queue_id} Completed"


def test_relay_with_starttls(tmp_path: Path, tls_hop: Hop, client_ctx: ssl.SSLContext) -> None:
    tls_hop.start()
    s = setup(tmp_path, tls_hop, require_tls=True, tls_context=client_ctx)

    async def go() -> None:
        await queue(s.spool, envelope())
        await s.runner().run_once()

    run(go())
    assert len(tls_hop.handler.messages) == 1 and tls_hop.handler.tls_seen == [True]
    assert re.search(
        r"=> bob@corp.test R=relay T=smtp H=127.0.0.1 \[127.0.0.1\]:\d+ "
        r"X=TLS1\.[23]:[A-Z0-9_-]+:\d+ C=\"250 ",
        s.lines()[0],
    )


def test_require_tls_without_starttls_defers_and_sends_nothing(tmp_path: Path, hop: Hop) -> None:
    hop.start()
    s = setup(tmp_path, hop, require_tls=True)
    env = envelope()

    async def go() -> None:
        await queue(s.spool, env)
        await s.runner().run_once()

    run(go())
    assert hop.handler.messages == []
    assert s.lines() == [
        f"{env.queue_id} == bob@corp.test R=relay T=smtp defer (-1) H=127.0.0.1 [127.0.0.1]:"
        f"{hop.port}: TLS required but the next hop does not offer STARTTLS"
    ]
    assert s.spool.load(env.queue_id)[1].pending() == ["bob@corp.test"]


def test_require_tls_with_an_unverifiable_certificate_defers(tmp_path: Path, tls_hop: Hop) -> None:
    tls_hop.start()
    s = setup(tmp_path, tls_hop, require_tls=True)  # default context: the test CA is unknown

    async def go() -> None:
        await queue(s.spool, envelope())
        await s.runner().run_once()

    run(go())
    assert tls_hop.handler.messages == []
    (line,) = s.lines()
    assert " == bob@corp.test " in line and "TLS required but TLS negotiation failed" in line
    assert "CERTIFICATE_VERIFY_FAILED" in line


def test_opportunistic_tls_falls_back_to_cleartext(tmp_path: Path, tls_hop: Hop) -> None:
    tls_hop.start()
    s = setup(tmp_path, tls_hop)  # unverifiable certificate, TLS not required

    async def go() -> None:
        await queue(s.spool, envelope())
        await s.runner().run_once()

    run(go())
    assert len(tls_hop.handler.messages) == 1 and tls_hop.handler.tls_seen == [False]


def test_next_hop_down_then_up_is_delivered_once(tmp_path: Path, hop: Hop) -> None:
    s = setup(tmp_path, hop)
    env = envelope()
    t0 = time.time()

    async def go() -> None:
        await queue(s.spool, env)
        runner = s.runner(retry_initial=300, retry_factor=2, retry_max_interval=3600)
        assert await runner.run_once(now=t0) == 1
        state = s.spool.load(env.queue_id)[1]
        assert state.attempts == 1 and state.next_attempt == t0 + 300
        assert await runner.run_once(now=t0 + 100) == 0  # not due yet
        assert await runner.run_once(now=t0 + 301) == 1  # still down: backoff doubles
        assert s.spool.load(env.queue_id)[1].next_attempt == t0 + 301 + 600
        hop.start()
        assert await runner.run_once(now=t0 + 1000) == 1
        assert await runner.run_once(now=t0 + 99999) == 0

    run(go())
    assert len(hop.handler.messages) == 1
    lines = s.lines()
    assert re.fullmatch(
        rf"{env.queue_id} == bob@corp.test R=relay T=smtp defer \((111|-1)\) H=127.0.0.1: .+",
        lines[0],
    )
    assert lines[2].startswith(f"{env.queue_id} => bob@corp.test R=relay T=smtp")
    assert lines[3] == f"{env.queue_id} Completed"


def _parts(raw: bytes) -> dict[str, str]:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    return {p.get_content_type(): p.as_string() for p in msg.iter_parts()}


def test_5xx_from_next_hop_bounces_to_a_local_sender(tmp_path: Path, hop: Hop) -> None:
    hop.handler.rcpt_reply["bad@corp.test"] = "550 5.1.1 <bad@corp.test>: no such user"
    hop.start()
    s = setup(tmp_path, hop)
    env = envelope(sender="alice@example.test", recipients=("bad@corp.test", "bob@corp.test"))

    async def go() -> None:
        await queue(s.spool, env)
        runner = s.runner()
        await runner.run_once()
        await runner.wait_idle()

    run(go())
    assert [m[1] for m in hop.handler.messages] == [["bob@corp.test"]]
    (dsn,) = s.maildir("alice")
    assert dsn.startswith(b"Return-Path: <>\n")
    msg = email.message_from_bytes(dsn, policy=email.policy.default)
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.test>"
    assert msg["To"] == "alice@example.test" and msg["Auto-Submitted"] == "auto-replied"
    parts = _parts(dsn)
    status = parts["message/delivery-status"]
    assert "Final-Recipient: rfc822; bad@corp.test" in status and "Action: failed" in status
    assert "Status: 5.1.1" in status and "Diagnostic-Code: smtp; 550 5.1.1" in status
    assert "bob@corp.test" not in status
    assert "Subject: hello" in parts["text/rfc822-headers"]
    lines = s.lines()
    assert any(
        line.startswith(f"{env.queue_id} ** bad@corp.test R=relay T=smtp H=127.0.0.1 ")
        and line.endswith(
            "SMTP error from remote mail server after RCPT TO:<bad@corp.test>: "
            "550 5.1.1 <bad@corp.test>: no such user"
        )
        for line in lines
    )
    bounce = [line for line in lines if f"<= <> R={env.queue_id} U=MAILER-DAEMON" in line]
    assert len(bounce) == 1
    bounce_id = bounce[0].split()[0]
    assert f"{bounce_id} => alice@example.test R=local_maildir T=maildir" in lines
    assert f"{env.queue_id} Completed" in lines and f"{bounce_id} Completed" in lines
    assert s.spool.list() == []


def test_4xx_past_max_age_fails_with_a_dsn(tmp_path: Path, hop: Hop) -> None:
    hop.handler.data_reply = "451 4.3.0 try later"
    hop.start()
    s = setup(tmp_path, hop)
    env = envelope(received_at=time.time() - 3600)

    async def go() -> None:
        await queue(s.spool, env)
        runner = s.runner(max_age=7200)
        await runner.run_once()
        assert s.spool.load(env.queue_id)[1].pending() == ["bob@corp.test"]
        await runner.run_once(now=time.time() + 7200)
        await runner.wait_idle()

    run(go())
    lines = s.lines()
    assert "defer (-44)" in lines[0] and "451 4.3.0 try later" in lines[0]
    assert any(
        line.startswith(f"{env.queue_id} ** bob@corp.test") and "retry timeout exceeded" in line
        for line in lines
    )
    (dsn,) = s.maildir("alice")
    assert "Status: 4.4.7" in _parts(dsn)["message/delivery-status"]


def test_null_sender_never_gets_a_dsn(tmp_path: Path, hop: Hop) -> None:
    hop.handler.rcpt_reply["bob@corp.test"] = "550 5.1.1 no"
    hop.start()
    s = setup(tmp_path, hop)
    env = envelope(sender="")

    async def go() -> None:
        await queue(s.spool, env)
        runner = s.runner()
        await runner.run_once()
        await runner.wait_idle()

    run(go())
    lines = s.lines()
    assert not any("MAILER-DAEMON" in line for line in lines)
    assert f"{env.queue_id} no bounce message sent for 1 failed recipient(s): null sender" in lines
    assert lines[-1] == f"{env.queue_id} Completed" and s.spool.list() == []


def test_bounce_without_a_route_is_dropped(tmp_path: Path) -> None:
    s = setup(tmp_path)  # no next hop: a bounce to a remote sender cannot leave
    hop_less = envelope(sender="someone@remote.test", recipients=("nobody@elsewhere.test",))

    async def go() -> None:
        await queue(s.spool, hop_less)
        runner = s.runner()
        await runner.run_once()
        await runner.wait_idle()

    run(go())
    lines = s.lines()
    assert f"{hop_less.queue_id} ** nobody@elsewhere.test: Unrouteable address" in lines
    assert any(" ** someone@remote.test: bounce undeliverable: no route" in line for line in lines)
    assert any("no bounce message sent" in line for line in lines)  # a bounce is not bounced
    assert s.spool.list() == []


def test_delivery_follows_the_routes_stored_at_rcpt_not_its_own_domains(
    tmp_path: Path, hop: Hop
) -> None:
    # The router knows example.test as local and corp.test as relay domain; relay control decided
    # otherwise at RCPT (a domain added by a reload, a trusted client's outbound mail): the
    # stored route wins, whatever the domain.
    hop.start()
    s = setup(tmp_path, hop)
    env = dataclasses.replace(
        envelope(recipients=("amy@new.test", "carl@far.test", "dora@example.test")),
        routes=(Route.LOCAL, Route.OUTBOUND, Route.RELAY),
    )

    async def go() -> None:
        await queue(s.spool, env)
        assert await s.runner().run_once() == 1

    run(go())
    assert len(s.maildir("amy")) == 1 and s.maildir("dora") == []
    assert [m[1] for m in hop.handler.messages] == [["carl@far.test", "dora@example.test"]]
    lines = s.lines()
    assert f"{env.queue_id} => amy@new.test R=local_maildir T=maildir" in lines
    assert any(line.startswith(f"{env.queue_id} => carl@far.test R=relay T=smtp") for line in lines)
    assert f"{env.queue_id} Completed" in lines


def test_outbound_route_without_a_next_hop_is_unrouteable(tmp_path: Path) -> None:
    s = setup(tmp_path)
    env = dataclasses.replace(
        envelope(sender="", recipients=("carl@far.test",)), routes=(Route.OUTBOUND,)
    )

    async def go() -> None:
        await queue(s.spool, env)
        await s.runner().run_once()

    run(go())
    assert f"{env.queue_id} ** carl@far.test: Unrouteable address" in s.lines()


def test_a_bounce_is_queued_with_its_route(tmp_path: Path, hop: Hop) -> None:
    hop.handler.rcpt_reply["bad@corp.test"] = "550 5.1.1 <bad@corp.test>: no such user"
    hop.handler.rcpt_reply["someone@remote.test"] = "450 4.2.0 try later"  # the bounce waits
    hop.start()
    s = setup(tmp_path, hop)
    env = envelope(sender="someone@remote.test", recipients=("bad@corp.test",))

    async def go() -> None:
        await queue(s.spool, env)
        runner = s.runner()
        await runner.run_once()
        await runner.wait_idle()

    run(go())
    (bounce,) = s.spool.list()
    assert bounce.envelope.extra["bounce_of"] == env.queue_id
    assert bounce.envelope.recipients == ("someone@remote.test",)
    assert bounce.envelope.routes == (Route.OUTBOUND,)
    assert any(
        line.startswith(f"{bounce.queue_id} == someone@remote.test R=relay T=smtp")
        for line in s.lines()
    )


def test_restart_skips_recipients_already_done(tmp_path: Path, hop: Hop) -> None:
    s = setup(tmp_path, hop)
    env = envelope(recipients=("bob@example.test", "carol@corp.test"))
    t0 = time.time()

    async def first() -> None:
        await queue(s.spool, env)
        await s.runner().run_once(now=t0)  # local delivered, next hop down

    async def second() -> None:
        runner = s.runner()
        assert await runner.start(background=False) == [env.queue_id]
        await runner.run_once(now=t0 + 10_000)

    run(first())
    hop.start()
    run(second())
    assert len(s.maildir("bob")) == 1
    assert [m[1] for m in hop.handler.messages] == [["carol@corp.test"]]
    assert s.spool.list() == []


def test_a_second_submit_of_a_deferred_message_reads_its_state(tmp_path: Path, hop: Hop) -> None:
    """submit() skips the state file only for a message never attempted: one already deferred
    (a late or repeated notification) must not be delivered again to recipients done before."""
    hop.handler.rcpt_reply["carol@corp.test"] = "451 4.3.0 <carol@corp.test>: try again later"
    hop.start()
    s = setup(tmp_path, hop)
    env = envelope(recipients=("bob@corp.test", "carol@corp.test"))

    async def go() -> None:
        runner = s.runner()
        await queue(s.spool, env)
        runner.submit(env.queue_id)  # bob relayed, carol deferred: state saved
        await runner.wait_idle()
        assert s.spool.load(env.queue_id)[1].pending() == ["carol@corp.test"]
        del hop.handler.rcpt_reply["carol@corp.test"]
        runner.submit(env.queue_id)
        await runner.wait_idle()

    run(go())
    assert [m[1] for m in hop.handler.messages] == [["bob@corp.test"], ["carol@corp.test"]]
    assert s.spool.list() == []
    assert os.listdir(tmp_path / "spool" / "state") == []
    # The finished message's file waits in free/ for the next message (palisade.spool.recycle).
    assert os.listdir(tmp_path / "spool" / "free") == [env.queue_id]


def test_submit_and_background_loop(tmp_path: Path, hop: Hop) -> None:
    hop.start()
    s = setup(tmp_path, hop)

    async def go() -> None:
        completed = asyncio.Event()
        real_main = s.log.main

        def main(line: str, **fields: object) -> None:  # a wake-up on the log line, no sleeps
            real_main(line, **fields)
            if line.endswith(" Completed") and len(hop.handler.messages) == 6:
                completed.set()

        s.log.main = main  # type: ignore[method-assign]  # wraps the real method, see above
        runner = s.runner(scan_interval=0.2)
        await runner.start()
        ids = [await queue(s.spool, envelope()) for _ in range(5)]
        for qid in ids:
            runner.submit(qid)
        await runner.wait_idle()
        assert len(hop.handler.messages) == 5
        await queue(s.spool, envelope())  # not submitted: the loop's scan finds it
        await asyncio.wait_for(completed.wait(), timeout=10)
        await runner.stop()

    run(go())


def test_maildir_redelivery_after_crash_window_writes_no_second_copy(tmp_path: Path) -> None:
    """The crash window: delivered into new/, killed before the spool recorded it. A second
    delivery of the same (queue id, recipient) must find the first copy and not write another."""
    from palisade.delivery import MaildirDelivery
    from palisade.spool import Envelope

    env = Envelope(
        queue_id="1xVYZp-0006q7-00",
        sender="a@outside.test",
        recipients=("bob@example.test",),
        received_at=1_795_457_741.0,
        client_ip="127.0.0.1",
        client_port=1,
        helo="h",
        client_name=None,
        protocol="esmtp",
        tls=None,
    )
    maildir = MaildirDelivery(tmp_path)
    first = maildir.deliver(env, "bob@example.test", [b"Subject: x\r\n\r\nbody\r\n"])
    (tmp_path / "bob" / "tmp" / first.name).write_bytes(b"torn")  # a torn retry leftover
    second = maildir.deliver(env, "bob@example.test", [b"Subject: x\r\n\r\nbody\r\n"])
    assert second == first
    assert len(list((tmp_path / "bob" / "new").iterdir())) == 1
    other = maildir.deliver(env, "carol@example.test", [b"Subject: x\r\n\r\nbody\r\n"])
    assert other.parent == tmp_path / "carol" / "new"


def test_next_hop_connection_is_reused_and_a_stale_one_is_replaced(
    tmp_path: Path, hop: Hop
) -> None:
    hop.start()
    s = setup(tmp_path, hop)

    async def go() -> None:
        runner = s.runner()
        for n in range(3):  # one after another: the second and third reuse the connection
            await queue(s.spool, envelope(recipients=(f"r{n}@corp.test",)))
            await runner.run_once()
        hop.stop()  # the cached connection dies with the server...
        hop.start()
        await queue(s.spool, envelope(recipients=("after@corp.test",)))
        await runner.run_once()  # ...and the message still goes, on a fresh connection
        await runner.stop()

    run(go())
    assert [m[1] for m in hop.handler.messages] == [
        ["r0@corp.test"],
        ["r1@corp.test"],
        ["r2@corp.test"],
        ["after@corp.test"],
    ]
    assert len(set(hop.handler.peers[:3])) == 1
    assert hop.handler.peers[3] != hop.handler.peers[0]
    assert not [line for line in s.lines() if " == " in line]  # nothing was deferred
