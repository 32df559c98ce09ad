"""A real HTTPS server on loopback serving MTA-STS policies, for tests.

Owns: answering ``GET /.well-known/mta-sts.txt`` over TLS (standard library ``http.server`` and
``ssl``, in a thread) with what the test set for the ``Host`` it was asked for: a body, a status,
a content type, extra headers, a delay. It counts requests per host, so tests assert caching by
what the *server* saw.

Must not touch: anything of the ``palisade`` package (it is the other side of the wire). Test
code, not shipped.

Use::

    server = StsServer(cert_file, key_file).start()    # the certificate names the hosts
    server.set("mta-sts.example.test", "version: STSv1\\nmode: enforce\\nmx: mx.example.test\\n"
               "max_age: 86400\\n")
    server.set("mta-sts.bad.test", "...", status=302, headers={"Location": "https://x/"})
    server.requests("mta-sts.example.test")
    server.stop()
"""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

WELL_KNOWN = "/.well-known/mta-sts.txt"


@dataclass
class Answer:
    body: bytes
    status: int = 200
    content_type: str = "text/plain"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].lower()
        owner = self.server.owner
        with owner.lock:
            owner.counts[host] += 1
            answer = owner.answers.get(host) if self.path == WELL_KNOWN else None
        if answer is None:
            self.send_error(404)
            return
        if answer.delay:
            time.sleep(answer.delay)
        self.send_response(answer.status)
        if answer.content_type:
            self.send_header("Content-Type", answer.content_type)
        for key, value in answer.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(answer.body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: StsServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up on the TLS handshake (a refused certificate) is expected


class StsServer:
    """Serves policies over HTTPS on ``host`` (127.0.0.1), a free port, with the given
    certificate chain (PEM, leaf first) and key."""

    def __init__(self, cert_file: Path, key_file: Path, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.lock = threading.Lock()
        self.answers: dict[str, Answer] = {}
        self.counts: Counter[str] = Counter()
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(str(cert_file), str(key_file))
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> StsServer:
        server = _Server((self.host, 0), _Handler, bind_and_activate=True)
        server.socket = self._context.wrap_socket(server.socket, server_side=True)
        server.owner = self
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> StsServer:
        return self if self._server is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set(
        self,
        host: str,
        body: str | bytes,
        *,
        status: int = 200,
        content_type: str = "text/plain",
        headers: dict[str, str] | None = None,
        delay: float = 0.0,
    ) -> None:
        """What ``GET /.well-known/mta-sts.txt`` with ``Host: host`` gets."""
        raw = body.encode() if isinstance(body, str) else body
        with self.lock:
            self.answers[host.lower()] = Answer(raw, status, content_type, headers or {}, delay)

    def requests(self, host: str) -> int:
        with self.lock:
            return self.counts[host.lower()]


def policy_text(mode: str, *mx: str, max_age: int = 86400) -> str:
    """A well-formed policy body (CRLF line ends, as the RFC's example)."""
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return "\r\n".join(lines) + "\r\n"
