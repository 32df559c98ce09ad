"""``palisade install-system`` / ``uninstall-system`` under ``--root`` (a temporary tree): modes,
owners, what is never overwritten, a second run that changes nothing, what uninstall keeps.

As root (it chowns); the service user is ``nobody`` with ``--no-user``, so the host's users are
not touched (the end-to-end test in test_install_e2e.py creates the real one).
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.services import need_root

NOBODY = pwd.getpwnam("nobody").pw_uid
NOGROUP = pwd.getpwnam("nobody").pw_gid
LISTS = sorted(p.name for p in (ROOT / "examples" / "lists").iterdir())


@pytest.fixture(autouse=True)
def as_root() -> None:
    need_root("install-system gives files to root and the service user")


def palisade(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "palisade", *args], capture_output=True, text=True, timeout=60
    )


def install(root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    result = palisade(
        "install-system", "--root", str(root), "--no-user", "--user", "nobody",
        "--prefix", "/opt/palisade-test", "--source", str(ROOT), *extra,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result


def mode_owner(path: Path) -> tuple[str, int, int]:
    st = path.lstat()
    return f"{st.st_mode & 0o7777:04o}", st.st_uid, st.st_gid


def snapshot(root: Path) -> dict[str, tuple[str, int, int, int, bytes]]:
    """Every path under ``root``: mode, owner, group, mtime and content."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        content = path.read_bytes() if path.is_file() else b""
        found[str(path)] = (f"{st.st_mode:o}", st.st_uid, st.st_gid, st.st_mtime_ns, content)
    return found


def test_install_system_makes_the_debian_layout(tmp_path: Path) -> None:
    result = install(tmp_path)
    etc = tmp_path / "etc" / "palisade"
    assert mode_owner(etc) == ("0750", 0, NOGROUP)
    assert mode_owner(etc / "palisade.toml") == ("0640", 0, NOGROUP)
    assert (etc / "palisade.toml").read_bytes() == (ROOT / "examples/perimeter.toml").read_bytes()
    assert mode_owner(etc / "lists") == ("0750", 0, NOGROUP)
    assert sorted(p.name for p in (etc / "lists").iterdir()) == LISTS
    for name in LISTS:
        assert mode_owner(etc / "lists" / name) == ("0640", 0, NOGROUP)
    assert mode_owner(etc / "keys") == ("0750", 0, NOGROUP)
    for data in ("var/spool/palisade", "var/lib/palisade", "var/log/palisade"):
        assert mode_owner(tmp_path / data) == ("0750", NOBODY, NOGROUP), data
    for parent in ("etc", "var", "var/lib", "etc/systemd/system", "etc/logrotate.d"):
        if (tmp_path / parent).exists():
            assert mode_owner(tmp_path / parent) == ("0755", 0, 0), parent
    unit = tmp_path / "etc/systemd/system/palisade.service"
    assert mode_owner(unit) == ("0644", 0, 0)
    exec_start = [line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
    assert exec_start == [
        "ExecStart=/opt/palisade-test/bin/palisade serve --config /etc/palisade/palisade.toml"
    ]
    rotate = ROOT / "contrib" / "palisade.logrotate"
    if rotate.exists():
        snippet = tmp_path / "etc/logrotate.d/palisade"
        assert snippet.read_bytes() == rotate.read_bytes()
        assert mode_owner(snippet) == ("0644", 0, 0)
    assert "/var/spool/palisade: created (0750 nobody:" in result.stdout
    assert "systemctl daemon-reload: not run (--root)" in result.stdout
    assert result.stdout.endswith("config in /etc/palisade/palisade.toml\n")


def test_a_second_run_changes_nothing_and_says_so(tmp_path: Path) -> None:
    install(tmp_path)
    before = snapshot(tmp_path)
    again = install(tmp_path)
    assert snapshot(tmp_path) == before
    assert again.stdout.endswith("install-system: nothing changed (already installed)\n")
    assert "created" not in again.stdout and "copied" not in again.stdout


def test_the_operators_files_are_never_overwritten_the_programs_are(tmp_path: Path) -> None:
    install(tmp_path)
    config = tmp_path / "etc/palisade/palisade.toml"
    config.write_text("# the operator's own\n")
    spool = tmp_path / "var/spool/palisade"
    spool.chmod(0o700)  # the operator's choice: reported, kept
    unit = tmp_path / "etc/systemd/system/palisade.service"
    unit.write_text("[Service]\nExecStart=/old/bin/palisade serve\n")
    result = install(tmp_path)
    assert config.read_text() == "# the operator's own\n"
    assert "/etc/palisade/palisade.toml: exists, not overwritten" in result.stdout
    assert mode_owner(spool)[0] == "0700"
    assert "/var/spool/palisade: exists, kept as it is (0700 nobody:" in result.stdout
    assert "/opt/palisade-test/bin/palisade serve --config" in unit.read_text()
    assert "/etc/systemd/system/palisade.service: updated (systemd unit)" in result.stdout


def test_uninstall_removes_the_program_and_the_unit_and_keeps_the_data(tmp_path: Path) -> None:
    install(tmp_path)
    prefix = tmp_path / "opt/palisade-test"  # a venv's marks: pyvenv.cfg and bin/palisade
    (prefix / "bin").mkdir(parents=True)
    (prefix / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (prefix / "bin" / "palisade").write_text("#!/bin/sh\n")
    (tmp_path / "var/spool/palisade/queued").write_text("a message\n")
    result = palisade("uninstall-system", "--root", str(tmp_path), "--prefix", "/opt/palisade-test")
    assert result.returncode == 0, result.stderr
    assert not prefix.exists()
    assert not (tmp_path / "etc/systemd/system/palisade.service").exists()
    assert not (tmp_path / "etc/logrotate.d/palisade").exists()
    assert (tmp_path / "etc/palisade/palisade.toml").exists()
    assert (tmp_path / "var/spool/palisade/queued").read_text() == "a message\n"
    assert (tmp_path / "var/lib/palisade").is_dir() and (tmp_path / "var/log/palisade").is_dir()
    assert result.stdout.splitlines()[-1] == (
        "uninstall-system: kept /etc/palisade, /var/spool/palisade, /var/lib/palisade, "
        "/var/log/palisade and the user palisade (remove them by hand)"
    )
    assert "/opt/palisade-test: removed (the program's venv)" in result.stdout


def test_uninstall_never_removes_a_prefix_that_is_not_a_venv(tmp_path: Path) -> None:
    other = tmp_path / "opt/something"
    other.mkdir(parents=True)
    (other / "precious").write_text("x")
    result = palisade("uninstall-system", "--root", str(tmp_path), "--prefix", "/opt/something")
    assert result.returncode == 1
    assert result.stderr == (
        "palisade uninstall-system: --prefix /opt/something: not removed: it is not a venv "
        "with bin/palisade in it\n"
    )
    assert (other / "precious").exists()


def test_no_user_needs_an_existing_user_and_the_source_needs_the_examples(
    tmp_path: Path,
) -> None:
    missing = palisade(
        "install-system", "--root", str(tmp_path), "--no-user", "--user", "no-such-palisade",
        "--source", str(ROOT),
    )  # fmt: skip
    assert missing.returncode == 1
    assert missing.stderr == (
        "palisade install-system: --no-user: the user 'no-such-palisade' does not exist\n"
    )
    elsewhere = palisade(
        "install-system", "--root", str(tmp_path), "--no-user", "--user", "nobody",
        "--source", str(tmp_path),
    )  # fmt: skip
    assert elsewhere.returncode == 1
    assert elsewhere.stderr == (
        f"palisade install-system: --source {tmp_path}: no examples/perimeter.toml (run it "
        "from the checkout, or give --source CHECKOUT)\n"
    )
    assert not (tmp_path / "etc").exists()
    assert grp.getgrgid(NOGROUP)  # the group the tests above expect exists
    assert os.geteuid() == 0
