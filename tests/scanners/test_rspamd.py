"""RspamdScanner against a real rspamd 3.4 on loopback (``tests/scanners/rspamd.py``): its normal
worker, and its controller behind a password; rspamd stopped, and a socket that accepts and
never answers (a hung rspamd).

Replies no well-behaved rspamd sends (a chunked body from a proxy in front, an error status with
control characters, JSON without a score, oversized headers) come from a scripted TCP server.
"""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path

import pytest

from palisade.adapters.rspamd import RspamdScanner
from palisade.ports import ServiceTempError, SpamScanner
from tests.conftest import free_port
from tests.scanners.conftest import (
    GTUBE,
    HAM_BODY,
    ScriptedServer,
    SilentServer,
    message_bytes,
    run,
)
from tests.scanners.conftest import write_message as write
from tests.scanners.rspamd import RspamdProcess

# rspamd's stock actions.conf: "reject = 15". GTUBE is a forced "reject" that rspamd reports
# with that threshold as the score (the GTUBE symbol itself weighs 0).
RSPAMD_REJECT = 15.0
RULE = re.compile(r"[A-Z][A-Z0-9_]+")


def test_gtube_scores_the_reject_threshold(rspamd: RspamdProcess, tmp_path: Path) -> None:
    scanner = RspamdScanner(rspamd.url, timeout=10)
    assert isinstance(scanner, SpamScanner) and scanner.name == "rspamd"
    report = run(scanner.scan(write(tmp_path, message_bytes(HAM_BODY + GTUBE + "\n"))))
    assert report.score == RSPAMD_REJECT
    assert report.rules == ("GTUBE",)
    assert report.scanner == "rspamd"


def test_clean_message_scores_low_with_rule_names(rspamd: RspamdProcess, tmp_path: Path) -> None:
    report = run(RspamdScanner(rspamd.url).scan(write(tmp_path, message_bytes(HAM_BODY))))
    assert -5 < report.score < 4.5
    assert "MIME_GOOD" in report.rules  # text/plain: rspamd's own rule name, as it reports it
    assert list(report.rules) == sorted(report.rules)
    assert all(RULE.fullmatch(rule) for rule in report.rules), report.rules


def test_a_message_without_headers_scores_what_it_misses(
    rspamd: RspamdProcess, tmp_path: Path
) -> None:
    report = run(RspamdScanner(rspamd.url).scan(write(tmp_path, b"x")))
    assert {"MISSING_FROM", "MISSING_DATE", "MISSING_MID"} <= set(report.rules)
    assert report.score > 4.5


def test_controller_with_its_password(rspamd: RspamdProcess, tmp_path: Path) -> None:
    scanner = RspamdScanner(rspamd.controller_url, password=rspamd.password, timeout=10)
    spam = write(tmp_path, message_bytes(HAM_BODY + GTUBE + "\n"), "spam.eml")
    assert run(scanner.scan(spam)).rules == ("GTUBE",)
    assert rspamd.password not in repr(scanner)


@pytest.mark.parametrize("password", ["", "wrong-password"])
def test_controller_refuses_a_wrong_password(
    rspamd: RspamdProcess, tmp_path: Path, password: str
) -> None:
    scanner = RspamdScanner(rspamd.controller_url, password=password)
    with pytest.raises(ServiceTempError) as info:
        run(scanner.scan(write(tmp_path, message_bytes(HAM_BODY))))
    assert info.value.reason == f"rspamd {rspamd.controller_url}: HTTP status 401: Unauthorized"
    assert "wrong-password" not in repr(scanner)


def test_large_message_streamed(rspamd: RspamdProcess, tmp_path: Path) -> None:
    """GTUBE in a small text part after a 700 KB attachment: found only if the whole message
    arrived (rspamd looks for GTUBE only in text parts of at most 8 KiB)."""
    attachment = base64.encodebytes(bytes(range(256)) * 2000).decode()
    body = (
        "--b\n"
        "Content-Type: application/octet-stream\n"
        "Content-Transfer-Encoding: base64\n\n"
        f"{attachment}"
        "--b\n"
        "Content-Type: text/plain\n\n"
        f"{HAM_BODY}{GTUBE}\n"
        "--b--\n"
    )
    data = message_bytes(body).replace(
        b"Content-Type: text/plain; charset=us-ascii",
        b'Content-Type: multipart/mixed; boundary="b"',
    )
    assert len(data) > 700_000
    report = run(RspamdScanner(rspamd.url, timeout=20).scan(write(tmp_path, data)))
    assert report.rules == ("GTUBE",)


def test_wrong_base_path(rspamd: RspamdProcess, tmp_path: Path) -> None:
    message = write(tmp_path, message_bytes(HAM_BODY))
    with pytest.raises(ServiceTempError) as info:  # the normal worker: /sub/checkv2 unknown
        run(RspamdScanner(rspamd.url + "/sub").scan(message))
    assert info.value.reason == f"rspamd {rspamd.url}: HTTP status 500: invalid command"
    controller = RspamdScanner(rspamd.controller_url + "/sub/", password=rspamd.password)
    assert controller.path == "/sub/checkv2"
    with pytest.raises(ServiceTempError) as info:
        run(controller.scan(message))
    assert info.value.reason == f"rspamd {rspamd.controller_url}: HTTP status 404"


def test_rspamd_paused_times_out(rspamd: RspamdProcess, tmp_path: Path) -> None:
    message = write(tmp_path, message_bytes(HAM_BODY))
    with rspamd.paused(), pytest.raises(ServiceTempError) as info:
        run(RspamdScanner(rspamd.url, timeout=0.5).scan(message))
    assert info.value.reason == f"rspamd {rspamd.url}: no answer within 0.5s"


def test_rspamd_hanging_times_out(silent: SilentServer, tmp_path: Path) -> None:
    url = f"http://{silent.address}"
    started = time.monotonic()
    with pytest.raises(ServiceTempError) as info:
        run(RspamdScanner(url, timeout=0.5).scan(write(tmp_path, b"x")))
    assert info.value.reason == f"rspamd {url}: no answer within 0.5s"
    assert time.monotonic() - started < 5.0  # the timeout, not the test's patience


def test_rspamd_stopped(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServiceTempError) as info:
        run(RspamdScanner(url, password="s3cret").scan(write(tmp_path, b"x")))
    assert info.value.reason == f"rspamd {url}: Connection refused"
    assert "s3cret" not in repr(RspamdScanner(url, password="s3cret"))


def test_chunked_reply_and_request_on_the_wire(tmp_path: Path) -> None:
    """A proxy in front of rspamd may answer chunked; the request is what rspamd expects."""
    body = b'{"score": 15.0, "symbols": {"GTUBE": {"name": "GTUBE", "score": 0.0}}}'
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7]) for i in range(0, len(body), 7)
    )
    reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    server = ScriptedServer(reply, until=GTUBE.encode() + b"\r\n")
    message = write(tmp_path, message_bytes(GTUBE + "\n"))
    try:
        scanner = RspamdScanner(f"http://{server.address}/rspamd/", password="s3cret")
        report = run(scanner.scan(message))
    finally:
        server.close()
    assert (report.score, report.rules) == (15.0, ("GTUBE",))
    head, sent = server.requests[0].split(b"\r\n\r\n", 1)
    assert sent == message.path.read_bytes()
    assert head.split(b"\r\n") == [
        b"POST /rspamd/checkv2 HTTP/1.1",
        f"Host: {server.address}".encode(),
        f"Content-Length: {message.size}".encode(),
        b"Content-Type: message/rfc822",
        b"Connection: close",
        b"User-Agent: palisade",
        b"Password: s3cret",
    ]


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (b"SPAMD/1.1 0 EX_OK\r\n\r\n", "not an HTTP reply: SPAMD/1.1 0 EX_OK"),
        (
            b'HTTP/1.1 500 Oops\r\n\r\n{"error": "Internal error: \\u001b[31m boom"}',
            "HTTP status 500: Internal error:  [31m boom",
        ),
        (b"HTTP/1.1 200 OK\r\n\r\n<html>not json</html>", "reply is not a JSON object"),
        (b"HTTP/1.1 200 OK\r\n\r\n" + b'{"error": "no"}', "rspamd error: no"),
        (b"HTTP/1.1 200 OK\r\n\r\n" + b'{"symbols": {}}', "reply without a numeric score"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", "bad Content-Length 99999999"),
        (b"HTTP/1.1 200 OK\r\n\r\n" + b'{"score": "NaN"}', "reply without a numeric score"),
        (b"HTTP/1.1 200 OK\r\n\r\n" + b'{"score": 1e999}', "score is not a number"),
        (b"HTTP/1.1 200 OK\r\n\r\n" + b'{"score": 1, "symbols": []}', "symbols is not an object"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size zz"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", "connection closed before a full"),
        (b"HTTP/1.1 200 OK\r\nbroken\r\n\r\n{}", "bad reply header: broken"),
        (b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 12000, "reply header section too long"),
    ],
)
def test_bad_replies(reply: bytes, reason: str, tmp_path: Path) -> None:
    server = ScriptedServer(reply, until=b"\r\n\r\nx")
    try:
        with pytest.raises(ServiceTempError) as info:
            run(RspamdScanner(f"http://{server.address}").scan(write(tmp_path, b"x")))
    finally:
        server.close()
    assert info.value.reason.startswith(f"rspamd http://{server.address}: {reason}")


def test_bad_urls() -> None:
    for url in ("", "ftp://h:1", "http://", "http://h:1/?q=1", "http://u:p@h:1"):
        with pytest.raises(ValueError):
            RspamdScanner(url)
    scanner = RspamdScanner("http://[::1]:11333/base/")
    assert (scanner.host, scanner.port, scanner.path) == ("::1", 11333, "/base/checkv2")
    assert scanner.authority == "[::1]:11333"
