"""Finding the real servers the tests start (slapd, spamd, rspamd, clamd): missing fails in CI;
and pausing and stopping a daemon that runs in its own process group (spamd, rspamd).

``make test`` installs them with apt-get. Outside CI a developer without them gets a skip that
names the package; with ``CI=true`` the same absence is a failure, never a skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def need_program(name: str, package: str) -> str:
    """The path of ``name`` (searched in PATH and the sbin directories), or skip / fail."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
    if path is not None:
        return path
    message = f"{name} not installed (Debian package {package}; `make test` installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def need_file(path: Path, package: str) -> Path:
    """A data file a service needs (schemas, rule sets), or skip / fail as ``need_program``."""
    if path.exists():
        return path
    message = f"{path} missing (Debian package {package}; `make test` installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def need_root(why: str) -> None:
    """Skip unless root; with ``CI=true`` (the suite runs as root there) not being root fails."""
    if os.geteuid() == 0:
        return
    message = f"needs root: {why}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@contextmanager
def system_user(name: str) -> Iterator[tuple[int, int]]:
    """A system user and group ``name`` (uid, gid) as ``useradd --system --user-group`` makes
    them: created for the block and deleted after it, unless it existed before (then kept)."""
    import pwd

    try:
        entry = pwd.getpwnam(name)
        created = False
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
             "/nonexistent", "--shell", "/usr/sbin/nologin", name],
            check=True, capture_output=True,
        )  # fmt: skip
        entry = pwd.getpwnam(name)
        created = True
    try:
        yield entry.pw_uid, entry.pw_gid
    finally:
        if created:
            subprocess.run(["userdel", name], check=True, capture_output=True)


@contextmanager
def paused_group(process: subprocess.Popen[bytes]) -> Iterator[None]:
    """The daemon and its children stopped (SIGSTOP to its process group): connections are
    accepted by the kernel but never answered, as with a hung daemon."""
    os.killpg(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(process.pid, signal.SIGCONT)


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the daemon's process group, SIGKILL after 10 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
