"""send_message: what the scanner adapters put on the wire, write by write.

A writer that records each ``write`` stands in for the socket's StreamWriter: what matters here
is how the bytes are cut into writes (each write is a send, a segment the scanner wakes up for),
which a real socket would hide by coalescing them in its buffer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from palisade.adapters.scanner_io import CHUNK_SIZE, send_message
from palisade.ports import ServiceTempError
from tests.messages import FileSource
from tests.scanners.conftest import run


class RecordingWriter:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.drains = 0

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    async def drain(self) -> None:
        self.drains += 1


def _send(source: FileSource, **kwargs: object) -> RecordingWriter:
    writer = RecordingWriter()
    run(send_message(writer, source, **kwargs))  # type: ignore[arg-type]
    return writer


def test_a_small_message_is_one_write_with_the_head_and_the_terminator(tmp_path: Path) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    writer = _send(FileSource(path), frame=True, prefix=b"zINSTREAM\0", suffix=b"\0\0\0\0")
    assert writer.writes == [
        b"zINSTREAM\0" + (20).to_bytes(4, "big") + path.read_bytes() + b"\0" * 4
    ]


def test_a_large_message_goes_in_chunks_head_first_terminator_last(tmp_path: Path) -> None:
    data = bytes(range(256)) * ((2 * CHUNK_SIZE + 1000) // 256 + 1)
    path = tmp_path / "big.eml"
    path.write_bytes(data)
    writer = _send(FileSource(path), prefix=b"POST / HTTP/1.1\r\n\r\n")
    assert len(writer.writes) == 3
    assert writer.writes[0].startswith(b"POST / HTTP/1.1\r\n\r\n")
    assert b"".join(writer.writes) == b"POST / HTTP/1.1\r\n\r\n" + data
    assert writer.drains == 3  # back-pressure after every chunk


def test_framed_chunks_each_carry_their_length(tmp_path: Path) -> None:
    data = b"x" * (CHUNK_SIZE + 10)
    path = tmp_path / "m.eml"
    path.write_bytes(data)
    writer = _send(FileSource(path), frame=True, suffix=b"\0\0\0\0")
    first, second = writer.writes
    assert first == CHUNK_SIZE.to_bytes(4, "big") + data[:CHUNK_SIZE]
    assert second == (10).to_bytes(4, "big") + data[CHUNK_SIZE:] + b"\0\0\0\0"


def test_an_empty_message_still_sends_head_and_terminator(tmp_path: Path) -> None:
    path = tmp_path / "empty.eml"
    path.write_bytes(b"")
    writer = _send(FileSource(path), frame=True, prefix=b"zINSTREAM\0", suffix=b"\0\0\0\0")
    assert writer.writes == [b"zINSTREAM\0\0\0\0\0"]


def test_a_spool_file_shorter_than_its_size_is_a_temporary_error(tmp_path: Path) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(b"0123456789")

    class Shrunk(FileSource):
        @property
        def size(self) -> int:
            return 20

    with pytest.raises(ServiceTempError, match="ended 10 bytes before its size 20"):
        _send(Shrunk(path), prefix=b"HEAD")
