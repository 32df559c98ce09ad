"""Fixtures for the state store tests: a real SQLite file in tmp_path and a settable clock."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest

from palisade.adapters.sqlite_state import SqliteStateStore
from palisade.policy.rules import Facts, Ports
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
