"""``palisade init``: answers in, a commented config with only the chosen features out.

Real parts only: ``python -m palisade init`` and ``config check`` in subprocesses, a real DNS
server on loopback (``loopback/dnsserver.py``) for the DNSBL probes and the gateway's lookups, a
real gateway started on a generated config, and a real pseudo-terminal for the questions.
"""

from __future__ import annotations

import os
import pty
import select
import smtplib
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loopback.dnsserver import ZoneServer, start_zone_server
from tests.conftest import GatewayProcess, free_port, palisade, toml_value, wait_for

pytestmark = pytest.mark.usefixtures("palisade_user")


DQS_KEY = "s3cr3tdqsk3y0000000000000a"


@pytest.fixture
def dns() -> Iterator[ZoneServer]:
    server = start_zone_server()
    server.add_zone(f"{DQS_KEY}.zen.dq.spamhaus.net")
    server.list_address(f"{DQS_KEY}.zen.dq.spamhaus.net", "127.0.0.2")  # RFC 5782 probe passes
    server.add_zone("sender.test")
    server.set("sender.test", "A", ["192.0.2.25"])  # a sender domain that can receive mail
    yield server
    server.stop()


def write_answers(path: Path, answers: dict[str, Any]) -> Path:
    path.write_text("".join(f"{key} = {toml_value(value)}\n" for key, value in answers.items()))
    return path


def paths_in(base: Path) -> dict[str, str]:
    return {
        "spool_dir": str(base / "spool"),
        "state_file": str(base / "state" / "state.sqlite"),
        "log_dir": str(base / "log"),
        "mail_dir": str(base / "mail"),
    }


FEATURES_OFF: dict[str, Any] = {
    "whitelist": False,
    "sender_whitelist": False,
    "history": False,
    "ratelimit": False,
    "ptr_required": False,
    "generic_rdns": "off",
    "dnsbl": False,
    "dbl": False,
    "helo_rules": False,
    "sender_rules": False,
    "sender_verify": False,
    "header_sender": False,
    "recipients": "none",
    "authentication": False,
    "spam_scanner": "none",
    "clamd": False,
}


def init(tmp_path: Path, *args: str) -> Any:
    return palisade("init", *args, cwd=tmp_path)


def rule_checks(config: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (stage, rule["check"]) for stage, rules in config.get("rules", {}).items() for rule in rules
    }


def check_config(tmp_path: Path, config: Path, *extra: str) -> Any:
    result = palisade("config", "check", "--config", str(config), *extra, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "self-check: 0 error(s)" in result.stderr
    return result


def test_minimal_answers_give_maildir_delivery_and_no_rules(tmp_path: Path) -> None:
    answers = write_answers(
        tmp_path / "answers.toml",
        {"hostname": "mx.example.test", "domains": ["example.test"], "user": "palisade",
         **paths_in(tmp_path / "var"), **FEATURES_OFF},
    )  # fmt: skip
    out = tmp_path / "etc" / "palisade.toml"
    result = init(tmp_path, "--answers", str(answers), "--output", str(out), "--no-dns")
    assert result.returncode == 0, result.stderr
    assert "self-check: 0 error(s), 0 warning(s)" in result.stderr
    assert f"{out} passes the self-check" in result.stdout
    check_config(tmp_path, out, "--no-dns")
    config = tomllib.loads(out.read_text())
    assert config["server"]["hostname"] == "mx.example.test"
    assert config["server"]["user"] == "palisade"
    assert config["domains"] == {"local": ["example.test"], "relay": []}
    assert config["paths"]["mail"] == str(tmp_path / "var" / "mail")
    assert "rules" not in config and "lists" not in config
    for section in ("tls", "ldap", "spamd", "rspamd", "clamd", "authentication", "delivery"):
        assert section not in config, section
    assert not (out.parent / "lists").exists()
    assert out.stat().st_mode & 0o777 == 0o640
    assert (out.parent / "init-answers.toml").stat().st_mode & 0o777 == 0o600


def test_a_small_company_gets_exactly_its_features_and_the_dqs_zones(
    tmp_path: Path, dns: ZoneServer, tls_files: dict[str, Path]
) -> None:
    answers = write_answers(
        tmp_path / "answers.toml",
        {
            "hostname": "mx.example.test",
            "domains": ["example.test", "example.net"],
            "nameservers": [f"127.0.0.1:{dns.port}"],
            **paths_in(tmp_path / "var"),
            **FEATURES_OFF,
            "tls_certificate": str(tls_files["certificate"]),
            "tls_private_key": str(tls_files["private_key"]),
            "tls_required": "on",
            "whitelist": True,
            "whitelist_hosts": ["192.0.2.10", "198.51.100.0/24"],
            "ptr_required": True,
            "dnsbl": True,
            "dnsbl_zones": ["zen.spamhaus.org"],
            "dqs_key": DQS_KEY,
            "dbl": True,
            "helo_rules": True,
            "sender_rules": True,
            "sender_verify": True,
            "recipients": "file",
            "authentication": True,
            "spam_scanner": "spamd",
            "clamd": True,
        },
    )
    out = tmp_path / "etc" / "palisade.toml"
    result = init(tmp_path, "--answers", str(answers), "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert "ok: DNSBL zone zen.spamhaus.org passes the RFC 5782 probe" in result.stderr
    assert DQS_KEY not in result.stdout + result.stderr
    assert dns.queries(f"2.0.0.127.{DQS_KEY}.zen.dq.spamhaus.net") >= 1  # asked with the key
    checked = check_config(tmp_path, out)
    assert DQS_KEY not in checked.stdout + checked.stderr
    config = tomllib.loads(out.read_text())
    assert rule_checks(config) == {
        ("connect", "ip_list"),
        ("connect", "private_ip"),
        ("connect", "rdns"),
        ("connect", "dnsbl"),
        ("helo", "helo"),
        ("mail", "sender"),
        ("mail", "dbl"),
        ("rcpt", "tls_required"),
        ("rcpt", "recipient"),
        ("data", "dmarc"),
        ("data", "spf"),
    }
    (dnsbl,) = config["rules"]["connect"][3:4]
    assert dnsbl["dqs_key"] == DQS_KEY
    assert dnsbl["zones"] == [{"zone": "zen.spamhaus.org", "codes": ["127.0.0.2-127.0.0.11"]}]
    assert config["rules"]["mail"][-1]["dqs_key"] == DQS_KEY  # the DBL through DQS too
    assert "observe" not in config["rules"]["rcpt"][0]  # TLS required: on
    assert [r["name"] for r in config["rules"]["mail"]] == [
        "botnet senders",
        "sender verification",
        "Spamhaus DBL",
    ]
    assert config["tls"]["certificate"] == str(tls_files["certificate"])
    assert config["spamd"] == {
        "address": "127.0.0.1:783", "tag_level": 4.5, "kill_level": 16.0, "on_failure": "accept"
    }  # fmt: skip
    assert config["clamd"]["address"] == "/run/clamav/clamd.ctl"
    assert config["authentication"] == {"enabled": True}
    assert set(config["lists"]) == {"whitelist_connect_hosts", "recipients"}
    recipients = (out.parent / "lists" / "recipients").read_text().splitlines()
    assert [line for line in recipients if not line.startswith("#")] == [
        "postmaster@example.test",
        "abuse@example.test",
        "postmaster@example.net",
        "abuse@example.net",
    ]
    hosts = (out.parent / "lists" / "whitelist_connect_hosts").read_text()
    assert hosts.startswith("# ") and hosts.endswith("192.0.2.10\n198.51.100.0/24\n")
    text = out.read_text()
    for heading in ("[[rules.connect]]", "# DNS blocklists.", "# Unknown recipients are refused"):
        assert heading in text
    for absent in ("header_sender", "history", "ratelimit", "generic", "[rspamd]", "[ldap]"):
        assert absent not in text, absent


def test_an_active_directory_shop_gets_ldap_with_proxy_addresses_rspamd_and_a_next_hop(
    tmp_path: Path,
) -> None:
    password = tmp_path / "ldap.pw"
    password.write_text("pw-9d1f7c\n")
    answers = write_answers(
        tmp_path / "answers.toml",
        {
            "hostname": "mx.corp.test",
            "domains": ["corp.test"],
            "next_hop": "10.0.0.5:25",
            "relay_from_hosts": ["10.0.0.0/8"],
            **paths_in(tmp_path / "var"),
            **FEATURES_OFF,
            "recipients": "ad",
            "ldap_servers": ["ldaps://dc1.corp.test", "ldaps://dc2.corp.test"],
            "ldap_bind_dn": "cn=mailcheck,ou=services,dc=corp,dc=test",
            "ldap_bind_password_file": str(password),
            "spam_scanner": "rspamd",
        },
    )
    out = tmp_path / "etc" / "palisade.toml"
    result = init(tmp_path, "--answers", str(answers), "--output", str(out), "--no-dns")
    assert result.returncode == 0, result.stderr
    check_config(tmp_path, out, "--no-dns")
    config = tomllib.loads(out.read_text())
    assert config["domains"] == {"local": [], "relay": ["corp.test"]}
    assert config["delivery"]["next_hop"] == "10.0.0.5:25"
    assert config["relay"]["relay_from_hosts"] == ["10.0.0.0/8"]
    assert config["ldap"] == {
        "servers": ["ldaps://dc1.corp.test", "ldaps://dc2.corp.test"],
        "base_dn": "dc=corp,dc=test",
        "filter": "(proxyAddresses=smtp:%s)",
        "attributes": ["proxyAddresses"],
        "bind_dn": "cn=mailcheck,ou=services,dc=corp,dc=test",
        "bind_password_file": str(password),
        "timeout": "5s",
        "positive_ttl": "1h",
        "negative_ttl": "5m",
    }
    assert config["rspamd"] == {
        "url": "http://127.0.0.1:11333", "tag_level": 6.0, "kill_level": 15.0,
        "on_failure": "accept",
    }  # fmt: skip
    assert "spamd" not in config and "clamd" not in config
    assert rule_checks(config) == {("mail", "local_sender"), ("rcpt", "recipient")}
    recipient = config["rules"]["rcpt"][0]
    assert recipient["list"] == "recipients" and recipient["timeout"] == "8s"
    assert "pw-9d1f7c" not in out.read_text()


def test_a_gateway_started_on_the_defaults_accepts_a_message(
    tmp_path: Path, dns: ZoneServer
) -> None:
    port = free_port()
    answers = write_answers(
        tmp_path / "answers.toml",
        {"listen": [f"127.0.0.1:{port}"], "user": "", "nameservers": [f"127.0.0.1:{dns.port}"]},
    )
    out = tmp_path / "etc" / "palisade.toml"
    result = init(
        tmp_path,
        *("--answers", str(answers), "--output", str(out), "--paths-root", str(tmp_path / "r")),
        *("--hostname", "mx.example.test", "--domain", "example.test"),
    )
    assert result.returncode == 0, result.stderr
    config = tomllib.loads(out.read_text())
    assert "user" not in config["server"]
    assert {"dnsbl", "rdns", "ratelimit", "history", "sender", "dmarc"} <= {
        check for _, check in rule_checks(config)
    }  # the default features are on
    gateway = GatewayProcess(base=tmp_path, port=port, config_path=out, sections={}).start()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("mail.sender.test")
            client.sendmail(
                "alice@sender.test",
                ["postmaster@example.test"],
                "From: Alice <alice@sender.test>\r\nTo: postmaster@example.test\r\n"
                "Subject: hello\r\nMessage-ID: <1@sender.test>\r\n\r\nhello\r\n",
            )
        new = tmp_path / "r" / "var" / "mail" / "palisade" / "postmaster" / "new"
        (message,) = wait_for(lambda: list(new.iterdir()) if new.is_dir() else [])
        assert b"Subject: hello" in message.read_bytes()
    finally:
        assert gateway.stop() == 0, gateway.stderr()


def test_an_existing_config_gets_a_new_file_and_a_diff_and_force_replaces_it(
    tmp_path: Path,
) -> None:
    out = tmp_path / "etc" / "palisade.toml"
    common = ("--yes", "--output", str(out), "--paths-root", str(tmp_path / "r"), "--no-dns")
    first = init(tmp_path, *common, "--hostname", "mx.example.test", "--domain", "example.test")
    assert first.returncode == 0, first.stderr
    (out.parent / "lists" / "whitelist_connect_hosts").write_text("192.0.2.99\n")  # the admin's
    original = out.read_text()
    same = init(tmp_path, *common, "--hostname", "mx.example.test", "--domain", "example.test")
    assert same.returncode == 0, same.stderr
    assert f"{out} is already what these answers make: unchanged" in same.stdout
    assert not out.with_name("palisade.toml.new").exists()
    second = init(
        tmp_path, *common, "--hostname", "mx2.example.test", "--domain", "a.test",
        "--domain", "b.test", "--next-hop", "10.0.0.5:25",
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert out.read_text() == original
    new = out.with_name("palisade.toml.new")
    assert f"{out} exists: wrote {new} instead (--force replaces it)" in second.stdout
    assert f"--- {out}\n+++ {new}\n" in second.stdout
    assert '-hostname = "mx.example.test"' in second.stdout
    assert '+hostname = "mx2.example.test"' in second.stdout
    assert f"{new} passes the self-check" in second.stdout
    config = tomllib.loads(new.read_text())
    assert config["domains"]["relay"] == ["a.test", "b.test"]
    assert config["delivery"]["next_hop"] == "10.0.0.5:25"
    assert (out.parent / "lists" / "whitelist_connect_hosts").read_text() == "192.0.2.99\n"
    assert "kept" in second.stdout
    third = init(tmp_path, *common, "--force", "--hostname", "mx2.example.test")
    assert third.returncode == 0, third.stderr
    assert tomllib.loads(out.read_text())["server"]["hostname"] == "mx2.example.test"
    assert f"wrote {out}\n" in third.stdout


def test_the_answers_written_back_make_the_same_config(tmp_path: Path) -> None:
    answers = write_answers(
        tmp_path / "answers.toml",
        {"hostname": "mx.example.test", "domains": ["example.test"], "recipients": "file",
         "spam_scanner": "rspamd", "spam_kill_level": 12, "dnsbl_zones": ["zen.spamhaus.org"]},
    )  # fmt: skip
    out = tmp_path / "etc" / "palisade.toml"
    common = ("--output", str(out), "--paths-root", str(tmp_path / "r"), "--no-dns")
    assert init(tmp_path, "--answers", str(answers), *common).returncode == 0
    written_back = out.parent / "init-answers.toml"
    config, saved = out.read_text(), written_back.read_text()
    assert tomllib.loads(saved)["spam_kill_level"] == 12.0
    assert tomllib.loads(saved)["spam_tag_level"] == 6.0  # rspamd's default was filled in
    again = init(tmp_path, "--answers", str(written_back), *common, "--force")
    assert again.returncode == 0, again.stderr
    assert out.read_text() == config
    assert written_back.read_text() == saved


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("colour = 1", "answers file {file}: colour: unknown answer key(s) (known: hostname, "),
        ('ratelimit_connections = "ten"', "answers file {file}: ratelimit_connections: expected "
         "a whole number, got 'ten'"),
        ('hostname = "-bad-"', "answers file {file}: hostname: expected a fully qualified host "
         "name like mx.example.org, got '-bad-'"),
        ('next_hop = "10.0.0.5:99999"', "answers file {file}: next_hop: expected a port from 1 "
         "to 65535 in '10.0.0.5:99999'"),
        ('recipients = "nis"', "answers file {file}: recipients: expected one of none, file, "
         "ldap, ad, got 'nis'"),
        ("dnsbl = [", "answers file {file}: (syntax): not valid TOML"),
    ],
)  # fmt: skip
def test_a_malformed_answers_file_is_one_line_naming_the_key(
    tmp_path: Path, line: str, expected: str
) -> None:
    answers = tmp_path / "answers.toml"
    answers.write_text(f'domains = ["example.test"]\n{line}\n')
    out = tmp_path / "etc" / "palisade.toml"
    result = init(tmp_path, "--answers", str(answers), "--output", str(out))
    assert result.returncode == 2
    assert result.stderr.startswith("palisade init: " + expected.format(file=answers))
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert not out.parent.exists()  # nothing written


def test_without_a_terminal_or_answers_it_says_what_to_give(tmp_path: Path) -> None:
    result = init(tmp_path, "--output", str(tmp_path / "p.toml"))
    assert result.returncode == 2
    assert result.stderr == (
        "palisade init: standard input is not a terminal: give --answers FILE or --yes\n"
    )


class Terminal:
    """``palisade init`` on a pseudo-terminal: read up to each prompt, answer it."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: the command on the terminal (never back into pytest)
            try:
                os.chdir(cwd)
                os.execv(sys.executable, [sys.executable, "-m", "palisade", *args])
            finally:
                os._exit(127)
        self.pid, self.fd, self.seen = pid, fd, ""

    def read_prompt(self, timeout: float = 30) -> str | None:
        """The text up to the next question (ending in ``]: ``), or None when it exited."""
        start = len(self.seen)
        while not self.seen.endswith("]: "):
            ready, _, _ = select.select([self.fd], [], [], timeout)
            assert ready, f"no prompt within {timeout}s: {self.seen[start:]!r}"
            try:
                data = os.read(self.fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                data = b""
            if not data:
                return None
            self.seen += data.decode(errors="replace").replace("\r\n", "\n")
        prompt = self.seen[start:]
        return prompt

    def answer(self, text: str) -> None:
        os.write(self.fd, text.encode() + b"\n")
        self.seen += "\n"  # so the next prompt is read past this one

    def drive(self, answers: dict[str, list[str]]) -> list[str]:
        """Answers each question that starts with a key of ``answers`` with the next of its
        texts, and every other one with Enter (the default); the questions asked."""
        prompts = []
        while (prompt := self.read_prompt()) is not None:
            question = prompt.splitlines()[-1]
            prompts.append(question)
            key = next((k for k in answers if question.startswith(k)), None)
            self.answer(answers[key].pop(0) if key else "")
        return prompts

    def wait(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)


def test_an_interactive_run_on_a_terminal(tmp_path: Path) -> None:
    out = tmp_path / "etc" / "palisade.toml"
    args = ["init", "--output", str(out), "--paths-root", str(tmp_path / "r"), "--no-dns"]
    terminal = Terminal(args, tmp_path)
    answers = {
        "Host name this gateway greets with": ["mx.example.test"],
        "Mail domains received here": ["example.test"],
        "Internal mail server": ["no such host:x", ""],  # refused, asked again, default taken
        "Refuse clients listed in DNS blocklists": ["maybe", "no"],
        "Spam scanner": ["spamd"],
    }
    prompts = terminal.drive(answers)
    assert terminal.wait() == 0, terminal.seen
    assert f"{out} passes the self-check" in terminal.seen
    shown = "\n".join(prompts)
    assert "Host name this gateway greets with [" in shown
    assert "Refuse clients listed in DNS blocklists (yes/no) [yes]: " in shown
    assert "Spam scanner (none/spamd/rspamd) [none]: " in shown
    assert "Score at which messages are refused [16]: " in shown  # spamd's, as it was chosen
    assert not any(p.startswith("LDAP") for p in prompts)  # recipients none: not asked
    assert "not accepted: expected a port from 1 to 65535 in 'no such host:x'" in terminal.seen
    assert "not accepted: expected yes or no, got 'maybe'; please answer again" in terminal.seen
    assert all(not rest for rest in answers.values()), answers
    config = tomllib.loads(out.read_text())
    assert config["server"]["hostname"] == "mx.example.test"
    assert config["domains"]["local"] == ["example.test"]
    assert "dnsbl" not in {check for _, check in rule_checks(config)}
    assert "rdns" in {check for _, check in rule_checks(config)}  # a default taken
    assert config["spamd"]["kill_level"] == 16.0
    saved = tomllib.loads((out.parent / "init-answers.toml").read_text())
    assert saved["dnsbl"] is False and saved["hostname"] == "mx.example.test"

    # Next time, last time's answers are the defaults; a default that derives from an answer
    # changed now (the scanner's levels) is the new answer's.
    terminal = Terminal([*args, "--force"], tmp_path)
    prompts = terminal.drive({"Spam scanner": ["rspamd"]})
    assert terminal.wait() == 0, terminal.seen
    shown = "\n".join(prompts)
    assert "the defaults offered are your answers of last time" in terminal.seen
    assert "Host name this gateway greets with [mx.example.test]: " in shown
    assert "Refuse clients listed in DNS blocklists (yes/no) [no]: " in shown
    assert "Spam scanner (none/spamd/rspamd) [spamd]: " in shown
    assert "Score at which messages are refused [15]: " in shown
    config = tomllib.loads(out.read_text())
    assert config["rspamd"]["kill_level"] == 15.0 and "dnsbl" not in str(config["rules"])
