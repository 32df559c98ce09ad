"""A raw SMTP client for tests that need exact bytes on the wire (smtplib normalises too much)."""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import time

_REPLY_END = re.compile(rb"(?:^|\r\n)\d{3} [^\r\n]*\r\n")


class RawClient:
    def __init__(
        self, port: int, host: str = "127.0.0.1", timeout: float = 10.0, source: str | None = None
    ) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self.buffer += chunk
        return True

    def reply(self) -> tuple[int, str]:
        """Reads one whole reply (all its lines); (code, text of the last line)."""
        while True:
            match = _REPLY_END.search(self.buffer)
            if match:
                raw, self.buffer = self.buffer[: match.end()], self.buffer[match.end() :]
                last = raw.rstrip(b"\r\n").split(b"\r\n")[-1].decode()
                return int(last[:3]), last[4:]
            if not self._fill():
                raise ConnectionError(f"closed by server; buffered {self.buffer!r}")

    def command(self, line: str) -> tuple[int, str]:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def quiet_for(self, seconds: float) -> bytes:
        """What the server sends within ``seconds`` (expected: nothing)."""
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, ssl.SSLError, OSError):
            data = b""
        finally:
            self.sock.settimeout(10)
        return self.buffer + data

    def closed(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection within ``timeout``."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(timeout)
        try:
            while time.monotonic() < deadline:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except (ConnectionResetError, BrokenPipeError):
            return True
        except (TimeoutError, OSError):
            return False
        return False

    def starttls(self, context: ssl.SSLContext, server_hostname: str = "mx.example.test") -> None:
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def transaction(
    client: RawClient, sender: str, rcpt: str, body: bytes, helo: str = "EHLO client.test"
) -> tuple[int, str]:
    """Greeting, EHLO, MAIL, RCPT, DATA with ``body`` (already terminated) → the final reply."""
    assert client.reply()[0] == 220
    assert client.command(helo)[0] == 250
    assert client.command(f"MAIL FROM:<{sender}>")[0] == 250
    code, text = client.command(f"RCPT TO:<{rcpt}>")
    assert code == 250, text
    assert client.command("DATA")[0] == 354
    client.send(body)
    return client.reply()
