"""The generation: built whole or refused whole, closed only when its last session has ended.

Real parts: a SQLite state database and a Maildir root in a temporary directory.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from palisade.config import parse_config
from palisade.config.model import Config, keep_running, restart_needed
from palisade.ports import StateTempError
from palisade.server.generation import GenerationError, build_generation


def config(base: Path, extra: str = "", state: Path | None = None) -> Config:
    text = f"""
[server]
hostname = "mx.example.test"
listen = ["127.0.0.1:2525"]
[domains]
local = ["example.test"]
[paths]
spool = "{base / "spool"}"
mail = "{base / "mail"}"
log = "{base / "log"}"
state = "{state or base / "state.sqlite"}"
{extra}
"""
    return parse_config(text, str(base / "palisade.toml"))


def test_a_retired_generation_closes_its_clients_when_its_last_session_ends(
    tmp_path: Path,
) -> None:
    generation = build_generation(config(tmp_path))
    state = generation.session_ports.state
    generation.acquire()  # a session began with it
    generation.retire()  # a reload replaced it
    assert not generation.closed
    asyncio.run(state.remember_pass("pregreet:192.0.2.1", 2e9, 1e9))  # still usable
    generation.release()  # the session ended
    assert generation.closed
    with pytest.raises(StateTempError):
        asyncio.run(state.pass_until("pregreet:192.0.2.1", 1e9))


def test_an_unused_generation_is_closed_when_retired(tmp_path: Path) -> None:
    generation = build_generation(config(tmp_path))
    generation.retire()
    assert generation.closed


def test_a_part_that_cannot_be_built_refuses_the_whole_generation(tmp_path: Path) -> None:
    directory = tmp_path / "a-directory"
    directory.mkdir()
    with pytest.raises(GenerationError, match=r"\[paths\] state"):
        build_generation(config(tmp_path, state=directory), check_environment=True)
    with pytest.raises(GenerationError, match="clients"):  # without the self-check as well
        build_generation(config(tmp_path, state=directory))


def test_each_process_gets_the_parts_it_uses(tmp_path: Path) -> None:
    parent = build_generation(config(tmp_path), listening=False)
    assert parent.ports is None and parent.router is not None
    with pytest.raises(RuntimeError):
        parent.session_ports  # noqa: B018
    worker = build_generation(config(tmp_path), delivering=False)
    assert worker.router is None and worker.ports is not None
    worker.close()


def test_restart_needed_names_only_the_keys_a_reload_cannot_change(tmp_path: Path) -> None:
    old = config(tmp_path)
    new = config(tmp_path, '[log]\njson = true\n[dns]\ntimeout = "3s"\n')
    assert restart_needed(old, new) == ["log.json"]


def test_a_reload_keeps_the_running_values_of_the_keys_it_cannot_change(tmp_path: Path) -> None:
    running = config(tmp_path)
    loaded = parse_config(
        f"""
[server]
hostname = "mx2.example.test"
listen = ["127.0.0.1:2626"]
workers = 4
[paths]
spool = "{tmp_path / "other-spool"}"
state = "{tmp_path / "other.db"}"
""",
        "new.toml",
    )
    in_force = keep_running(running, loaded)
    assert in_force.server.listen == ("127.0.0.1:2525",) and in_force.server.workers == 1
    assert in_force.paths.spool == tmp_path / "spool"
    assert in_force.server.hostname == "mx2.example.test"  # the rest is the new config's
    assert in_force.paths.state == tmp_path / "other.db"
    assert restart_needed(running, loaded) == [
        "server.listen",
        "server.workers",
        "paths.spool",
        "paths.log",
    ]
    assert restart_needed(running, in_force) == []
