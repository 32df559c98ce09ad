"""``palisade dkim keygen`` as an operator runs it: the key file (PEM, 0600, under keys_dir),
the TXT record (strings of at most 255 bytes, t=y unless --no-testing, the key's public part),
no overwrite without --force, and one clear error line for bad input."""

from __future__ import annotations

import base64
import os
import pwd
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from tests.conftest import palisade, write_config
from tests.outbound.dkimkit import keygen, records


def expected_owner() -> int:
    """The service user when we are root and it exists, else whoever runs the command."""
    if os.geteuid() == 0:
        try:
            return pwd.getpwnam("palisade").pw_uid
        except KeyError:
            pass
    return os.geteuid()


@pytest.fixture
def base(tmp_path: Path) -> Path:
    write_config(tmp_path / "palisade.toml", {"dkim": {"keys_dir": "keys"}})
    return tmp_path


def test_rsa_key_and_its_record(base: Path) -> None:
    output = keygen(base, "example.org", "s1")
    path = base / "keys" / "example.org.s1.rsa.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_uid == expected_owner()
    assert f"mode 0600, owner {pwd.getpwuid(expected_owner()).pw_name}" in output
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    assert path.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    (strings,) = records(output).values()
    assert list(records(output)) == ["s1._domainkey.example.org"]
    assert len(strings) >= 2 and all(len(s.encode()) <= 255 for s in strings)
    value = "".join(strings)
    assert value.startswith("v=DKIM1; k=rsa; t=y; p=")
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert value.split("p=", 1)[1] == base64.b64encode(der).decode()
    assert 's1._domainkey.example.org. IN TXT ( "v=DKIM1; k=rsa; t=y; p=' in output
    assert 'selector = "s1"' in output and 'file = "example.org.s1.rsa.key"' in output


def test_ed25519_key_4096_bits_and_no_testing(base: Path) -> None:
    output = keygen(base, "example.org", "e1", "--ed25519", "--no-testing")
    key = serialization.load_pem_private_key(
        (base / "keys" / "example.org.e1.ed25519.key").read_bytes(), password=None
    )
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    (strings,) = records(output).values()
    assert strings == [f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"]
    big = records(keygen(base, "example.org", "big", "--bits", "4096"))
    (strings,) = big.values()
    assert len(strings) == 3 and all(len(s) <= 255 for s in strings)
    assert len(strings[0]) == len(strings[1]) == 255


def test_refuses_to_overwrite_without_force(base: Path) -> None:
    keygen(base, "example.org", "s1")
    path = base / "keys" / "example.org.s1.rsa.key"
    before = path.read_bytes()
    result = palisade(
        "dkim", "keygen", "example.org", "--selector", "s1", "--config", "palisade.toml", cwd=base
    )
    assert result.returncode == 2
    assert result.stderr == (
        "palisade: dkim keygen: keys/example.org.s1.rsa.key exists: not replaced "
        "(--force replaces it)\n"
    )
    assert result.stdout == "" and path.read_bytes() == before
    keygen(base, "example.org", "s1", "--force")
    assert path.read_bytes() != before
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in (base / "keys").iterdir()) == ["example.org.s1.rsa.key"]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["example.org", "--selector", "s1", "--ed25519"],
         "keys/example.org.s1.rsa.key already holds a key for selector 's1': a selector "
         "publishes one key; give this one its own selector"),
        (["exa mple.org", "--selector", "s2"], "expected a domain name, got 'exa mple.org'"),
        (["example.org", "--selector", "../x"],
         "expected a selector (letters, digits, '-', '_', dots between labels), got '../x'"),
        (["example.org", "--selector", "s3", "--bits", "512"],
         "--bits: expected 1024 to 8192 (2048 advised), got 512"),
    ],
)  # fmt: skip
def test_bad_input_is_one_error_line(base: Path, args: list[str], error: str) -> None:
    keygen(base, "example.org", "s1")
    result = palisade("dkim", "keygen", *args, "--config", "palisade.toml", cwd=base)
    assert result.returncode == 2
    assert result.stderr == f"palisade: dkim keygen: {error}\n"
    assert sorted(p.name for p in (base / "keys").iterdir()) == ["example.org.s1.rsa.key"]
