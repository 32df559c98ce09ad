"""Each writer gives its files and directories their mode itself, whatever the umask: the CLI's
umask 0077 is the second line, these explicit modes the first (gateway-level test:
tests/server/test_file_modes_e2e.py)."""

from __future__ import annotations

import asyncio
import grp
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from palisade.adapters.sqlite_state import SqliteStateStore
from palisade.config import ConfigError, load_config
from palisade.delivery.maildir import MaildirDelivery
from palisade.obs.log import FileEventLog
from palisade.spool import Spool
from tests.spool.spoolkit import make_envelope


@pytest.fixture(autouse=True)
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_spool_files_0600_and_directories_0700(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "a" / "spool", fsync=False)
    env = make_envelope()
    writer = spool.open_message(env)
    writer.write(b"x\r\n")
    asyncio.run(writer.commit())
    _, state = spool.load(env.queue_id)
    state.attempts = 1
    spool.save_state(env.queue_id, state)
    root = tmp_path / "a" / "spool"
    assert {mode(p) for p in [tmp_path / "a", root, *root.iterdir()]} == {0o700}
    assert mode(root / "queue" / env.queue_id) == 0o600
    assert mode(root / "state" / f"{env.queue_id}.json") == 0o600
    spool.remove(env.queue_id, recycle=True)
    assert mode(root / "free" / env.queue_id) == 0o600
    spool.close()


def test_recycled_files_of_an_older_version_are_narrowed(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    env = make_envelope()
    writer = spool.open_message(env)
    writer.write(b"x\r\n")
    asyncio.run(writer.commit())
    old_free = tmp_path / "free" / make_envelope().queue_id
    old_free.write_bytes(b"an old message")
    os.chmod(old_free, 0o644)
    os.chmod(tmp_path / "queue" / env.queue_id, 0o644)  # as an older version left it
    spool.pool.trim()  # at start-up
    assert mode(old_free) == 0o600
    spool.remove(env.queue_id, recycle=True)  # on its way into free/
    assert mode(tmp_path / "free" / env.queue_id) == 0o600
    spool.close()


def test_log_files_0640_in_a_0750_directory_and_an_existing_file_keeps_its_mode(
    tmp_path: Path,
) -> None:
    log = FileEventLog(tmp_path / "log", json_lines=True)
    log.main("x")
    log.close()
    assert mode(tmp_path / "log") == 0o750
    files = ("mainlog", "rejectlog", "paniclog", "main.jsonl")
    assert {mode(tmp_path / "log" / name) for name in files} == {0o640}
    os.chmod(tmp_path / "log" / "mainlog", 0o600)  # the operator's choice
    FileEventLog(tmp_path / "log").close()
    assert mode(tmp_path / "log" / "mainlog") == 0o600


def test_maildir_private_by_default(tmp_path: Path) -> None:
    delivery = MaildirDelivery(tmp_path / "mail", fsync=False)
    final = delivery.deliver(make_envelope(), "user@example.test", [b"x\r\n"])
    box = tmp_path / "mail" / "user"
    dirs = [tmp_path / "mail", box, box / "tmp", box / "new", box / "cur"]
    assert {mode(p) for p in dirs} == {0o700} and mode(final) == 0o600


def test_state_database_and_its_wal_files_0600(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path / "state" / "state.sqlite")
    try:
        names = ("state.sqlite", "state.sqlite-wal", "state.sqlite-shm")
        assert {mode(tmp_path / "state" / name) for name in names} == {0o600}
        assert mode(tmp_path / "state") == 0o700
    finally:
        store.close()


@pytest.mark.parametrize("value", ['"mail"', '"8"', "8"])
def test_paths_group_is_resolved_to_a_gid(tmp_path: Path, value: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(f"[paths]\ngroup = {value}\n")
    assert load_config(path).paths.group == grp.getgrnam("mail").gr_gid


@pytest.mark.parametrize("value", ['"no-such-group-palisade"', "4000000000", "true", '""', "-1"])
def test_paths_group_unknown_or_malformed_is_a_config_error(tmp_path: Path, value: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(f"[paths]\ngroup = {value}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert f"{path}:2: paths.group: " in str(caught.value)
