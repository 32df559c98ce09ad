"""``[server] user``: as root, every process drops to the service account after binding.

Run as root (the suite runs as root in CI; elsewhere these skip, and fail with ``CI=true``). The
test user ``palisade-test`` is created with useradd for the session and deleted after it. The
gateway's directory is made under /tmp with mode 0755 (pytest's tmp_path is in a 0700
directory of root's, which the service user could not even enter).
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from palisade.config import ConfigError, load_config
from tests.conftest import (
    GatewayProcess,
    child_pids,
    free_port,
    gateway_sections,
    search,
    wait_for,
    write_config,
)
from tests.server.smtpclient import RawClient
from tests.services import code_for_other_users, need_root, system_user

USER = "palisade-test"
MESSAGE = "From: a@outside.test\r\nSubject: {subject}\r\n\r\nhello\r\n"


@pytest.fixture(scope="module")
def service_user() -> Iterator[tuple[int, int]]:
    need_root("switching to a service account")
    with system_user(USER) as ids:
        yield ids


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory the service user may enter, removed after the test."""
    path = Path(tempfile.mkdtemp(prefix="palisade-drop-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def configured(base: Path, **overrides: dict[str, Any]) -> GatewayProcess:
    """A gateway in ``base`` whose config is 0640 root:<the user's group>, as installed."""
    port = free_port()
    sections = gateway_sections(port, **overrides)
    config = write_config(base / "palisade.toml", sections)
    if "user" in sections["server"]:
        os.chown(config, 0, pwd.getpwnam(sections["server"]["user"]).pw_gid)
    config.chmod(0o640)
    return GatewayProcess(base=base, port=port, config_path=config, sections=sections)


def command_for_the_user() -> tuple[list[str], dict[str, str]]:
    """``python -m palisade`` that the service user can run: this interpreter may live where
    that user cannot go (a pyenv under /root), so Debian's python3 of the same version with
    this environment's packages on its path (-S: not Debian's dist-packages)."""
    system = Path("/usr/bin/python3")
    version = subprocess.run(
        [system, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True
    ).stdout.strip()
    assert version == str(sys.version_info[:2]), f"{system} is {version}, not {sys.version}"
    src, site = code_for_other_users()
    path = f"{src}:{site}"
    return [str(system), "-S", "-m", "palisade"], dict(os.environ, HOME="/", PYTHONPATH=path)


def ids(pid: int) -> dict[str, str]:
    """The Uid, Gid, Groups and capability lines of /proc/PID/status."""
    status = Path(f"/proc/{pid}/status").read_text()
    return {
        key: value.strip()
        for key, value in re.findall(r"^(Uid|Gid|Groups|CapPrm|CapEff):(.*)$", status, re.M)
    }


def owners(root: Path) -> set[tuple[int, int]]:
    """The (uid, gid) of ``root`` and of everything under it."""
    found = {(root.stat().st_uid, root.stat().st_gid)}
    for path in root.rglob("*"):
        st = path.lstat()
        found.add((st.st_uid, st.st_gid))
    return found


def test_every_process_drops_to_the_service_user(service_user: tuple[int, int], base: Path) -> None:
    uid, gid = service_user
    gw = configured(base, server={"user": USER, "workers": 2}).start()
    try:
        assert gw.proc is not None
        parent = gw.proc.pid
        processes = [parent, *wait_for(lambda: len(child_pids(parent)) == 2 and child_pids(parent))]
        groups = " ".join(str(g) for g in sorted(set(os.getgrouplist(USER, gid))))
        for pid in processes:  # real, effective, saved and file-system ids; no capability left
            assert ids(pid) == {
                "Uid": f"{uid}\t{uid}\t{uid}\t{uid}",
                "Gid": f"{gid}\t{gid}\t{gid}\t{gid}",
                "Groups": groups,
                "CapPrm": "0000000000000000",
                "CapEff": "0000000000000000",
            }, pid
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
            client.sendmail(
                "a@outside.test", ["postmaster@example.test"], MESSAGE.format(subject="smtplib")
            )
        raw = RawClient(gw.port)
        raw.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert raw.reply()[0] == 220
        for line in ("EHLO raw.outside.test", "MAIL FROM:<a@outside.test>"):
            assert raw.command(line)[0] == 250
        assert raw.command("RCPT TO:<postmaster@example.test>")[0] == 250
        assert raw.command("DATA")[0] == 354
        raw.send(MESSAGE.format(subject="raw").encode() + b".\r\n")
        assert raw.reply()[0] == 250
        raw.command("QUIT")
        delivered = wait_for(lambda: len(gw.maildir_messages("postmaster")) == 2, timeout=20)
        assert delivered
        bodies = b"".join(gw.maildir_messages("postmaster"))
        assert b"Subject: smtplib" in bodies and b"Subject: raw" in bodies
        for tree in (gw.spool_dir, gw.mail_dir, gw.log_dir):
            assert owners(tree) == {(uid, gid)}, tree
        state = base / "var" / "state.sqlite"
        assert (state.stat().st_uid, state.stat().st_gid) == (uid, gid)
        # a reload reads the config (0640 root:group) again, as the user, in every process
        gw.signal(signal.SIGHUP)
        assert wait_for(lambda: gw.mainlog().count("configuration reloaded from") == 3)
        assert "reload refused" not in gw.paniclog()
    finally:
        assert gw.stop() == 0, gw.stderr()
    assert "running as root" not in gw.mainlog()


def test_root_without_user_on_a_port_below_1024_refuses_to_start(tmp_path: Path) -> None:
    need_root("the refusal is for root")
    sections = gateway_sections(25)  # refused before anything is bound: the port may be busy
    config = write_config(tmp_path / "palisade.toml", sections)
    result = subprocess.run(
        [sys.executable, "-m", "palisade", "serve", "--config", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    line = search(r"palisade: not starting: (.*)\n", result.stderr)[1]
    assert line == (
        f"{config}: server.user is not set and palisade runs as root with 127.0.0.1:25 in "
        'server.listen (a port below 1024): set [server] user = "palisade" (make install '
        "creates that user) so that every process drops to it after binding"
    )
    assert f"not starting: {line}" in (tmp_path / "var" / "log" / "paniclog").read_text()
    assert result.stderr.count("\n") == 1


def test_root_without_user_on_a_high_port_runs_with_one_warning(make_gateway: Any) -> None:
    need_root("the warning is for root")
    gw: GatewayProcess = make_gateway()
    warning = (
        f"warning: running as root ({gw.config_path}: server.user is not set; only "
        'ports above 1023 are used): set [server] user = "palisade" to run unprivileged\n'
    )
    assert wait_for(lambda: "palisade daemon started" in gw.mainlog())
    assert gw.mainlog().count(warning) == 1  # mainlog only: stderr stays quiet when all is well
    assert gw.stderr() == ""
    assert gw.proc is not None
    assert ids(gw.proc.pid)["Uid"] == "0\t0\t0\t0"


def test_not_root_with_user_naming_another_account_refuses(
    service_user: tuple[int, int], base: Path
) -> None:
    uid, gid = service_user
    gw = configured(base, server={"user": "nobody"})
    os.chown(gw.config_path, 0, gid)
    command, env = command_for_the_user()
    result = subprocess.run(
        [*command, "serve", "--config", str(gw.config_path)],
        cwd=base,
        capture_output=True,
        text=True,
        timeout=30,
        user=uid,
        group=gid,
        extra_groups=[],
        env=env,
    )
    assert result.returncode == 2, result.stderr
    assert (
        f"palisade: not starting: {gw.config_path}: server.user is 'nobody' but palisade runs "
        f"as '{USER}', not root: only root can switch to the service account (start it as "
        "root, or as that user and group)\n"
    ) == result.stderr


def test_unknown_user_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    path = write_config(tmp_path / "palisade.toml", {"server": {"user": "no-such-user-palisade"}})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == (
        f"config error in {path}:2: server.user: no such user on this host: "
        "'no-such-user-palisade' (make install creates the user palisade)"
    )


def test_server_group_is_resolved_and_defaults_to_none(tmp_path: Path) -> None:
    path = write_config(tmp_path / "palisade.toml", {"server": {"user": "nobody", "group": "mail"}})
    config = load_config(path)
    assert (config.server.user, config.server.group) == ("nobody", grp.getgrnam("mail").gr_gid)
    plain = load_config(write_config(tmp_path / "plain.toml", {"server": {}}))
    assert (plain.server.user, plain.server.group) == (None, None)


def test_a_file_the_service_user_cannot_read_stops_the_start_with_its_name(
    service_user: tuple[int, int], base: Path
) -> None:
    """A reload reads the config and its lists again as the user: a list only root can read
    is found right after the drop, not at the first SIGHUP."""
    listed = base / "whitelist"
    listed.write_text("192.0.2.1\n")
    listed.chmod(0o600)  # root's alone
    gw = configured(
        base,
        server={"user": USER},
        lists={"whitelist": {"type": "ip", "file": str(listed)}},
    )
    result = subprocess.run(
        [sys.executable, "-m", "palisade", "serve", "--config", str(gw.config_path)],
        cwd=base,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1, result.stderr
    line = search(r"palisade: not starting: as server.user 'palisade-test': (.*)\n", result.stderr)
    assert f"{listed}" in line[1] and "Permission denied" in line[1], line[1]
    assert line[0].removeprefix("palisade: ") in gw.paniclog()


def test_log_files_left_by_root_are_handed_over_and_planted_links_are_not(
    service_user: tuple[int, int], base: Path
) -> None:
    uid, gid = service_user
    logs = base / "var" / "log"
    logs.mkdir(parents=True)
    os.chown(base / "var", uid, gid)
    os.chown(logs, uid, gid)
    mainlog = logs / "mainlog"
    mainlog.write_text("a line written by a run as root\n")  # root's, 0600 by the umask
    secret = base / "secret"
    secret.write_text("root's alone\n")
    secret.chmod(0o600)
    os.symlink(secret, logs / "main.jsonl")  # planted where a root-era log file would be
    gw = configured(base, server={"user": USER}, log={"json": False}).start()
    try:
        assert wait_for(lambda: "palisade daemon started" in gw.mainlog())
        assert (mainlog.stat().st_uid, mainlog.stat().st_gid) == (uid, gid)
        assert gw.mainlog().startswith("a line written by a run as root\n")
        assert (secret.stat().st_uid, secret.stat().st_gid) == (0, 0)
    finally:
        assert gw.stop() == 0, gw.stderr()
