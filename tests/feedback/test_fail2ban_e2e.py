"""The shipped fail2ban filter (contrib/fail2ban) on lines a real gateway wrote in this run.

One gateway; each kind of refusal is driven by a real client from its own loopback address
(raw sockets with TCP_NODELAY, smtplib, swaks), plus clients that are not hostile (a deferral,
an accepted message, a command time-out, a failed STARTTLS handshake). Debian's
``fail2ban-regex`` then reads the whole ``mainlog`` (every line the gateway wrote, arrivals and
deliveries included):

- Palisade's filter matches every hostile line (the reject-log lines of the hostile clients,
  except the two kinds the filter leaves out on purpose: ``temporarily rejected`` and
  ``message too big``), each for the address of the client that caused it, and nothing else;
- Debian's stock ``exim`` filter (normal mode) matches the lines where Palisade writes exim's
  own format: the pregreet and pipelining synchronization errors (``input="..."``), the
  too-many-errors drop (``last command was``), AUTH when not advertised and the refused relay
  attempt (``relay not permitted``).
"""

from __future__ import annotations

import os
import smtplib
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import ROOT, GatewayProcess, wait_for
from tests.server.smtpclient import RawClient
from tests.services import need_program

FILTER = ROOT / "contrib" / "fail2ban" / "filter.d" / "palisade.conf"
JAIL = ROOT / "contrib" / "fail2ban" / "jail.d" / "palisade.conf"
EXIM_FILTER = Path("/etc/fail2ban/filter.d/exim.conf")

# one client address per kind of refusal
HOSTILE = {
    "connect": "127.0.0.11",
    "helo": "127.0.0.13",
    "mail": "127.0.0.14",
    "rcpt_unknown": "127.0.0.15",
    "relay": "127.0.0.16",
    "smuggling": "127.0.0.17",
    "pregreet": "127.0.0.18",
    "pipelining": "127.0.0.19",
    "too_many_errors": "127.0.0.20",
    "syntax": "127.0.0.21",
    "auth": "127.0.0.22",
    "per_ip_limit": "127.0.0.23",
    "data_rule": "127.0.0.24",
}
DEFERRED = "127.0.0.12"  # temporarily rejected: not hostile
TOO_BIG = ("127.0.0.25", "127.0.0.26")  # too big (declared with SIZE, sent): not counted
GOOD = ("127.0.0.30", "127.0.0.31")  # accepted mail, smtplib and swaks
SLOW = "127.0.0.32"  # a command time-out: not hostile
TLS_FAILS = "127.0.0.33"  # a failed STARTTLS handshake: not hostile (old clients, scanners)
# the lines where Palisade follows exim's format, so Debian's stock exim filter matches them
EXIM_MATCHES = {"pregreet", "pipelining", "too_many_errors", "auth", "relay"}


def config() -> dict[str, Any]:
    return {
        "server": {"greeting_delay": 0.3, "pregreet_pass_ttl": 0, "max_connections_per_ip": 2},
        "limits": {"command_timeout": 1, "max_errors": 3, "max_message_size": 2048},
        "lists": {
            "denied": {"type": "ip", "entries": [HOSTILE["connect"]]},
            "deferred": {"type": "ip", "entries": [DEFERRED]},
            "recipients": {"type": "address", "entries": ["user@example.test"]},
        },
        "rules": {
            "connect": [
                {"name": "denied", "check": "ip_list", "list": "denied", "verb": "deny",
                 "message": "Access denied", "log_message": "DENY - listed host"},
                {"name": "deferred", "check": "ip_list", "list": "deferred", "verb": "defer",
                 "message": "Try later", "log_message": "DEFER - slow down"},
            ],
            "helo": [
                {"name": "botnet HELO", "check": "helo", "patterns": ["^ylmf-pc$"], "verb": "deny",
                 "message": "Access denied", "log_message": "DENY - HELO $helo"},
            ],
            "mail": [
                {"name": "botnet sender", "check": "sender", "patterns": ["^Anastasia.{2,5}@"],
                 "verb": "deny", "message": "Access denied", "log_message": "DENY - botnet"},
            ],
            "rcpt": [
                {"name": "valid recipients", "check": "recipient", "list": "recipients",
                 "verb": "deny", "code": 550, "enhanced": "5.1.1",
                 "message": "User unknown", "log_message": "DENY - unknown recipient"},
            ],
            "data": [
                {"name": "spammer", "check": "regex", "field": "sender",
                 "patterns": ["^spammer@"], "verb": "deny",
                 "message": "Spam", "log_message": "DENY - known spammer"},
            ],
        },
    }  # fmt: skip


def raw(gw: GatewayProcess, source: str) -> RawClient:
    client = RawClient(gw.port, source=source)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client


def smtp(gw: GatewayProcess, source: str) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", gw.port, source_address=(source, 0), timeout=10)


def swaks(gw: GatewayProcess, source: str, *args: str) -> subprocess.CompletedProcess[str]:
    program = need_program("swaks", "swaks")
    return subprocess.run(
        [program, "--server", f"127.0.0.1:{gw.port}", "--local-interface", source,
         "--timeout", "10", "--helo", "client.test", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def drive(gw: GatewayProcess) -> None:
    """Every kind of refusal once, by a real client, and the clients that are not hostile."""
    with raw(gw, HOSTILE["connect"]) as client:
        assert client.reply()[0] == 554
    with raw(gw, DEFERRED) as client:
        assert client.reply()[0] // 100 == 4
    with smtp(gw, HOSTILE["helo"]) as session:
        assert session.ehlo("ylmf-pc")[0] == 550
    done = swaks(
        gw, HOSTILE["mail"], "--from", "Anastasia123@bot.test", "--to", "user@example.test"
    )
    assert "550" in done.stdout, done.stdout
    with smtp(gw, HOSTILE["rcpt_unknown"]) as session:
        session.ehlo("client.test")
        session.mail("a@client.test")
        assert session.rcpt("nobody@example.test")[0] == 550
    done = swaks(gw, HOSTILE["relay"], "--from", "a@client.test", "--to", "v@elsewhere.test")
    assert "<** 550" in done.stdout, done.stdout
    with raw(gw, HOSTILE["smuggling"]) as client:
        client.reply()
        client.command("EHLO client.test")
        client.command("MAIL FROM:<a@client.test>")
        client.command("RCPT TO:<user@example.test>")
        assert client.command("DATA")[0] == 354
        client.send(b"Subject: x\r\n\r\nouter\n.\r\nMAIL FROM:<ceo@example.test>\r\n.\r\n")
        assert client.reply()[0] >= 500
    with raw(gw, HOSTILE["pregreet"]) as client:
        client.send(b"EHLO early.test\r\n")
        assert client.closed()
    with raw(gw, HOSTILE["pipelining"]) as client:
        client.reply()
        client.send(b"HELO client.test\r\nMAIL FROM:<a@client.test>\r\n")
        assert client.reply()[0] == 554
    with raw(gw, HOSTILE["too_many_errors"]) as client:
        client.reply()
        for n in range(3):
            assert client.command(f"XYZZY {n}")[0] == 500
        client.send(b"NOOP\r\n")
        assert client.reply()[0] == 421
    with raw(gw, HOSTILE["syntax"]) as client:
        client.reply()
        assert client.command("EHLO a b")[0] == 501
        client.command("QUIT")
    with raw(gw, HOSTILE["auth"]) as client:
        client.reply()
        client.command("EHLO client.test")
        assert client.command("AUTH PLAIN AGFAYg==")[0] == 503
        client.command("QUIT")
    held = [raw(gw, HOSTILE["per_ip_limit"]) for _ in range(2)]
    for client in held:
        assert client.reply()[0] == 220
    with raw(gw, HOSTILE["per_ip_limit"]) as client:
        assert client.reply()[0] == 421
    for client in held:
        client.sock.close()
    with smtp(gw, HOSTILE["data_rule"]) as session:
        session.ehlo("client.test")
        try:
            session.sendmail(
                "spammer@client.test", ["user@example.test"], "Subject: x\r\n\r\nx\r\n"
            )
        except smtplib.SMTPDataError as exc:
            assert exc.smtp_code == 550
        else:
            raise AssertionError("the spammer's message was accepted")
    with smtp(gw, TOO_BIG[0]) as session:
        session.ehlo("client.test")
        try:
            session.sendmail(
                "a@client.test", ["user@example.test"], "Subject: big\r\n\r\n" + "x" * 70 * 60
            )
        except (smtplib.SMTPDataError, smtplib.SMTPSenderRefused) as exc:
            assert exc.smtp_code == 552
        else:
            raise AssertionError("the big message was accepted")
    with raw(gw, TOO_BIG[1]) as client:  # no SIZE: refused after DATA
        client.reply()
        client.command("EHLO client.test")
        client.command("MAIL FROM:<a@client.test>")
        client.command("RCPT TO:<user@example.test>")
        assert client.command("DATA")[0] == 354
        client.send(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 60 + b".\r\n")
        assert client.reply()[0] == 552
    # not hostile: accepted mail (two kinds of client), a command time-out
    with smtp(gw, GOOD[0]) as session:
        session.sendmail("a@client.test", ["user@example.test"], "Subject: hi\r\n\r\nhello\r\n")
    done = swaks(gw, GOOD[1], "--from", "b@client.test", "--to", "user@example.test")
    assert "<-  250" in done.stdout, done.stdout
    with raw(gw, TLS_FAILS) as client:
        client.reply()
        client.command("EHLO client.test")
        assert client.command("STARTTLS")[0] == 220
        client.send(b"this is no TLS ClientHello\r\n")
        assert client.closed()
    with raw(gw, SLOW) as client:
        client.reply()
        assert client.closed(timeout=10)  # 421 after command_timeout, then closed
    wait_for(lambda: all(ip in gw.mainlog() for ip in (*HOSTILE.values(), *GOOD, SLOW, TLS_FAILS)))
    wait_for(lambda: gw.mainlog().count(" Completed") == 2)


def fail2ban(log: Path, filter_file: Path) -> list[str]:
    """The addresses ``fail2ban-regex`` finds, one per matched line."""
    done = subprocess.run(
        ["fail2ban-regex", "-o", "ip", str(log), str(filter_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.split()


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    need_program("fail2ban-regex", "fail2ban")
    from tests.conftest import GatewayProcess, free_port, gateway_sections, write_config

    base = tmp_path_factory.mktemp("fail2ban")
    port = free_port()
    cert = trustme.CA().issue_cert("mx.example.test")
    chain, key = base / "chain.pem", base / "key.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key.write_bytes(cert.private_key_pem.bytes())
    sections = gateway_sections(
        port, tls={"certificate": str(chain), "private_key": str(key)}, **config()
    )
    gw = GatewayProcess(base, port, write_config(base / "palisade.toml", sections), sections)
    gw.start()
    try:
        drive(gw)
        mainlog = base / "mainlog.copy"
        mainlog.write_text(gw.mainlog())
        yield gw, mainlog
    finally:
        gw.stop()


def hostile_lines(gw: GatewayProcess) -> dict[str, list[str]]:
    """The reject-log lines the filter must match, by client address."""
    wanted: dict[str, list[str]] = {}
    for line in gw.rejectlog().splitlines():
        if "temporarily rejected" in line or f"[{TOO_BIG[0]}]" in line or f"[{TOO_BIG[1]}]" in line:
            continue
        ip = next(ip for ip in HOSTILE.values() if f"[{ip}]" in line)
        wanted.setdefault(ip, []).append(line)
    return wanted


def test_palisade_filter_matches_every_hostile_line_and_nothing_else(logs: Any) -> None:
    gw, mainlog = logs
    wanted = hostile_lines(gw)
    assert set(wanted) == set(HOSTILE.values())  # every kind was logged
    found = fail2ban(mainlog, FILTER)
    assert sorted(found) == sorted(ip for ip, lines in wanted.items() for _ in lines), (
        found,
        wanted,
    )
    # the not-hostile clients' lines are in the log, and unmatched
    text = mainlog.read_text()
    for ip in (DEFERRED, *TOO_BIG, *GOOD, SLOW, TLS_FAILS):
        assert f"[{ip}]" in text
        assert ip not in found
    assert "temporarily rejected" in text and "message too big" in text
    assert "SMTP command timeout" in text and " <= " in text and "TLS error on connection" in text


def test_stock_exim_filter_matches_the_exim_shaped_lines(logs: Any) -> None:
    gw, mainlog = logs
    if not EXIM_FILTER.exists() and not os.environ.get("CI"):
        pytest.skip("Debian's fail2ban filter.d/exim.conf is not installed")
    found = fail2ban(mainlog, EXIM_FILTER)
    wanted = hostile_lines(gw)
    expected = [HOSTILE[kind] for kind in EXIM_MATCHES]
    assert set(found) == set(expected), found
    # the too-many-errors client's three unknown commands are Palisade's own lines: only its
    # drop line is exim's
    assert found.count(HOSTILE["too_many_errors"]) == 1
    total = sum(len(lines) for lines in wanted.values())
    print(f"stock exim filter: {len(found)} of {total} hostile lines")


def test_jail_uses_the_filter() -> None:
    text = JAIL.read_text()
    assert "filter   = palisade" in text and "port     = smtp,465,submission" in text
