"""Reply encoding and the pinned public surface of palisade.smtp."""

from __future__ import annotations

import pytest

import palisade.smtp as smtp
from palisade.smtp import LocalProtocolError, Reply, events, replies


def test_single_line_reply() -> None:
    assert Reply(250, "2.1.0", "Ok").to_bytes() == b"250 2.1.0 Ok\r\n"
    assert Reply(354, None, "End data").to_bytes() == b"354 End data\r\n"


def test_multi_line_reply_repeats_enhanced_code() -> None:
    reply = Reply(550, "5.7.1", ("first", "second", "third"))
    assert reply.to_bytes() == (b"550-5.7.1 first\r\n550-5.7.1 second\r\n550 5.7.1 third\r\n")


def test_reply_text_cannot_inject_lines() -> None:
    out = Reply(550, "5.7.1", "evil\r\n250 2.0.0 Ok").to_bytes()
    assert out.count(b"\r\n") == 1
    assert out == b"550 5.7.1 evil  250 2.0.0 Ok\r\n"
    assert Reply(250, None, "caf\u00e9").to_bytes() == b"250 caf?\r\n"


def test_reply_without_enhanced_on_wire() -> None:
    assert Reply(250, "2.0.0", "Ok").to_bytes(enhanced=False) == b"250 Ok\r\n"


def test_empty_text() -> None:
    assert Reply(250, None, "").to_bytes() == b"250 \r\n"
    assert Reply(250, None, ()).to_bytes() == b"250 \r\n"


@pytest.mark.parametrize(
    ("code", "enhanced"), [(199, None), (600, None), (250, "5.0.0"), (250, "2.0"), (550, "x")]
)
def test_bad_reply_values_are_local_errors(code: int, enhanced: str | None) -> None:
    with pytest.raises(LocalProtocolError):
        Reply(code, enhanced, "x")


def test_is_positive() -> None:
    assert Reply(250, None, "").is_positive
    assert Reply(354, None, "").is_positive
    assert not Reply(450, None, "").is_positive
    assert not Reply(550, None, "").is_positive


def test_too_many_errors_reply() -> None:
    assert replies.too_many_errors("mx.test").to_bytes() == (
        b"421 4.7.0 mx.test Too many errors, closing connection\r\n"
    )


def test_public_surface_is_pinned() -> None:
    assert set(smtp.__all__) == {
        "NEED_DATA",
        "PAUSED",
        "Address",
        "Features",
        "Limits",
        "LocalProtocolError",
        "Reply",
        "Sentinel",
        "SmtpConnection",
        "State",
        "events",
        "replies",
    }
    for name in smtp.__all__:
        assert hasattr(smtp, name)
    assert {s.name for s in smtp.State} == {
        "INITIAL",
        "READY",
        "MAIL",
        "RCPT",
        "DATA",
        "STARTTLS_PENDING",
        "AUTH",
        "CLOSED",
    }
    needs_reply = {
        name
        for name in events.__all__
        if getattr(events, name).needs_reply and name not in {"Event"}
    }
    assert needs_reply == {
        "Helo", "Mail", "Rcpt", "Data", "Rset", "Noop", "Quit", "Help", "Vrfy", "Expn",
        "StartTls", "Auth", "AuthResponse", "CommandError", "TooManyErrors", "DataEnd",
    }  # fmt: skip


def test_events_are_frozen() -> None:
    ev = events.Helo(name="x", extended=True)
    with pytest.raises(AttributeError):
        ev.name = "y"  # type: ignore[misc]  # the frozen field is written on purpose


@pytest.mark.parametrize(
    ("flaw", "code", "enhanced"),
    [
        ("bare_lf", 550, "5.6.0"),
        ("bare_cr", 550, "5.6.0"),
        ("nul", 550, "5.6.0"),
        ("line_too_long", 550, "5.6.0"),
        ("size", 552, "5.3.4"),
        (None, 451, "4.3.0"),
    ],
)
def test_data_end_suggested_reply(flaw: str | None, code: int, enhanced: str) -> None:
    reply = events.DataEnd(size=1, flaw=flaw).suggested_reply
    assert (reply.code, reply.enhanced) == (code, enhanced)
