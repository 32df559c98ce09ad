"""RspamdScanner against a small real HTTP server on loopback that plays rspamd's /checkv2.

rspamd itself cannot be installed in this environment (no Debian package here), so the server
is the standard library's ``http.server`` in a thread: it implements ``POST /checkv2`` the way
rspamd documents it (message as the body, optional ``Password`` header, a JSON reply with
``score``, ``required_score``, ``action`` and ``symbols``), scoring GTUBE like rspamd's rule.
The HTTP exchange on the wire is real; what is not tested is rspamd's own scoring.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from palisade.adapters.rspamd import RspamdScanner
from palisade.ports import ServiceTempError, SpamScanner
from tests.conftest import free_port
from tests.scanners.conftest import GTUBE, HAM_BODY, ScriptedServer, message_bytes, run
from tests.scanners.conftest import write_message as write


class FakeRspamd(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, password: str = "") -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.password = password
        self.mode = "normal"  # "hang", "error", "badjson", "chunked", "noscore"
        self.release = threading.Event()
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeRspamd

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, chunked: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if chunked:
            for i in range(0, len(body), 7):
                piece = body[i : i + 7]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        body = self.rfile.read(length)
        self.server.requests.append((self.path, dict(self.headers.items()), body))
        mode = self.server.mode
        if mode == "hang":
            self.server.release.wait(10)
            return
        if self.path != "/checkv2":
            self._send(404, b'{"error": "Not found"}')
            return
        if self.server.password and self.headers.get("Password") != self.server.password:
            self._send(403, b'{"error": "Unauthorized"}')
            return
        if mode == "error":
            self._send(500, b'{"error": "Internal error: \\u001b[31m boom"}')
            return
        if mode == "badjson":
            self._send(200, b"<html>not json</html>")
            return
        symbols: dict[str, Any] = {"MIME_GOOD": {"name": "MIME_GOOD", "score": -0.1}}
        score = -0.1
        if GTUBE.encode() in body:
            symbols["GTUBE"] = {"name": "GTUBE", "score": 1000.0}
            score += 1000.0
        reply: dict[str, Any] = {
            "is_skipped": False,
            "score": score,
            "required_score": 15.0,
            "action": "reject" if score >= 15 else "no action",
            "symbols": symbols,
            "messages": {},
            "message-id": "x@example.org",
        }
        if mode == "noscore":
            del reply["score"]
        self._send(200, json.dumps(reply).encode(), chunked=mode == "chunked")


@pytest.fixture
def rspamd() -> Iterator[FakeRspamd]:
    server = FakeRspamd(password="s3cret")
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


def test_gtube_and_ham(rspamd: FakeRspamd, tmp_path: Path) -> None:
    scanner = RspamdScanner(rspamd.url, password="s3cret", timeout=5)
    assert isinstance(scanner, SpamScanner) and scanner.name == "rspamd"
    spam = write(tmp_path, message_bytes(HAM_BODY + GTUBE + "\n"), "spam.eml")
    report = run(scanner.scan(spam))
    assert report.score >= 16 and report.rules == ("GTUBE", "MIME_GOOD")
    assert report.scanner == "rspamd"
    ham = write(tmp_path, message_bytes(HAM_BODY), "ham.eml")
    assert run(scanner.scan(ham)).score < 4.5
    path, headers, body = rspamd.requests[0]
    assert path == "/checkv2"
    assert body == spam.path.read_bytes()
    assert headers["Content-Length"] == str(spam.size)
    assert headers["Password"] == "s3cret"


def test_chunked_reply_and_base_path(rspamd: FakeRspamd, tmp_path: Path) -> None:
    rspamd.mode = "chunked"
    scanner = RspamdScanner(rspamd.url + "/", password="s3cret")
    assert run(scanner.scan(write(tmp_path, message_bytes(GTUBE)))).score >= 16
    with pytest.raises(ServiceTempError) as info:  # /sub/checkv2: 404 from our server
        run(RspamdScanner(rspamd.url + "/sub", password="s3cret").scan(write(tmp_path, b"x")))
    assert info.value.reason.endswith("HTTP status 404: Not found")
    assert rspamd.requests[-1][0] == "/sub/checkv2"


def test_large_message_streamed(rspamd: FakeRspamd, tmp_path: Path) -> None:
    data = message_bytes("filler line of text\n" * 30000 + GTUBE)
    report = run(RspamdScanner(rspamd.url, password="s3cret").scan(write(tmp_path, data)))
    assert "GTUBE" in report.rules
    assert rspamd.requests[-1][2] == data


@pytest.mark.parametrize(
    ("mode", "password", "reason"),
    [
        ("normal", "wrong", "HTTP status 403: Unauthorized"),
        ("error", "s3cret", "HTTP status 500: Internal error:  [31m boom"),
        ("badjson", "s3cret", "reply is not a JSON object"),
        ("noscore", "s3cret", "reply without a numeric score"),
    ],
)
def test_error_replies(
    rspamd: FakeRspamd, tmp_path: Path, mode: str, password: str, reason: str
) -> None:
    rspamd.mode = mode
    with pytest.raises(ServiceTempError) as info:
        run(RspamdScanner(rspamd.url, password=password).scan(write(tmp_path, b"x")))
    assert info.value.reason == f"rspamd {rspamd.url}: {reason}"
    assert "wrong" not in info.value.reason and "s3cret" not in info.value.reason


def test_rspamd_hanging_times_out(rspamd: FakeRspamd, tmp_path: Path) -> None:
    rspamd.mode = "hang"
    started = time.monotonic()
    with pytest.raises(ServiceTempError) as info:
        run(RspamdScanner(rspamd.url, timeout=0.5).scan(write(tmp_path, b"x")))
    assert info.value.reason == f"rspamd {rspamd.url}: no answer within 0.5s"
    assert time.monotonic() - started < 2.0


def test_rspamd_stopped(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServiceTempError) as info:
        run(RspamdScanner(url, password="s3cret").scan(write(tmp_path, b"x")))
    assert info.value.reason == f"rspamd {url}: Connection refused"
    assert "s3cret" not in repr(RspamdScanner(url, password="s3cret"))


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (b"SPAMD/1.1 0 EX_OK\r\n\r\n", "not an HTTP reply: SPAMD/1.1 0 EX_OK"),
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
