"""The follower of ``palisade scan`` on real files: whole lines only (a file written byte by
byte gives the same lines as written at once), offsets kept across runs, rotation by rename
(the rotated file finished, found again by inode), truncation (copytruncate, even when the file
has grown past the old offset again), overlong lines skipped whole even across chunks and
restarts, and a damaged offsets file named in the error."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from palisade.feedback.follow import Follower, OffsetsError
from tests.conftest import palisade, write_config


class Reader:
    """A follower of ``log`` whose every pass collects the lines it hands on."""

    def __init__(self, tmp_path: Path, log: Path, **options: int | bool) -> None:
        self.log = log
        self.offsets = tmp_path / "state" / "offsets.json"
        self.options = options
        self.follower = Follower([log], self.offsets, **options)  # type: ignore[arg-type]

    def restart(self) -> None:
        self.follower.close()
        self.follower = Follower([self.log], self.offsets, **self.options)  # type: ignore[arg-type]

    def read(self) -> list[str]:
        got: list[str] = []

        async def handle(path: str, lines: list[str]) -> None:
            assert path == str(self.log)
            got.extend(lines)

        asyncio.run(self.follower.run_pass(handle))
        return got


def test_byte_by_byte_gives_the_same_lines_as_all_at_once(tmp_path: Path) -> None:
    text = "first line\nsecond\r\n\nthird ünïcode line\n"
    log = tmp_path / "a.log"
    log.write_bytes(b"")
    reader = Reader(tmp_path, log)
    got = []
    for byte in text.encode():
        with log.open("ab") as f:
            f.write(bytes([byte]))
        got += reader.read()
        reader.restart()  # and the offsets survive a restart at every byte
    assert got == ["first line", "second", "", "third ünïcode line"]
    whole = tmp_path / "b.log"
    whole.write_text(text)
    assert Reader(tmp_path / "b", whole).read() == got


def test_rotation_by_rename_finishes_the_old_file_then_reads_the_new(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    log.write_text("one\ntwo\n")
    reader = Reader(tmp_path, log)
    assert reader.read() == ["one", "two"]
    os.rename(log, tmp_path / "mail.log.1")
    with (tmp_path / "mail.log.1").open("a") as old:
        old.write("three (written before the writer reopened)\nlast, without a line break")
    log.write_text("new one\n")
    assert reader.read() == [
        "three (written before the writer reopened)",
        "last, without a line break",  # the end of a rotated file is final
        "new one",
    ]
    assert reader.read() == []
    os.rename(tmp_path / "mail.log.1", tmp_path / "mail.log.2")  # rotated again: not re-read
    os.rename(log, tmp_path / "mail.log.1")
    log.write_text("newest\n")
    assert reader.read() == ["newest"]


def test_daemon_reads_a_renamed_file_through_its_descriptor(tmp_path: Path) -> None:
    log = tmp_path / "dovecot.log"
    log.write_text("a\n")
    reader = Reader(tmp_path, log, keep_open=True)
    assert reader.read() == ["a"]
    os.rename(log, tmp_path / "elsewhere")  # a name the sibling search would never find
    with (tmp_path / "elsewhere").open("a") as old:
        old.write("b\n")
    assert reader.read() == ["b"]  # the path is missing: the held file is read on
    with (tmp_path / "elsewhere").open("a") as old:
        old.write("c\n")
    log.write_text("d\n")
    assert reader.read() == ["c", "d"]
    reader.follower.close()


def test_truncation_and_copytruncate_read_from_the_start(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    log.write_text("Dec  2 07:00:00 first line of the old file\nmore\n")
    reader = Reader(tmp_path, log)
    assert len(reader.read()) == 2
    with log.open("r+") as f:  # copytruncate: same inode, emptied, then written again
        f.truncate(0)
    log.write_text("Dec  2 08:00:00 a new first line, and the file grew past the old offset\n")
    assert reader.read() == [
        "Dec  2 08:00:00 a new first line, and the file grew past the old offset"
    ]
    with log.open("r+") as f:
        f.truncate(0)
    assert reader.read() == []
    log.write_text("x\n")
    assert reader.read() == ["x"]


def test_overlong_lines_are_skipped_whole_across_chunks_and_restarts(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    log.write_bytes(b"short\n" + b"A" * 5000)  # an overlong line still being written
    reader = Reader(tmp_path, log, max_line=100, chunk=1024)
    assert reader.read() == ["short"]
    reader.restart()
    # Its tail, written later, looks like a line of its own: it must not become one.
    with log.open("ab") as f:
        f.write(b" NOQUEUE: reject: RCPT from x[192.0.2.1]: 554 tail\nnext\n" + b"B" * 300 + b"\n")
    assert reader.read() == ["next"]
    with log.open("ab") as f:
        f.write(b"ok\n")
    assert reader.read() == ["ok"]


def test_damaged_offsets_file_is_named(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    log.write_text("a\n")
    offsets = tmp_path / "state" / "offsets.json"
    offsets.parent.mkdir()
    offsets.write_text("{not json")
    with pytest.raises(OffsetsError, match=r"offsets\.json is damaged"):
        Follower([log], offsets)
    config = write_config(
        tmp_path / "scan.toml",
        {
            "paths": {"state": str(tmp_path / "state" / "state.sqlite")},
            "scan": {"files": [str(log)], "state": str(offsets)},
        },
    )
    done = palisade("scan", "--once", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert f"palisade scan: the offsets file {offsets} is damaged" in done.stderr
    assert "Traceback" not in done.stderr
