"""Fixtures for the state store tests: a real SQLite file in tmp_path, a real redis-server, and
a settable clock."""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from palisade.adapters.redis_state import RedisSettings, RedisStateStore
from palisade.adapters.sqlite_state import SqliteStateStore
from palisade.policy.rules import Facts, Ports
from palisade.ports import BlockPolicy
from tests.redisserver import RedisServer
from tests.unused_ports import NoResolver


class SettableClock:
    """A clock tests move by hand; both readings advance together."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.value = start

    def now(self) -> float:
        return self.value

    def monotonic(self) -> float:
        return self.value

    def advance(self, seconds: float) -> None:
        self.value += seconds


@pytest.fixture
def clock() -> SettableClock:
    return SettableClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "var" / "state.sqlite"


@pytest.fixture
def store(db_path: Path, clock: SettableClock) -> Iterator[SqliteStateStore]:
    s = SqliteStateStore(db_path, clock=clock)
    yield s
    s.close()


@pytest.fixture
def ports(store: SqliteStateStore, clock: SettableClock) -> Ports:
    return Ports(resolver=NoResolver(), state=store, clock=clock)


def facts(ip: str) -> Facts:
    return Facts(client_ip=ipaddress.ip_address(ip), client_port=40000)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session (each test gets its own key prefix)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def redis_store(
    server: RedisServer, clock: SettableClock | None = None, policy: BlockPolicy | None = None
) -> RedisStateStore:
    """A store on ``server`` under a prefix of its own."""
    settings = RedisSettings(url=server.url, prefix=f"t{uuid.uuid4().hex[:12]}:")
    return RedisStateStore(settings, clock=clock, policy=policy)


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_store(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, clock: SettableClock
) -> Iterator[Callable[..., Any]]:
    """``make_store(policy=...)``: a store of the test's backend on the test's clock; every
    call on SQLite opens the same file, on Redis the same prefix (two handles, one state)."""
    made: list[Any] = []
    prefix = f"t{uuid.uuid4().hex[:12]}:"

    def factory(policy: BlockPolicy | None = None) -> Any:
        if backend == "sqlite":
            store: Any = SqliteStateStore(tmp_path / "state.sqlite", clock=clock, policy=policy)
        else:
            server = request.getfixturevalue("redis_server")
            store = RedisStateStore(
                RedisSettings(url=server.url, prefix=prefix), clock=clock, policy=policy
            )
        made.append(store)
        return store

    yield factory
    for store in made:
        store.close()


@pytest.fixture
def any_store(make_store: Callable[..., Any]) -> Any:
    """The contract tests' store: SQLite, then Redis."""
    return make_store()
