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


_READABLE_COPY: list[Path] = []


def code_for_other_users() -> tuple[Path, Path]:
    """``(src, site_packages)``: this checkout's ``src`` and this venv's site-packages where any
    user may read them. A checkout or venv under a 0700 directory (root's home, ``mktemp -d``)
    cannot be reached by a service user, so then both are copied (hard links when the file
    system allows) once per test session into a 0755 directory under /tmp, removed at exit."""
    import atexit
    import sysconfig
    import tempfile

    root = Path(__file__).resolve().parent.parent
    src, site = root / "src", Path(sysconfig.get_paths()["purelib"])
    if all(_reachable_by_others(path) for path in (src, site)):
        return src, site
    if not _READABLE_COPY:
        base = Path(tempfile.mkdtemp(prefix="palisade-code-", dir="/tmp"))
        base.chmod(0o755)
        atexit.register(shutil.rmtree, base, True)
        for source, name in ((src, "src"), (site, "site-packages")):
            copied = subprocess.run(["cp", "-al", str(source), str(base / name)])
            if copied.returncode != 0:
                shutil.rmtree(base / name, ignore_errors=True)
                subprocess.run(["cp", "-a", str(source), str(base / name)], check=True)
        _READABLE_COPY.append(base)
    base = _READABLE_COPY[0]
    return base / "src", base / "site-packages"


def _reachable_by_others(path: Path) -> bool:
    """Whether every directory above ``path`` may be searched by any user (o+x)."""
    return all(os.stat(parent).st_mode & 0o001 for parent in [path, *path.parents])
