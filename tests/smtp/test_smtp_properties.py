"""Property tests (hypothesis): whatever the peer sends, however it is split, and however the
application answers, the core yields events or sentinels, never an exception, and its buffer
stays bounded by the limits."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from palisade.smtp import NEED_DATA, PAUSED, Reply, SmtpConnection, State, events
from tests.smtp.smtp_harness import (
    EHLO,
    ENVELOPE,
    Answer,
    Driver,
    default_answer,
    make,
    state_of,
)

MAX_LINE = 64

FRAGMENTS = st.sampled_from(
    [
        b"EHLO x\r\n", b"HELO x\r\n", b"MAIL FROM:<a@b>\r\n", b"MAIL FROM:<>\r\n",
        b"RCPT TO:<c@d>\r\n", b"RCPT TO:<postmaster>\r\n", b"DATA\r\n", b"BDAT 10\r\n",
        b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n", b"STARTTLS\r\n", b"AUTH PLAIN\r\n",
        b"VRFY x\r\n", b".\r\n", b"..\r\n", b"\r\n.\r\n", b"\r\n", b"\n", b"\r", b".", b"\x00",
        b"\n.\r\n", b"\r.\r\n", b"\n.\n", b"\r\n.\r", b"\r\n.\n", b"\r.\n",
        b"MAIL FROM:<a@b> SIZE=99999999\r\n", b"x" * 70, b"\xff\xfe",
    ]
)  # fmt: skip
STREAM = st.lists(FRAGMENTS | st.binary(max_size=24), max_size=30).map(b"".join)


def chunks_of(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def run(conn: SmtpConnection, chunks: list[bytes], answer: Answer = default_answer) -> Driver:
    d = Driver(conn, answer)
    for chunk in chunks:
        if conn.state is State.CLOSED:
            break
        if chunk:
            d.feed(chunk)
        # After draining, only a partial command line or a partial terminator may be left.
        assert conn.pending_input() < MAX_LINE
        assert conn.next_event() in (NEED_DATA, events.ConnectionClosed())
    if conn.state is not State.CLOSED:
        d.feed(b"")
    assert d.events()[-1] == events.ConnectionClosed()
    assert not conn.awaiting_reply
    return d


def small_conn() -> SmtpConnection:
    return make(max_command_line=MAX_LINE, max_text_line=40, max_message_size=200, max_errors=5)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=STREAM, cuts=st.lists(st.integers(min_value=0, max_value=1000), max_size=10))
def test_any_bytes_any_split(data: bytes, cuts: list[int]) -> None:
    run(small_conn(), chunks_of(data, cuts))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=STREAM, cuts=st.lists(st.integers(min_value=0, max_value=1000), max_size=10))
def test_wellformed_prefix_then_anything(data: bytes, cuts: list[int]) -> None:
    conn = small_conn()
    d = Driver(conn)
    d.feed(EHLO).feed(ENVELOPE)
    assert state_of(conn) is State.DATA
    for chunk in chunks_of(b"Subject: x\r\n\r\n" + data, cuts):
        if state_of(conn) is State.CLOSED:
            break
        if chunk:
            d.feed(chunk)
        assert conn.pending_input() < MAX_LINE


CODES = [220, 221, 250, 251, 252, 354, 421, 450, 451, 452, 500, 501, 503, 550, 552, 554]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=STREAM, cuts=st.lists(st.integers(0, 1000), max_size=6), choices=st.randoms())
def test_any_answers(data: bytes, cuts: list[int], choices: random.Random) -> None:
    def answer(conn: SmtpConnection, ev: events.Event) -> Reply:
        if choices.random() < 0.5:
            return default_answer(conn, ev)
        code = choices.choice(CODES)
        if code == 354 and not isinstance(ev, events.Data):
            code = 250
        return Reply(code, None, "random")

    run(small_conn(), chunks_of(data, cuts), answer)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=STREAM)
def test_whole_equals_bytewise_after_ehlo_for_single_commands(data: bytes) -> None:
    """Split points never change what a lone command line means."""
    line = data.split(b"\n", 1)[0][:50] + b"\r\n"
    whole = Driver(small_conn()).feed(EHLO).feed(line)
    bytewise = Driver(small_conn()).feed(EHLO).feed_bytewise(line)
    assert whole.events() == bytewise.events()


def test_paused_is_reported_not_raised() -> None:
    conn = small_conn()
    conn.receive_data(b"NOOP\r\n")
    assert isinstance(conn.next_event(), events.Noop)
    for _ in range(3):
        assert conn.next_event() is PAUSED
