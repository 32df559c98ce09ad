"""The streaming header splitter: fields out, forged fields dropped, any chunking gives the same."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from palisade.smtp.headers import (
    MAX_MESSAGE_ID,
    HeaderSplitter,
    MessageIdFinder,
    clean_message_id,
)

MESSAGE = (
    b"Received: from a\r\n\tby b; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Authentication-Results: mx.example.test; spf=pass\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"Authentication-Results: other.example; dkim=pass\r\n"
    b"Subject: a folded\r\n subject\r\n"
    b"\r\n"
    b"Authentication-Results: mx.example.test; in the body, kept\r\n"
    b"body\r\n"
)


def forged(name: str, value: str) -> bool:
    return name.lower() == "authentication-results" and value.startswith("mx.example.test;")


def run(chunks: list[bytes]) -> tuple[HeaderSplitter, bytes]:
    splitter = HeaderSplitter(forged)
    out = b"".join(splitter.feed(c) for c in chunks) + splitter.finish()
    return splitter, out


def test_fields_are_unfolded_and_forged_ones_dropped() -> None:
    splitter, out = run([MESSAGE])
    assert splitter.fields == [
        ("Received", "from a\tby b; Mon, 1 Jan 2024 00:00:00 +0000"),
        ("From", "Alice <alice@example.org>"),
        ("Authentication-Results", "other.example; dkim=pass"),
        ("Subject", "a folded subject"),
    ]
    assert splitter.dropped == [("Authentication-Results", "mx.example.test; spf=pass")]
    assert out == MESSAGE.replace(b"Authentication-Results: mx.example.test; spf=pass\r\n", b"")
    assert b"in the body, kept" in out


@given(st.lists(st.integers(min_value=0, max_value=len(MESSAGE)), max_size=12))
def test_any_chunking_gives_the_same_result(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    chunks = [MESSAGE[a:b] for a, b in zip([0, *points], [*points, len(MESSAGE)], strict=True)]
    splitter, out = run(chunks)
    whole_splitter, whole = run([MESSAGE])
    assert out == whole and splitter.fields == whole_splitter.fields


def test_a_line_that_is_not_a_field_starts_the_body() -> None:
    splitter, out = run([b"Subject: x\r\nthis is body text\r\nFrom: not a header\r\n"])
    assert splitter.fields == [("Subject", "x")]
    assert out == b"Subject: x\r\nthis is body text\r\nFrom: not a header\r\n"


def test_headers_only_message_keeps_its_last_field() -> None:
    splitter, out = run([b"Subject: x\r\nFrom: a@b.example\r\n"])
    assert splitter.fields == [("Subject", "x"), ("From", "a@b.example")]
    assert out == b"Subject: x\r\nFrom: a@b.example\r\n"


def test_oversized_header_section_is_passed_through_untouched() -> None:
    big = b"X-Big: " + b"a" * 5000 + b"\r\n"
    message = b"Subject: x\r\n" + big + b"Authentication-Results: mx.example.test; x\r\n\r\nb\r\n"
    splitter = HeaderSplitter(forged, max_bytes=1000)
    out = b"".join(splitter.feed(message[i : i + 100]) for i in range(0, len(message), 100))
    out += splitter.finish()
    assert out == message  # parsing stopped: nothing dropped, nothing lost
    assert splitter.fields == [("Subject", "x")]


def find_message_id(chunks: list[bytes], max_bytes: int = 64 * 1024) -> str | None:
    finder = MessageIdFinder(max_bytes)
    for chunk in chunks:
        finder.feed(chunk)
    return finder.finish()


WITH_ID = (
    b"Received: from a\r\n\tby b\r\nFrom: a@b.test\r\n"
    b"message-id :\r\n <folded@b.test>\r\nMessage-ID: <second@b.test>\r\n\r\n"
    b"Message-ID: <in-the-body@b.test>\r\n"
)


def test_message_id_found_whole_byte_by_byte_and_with_trailing_data() -> None:
    assert find_message_id([WITH_ID]) == "<folded@b.test>"  # the first, unfolded
    assert find_message_id([WITH_ID[i : i + 1] for i in range(len(WITH_ID))]) == "<folded@b.test>"
    assert find_message_id([WITH_ID, b"more body\r\n" * 1000]) == "<folded@b.test>"


@pytest.mark.parametrize(
    "content",
    [
        b"Subject: x\r\n\r\nMessage-ID: <body@b.test>\r\n",  # after the empty line
        b"\r\nMessage-ID: <body@b.test>\r\n",  # no header section at all
        b"Subject: x\r\nnot a field\r\nMessage-ID: <body@b.test>\r\n\r\n",  # after body text
        b"X-Message-ID: <other@b.test>\r\n\r\n",
        b"Message-ID:   \r\n\r\n",  # empty
    ],
)
def test_no_message_id_outside_the_header_section(content: bytes) -> None:
    assert find_message_id([content]) is None
    assert find_message_id([content[i : i + 1] for i in range(len(content))]) is None


def test_hostile_message_id_is_cleaned_and_bounded() -> None:
    content = b"Message-ID: <a\x1b[31m\x07\tb\x7f@x>" + b"y" * 5000 + b"\r\n\r\n"
    value = find_message_id([content])
    assert value is not None and len(value) == MAX_MESSAGE_ID
    assert value.startswith("<a [31m b @x>yyy")
    assert all(" " <= c != "\x7f" for c in value)
    assert clean_message_id("\r\n\t ") is None


def test_message_id_past_the_byte_limit_is_not_looked_for() -> None:
    late = b"X-Filler: " + b"f" * 200 + b"\r\n"
    content = late * 10 + b"Message-ID: <late@b.test>\r\n\r\n"
    assert find_message_id([content], max_bytes=len(content)) == "<late@b.test>"
    assert find_message_id([content], max_bytes=len(late) * 10) is None
    assert find_message_id([content[i : i + 7] for i in range(0, len(content), 7)], 500) is None


@given(st.lists(st.integers(min_value=1, max_value=40), max_size=30))
def test_message_id_the_same_under_any_chunking(cuts: list[int]) -> None:
    chunks, at = [], 0
    for size in cuts:
        chunks.append(WITH_ID[at : at + size])
        at += size
    chunks.append(WITH_ID[at:])
    assert find_message_id(chunks) == "<folded@b.test>"
