"""The password-file back end (real Argon2id hashes, a real file changed on disk), the senders
map, and the [submission] config checks."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from palisade.adapters.password_file import PasswordFile, read_entries, remove_user, set_password
from palisade.config import ConfigError, parse_config
from palisade.config.lists import SendersFile
from palisade.policy.senders import parse_senders
from palisade.ports import AuthAttempt, ServiceTempError


def attempt(user: str, password: str, authzid: str = "") -> AuthAttempt:
    return AuthAttempt("PLAIN", user, password, authzid, "192.0.2.1", "192.0.2.25", True)


def test_password_file_checks_and_rereads(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    assert set_password(path, "alice@example.org", "s3cret: with spaces") is True
    assert set_password(path, "bob", "other") is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    text = path.read_text()
    assert "s3cret" not in text and text.count("$argon2id$") == 2
    backend = PasswordFile(path, check_interval=0)

    async def check(user: str, password: str, authzid: str = "") -> str | None:
        return await backend.authenticate(attempt(user, password, authzid))

    assert asyncio.run(check("alice@example.org", "s3cret: with spaces")) == "alice@example.org"
    assert asyncio.run(check("alice@example.org", "wrong")) is None
    assert asyncio.run(check("nobody", "s3cret: with spaces")) is None  # the dummy hash
    assert asyncio.run(check("bob", "other", authzid="alice@example.org")) is None
    assert asyncio.run(check("bob", "other", authzid="bob")) == "bob"
    assert set_password(path, "bob", "changed") is False  # a new password, read on next use
    assert remove_user(path, "alice@example.org") is True
    assert remove_user(path, "alice@example.org") is False
    assert asyncio.run(check("bob", "changed")) == "bob"
    assert asyncio.run(check("alice@example.org", "s3cret: with spaces")) is None
    assert text.splitlines()[0].startswith("#") and path.read_text().startswith("#")


def test_malformed_lines_are_skipped_and_named_by_number(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    set_password(path, "carol", "pw")
    with path.open("a") as f:
        f.write("dave:plaintext-password\nno colon here\n")
    entries, bad = read_entries(path)
    assert list(entries) == ["carol"] and bad == [3, 4]
    errors: list[str] = []
    backend = PasswordFile(path, check_interval=0, on_error=errors.append)
    assert asyncio.run(backend.authenticate(attempt("dave", "plaintext-password"))) is None
    assert len(errors) == 1 and "line(s) 3, 4 skipped" in errors[0]
    assert "plaintext-password" not in errors[0]


def test_unreadable_file_is_a_temporary_error_without_secrets(tmp_path: Path) -> None:
    backend = PasswordFile(tmp_path / "missing", check_interval=0)
    with pytest.raises(ServiceTempError) as exc:
        asyncio.run(backend.authenticate(attempt("alice", "hunter2")))
    assert "No such file" in exc.value.reason and "hunter2" not in str(exc.value)
    assert "hunter2" not in repr(attempt("alice", "hunter2"))


def test_senders_map() -> None:
    senders = parse_senders(
        "# comment\nbob  bob@example.org, @Bob.Example  # trailing\nbob info@example.org\n"
    )
    assert senders.owns("bob", "bob@example.org") and senders.owns("bob", "BOB@EXAMPLE.ORG")
    assert senders.owns("bob", "x@bob.example") and senders.owns("bob", "info@example.org")
    assert not senders.owns("bob", "x@sub.bob.example")
    assert not senders.owns("bob", "alice@example.org")
    assert not senders.owns("bob", "") and not senders.owns("bob", None)  # the null sender
    assert senders.owns("alice@example.org", "Alice@Example.org")  # its own login name
    assert not senders.owns("alice", "alice@example.org")  # a login that is not an address
    for text, problem in (
        ("bob\n", "line 1: user 'bob' has no address"),
        ("bob not-an-address\n", "line 1: expected an address or @domain"),
    ):
        with pytest.raises(ValueError, match=problem):
            parse_senders(text)


def test_senders_file_is_reread_and_a_broken_edit_keeps_the_old_map(tmp_path: Path) -> None:
    path = tmp_path / "senders"
    path.write_text("bob bob@example.org\n")
    errors: list[str] = []
    handle = SendersFile.load(path, check_interval=0, on_error=errors.append)
    assert handle().owns("bob", "bob@example.org")
    path.write_text("bob other@example.org\n")
    os.utime(path, (1, 1))
    assert handle().owns("bob", "other@example.org")
    path.write_text("bob broken\n")
    os.utime(path, (2, 2))
    assert handle().owns("bob", "other@example.org")
    assert errors and "line 1: expected an address or @domain" in errors[0]


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ('[submission]\nlisten = ["127.0.0.1:587"]\n', "submission.listen",
         "submission listeners need [tls]"),
        ('[submission]\nlisten_tls = ["127.0.0.1:99999"]\n', "submission.listen_tls",
         "expected a port"),
        ('[submission]\nauth = "ldap"\n', "submission.auth", "expected one of 'file', 'dovecot'"),
        ('[submission]\ndovecot_socket = "localhost"\n', "submission.dovecot_socket",
         "expected host:port with a port"),
        ("[submission]\nfailure_delay = 5\nfailure_delay_max = 1\n",
         "submission.failure_delay_max", "must not be shorter"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(text: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "test.toml")
    assert key in str(exc.value) and problem in str(exc.value)


def test_selfcheck_reports_the_password_file_and_senders(
    tmp_path: Path, tls_files: dict[str, Path]
) -> None:
    from palisade.server.selfcheck import run_selfcheck

    text = (
        f'[tls]\ncertificate = "{tls_files["certificate"]}"\n'
        f'private_key = "{tls_files["private_key"]}"\n'
        f'[submission]\nlisten = ["127.0.0.1:2587"]\npassword_file = "{tmp_path}/passwd"\n'
        f'senders = "{tmp_path}/senders"\n'
    )
    config = parse_config(text, str(tmp_path / "p.toml"))
    found = {f.where: f for f in run_selfcheck(config, dns=False)}
    assert found["submission.password_file"].level == "warning"
    assert "cannot be read: No such file or directory" in found["submission.password_file"].message
    assert found["submission.senders"].level == "error"
    set_password(tmp_path / "passwd", "bob", "pw")
    (tmp_path / "senders").write_text("bob bob@example.org\n")
    found = {f.where: f for f in run_selfcheck(config, dns=False)}
    assert found["submission.password_file"].level == "ok"
    assert "1 entry (users)" in found["submission.password_file"].message
    assert found["submission.senders"].level == "ok"
