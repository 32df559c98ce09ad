"""The spool on a real file system: round trip, format, state files, recovery of torn files."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from palisade.obs.log import MemoryEventLog
from palisade.ports import Route
from palisade.spool import (
    CorruptMessage,
    DeliveryState,
    Envelope,
    Spool,
    UnknownMessage,
)
from palisade.spool.format import MAGIC, MAGIC_V2, MAGIC_V3, TRAILER_LEN
from palisade.spool.message import SMALL_FILE
from tests.spool.spoolkit import make_envelope


async def queue(spool: Spool, envelope: Envelope, *chunks: bytes) -> None:
    writer = spool.open_message(envelope)
    for chunk in chunks:
        writer.write(chunk)
    await writer.commit()


def test_envelope_json_round_trip() -> None:
    env = make_envelope(recipients=("a@x.test", "b@x.test"))
    env2 = Envelope.from_json(json.loads(env.dumps()))
    assert env2 == env
    assert Envelope.from_json(env.to_json()).recipients == ("a@x.test", "b@x.test")
    with pytest.raises(ValueError):
        Envelope.from_json({**env.to_json(), "client_port": "25"})
    with pytest.raises(ValueError):
        Envelope.from_json({**env.to_json(), "queue_id": "../../etc/passwd"})


@pytest.mark.parametrize("fsync", [True, False])
def test_round_trip(tmp_path: Path, fsync: bool) -> None:
    spool = Spool(tmp_path, fsync=fsync)
    env = make_envelope(sender="", recipients=("a@x.test", "b@x.test"))
    body = b"Subject: hi\r\n\r\n" + bytes(range(256)) * 1000
    asyncio.run(queue(spool, env, body[:1000], body[1000:]))
    assert os.listdir(tmp_path / "tmp") == []
    env2, state = spool.load(env.queue_id)
    assert env2 == env and env2.sender == ""
    assert state.pending() == ["a@x.test", "b@x.test"] and state.attempts == 0
    assert b"".join(spool.iter_body(env.queue_id, chunk_size=4096)) == body
    assert spool.read_body(env.queue_id, limit=13) == b"Subject: hi\r\n"
    f, length = spool.open_body(env.queue_id)
    with f:
        assert length == len(body) and f.read(length) == body
    (entry,) = spool.list()
    assert entry.queue_id == env.queue_id and entry.size == len(body) and entry.age >= 0
    raw = (tmp_path / "queue" / env.queue_id).read_bytes()
    assert raw.startswith(MAGIC_V3) and raw.endswith(b"\n") and b"\nEND " in raw[-TRAILER_LEN:]
    spool.close()


def test_state_is_replaced_atomically_and_removed_with_the_message(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    env = make_envelope(recipients=("a@x.test", "b@x.test"))
    asyncio.run(queue(spool, env, b"x"))
    _, state = spool.load(env.queue_id)
    state.recipients["a@x.test"].status = "delivered"
    state.attempts, state.next_attempt = 1, 1234.5
    spool.save_state(env.queue_id, state)
    assert sorted(os.listdir(tmp_path / "state")) == [f"{env.queue_id}.json"]
    _, again = spool.load(env.queue_id)
    assert again == state and again.pending() == ["b@x.test"]
    assert spool.remove(env.queue_id) is True
    assert os.listdir(tmp_path / "queue") == [] and os.listdir(tmp_path / "state") == []
    assert spool.remove(env.queue_id) is False
    with pytest.raises(UnknownMessage):
        spool.load(env.queue_id)
    with pytest.raises(UnknownMessage):  # no state file for a message that is gone
        spool.save_state(env.queue_id, state)


@pytest.mark.parametrize("bad", ["../../etc/passwd", "", "x" * 17, "abc/def-ghijkl-mn", "\x00"])
def test_malformed_ids_never_touch_the_disk(tmp_path: Path, bad: str) -> None:
    spool = Spool(tmp_path, fsync=False)
    for call in (spool.load, spool.remove, spool.open_body, spool.exists):
        with pytest.raises(UnknownMessage):
            call(bad)


def test_abort_removes_the_tmp_file_and_is_idempotent(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    writer = spool.open_message(make_envelope())
    writer.write(b"partial")
    assert writer.size == 7 and len(os.listdir(tmp_path / "tmp")) == 1
    writer.abort()
    writer.abort()
    assert os.listdir(tmp_path / "tmp") == [] and os.listdir(tmp_path / "queue") == []


def test_failed_commit_leaves_nothing_queued_and_abort_is_safe(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=True)
    writer = spool.open_message(make_envelope())
    writer.write(b"data")
    os.rmdir(tmp_path / "queue")  # the rename target is gone: commit must fail, not pretend
    with pytest.raises(OSError):
        asyncio.run(writer.commit())
    writer.abort()
    assert os.listdir(tmp_path / "tmp") == []
    spool.close()


def record(env: Envelope, body: bytes) -> bytes:
    """A complete queue file built by hand, to be damaged below."""
    digest = hashlib.sha256(body).hexdigest().encode()
    trailer = b"\nEND %020d sha256=%s\n" % (len(body), digest)
    return MAGIC + env.dumps().encode() + b"\n" + body + trailer


def test_message_id_learnt_after_the_envelope_is_kept_in_the_late_record(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    small, large = (dataclasses.replace(make_envelope(), message_id=None) for _ in range(2))
    body = b"Message-ID: <late@x.test>\r\n\r\nbody\r\n"
    for env, size in ((small, 1), (large, SMALL_FILE // 4)):
        writer = spool.open_message(env)
        writer.write(body * size)
        writer.prepend(b"X-Added: 1\r\n")
        writer.message_id = '<late@x.test> "\u00e9\\'
        asyncio.run(writer.commit())
    for env, size in ((small, 1), (large, SMALL_FILE // 4)):
        loaded, _ = spool.load(env.queue_id)
        assert loaded == dataclasses.replace(env, message_id='<late@x.test> "\u00e9\\')
        delivered_env, _, message = spool.load_for_delivery(env.queue_id)
        assert delivered_env == loaded
        assert message == (b"X-Added: 1\r\n" + body * size if size == 1 else None)
        assert spool.read_body(env.queue_id) == b"X-Added: 1\r\n" + body * size
    assert [e.envelope.message_id for e in spool.list()] == ['<late@x.test> "\u00e9\\'] * 2
    assert spool.recover(MemoryEventLog()) == sorted([small.queue_id, large.queue_id])
    # none found: the LATE record is empty and the first record's (here None) stands
    env = dataclasses.replace(make_envelope(), message_id=None)
    asyncio.run(queue(spool, env, b"no id\r\n"))
    assert spool.load(env.queue_id)[0].message_id is None
    assert (
        (tmp_path / "queue" / env.queue_id)
        .read_bytes()
        .endswith(
            b"no id\r\n\nLATE %020d\n\nADD %020d\n" % (0, 0)
            + b"\nEND %020d sha256=%s\n" % (7, hashlib.sha256(b"no id\r\n").hexdigest().encode())
        )
    )


def test_version_2_file_without_a_late_record_is_still_read(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    env = dataclasses.replace(make_envelope(), message_id=None)
    body, added = b"Subject: old\r\n\r\nbody\r\n", b"X-Added: 1\r\n"
    digest = hashlib.sha256(body + added).hexdigest().encode()
    raw = (
        MAGIC_V2 + env.dumps().encode() + b"\n" + body + added + b"\nADD %020d\n" % len(added)
    ) + b"\nEND %020d sha256=%s\n" % (len(body), digest)
    (tmp_path / "queue" / env.queue_id).write_bytes(raw)
    assert spool.recover(MemoryEventLog()) == [env.queue_id]
    assert spool.load(env.queue_id)[0] == env  # message_id unknown: None
    assert spool.read_body(env.queue_id) == added + body


def test_routes_decided_at_rcpt_are_stored_per_recipient_and_given_back(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    env = dataclasses.replace(
        make_envelope(recipients=("a@x.test", "b@y.test")), routes=(Route.LOCAL, Route.OUTBOUND)
    )
    asyncio.run(queue(spool, env, b"body\r\n"))
    assert spool.recover(MemoryEventLog()) == [env.queue_id]
    loaded, _ = spool.load(env.queue_id)
    assert loaded.routes == (Route.LOCAL, Route.OUTBOUND) and loaded == env
    assert loaded.route_of("b@y.test") is Route.OUTBOUND and loaded.route_of("c@z.test") is None
    assert spool.load_for_delivery(env.queue_id)[0] == env
    with pytest.raises(ValueError):  # one route per recipient, or none
        dataclasses.replace(env, routes=(Route.LOCAL,))


def test_a_file_written_before_routes_were_stored_reads_without_routes(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    env = make_envelope()
    old = {k: v for k, v in env.to_json().items() if k != "routes"}  # as 0.4.0 wrote it
    body = b"Subject: old\r\n\r\nbody\r\n"
    digest = hashlib.sha256(body).hexdigest().encode()
    raw = MAGIC_V3 + json.dumps(old).encode() + b"\n" + body + b"\nLATE %020d\n" % 0
    raw += b"\nADD %020d\n" % 0 + b"\nEND %020d sha256=%s\n" % (len(body), digest)
    (tmp_path / "queue" / env.queue_id).write_bytes(raw)
    assert spool.recover(MemoryEventLog()) == [env.queue_id]
    loaded, _ = spool.load(env.queue_id)
    assert loaded == env and loaded.routes == ()


@pytest.mark.parametrize("routes", [["local", "teleport"], ["local"], "local", [1, 2]], ids=str)
def test_bad_stored_routes_are_refused_at_recovery(tmp_path: Path, routes: Any) -> None:
    spool = Spool(tmp_path, fsync=False)
    env = make_envelope(recipients=("a@x.test", "b@y.test"))
    fields = {**env.to_json(), "routes": routes}
    body = b"body\r\n"
    digest = hashlib.sha256(body).hexdigest().encode()
    raw = MAGIC_V3 + json.dumps(fields).encode() + b"\n" + body + b"\nLATE %020d\n" % 0
    raw += b"\nADD %020d\n" % 0 + b"\nEND %020d sha256=%s\n" % (len(body), digest)
    (tmp_path / "queue" / env.queue_id).write_bytes(raw)
    with pytest.raises(CorruptMessage):
        spool.load(env.queue_id)
    assert spool.recover(MemoryEventLog()) == []
    assert os.listdir(tmp_path / "corrupt") == [env.queue_id]


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw.replace(b"\nLATE 000", b"\nLATE 100"),  # length past the file
        lambda raw: raw.replace(b"\nLATE ", b"\nLAME "),
        lambda raw: raw.replace(b'{"message_id"', b'{"queue_id"\x20\x20'),  # unknown late key
        lambda raw: raw.replace(b'"<m@x.test>"', b"123456789012"),  # not a string
    ],
)
def test_damaged_late_record_is_refused_at_recovery(tmp_path: Path, damage: Any) -> None:
    spool = Spool(tmp_path, fsync=False)
    env = make_envelope()
    writer = spool.open_message(env)
    writer.write(b"body\r\n")
    writer.message_id = "<m@x.test>"
    asyncio.run(writer.commit())
    path = tmp_path / "queue" / env.queue_id
    raw = path.read_bytes()
    damaged = damage(raw)
    assert damaged != raw and len(damaged) == len(raw)
    path.write_bytes(damaged)
    with pytest.raises(CorruptMessage):
        spool.load(env.queue_id)
    assert spool.recover(MemoryEventLog()) == []
    assert os.listdir(tmp_path / "corrupt") == [env.queue_id]


TORN: dict[str, Callable[[bytes, bytes], bytes]] = {  # damage(whole record, body)
    "empty": lambda whole, body: b"",
    "header cut": lambda whole, body: whole[:10],
    "header and part of the body": lambda whole, body: whole[: whole.index(b"\n") + 5],
    "no END record": lambda whole, body: whole[:-TRAILER_LEN],
    "half an END record": lambda whole, body: whole[:-20],
    "END record with a wrong length": lambda whole, body: whole.replace(
        b"END %020d" % len(body), b"END %020d" % 3
    ),
    "body changed": lambda whole, body: whole.replace(body, body[::-1]),
    "garbage first line": lambda whole, body: b"GARBAGE\n" + whole,
    "zeroed blocks": lambda whole, body: b"\x00" * len(whole),
    "trailing bytes": lambda whole, body: whole + b"x",
}


def test_recover_refuses_every_torn_file_and_keeps_good_ones(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    body = b"Subject: torn\r\n\r\nbody\r\n"
    good = make_envelope()
    asyncio.run(queue(spool, good, b"Subject: good\r\n\r\nok\r\n"))
    by_hand = make_envelope()  # the hand-built record itself is valid: the damage is what counts
    (tmp_path / "queue" / by_hand.queue_id).write_bytes(record(by_hand, body))
    torn_ids = []
    for damage in TORN.values():
        env = make_envelope()
        (tmp_path / "queue" / env.queue_id).write_bytes(damage(record(env, body), body))
        torn_ids.append(env.queue_id)
    (tmp_path / "tmp" / make_envelope().queue_id).write_bytes(b"never committed")
    (tmp_path / "state" / f"{make_envelope().queue_id}.json").write_text("{}")  # orphan
    (tmp_path / "state" / f"{good.queue_id}.tmp").write_text("half")
    log = MemoryEventLog()
    assert spool.recover(log) == sorted([good.queue_id, by_hand.queue_id])
    assert sorted(os.listdir(tmp_path / "corrupt")) == sorted(torn_ids)
    assert os.listdir(tmp_path / "tmp") == [] and os.listdir(tmp_path / "state") == []
    panics = [line for kind, line in log.lines if kind == "panic"]
    assert len(panics) == len(torn_ids)
    assert all("moved to corrupt/" in line for line in panics)
    assert b"".join(spool.iter_body(by_hand.queue_id)) == body


def test_recover_with_damaged_state_keeps_message(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    env = make_envelope()
    asyncio.run(queue(spool, env, b"x"))
    (tmp_path / "state" / f"{env.queue_id}.json").write_text('{"version": 1, "recipients": 3}')
    with pytest.raises(CorruptMessage):
        spool.load(env.queue_id)
    log = MemoryEventLog()
    assert spool.recover(log) == [env.queue_id]
    assert spool.load(env.queue_id)[1] == DeliveryState.fresh(env.recipients)
    assert any(kind == "panic" and "delivery state corrupt" in line for kind, line in log.lines)


def test_prepended_lines_are_delivered_before_the_body_and_checksummed(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    env = make_envelope()
    writer = spool.open_message(env)
    writer.write(b"Received: from x\r\nSubject: hi\r\n\r\nbody\r\n")
    seen = writer.received()
    with seen.open() as f:
        assert f.read() == b"Received: from x\r\nSubject: hi\r\n\r\nbody\r\n"
    assert seen.size == len(b"Received: from x\r\nSubject: hi\r\n\r\nbody\r\n")
    writer.prepend(b"Authentication-Results: mx; spf=pass\r\n")
    writer.prepend(b"X-Spam-Status: No\r\n")
    asyncio.run(writer.commit())
    expected = (
        b"Authentication-Results: mx; spf=pass\r\nX-Spam-Status: No\r\n"
        b"Received: from x\r\nSubject: hi\r\n\r\nbody\r\n"
    )
    assert b"".join(spool.iter_body(env.queue_id, chunk_size=7)) == expected
    assert spool.read_body(env.queue_id, limit=20) == expected[:20]
    assert [e.size for e in spool.list()] == [len(expected)]
    assert spool.recover(MemoryEventLog()) == [env.queue_id]
    # damage inside the added lines is caught by the checksum at recovery
    path = tmp_path / "queue" / env.queue_id
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b"spf=pass", b"spf=fail"))
    log = MemoryEventLog()
    assert spool.recover(log) == []
    assert any("checksum" in line for _, line in log.lines)


def test_load_for_delivery_reads_a_small_file_whole_and_leaves_a_large_one_on_disk(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path, fsync=False)
    small, large = make_envelope(), make_envelope()
    head = b"Subject: size\r\n\r\n"
    for env, body in ((small, head + b"x\r\n" * 10), (large, head + b"y" * 998 + b"\r\n")):
        writer = spool.open_message(env)
        writer.write(body)
        if env is large:
            for _ in range(SMALL_FILE // 1000 + 1):
                writer.write(b"y" * 998 + b"\r\n")
        writer.prepend(b"X-Added: 1\r\n")
        asyncio.run(writer.commit())
    envelope, state, message = spool.load_for_delivery(small.queue_id, fresh=True)
    assert envelope == small and state == DeliveryState.fresh(small.recipients)
    assert message == b"X-Added: 1\r\n" + head + b"x\r\n" * 10
    assert message == b"".join(spool.iter_body(small.queue_id))
    envelope, _state, message = spool.load_for_delivery(large.queue_id)
    assert envelope == large and message is None
    delivered = b"".join(spool.iter_body(large.queue_id))
    assert delivered.startswith(b"X-Added: 1\r\n" + head) and len(delivered) > SMALL_FILE
    assert spool.recover(MemoryEventLog()) == sorted([small.queue_id, large.queue_id])


def test_the_message_handle_reads_from_memory_or_from_the_one_open_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    head = b"Subject: handle\r\n\r\n"
    for lines in (3, SMALL_FILE // 1000 + 1):
        env = make_envelope()
        body = head + b"z" * 998 * lines
        writer = spool.open_message(env)
        writer.write(body)
        writer.prepend(b"X-Added: 1\r\n")
        asyncio.run(writer.commit())
        expected = b"X-Added: 1\r\n" + body
        envelope, state, message = spool.open_for_delivery(env.queue_id, fresh=True)
        with message:
            assert envelope == env and state == DeliveryState.fresh(env.recipients)
            assert (message.data is None) == (len(expected) > SMALL_FILE)
            # Gone from the queue: a reader of the handle never opens the file again.
            assert spool.remove(env.queue_id)
            for _ in range(2):  # every reader starts at the first byte
                assert b"".join(message.chunks(4096)) == expected
            assert message.read(30) == expected[:30] and message.read() == expected
            assert message.length == len(expected)
        if message.data is None:  # closed: the large message's descriptor is gone
            with pytest.raises(ValueError):
                list(message.chunks())
