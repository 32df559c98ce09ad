"""``palisade --version`` and ``palisade version``: the installed distribution's version, through
the real command."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest

from tests.conftest import palisade


@pytest.mark.parametrize("args", [["--version"], ["version"]])
def test_version_is_the_installed_distributions(tmp_path: Path, args: list[str]) -> None:
    result = palisade(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"palisade {metadata.version('palisade')}\n"
    assert result.stderr == ""
