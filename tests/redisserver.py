"""A real ``redis-server`` (and ``redis-sentinel``) for the tests, on a free loopback port.

No persistence (``--save '' --appendonly no``): a kill -9 loses everything, as the outage tests
want. ``need_program`` skips without the Debian package, and fails with ``CI=true``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.conftest import free_port
from tests.services import need_program


def _answers(port: int, password: str | None = None, tls: bool = False) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            if tls:
                return True  # listening is enough; the TLS handshake is the client's test
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
            return reply.startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process; ``kill()`` (SIGKILL), ``start()`` again on the same port,
    ``pause()`` / ``resume()`` (SIGSTOP / SIGCONT: a hung Redis)."""

    def __init__(self, base: Path, *, extra: tuple[str, ...] = (), port: int | None = None) -> None:
        self.binary = need_program("redis-server", "redis-server")
        self.base = base
        self.base.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = base / f"redis-{self.port}.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.base),
            "--logfile", str(self.log),
            *self.extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        tls = "--tls-port" in self.extra
        while not _answers(self.port, tls=tls):
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"redis-server did not answer on {self.port}")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        """SIGKILL: gone at once, everything it held lost."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def cli(self, *args: str) -> str:
        """``redis-cli -p PORT ARGS`` (redis-tools), its output."""
        binary = need_program("redis-cli", "redis-tools")
        done = subprocess.run(
            [binary, "-p", str(self.port), *args], capture_output=True, text=True, timeout=10
        )
        return done.stdout

    def commandstats(self) -> dict[str, int]:
        """``INFO commandstats``: calls per command (``evalsha``, ``get``, ...)."""
        calls = {}
        for line in self.cli("INFO", "commandstats").splitlines():
            if line.startswith("cmdstat_"):
                name, _, rest = line[len("cmdstat_") :].partition(":")
                fields = dict(item.split("=", 1) for item in rest.split(","))
                calls[name] = int(fields["calls"])
        return calls


class SentinelServer:
    """One ``redis-sentinel`` watching ``master`` as ``service``."""

    def __init__(self, base: Path, master_port: int, service: str = "mymaster") -> None:
        self.binary = need_program("redis-sentinel", "redis-sentinel")
        self.port = free_port()
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.conf = base / f"sentinel-{self.port}.conf"
        self.conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {base}\n"
            f"sentinel monitor {service} 127.0.0.1 {master_port} 1\n"
            f"sentinel down-after-milliseconds {service} 1000\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SentinelServer:
        self.proc = subprocess.Popen(
            [self.binary, str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while not _answers(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("redis-sentinel did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
