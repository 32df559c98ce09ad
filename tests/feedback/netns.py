"""Two network namespaces joined by a veth pair: a server side where the gateway, Dovecot and the
nftables table live, and a client side with several addresses, so that blocking a client in the
server's firewall can be tried for real without touching the machine's own ruleset.

Addresses (IPv4 /24 and IPv6 with ``nodad``, so they are usable at once):

- server: ``10.99.0.1``, ``fd00:99:0:1::1``
- client: ``10.99.0.2`` .. ``10.99.0.9``, ``fd00:99:0:1::2``, ``fd00:99:0:1::3`` (one /64 with the
  server's) and ``fd00:99:0:2::2`` (another /64, routed on the link)

Client sockets are opened by the test process itself inside the client namespace (``setns`` on
the calling thread around ``socket()``; the socket keeps its namespace when the thread returns
to its own), so a test can connect from any client address with any Python client. Programs
run in a namespace through ``ip netns exec``. The namespaces (and every process the harness
started in them) are removed when the fixture ends, whatever happened.

Needs root and ``ip`` (iproute2). Without them the tests skip, and with ``CI=true`` they fail.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SERVER4 = "10.99.0.1"
# The gateway's port in the server namespace: not 25, because as root without [server] user a
# port below 1024 is refused (README "Running unprivileged"); the firewall does not care.
SMTP = 2525
SERVER6 = "fd00:99:0:1::1"
CLIENTS4 = tuple(f"10.99.0.{n}" for n in range(2, 10))
CLIENT6_SAME = ("fd00:99:0:1::2", "fd00:99:0:1::3")  # the server's /64
CLIENT6_OTHER = "fd00:99:0:2::2"  # another /64
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_counter = iter(range(1_000_000))


def _fail_or_skip(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def run(
    *cmd: str, check: bool = True, input: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, capture_output=True, text=True, check=check, input=input, timeout=60, cwd=cwd
    )


@contextmanager
def inside(netns: str) -> Iterator[None]:
    """The calling thread in network namespace ``netns`` for the ``with`` block."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:  # pragma: no cover - cannot happen as root
                os._exit(99)  # a test process stuck in the wrong namespace must not go on
    finally:
        os.close(own)
        os.close(target)


@dataclass
class Daemon:
    """A process started in a namespace; its stderr is collected as it comes."""

    proc: subprocess.Popen[bytes]
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.decode(errors="replace"))

    def text(self) -> str:
        return "".join(self.lines)

    def wait_line(self, needle: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if needle in line:
                    return line
            if self.proc.poll() is not None:
                time.sleep(0.1)  # the last lines may still be draining
                found = [line for line in self.lines if needle in line]
                if found:
                    return found[0]
                raise AssertionError(
                    f"exited {self.proc.returncode} without {needle!r}: {self.text()}"
                )
            time.sleep(0.02)
        raise AssertionError(f"no {needle!r} within {timeout}s: {self.text()}")

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(
                    f"no exit within {timeout}s of SIGTERM: {self.text()}"
                ) from None
        return self.proc.returncode


@dataclass
class NetnsPair:
    server: str
    client: str
    daemons: list[Daemon] = field(default_factory=list)

    def exec(
        self, netns: str, *cmd: str, check: bool = True, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", netns, *cmd, check=check, cwd=cwd)

    def start(self, *cmd: str, cwd: Path, netns: str | None = None) -> Daemon:
        """``cmd`` in the server namespace (or ``netns``), stderr collected."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns or self.server, *cmd],
            cwd=cwd,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        daemon = Daemon(proc)
        self.daemons.append(daemon)
        return daemon

    def palisade(self, *args: str, cwd: Path) -> Daemon:
        return self.start(sys.executable, "-m", "palisade", *args, cwd=cwd)

    def palisade_once(self, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.server, sys.executable, "-m", "palisade", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def client_socket(self, source: str) -> socket.socket:
        family = socket.AF_INET6 if ":" in source else socket.AF_INET
        with inside(self.client):
            sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((source, 0))
        return sock

    def greeting(self, source: str, port: int = SMTP, timeout: float = 1.5) -> bytes | None:
        """The server's banner for a client at ``source``, or None when the SYN goes unanswered
        (the connection attempt times out: dropped by the firewall)."""
        server = SERVER6 if ":" in source else SERVER4
        sock = self.client_socket(source)
        try:
            sock.settimeout(timeout)
            try:
                sock.connect((server, port))
            except TimeoutError:
                return None
            sock.settimeout(15)
            return sock.recv(512)
        finally:
            sock.close()

    def server_socket_ready(self, host: str, port: int) -> bool:
        """Whether something in the server namespace accepts on host:port and greets."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with inside(self.server):
            sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(2)
            sock.connect((host, port))
            return sock.recv(512)[:1] in (b"2", b"4", b"5", b"*")
        except OSError:
            return False
        finally:
            sock.close()

    def blocked(self, table: str = "palisade") -> dict[str, float]:
        """The elements of the two sets in the server namespace: key -> seconds left."""
        found: dict[str, float] = {}
        for name in ("blocked4", "blocked6"):
            out = self.exec(
                self.server, "nft", "-j", "list", "set", "inet", table, name, check=False
            )
            if out.returncode != 0:
                continue
            for item in json.loads(out.stdout)["nftables"]:
                for elem in item.get("set", {}).get("elem", ()):
                    inner = elem["elem"]
                    value = inner["val"]
                    if isinstance(value, dict):
                        value = f"{value['prefix']['addr']}/{value['prefix']['len']}"
                    found[value] = inner.get("expires", 0)
        return found

    def tables(self) -> list[str]:
        out = json.loads(self.exec(self.server, "nft", "-j", "list", "tables").stdout)
        return [t["table"]["name"] for t in out["nftables"] if "table" in t]

    def drops(self, table: str = "palisade") -> int:
        """Packets the table's rules dropped so far (their counters)."""
        out = json.loads(
            self.exec(self.server, "nft", "-j", "list", "chain", "inet", table, "input").stdout
        )
        total = 0
        for item in out["nftables"]:
            for expr in item.get("rule", {}).get("expr", ()):
                if "counter" in expr:
                    total += int(expr["counter"]["packets"])
        return total


def _setup(pair: NetnsPair) -> None:
    s, c = pair.server, pair.client
    run("ip", "netns", "add", s)
    run("ip", "netns", "add", c)
    pair.exec(s, "ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", c)
    for ns, _dev in ((s, "veth0"), (c, "veth1")):
        pair.exec(ns, "ip", "link", "set", "lo", "up")
    pair.exec(s, "ip", "addr", "add", f"{SERVER4}/24", "dev", "veth0")
    pair.exec(s, "ip", "addr", "add", f"{SERVER6}/64", "dev", "veth0", "nodad")
    for address in CLIENTS4:
        pair.exec(c, "ip", "addr", "add", f"{address}/24", "dev", "veth1")
    for address in (*CLIENT6_SAME, CLIENT6_OTHER):
        pair.exec(c, "ip", "addr", "add", f"{address}/64", "dev", "veth1", "nodad")
    pair.exec(s, "ip", "link", "set", "veth0", "up")
    pair.exec(c, "ip", "link", "set", "veth1", "up")
    pair.exec(s, "ip", "-6", "route", "add", "fd00:99:0:2::/64", "dev", "veth0")


@pytest.fixture
def netns_pair() -> Iterator[NetnsPair]:
    """A fresh server/client namespace pair, removed (with what runs in it) afterwards."""
    if os.geteuid() != 0:
        _fail_or_skip("network-namespace tests need root (ip netns add)")
    n = next(_counter)
    pair = NetnsPair(server=f"palsrv{os.getpid()}x{n}", client=f"palcli{os.getpid()}x{n}")
    try:
        try:
            _setup(pair)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            _fail_or_skip(f"cannot create network namespaces: {detail}")
        yield pair
    finally:
        for daemon in pair.daemons:
            if daemon.proc.poll() is None:
                daemon.proc.kill()
                daemon.proc.wait()
        for ns in (pair.server, pair.client):
            pids = run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:  # anything else still running in there (a forked worker)
                with suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run("ip", "netns", "del", ns, check=False)
