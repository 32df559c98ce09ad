"""Fixtures of the CLI tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.services import need_root, system_user


@pytest.fixture(scope="module")
def palisade_user() -> Iterator[tuple[int, int]]:
    """The config ``palisade init`` generates says ``user = "palisade"`` and the loader checks
    that the user exists (``make install`` creates it): made for the module unless it exists."""
    need_root("creating the service user the generated config names")
    with system_user("palisade") as ids:
        yield ids
