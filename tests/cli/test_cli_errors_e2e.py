"""Operator mistakes end in one clear line and an exit status, never a traceback.

Every case runs ``python -m palisade`` as a real subprocess (what an operator types) and asserts
the exit status, the line naming the file or key, and that stderr holds no "Traceback".
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, palisade, write_config


def assert_one_clear_line(result: subprocess.CompletedProcess[str], status: int, text: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == status, result.stderr
    lines = [line for line in result.stderr.splitlines() if text in line]
    assert len(lines) == 1, result.stderr


def config_file(tmp_path: Path, **sections: dict[str, Any]) -> Path:
    base: dict[str, dict[str, Any]] = {
        "server": {"listen": [f"127.0.0.1:{free_port()}"]},
        "paths": {
            "spool": "var/spool",
            "mail": "var/mail",
            "log": "var/log",
            "state": "var/state.sqlite",
        },
        # a resolver that cannot answer in a test would cost its timeout: point it nowhere fast
        "dns": {"nameservers": [f"127.0.0.1:{free_port()}"], "timeout": 0.2},
    }
    for name, table in sections.items():
        base.setdefault(name, {}).update(table)
    return write_config(tmp_path / "palisade.toml", base)


# -- a closed standard output ----------------------------------------------------------------


def run_with_closed_stdout(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """stdout is a pipe whose reading end is already closed: every write gets EPIPE, as when
    ``head -1`` has exited (deterministic, unlike a race with a real ``head``)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return palisade(*args, cwd=cwd, stdout=write_end)
    finally:
        os.close(write_end)


@pytest.mark.parametrize(
    "args",
    [
        ("config", "check", "--no-dns"),
        ("history", "list"),
        ("history", "show", "192.0.2.1"),
        ("queue", "list"),
    ],
    ids=["config-check", "history-list", "history-show", "queue-list"],
)
def test_a_closed_stdout_ends_quietly_with_status_0(tmp_path: Path, args: tuple[str, ...]) -> None:
    config = config_file(tmp_path)
    if args[0] == "history":
        assert (
            palisade(
                "history", "add", "192.0.2.1", "--config", str(config), cwd=tmp_path
            ).returncode
            == 0
        )
    result = run_with_closed_stdout(*args, "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert "Exception ignored" not in result.stderr


def test_config_check_piped_into_head(tmp_path: Path) -> None:
    """The real client: a shell pipeline; whatever the race, no traceback and status 0."""
    config = config_file(tmp_path)
    result = subprocess.run(
        f"{sys.executable} -m palisade config check --no-dns --config {config} | head -1;"
        " echo status=${PIPESTATUS[0]} >&2",
        shell=True,
        executable="/bin/bash",
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.startswith("# palisade config check:")
    assert "Traceback" not in result.stderr and "status=0" in result.stderr


# -- TLS: a certificate and a key that do not belong together ----------------------------------


def test_a_certificate_that_does_not_match_its_key_is_a_config_error(
    tmp_path: Path, test_ca: Any
) -> None:
    one, other = test_ca.issue_cert("mx.example.test"), test_ca.issue_cert("mx.example.test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in one.cert_chain_pems))
    key.write_bytes(other.private_key_pem.bytes())
    config = config_file(tmp_path, tls={"certificate": str(cert), "private_key": str(key)})
    for command in (("config", "check"), ("serve",)):
        result = palisade(*command, "--config", str(config), cwd=tmp_path)
        assert_one_clear_line(result, 2, f"{config}:")
        assert "tls.certificate: certificate" in result.stderr
        assert f"does not match [tls] private_key {key}" in result.stderr
    key.write_bytes(one.private_key_pem.bytes())  # the right key: accepted
    result = palisade("config", "check", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr


# -- [paths] that cannot be created ----------------------------------------------------------


@pytest.mark.parametrize("command", [("config", "check"), ("serve",)])
def test_a_path_under_a_file_is_one_clear_line(tmp_path: Path, command: tuple[str, ...]) -> None:
    """Tests run as root, where permission bits do not stop a write: a path whose parent is a
    regular file fails for everybody (ENOTDIR)."""
    config = config_file(tmp_path, paths={"log": "/dev/null/log"})
    result = palisade(*command, "--config", str(config), cwd=tmp_path)
    assert_one_clear_line(result, 1, "cannot create [paths] log /dev/null/log: Not a directory")
    (tmp_path / "plain-file").write_text("")
    config = config_file(tmp_path, paths={"spool": str(tmp_path / "plain-file" / "spool")})
    result = palisade(*command, "--config", str(config), cwd=tmp_path)
    assert_one_clear_line(result, 1, f"cannot create [paths] spool {tmp_path}/plain-file/spool")
    config = config_file(tmp_path, paths={"mail": str(tmp_path / "plain-file")})
    result = palisade(*command, "--config", str(config), cwd=tmp_path)
    assert_one_clear_line(result, 1, f"[paths] mail {tmp_path}/plain-file is not a directory")


@pytest.mark.parametrize("command", [("config", "check"), ("serve",)])
def test_an_immutable_spool_directory_fails_even_for_root(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """A directory root cannot write in: ``chattr +i`` (permission bits would not stop root).
    The self-check creates a file there for real instead of trusting the mode bits."""
    spool = tmp_path / "spool"
    spool.mkdir()
    if subprocess.run(["chattr", "+i", str(spool)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here (no chattr, or the file system lacks it)")
    try:
        config = config_file(tmp_path, paths={"spool": str(spool)})
        result = palisade(*command, "--config", str(config), cwd=tmp_path)
    finally:
        subprocess.run(["chattr", "-i", str(spool)], check=True)
    assert_one_clear_line(
        result, 1, f"cannot write in [paths] spool {spool}: Operation not permitted"
    )


@pytest.mark.parametrize(
    "command",
    [("history", "add", "192.0.2.1"), ("check-host", "192.0.2.1"), ("config", "check")],
    ids=["history-add", "check-host", "config-check"],
)
def test_a_state_database_under_a_file_is_one_clear_line(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    config = config_file(tmp_path, paths={"state": "/dev/null/state.sqlite"})
    result = palisade(*command, "--config", str(config), cwd=tmp_path)
    assert_one_clear_line(
        result, 1, "cannot create [paths] state /dev/null/state.sqlite: Not a directory"
    )


def test_serve_refuses_to_start_before_binding(tmp_path: Path) -> None:
    """The self-check runs before the listening socket is made: with the port taken as well,
    the path is what the operator is told about."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = config_file(
            tmp_path, server={"listen": [f"127.0.0.1:{port}"]}, paths={"mail": "/dev/null/mail"}
        )
        result = palisade("serve", "--config", str(config), cwd=tmp_path)
    assert_one_clear_line(result, 1, "cannot create [paths] mail /dev/null/mail")
    assert "not starting: the self-check found errors" in result.stderr
    assert "cannot listen" not in result.stderr


# -- what config check used to accept ----------------------------------------------------------


def test_an_unreadable_bind_password_file_is_a_config_error(tmp_path: Path) -> None:
    ldap = {
        "servers": ["ldap://127.0.0.1:3890"],
        "base_dn": "dc=example,dc=test",
        "bind_dn": "cn=gw,dc=example,dc=test",
        "bind_password_file": str(tmp_path / "missing.pw"),
    }
    config = config_file(tmp_path, ldap=ldap)
    result = palisade("config", "check", "--config", str(config), cwd=tmp_path)
    assert_one_clear_line(result, 2, "ldap.bind_password_file: cannot be read")
    assert "missing.pw" in result.stderr or "No such file" in result.stderr
    (tmp_path / "missing.pw").write_text("secret\n")
    assert palisade("config", "check", "--config", str(config), cwd=tmp_path).returncode == 0


def test_an_unknown_variable_in_a_rule_text_is_a_config_error(tmp_path: Path) -> None:
    rule = {
        "check": "dnsbl",
        "verb": "deny",
        "zones": ["bl.example.test"],
        "message": "$ip is listed at $zone",
        "log_message": "DENY - listed at $zonee ($codes)",
    }
    config = config_file(tmp_path, rules={"connect": [rule]})
    result = palisade("config", "check", "--config", str(config), cwd=tmp_path)
    assert_one_clear_line(result, 2, "rules.connect[1].log_message: unknown variable $zonee")
    line = config.read_text().splitlines().index('log_message = "DENY - listed at $zonee ($codes)"')
    assert f"{config}:{line + 1}:" in result.stderr  # the line of the key
    assert "$zone, $codes, $txt, $zones" in result.stderr  # what may be used instead
    rule["log_message"] = "DENY - $${ip} listed at ${zone} ($codes, $reason)"  # $$ is a dollar
    config = config_file(tmp_path, rules={"connect": [rule]})
    result = palisade("config", "check", "--no-dns", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("section", ["spamd", "rspamd"])
def test_tag_level_above_kill_level_is_a_config_error(tmp_path: Path, section: str) -> None:
    address = {"spamd": {"address": "127.0.0.1:783"}, "rspamd": {"url": "http://127.0.0.1:11333"}}
    config = config_file(
        tmp_path, **{section: {**address[section], "tag_level": 20.0, "kill_level": 10.0}}
    )
    result = palisade("config", "check", "--config", str(config), cwd=tmp_path)
    assert_one_clear_line(result, 2, f"{section}.tag_level: tag_level 20 is above kill_level 10")


# -- read-only commands create nothing ---------------------------------------------------------


def test_read_only_commands_create_no_directories(tmp_path: Path) -> None:
    """No --config: the bundled demo config, whose paths are ./var/... relative to here."""
    result = palisade("queue", "list", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "0 message(s) in the queue" in result.stdout
    assert "no spool at [paths] spool var/spool" in result.stderr
    result = palisade("queue", "show", "aaaaaa-bbbbbb-cc", cwd=tmp_path)
    assert_one_clear_line(result, 1, "no spool at [paths] spool var/spool")
    result = palisade("history", "list", cwd=tmp_path)
    assert result.returncode == 0 and "0 record(s)" in result.stdout, result.stderr
    result = palisade("history", "remove", "192.0.2.1", cwd=tmp_path)
    assert_one_clear_line(result, 1, "no record for 192.0.2.1")
    result = palisade("history", "show", "192.0.2.1", cwd=tmp_path)
    assert_one_clear_line(result, 1, "no record for 192.0.2.1")
    result = palisade("config", "check", "--no-dns", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "[paths] spool var/spool can be created" in result.stderr
    assert list(tmp_path.iterdir()) == []
