"""The receive buffer and the DATA reader, each fed whole, byte by byte and with trailing data
(as h11's tests/test_io.py), plus a property test of the DATA reader against a slow model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palisade.smtp.buffer import TOO_LONG, ReceiveBuffer
from palisade.smtp.data import FLAW_ORDER, DataReader

Result = tuple[bytes, int, str | None, bytes]  # content, size, flaw, leftover

# -- receive buffer ----------------------------------------------------------------------------


def lines_of(chunks: list[bytes], max_len: int) -> tuple[list[object], bytes]:
    buf = ReceiveBuffer()
    out: list[object] = []
    for chunk in chunks:
        buf.append(chunk)
        while (line := buf.next_line(max_len)) is not None:
            out.append(line)
        assert len(buf) < max_len
    return out, bytes(buf)


BUFFER_CASES = [
    (b"HELO a\r\n", [b"HELO a\r\n"]),
    (b"A\r\nB\nC\r\n", [b"A\r\n", b"B\n", b"C\r\n"]),
    (b"x" * 14 + b"\r\n", [b"x" * 14 + b"\r\n"]),  # exactly the cap (16)
    (b"x" * 15 + b"\r\nOK\r\n", [TOO_LONG, b"OK\r\n"]),  # one over
    (b"x" * 100 + b"\nOK\r\n", [TOO_LONG, b"OK\r\n"]),
    (b"x" * 100 + b"\r\n" + b"y" * 50 + b"\r\nOK\r\n", [TOO_LONG, TOO_LONG, b"OK\r\n"]),
    (b"\r\n\n", [b"\r\n", b"\n"]),
]


@pytest.mark.parametrize(("data", "expected"), BUFFER_CASES)
def test_buffer_three_ways(data: bytes, expected: list[object]) -> None:
    assert lines_of([data], 16) == (expected, b"")
    assert lines_of([data[i : i + 1] for i in range(len(data))], 16) == (expected, b"")
    assert lines_of([data + b"TRAIL"], 16) == (expected, b"TRAIL")


def test_buffer_stays_bounded_under_endless_line() -> None:
    buf = ReceiveBuffer()
    results = []
    for _ in range(160):  # 10 MB in 64 KiB chunks, no LF
        buf.append(b"A" * 65536)
        assert len(buf) <= 65536
        while (line := buf.next_line(512)) is not None:
            results.append(line)
        assert len(buf) == 0
    assert results == [TOO_LONG]
    buf.append(b"rest\r\nNOOP\r\n")
    assert buf.next_line(512) == b"NOOP\r\n"


# -- DATA reader -------------------------------------------------------------------------------


def read(chunks: list[bytes], max_size: int = 10_000, max_line: int = 1000) -> Result | None:
    """(content, size, flaw, leftover) or None if the end was not seen."""
    reader = DataReader(max_size=max_size, max_line=max_line)
    buf = b""
    content = b""
    for n, chunk in enumerate(chunks):
        buf += chunk
        while True:
            step = reader.feed(buf)
            assert step.consumed <= len(buf)
            buf = buf[step.consumed :]
            content += step.content
            if step.done:
                return content, reader.size, reader.flaw, buf + b"".join(chunks[n + 1 :])
            if not step.content and not step.consumed:
                break
        assert len(buf) <= 4
    return None


def ended(chunks: list[bytes], max_size: int = 10_000, max_line: int = 1000) -> Result:
    result = read(chunks, max_size, max_line)
    assert result is not None
    return result


DATA_CASES = [
    # (input, content, flaw)
    (b".\r\n", b"", None),
    (b"hello\r\n.\r\n", b"hello\r\n", None),
    (b"..x\r\n.\r\n", b".x\r\n", None),
    (b"a\r\n..\r\n...\r\n.\r\n", b"a\r\n.\r\n..\r\n", None),
    (b"\r\n.\r\n", b"\r\n", None),
    (b"a\r\n\r\n.\r\n", b"a\r\n\r\n", None),
    (b".a\r\n.b\r\n.\r\n", b"a\r\nb\r\n", None),
    # the six smuggling variants: none ends the data, each is a flaw
    (b"a\n.\r\nMAIL\r\n.\r\n", None, "bare_lf"),
    (b"a\r.\r\nMAIL\r\n.\r\n", None, "bare_cr"),
    (b"a\n.\nMAIL\r\n.\r\n", None, "bare_lf"),
    (b"a\r\n.\rMAIL\r\n.\r\n", None, "bare_cr"),
    (b"a\r\n.\nMAIL\r\n.\r\n", None, "bare_lf"),
    (b"a\r.\nMAIL\r\n.\r\n", None, "bare_lf"),  # both bare CR and bare LF: LF ranks first
    (b"\n.\r\n.\r\n", None, "bare_lf"),
    (b".\n\r\n.\r\n", None, "bare_lf"),
    (b".\r\r\n.\r\n", None, "bare_cr"),
    (b"a\x00b\r\n.\r\n", None, "nul"),
    (b"a\r\r\n.\r\n", None, "bare_cr"),
]


@pytest.mark.parametrize(("data", "content", "flaw"), DATA_CASES)
def test_data_reader_three_ways(data: bytes, content: bytes | None, flaw: str | None) -> None:
    whole = read([data])
    assert whole is not None
    assert whole[2] == flaw
    if flaw is None:
        assert content is not None
        assert whole[0] == content
        assert whole[1] == len(content)
    else:
        assert whole[0] == b""  # nothing of a flawed message handed out in one chunk
    bytewise = read([data[i : i + 1] for i in range(len(data))])
    assert bytewise is not None
    assert bytewise[1:] == whole[1:]
    if flaw is None:
        assert bytewise[0] == whole[0]
    trailing = read([data + b"QUIT\r\n"])
    assert trailing is not None
    assert trailing[1:3] == whole[1:3]
    assert trailing[3] == b"QUIT\r\n"


@pytest.mark.parametrize(
    "data",
    [
        b"a\r\n.\r",
        b"a\r\n.",
        b"a\r\n",
        b"a\r",
        b".",
        b".\r",
        b"a\n.\r\n",
        b"x\r.\n",
        b".\n.\r\n",
        b".\r.\r\n",
    ],
)
def test_data_reader_never_ends_early(data: bytes) -> None:
    assert read([data]) is None
    assert read([data[i : i + 1] for i in range(len(data))]) is None


def test_data_line_length_limit() -> None:
    ok = b"x" * 8 + b"\r\n"  # 10 octets with CRLF
    assert ended([ok + b".\r\n"], max_line=10)[2] is None
    bad = b"x" * 9 + b"\r\n"
    assert ended([bad + b".\r\n"], max_line=10)[2] == "line_too_long"
    assert ended([b"a\r\n" + bad + b"b\r\n.\r\n"], max_line=10)[2] == "line_too_long"
    # an endless line keeps memory bounded and is still flagged
    reader = DataReader(max_size=10**9, max_line=1000)
    for _ in range(100):
        step = reader.feed(b"y" * 65536)
        assert step.consumed == 65536
    assert reader.flaw == "line_too_long"


def test_data_size_limit() -> None:
    assert ended([b"x" * 98 + b"\r\n.\r\n"], max_size=100)[1:3] == (100, None)
    assert ended([b"x" * 99 + b"\r\n.\r\n"], max_size=100)[1:3] == (101, "size")
    # stuffed dots do not count
    assert ended([b"." * 99 + b"\r\n.\r\n"], max_size=100)[1:3] == (100, None)


def test_chunks_stop_after_flaw() -> None:
    reader = DataReader(max_size=10_000, max_line=1000)
    assert reader.feed(b"clean\r\n").content == b"clean"
    assert reader.feed(b"\r\nbad\n").content == b""
    assert reader.feed(b"more clean\r\n").content == b""
    step = reader.feed(b"\r\n.\r\n")
    assert step.done
    assert reader.flaw == "bare_lf"


# -- the DATA reader against a slow byte-at-a-time model ---------------------------------------


def model(stream: bytes, max_size: int, max_line: int) -> Result | None:
    prefixed = b"\r\n" + stream
    end = prefixed.find(b"\r\n.\r\n")
    if end < 0:
        return None
    raw = stream[:end]
    consumed = end + 3
    content = (b"\r\n" + raw).replace(b"\r\n.", b"\r\n")[2:]
    flaws = set()
    for i, byte in enumerate(raw):
        if byte == 10 and (i == 0 or raw[i - 1] != 13):
            flaws.add("bare_lf")
        if byte == 13 and (i + 1 == len(raw) or raw[i + 1] != 10):
            flaws.add("bare_cr")
        if byte == 0:
            flaws.add("nul")
    if any(len(line) + 1 > max_line for line in raw.split(b"\n")[:-1]):
        flaws.add("line_too_long")
    if len(content) > max_size:
        flaws.add("size")
    flaw = next((f for f in FLAW_ORDER if f in flaws), None)
    return content, len(content), flaw, stream[consumed:]


ALPHABET = st.sampled_from([b"a", b"b", b"\r", b"\n", b".", b"\r\n", b"\r\n.", b"\x00"])


@settings(max_examples=400, deadline=None)
@given(
    parts=st.lists(ALPHABET, max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
    max_line=st.integers(min_value=3, max_value=12),
    max_size=st.integers(min_value=0, max_value=30),
)
def test_data_reader_matches_model(
    parts: list[bytes], cuts: list[int], max_line: int, max_size: int
) -> None:
    stream = b"".join(parts) + b"\r\n.\r\nNEXT"
    expected = model(stream, max_size, max_line)
    assert expected is not None
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    got = read(chunks, max_size=max_size, max_line=max_line)
    assert got is not None
    assert got[1:] == expected[1:]
    if expected[2] is None:
        assert got[0] == expected[0]
    else:
        assert expected[0].startswith(got[0])
