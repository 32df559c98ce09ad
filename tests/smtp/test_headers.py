"""The streaming header splitter: fields out, forged fields dropped, any chunking gives the same."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from palisade.smtp.headers import HeaderSplitter

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
