"""Client text cannot pin a log line on another address.

A real gateway is fed hostile HELO, MAIL, RCPT, AUTH and early text (brackets, quotes, fake
timestamps, ``H=`` fields, bare CR, UTF-8) from a chosen loopback source (127.0.0.77); then
naive log readers (an exim-style regex, a fail2ban-style regex anchored after the timestamp, a
non-greedy first-bracket regex) and Debian's ``fail2ban-regex`` with the shipped filter must
find only that address in ``mainlog`` and ``rejectlog``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, GatewayProcess, wait_for
from tests.server.smtpclient import RawClient

SOURCE = "127.0.0.77"
FILTER = ROOT / "contrib" / "fail2ban" / "filter.d" / "palisade.conf"
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")

# The readers an operator might point at the logs.
NAIVE = {
    "exim-style": re.compile(r"H=.*\[(?P<ip>[0-9.]+)\].*rejected"),
    "fail2ban-style greedy": re.compile(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d .*\[(?P<ip>\d+\.\d+\.\d+\.\d+)\]"
    ),
    "fail2ban-style H=": re.compile(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d .*?H=(?:\(\S*\) )?\[(?P<ip>\d+\.\d+\.\d+\.\d+)\]"
    ),
    "first bracket": re.compile(r"\[(?P<ip>\d+\.\d+\.\d+\.\d+)\]"),
}
ANY_BRACKETED = re.compile(r"\[([0-9A-Fa-f.:]+)\]")

HOSTILE: list[list[bytes]] = [
    # the two examples
    [b'EHLO ok.test', b'MAIL FROM:<"] rejected [1.2.3.4]"@x.test>', b"RCPT TO:<v@elsewhere.test>"],
    [b"EHLO x [5.6.7.8] rejected", b"EHLO x[5.6.7.8]rejected", b"MAIL FROM:<a@x.test>",
     b"RCPT TO:<v@elsewhere.test>"],
    # a whole forged line in a quoted local part, H= fields, address literals in HELO
    [b"EHLO [10.9.9.9]", b'MAIL FROM:<"2026-01-01 00:00:00 H=(a) [9.9.9.9]:25 rejected"@x.test>',
     b'RCPT TO:<"H=(b) [6.6.6.6]:25 rejected RCPT"@elsewhere.test>'],
    [b"HELO H=(evil)[4.4.4.4]:25", b'MAIL FROM:<"\\"[3.3.3.3]\\""@x.test>',
     b"RCPT TO:<v@[192.0.2.7]>", b"RCPT TO:<postmaster@[8.8.4.4]>"],
    # sender and recipient that a rule refuses (deny rule with $sender/$recipient in its log)
    [b"EHLO deny.test", b'MAIL FROM:<"deny [2.2.2.2] rejected"@x.test>'],
    # an accepted message: the arrival line shows the sender before H=, the delivery lines
    # (=> and ** for the recipient the Maildir cannot hold) the recipients
    [b"EHLO ok.test", b'MAIL FROM:<"[1.2.3.4] rejected H=(a) [4.3.2.1]"@x.test>',
     b'RCPT TO:<"x [5.4.3.2]"@example.test>', b"RCPT TO:<user@example.test>", b"DATA",
     b"Subject: [9.9.9.8]\r\n\r\nhi\r\n."],
    # protocol errors whose reason could echo client text
    [b"EHLO ok.test", b"MAIL FROM:<a@x.test> [7.7.7.7]=1", b"MAIL FROM:<a@[7.7.7.300]>",
     b"[1.1.1.1] rejected", b"AUTH [8.8.8.8]", b"AUTH PLAIN"],
    # bare CR inside a command line, UTF-8 in HELO, MAIL and RCPT
    [b"HELO a\r[3.4.5.6] rejected", "EHLO é[5.5.5.5]".encode(),
     b"EHLO ok.test", "MAIL FROM:<é[6.6.6.1]@x.test>".encode(),
     b"MAIL FROM:<a@x.test>", "RCPT TO:<\"é [6.6.6.2]\"@elsewhere.test>".encode()],
]  # fmt: skip


def rules() -> dict[str, Any]:
    return {
        "helo": [
            {
                "check": "helo",
                "patterns": ["."],
                "verb": "warn",
                "log_message": "WARN - odd HELO $helo",
            },
            {
                "check": "helo",
                "patterns": ["."],
                "observe": True,
                "verb": "deny",
                "log_message": "DENY - HELO $helo",
            },
        ],
        "mail": [
            {
                "check": "sender",
                "patterns": ["."],
                "observe": True,
                "verb": "deny",
                "log_message": "DENY - sender $sender",
            },
            {
                "check": "sender",
                "patterns": ["deny"],
                "verb": "deny",
                "message": "Access denied",
                "log_message": "DENY - sender $sender from $helo",
            },
        ],
    }


def converse(port: int, turns: list[bytes]) -> None:
    with RawClient(port, source=SOURCE) as client:
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.reply()
        for turn in turns:
            try:
                client.send(turn + b"\r\n")
                client.reply()
            except (ConnectionError, OSError):
                return
        client.send(b"QUIT\r\n")


def early_talker(port: int, text: bytes) -> None:
    with RawClient(port, source=SOURCE) as client:
        client.send(text + b"\r\n")
        assert client.closed()


def hostile_logs(make_gateway: Any) -> GatewayProcess:
    # no pass cache: the early talker at the end comes from the same address as the rest
    gw: GatewayProcess = make_gateway(
        server={"greeting_delay": 0.3, "pregreet_pass_ttl": 0}, rules=rules()
    )
    for turns in HOSTILE:
        converse(gw.port, turns)
    early_talker(gw.port, b'EHLO x\r\n2026-01-01 00:00:00 H=(a) [9.8.7.6]:1 rejected "[1.2.3.4]"')
    wait_for(lambda: 'input="' in gw.rejectlog() and " ** " in gw.mainlog())
    return gw


def lines_of(gw: GatewayProcess) -> list[str]:
    return [ln for ln in gw.mainlog().splitlines() + gw.rejectlog().splitlines() if ln]


def test_naive_readers_only_ever_find_the_real_client(make_gateway: Any) -> None:
    gw = hostile_logs(make_gateway)
    lines = lines_of(gw)
    for line in lines:
        assert STAMP.match(line), line  # no line was split or forged
        found = ANY_BRACKETED.findall(line)
        assert found in ([], [SOURCE]), line  # at most one bracketed address: the client's
        for name, regex in NAIVE.items():
            match = regex.search(line)
            if match:
                assert match["ip"] == SOURCE, (name, line)
    # the readers did have something to find: every kind of hostile line is there
    text = "\n".join(lines)
    for needle in [
        "rejected RCPT",
        "rejected MAIL",
        "Warning: WARN - odd HELO",
        "would deny: DENY - HELO",
        "would deny: DENY - sender",
        'SMTP protocol error in "AUTH \\x5b8.8.8.8\\x5d" H=(ok.test) [127.0.0.77]:',
        "SMTP protocol error in syntax",
        "SMTP protocol error in bare_cr",
        "SMTP protocol synchronization error",
        " <= ",
        " => ",
        " ** ",
    ]:
        assert needle in text, needle
    exim = [ln for ln in lines if NAIVE["exim-style"].search(ln)]
    assert len(exim) >= 8
    # what the client typed is still readable (escaped, not lost)
    assert r"F=<\x22] rejected \x5b1.2.3.4\x5d\x22@x.test>" not in text  # quotes escaped too
    assert r"F=<\x22\x5d rejected \x5b1.2.3.4\x5d\x22@x.test>" in text
    assert r"H=(x\x5b5.6.7.8\x5drejected) [127.0.0.77]:" in text


@pytest.mark.skipif(
    shutil.which("fail2ban-regex") is None and not os.environ.get("CI"),
    reason="fail2ban-regex not installed (make test installs Debian's fail2ban)",
)
def test_fail2ban_filter_finds_only_the_real_client(make_gateway: Any, tmp_path: Path) -> None:
    gw = hostile_logs(make_gateway)
    # a second client from another loopback address, with one protocol error only
    with RawClient(gw.port, source="127.0.0.78") as client:
        client.reply()
        assert client.command("EHLO a b")[0] == 501
        client.send(b"QUIT\r\n")
    wait_for(lambda: "127.0.0.78" in gw.rejectlog())
    log = tmp_path / "rejectlog"
    log.write_text(gw.rejectlog())
    result = subprocess.run(
        ["fail2ban-regex", "-o", "ip", str(log), str(FILTER)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    found = result.stdout.split()
    assert set(found) == {SOURCE, "127.0.0.78"}, result.stdout
    assert found.count("127.0.0.78") == 1
    # every refusal and protocol error line of the hostile client counted (none missed)
    assert found.count(SOURCE) == len(gw.rejectlog().splitlines()) - 1, result.stdout
