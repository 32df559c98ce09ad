"""SpamdScanner against a real spamd (SpamAssassin 4, local tests only) on loopback.

The spamd is started once per session (``conftest.spamd``, about 1.5 s); "stopped" is a port or
socket path where nothing listens, "hanging" is the real spamd under SIGSTOP.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest

from palisade.adapters.scanner_io import parse_address
from palisade.adapters.spamd import SpamdScanner
from palisade.ports import ServiceTempError, SpamScanner
from tests.conftest import free_port, wait_for
from tests.scanners.conftest import (
    GTUBE,
    HAM_BODY,
    FileSource,
    ScriptedServer,
    SilentServer,
    message_bytes,
    run,
    write_message,
)
from tests.scanners.spamd import SpamdProcess

TAG_LEVEL = 4.5
KILL_LEVEL = 16.0


def test_gtube_scores_over_the_kill_level(spamd: SpamdProcess, tmp_path: Path) -> None:
    scanner = SpamdScanner(spamd.address, timeout=20)
    assert isinstance(scanner, SpamScanner)
    source = write_message(tmp_path, message_bytes(HAM_BODY + GTUBE + "\n"))
    report = run(scanner.scan(source))
    assert report.score >= KILL_LEVEL
    assert "GTUBE" in report.rules
    assert report.scanner == "spamd"
    assert all(rule.replace("_", "").isalnum() for rule in report.rules)


def test_ordinary_message_scores_under_the_tag_level(spamd: SpamdProcess, tmp_path: Path) -> None:
    report = run(SpamdScanner(spamd.address).scan(write_message(tmp_path, message_bytes(HAM_BODY))))
    assert report.score < TAG_LEVEL
    assert "GTUBE" not in report.rules


def test_unix_socket_and_user(spamd: SpamdProcess, tmp_path: Path) -> None:
    """A socket path is a Unix socket; ``user`` is sent as spamc's -u (spamd logs it)."""
    scanner = SpamdScanner(str(spamd.socket_path), user="bob-scan")
    report = run(scanner.scan(write_message(tmp_path, message_bytes(GTUBE + "\n"))))
    assert report.score >= KILL_LEVEL and "GTUBE" in report.rules
    wait_for(lambda: "for bob-scan:" in spamd.log(), timeout=5)


def test_large_message_is_streamed_whole(spamd: SpamdProcess, tmp_path: Path) -> None:
    """~140 KiB (three chunks, mostly a base64 attachment, which SpamAssassin scans quickly):
    spamd read every byte (it logs the size it scanned) and finds GTUBE in the text part."""
    encoded = base64.encodebytes(bytes(range(256)) * 400).decode().replace("\n", "\r\n")
    data = (
        "From: a@example.org\r\nTo: b@example.net\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        f"--b1\r\nContent-Type: text/plain\r\n\r\n{GTUBE}\r\n"
        "--b1\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Transfer-Encoding: base64\r\n\r\n{encoded}--b1--\r\n"
    ).encode()
    source = write_message(tmp_path, data)
    assert source.size > 2 * 64 * 1024
    report = run(SpamdScanner(spamd.address, max_size=1_000_000).scan(source))
    assert "GTUBE" in report.rules
    wait_for(lambda: f" seconds, {source.size} bytes." in spamd.log(), timeout=5)


def test_spamd_stopped_is_a_temporary_error(tmp_path: Path) -> None:
    source = write_message(tmp_path, message_bytes(HAM_BODY))
    port = free_port()
    with pytest.raises(ServiceTempError) as info:
        run(SpamdScanner(f"127.0.0.1:{port}").scan(source))
    assert info.value.reason == f"spamd 127.0.0.1:{port}: Connection refused"
    missing = tmp_path / "no-spamd.sock"
    with pytest.raises(ServiceTempError) as info:
        run(SpamdScanner(str(missing)).scan(source))
    assert info.value.reason == f"spamd {missing}: No such file or directory"


def test_spamd_hanging_times_out(spamd: SpamdProcess, tmp_path: Path) -> None:
    source = write_message(tmp_path, message_bytes(HAM_BODY))
    with spamd.paused():
        started = time.monotonic()
        with pytest.raises(ServiceTempError) as info:
            run(SpamdScanner(spamd.address, timeout=0.5).scan(source))
        elapsed = time.monotonic() - started
    assert info.value.reason == f"spamd {spamd.address}: no answer within 0.5s"
    assert 0.4 < elapsed < 2.0


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (b"SPAMD/1.0 76 Bad header line: (EOF)\r\n", "spamd refused the request: 76 Bad header"),
        (b"HTTP/1.0 400 Bad Request\r\n\r\n", "not a SPAMD reply: HTTP/1.0 400 Bad Request"),
        (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\n\r\n", "reply without a valid Spam header"),
        (b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; lots / 5.0\r\n\r\n", "without a valid Spam"),
        (b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 9.0 / 5.0\r\nContent-length: 50\r\n\r\nA", "closed"),
        (b"", "connection closed without a reply"),
        (b"SPAMD/1.1 0 EX_OK\r\n" + b"X" * 70000, "reply line too long"),
        (b"SPAMD/1.1 0 EX_OK\r\nno colon here\r\n\r\n", "bad reply header: no colon here"),
        (b"SPAMD/1.1 0 EX_OK\r\n" + b"X-A: b\r\n" * 12000, "reply header section too long"),
    ],
)
def test_bad_replies_are_temporary_errors(reply: bytes, reason: str, tmp_path: Path) -> None:
    server = ScriptedServer(reply)
    try:
        with pytest.raises(ServiceTempError) as info:
            run(SpamdScanner(server.address).scan(write_message(tmp_path, b"Subject: x\r\n\r\nx")))
    finally:
        server.close()
    assert info.value.reason.startswith(f"spamd {server.address}: ")
    assert reason in info.value.reason


def test_request_format_and_rule_filtering(tmp_path: Path) -> None:
    """The request spamc would send (SYMBOLS, Content-length, User, the message, half-close);
    rule names that are not plain tokens are dropped."""
    body = b"GTUBE, BAD NAME,X\x1b[31m,RCVD_IN_X ,GTUBE"
    reply = b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\nSpam: False ; -1.5 / 5.0\r\n\r\n" % len(
        body
    )
    server = ScriptedServer(reply + body)
    data = b"Subject: hello\r\n\r\nbody\r\n"
    try:
        report = run(SpamdScanner(server.address, user="u1").scan(write_message(tmp_path, data)))
    finally:
        server.close()
    assert report.score == -1.5
    assert report.rules == ("GTUBE", "RCVD_IN_X")
    assert server.requests == [
        b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\nUser: u1\r\n\r\n" % len(data) + data
    ]


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:783", 1) == ("127.0.0.1", 783)
    assert parse_address("spamd.example.net", 783) == ("spamd.example.net", 783)
    assert parse_address("[::1]:7830", 783) == ("::1", 7830)
    assert parse_address("::1", 783) == ("::1", 783)
    assert parse_address("/run/spamd.sock", 783) == "/run/spamd.sock"
    assert parse_address("unix:/run/spamd.sock", 783) == "/run/spamd.sock"
    for bad in ("", "host:0", "host:99999", "host:x", ":783", "[::1", "[nonsense]:1"):
        with pytest.raises(ValueError):
            parse_address(bad, 783)
    with pytest.raises(ValueError):
        SpamdScanner("127.0.0.1:783", user="a\r\nb")


class LyingSource(FileSource):
    """A spool file whose declared size (known beforehand) is not what is on disk."""

    def __init__(self, path: Path, size: int) -> None:
        super().__init__(path)
        self.declared = size

    @property
    def size(self) -> int:
        return self.declared


def test_short_spool_file_is_a_temporary_error(silent: SilentServer, tmp_path: Path) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(b"Subject: x\r\n\r\nx")
    size = path.stat().st_size + 10
    with pytest.raises(ServiceTempError) as info:
        run(SpamdScanner(silent.address, timeout=5).scan(LyingSource(path, size)))
    assert info.value.reason == (
        f"spamd {silent.address}: spool file ended 10 bytes before its size {size}"
    )
    path.unlink()
    with pytest.raises(ServiceTempError) as info:
        run(SpamdScanner(silent.address, timeout=5).scan(LyingSource(path, 5)))
    assert "cannot read the spool file: No such file or directory" in info.value.reason
