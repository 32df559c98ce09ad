"""``palisade recipients sync`` as a subprocess against slapd: the file it writes, its refusals
(empty, shrunk), ``--force``, the atomic replace, and an unreachable LDAP without secrets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, free_port, write_config
from tests.ldap.slapd import (
    BIND_DN,
    BIND_PASSWORD,
    MAIL_ADDRESSES,
    PROXY_ADDRESSES,
    SUFFIX,
    SlapdServer,
)


def config(tmp_path: Path, slapd: SlapdServer, **ldap: Any) -> Path:
    secret = tmp_path / "bind.pw"
    secret.write_text(BIND_PASSWORD + "\n")
    values: dict[str, Any] = {
        "servers": [slapd.uri],
        "base_dn": SUFFIX,
        "bind_dn": BIND_DN,
        "bind_password_file": str(secret),
        "timeout": 2,
    }
    values.update(ldap)
    sections = {
        "ldap": values,
        "lists": {"recipients": {"type": "address", "file": "recipients.txt"}},
    }
    return write_config(tmp_path / "palisade.toml", sections)


def sync(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "palisade", "recipients", "sync", "--config", str(cfg), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def entries(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_writes_the_list_file(tmp_path: Path, slapd: SlapdServer) -> None:
    done = sync(config(tmp_path, slapd))
    assert done.returncode == 0, done.stderr
    target = tmp_path / "recipients.txt"
    assert entries(target) == MAIL_ADDRESSES
    assert target.read_text().startswith("# Valid recipients for palisade")
    assert f"wrote {len(MAIL_ADDRESSES)} address(es) to {target} (new file)" in done.stdout
    assert leftovers(tmp_path) == []
    assert BIND_PASSWORD not in done.stdout + done.stderr + target.read_text()


def test_proxy_addresses_and_output(tmp_path: Path, slapd: SlapdServer) -> None:
    cfg = config(tmp_path, slapd, filter="(proxyAddresses=smtp:%s)", attributes=["proxyAddresses"])
    out = tmp_path / "other.txt"
    done = sync(cfg, "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert entries(out) == PROXY_ADDRESSES
    assert not (tmp_path / "recipients.txt").exists()


def test_refuses_an_empty_list(tmp_path: Path, slapd: SlapdServer) -> None:
    target = tmp_path / "recipients.txt"
    target.write_text("keep@example.test\n")
    done = sync(config(tmp_path, slapd, base_dn=f"ou=people,{SUFFIX}", filter="(mail=%s@none)"))
    assert done.returncode == 1
    assert "refusing to write" in done.stderr and "no addresses" in done.stderr
    assert "--force" in done.stderr
    assert target.read_text() == "keep@example.test\n"
    assert leftovers(tmp_path) == []


def test_refuses_a_shrunken_list_unless_forced(tmp_path: Path, slapd: SlapdServer) -> None:
    target = tmp_path / "recipients.txt"
    before = "".join(f"old{n}@example.test\n" for n in range(10))
    target.write_text(before)
    target.chmod(0o640)
    cfg = config(tmp_path, slapd)
    done = sync(cfg)
    assert done.returncode == 1
    assert "shrink from 10 to 4 entries (60%" in done.stderr
    assert target.read_text() == before
    done = sync(cfg, "--max-shrink", "0.7")
    assert done.returncode == 0, done.stderr
    target.write_text(before)
    done = sync(cfg, "--force")
    assert done.returncode == 0, done.stderr
    assert "(was 10)" in done.stdout
    assert entries(target) == MAIL_ADDRESSES
    assert target.stat().st_mode & 0o777 == 0o640  # the mode of the replaced file
    assert leftovers(tmp_path) == []


def test_ldap_unreachable(tmp_path: Path, slapd: SlapdServer) -> None:
    target = tmp_path / "recipients.txt"
    target.write_text("keep@example.test\n")
    dead = f"ldap://127.0.0.1:{free_port()}"
    done = sync(config(tmp_path, slapd, servers=[dead]))
    assert done.returncode == 1
    assert "LDAP unreachable, nothing written" in done.stderr
    assert dead in done.stderr
    assert BIND_PASSWORD not in done.stderr
    assert target.read_text() == "keep@example.test\n"


def test_wrong_password_is_not_shown(tmp_path: Path, slapd: SlapdServer) -> None:
    cfg = config(tmp_path, slapd)
    (tmp_path / "bind.pw").write_text("Sync-Wrong-Pw-31337\n")
    done = sync(cfg)
    assert done.returncode == 1
    assert "invalidCredentials" in done.stderr
    assert "Sync-Wrong-Pw-31337" not in done.stderr + done.stdout


def test_usage_errors(tmp_path: Path, slapd: SlapdServer) -> None:
    cfg = write_config(
        tmp_path / "nolists.toml", {"ldap": {"servers": [slapd.uri], "base_dn": SUFFIX}}
    )
    done = sync(cfg)
    assert done.returncode == 2 and "no --output" in done.stderr
    cfg = write_config(tmp_path / "noldap.toml", {})
    done = sync(cfg, "--output", str(tmp_path / "x.txt"))
    assert done.returncode == 2 and "no [ldap] servers" in done.stderr
