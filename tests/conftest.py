"""Shared fixtures: a real gateway process on loopback, a test CA, a real next-hop SMTP server.

Nothing here is a mock: the gateway runs as ``python -m palisade serve`` in a subprocess and is
spoken to over TCP; the next hop is aiosmtpd, a real SMTP server, in a thread.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AnyStr

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Commands without --config read /etc/palisade/palisade.toml when it exists: point them at a
# file that never exists, so that an installed Palisade on the developer's machine never leaks
# into the tests (the tests of the system config set it themselves).
NO_SYSTEM_CONFIG = str(ROOT / "tests" / "no-such-system-config.toml")
os.environ["PALISADE_CONFIG"] = NO_SYSTEM_CONFIG


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for name, table in sections.items():
        if name == "rules":  # {stage: [rule, ...]} -> [[rules.<stage>]] tables, in order
            for stage, rules in table.items():
                for rule in rules:
                    lines.append(f"[[rules.{stage}]]")
                    lines.extend(f"{key} = {toml_value(value)}" for key, value in rule.items())
                    lines.append("")
            continue
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in table.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def perimeter_copy(tmp_path: Path) -> Path:
    """``examples/`` copied into ``tmp_path`` with ``perimeter.toml``'s absolute paths (lists,
    LDAP password file, spool, state, logs, Maildir) rewritten into it and ``user`` left out
    (the ``palisade`` user need not exist here): the example as shipped, where a test may
    write. Returns the config file."""
    import shutil

    copy = tmp_path / "examples"
    shutil.copytree(ROOT / "examples", copy)
    password = tmp_path / "ldap.pw"
    password.write_text("not-a-real-password\n")
    config = copy / "perimeter.toml"
    text = config.read_text()
    for shipped, here in (
        ("/etc/palisade/lists/", f"{copy}/lists/"),
        ("/etc/palisade/ldap.pw", str(password)),
        ("/var/spool/palisade", str(tmp_path / "var" / "spool")),
        ("/var/lib/palisade", str(tmp_path / "var" / "lib")),
        ("/var/log/palisade", str(tmp_path / "var" / "log")),
    ):
        assert shipped in text, shipped
        text = text.replace(shipped, here)
    user = 'user = "palisade"'
    assert user in text
    config.write_text(text.replace(user, "# " + user))
    return config


def search(pattern: AnyStr, text: AnyStr) -> re.Match[AnyStr]:
    """``re.search`` that fails the test with the text when nothing matches (not with an
    AttributeError on None)."""
    match = re.search(pattern, text)
    assert match is not None, (pattern, text)
    return match


def palisade(
    *args: str, cwd: Path, stdout: Any = subprocess.PIPE
) -> subprocess.CompletedProcess[str]:
    """``python -m palisade ARGS`` in ``cwd``, as an operator runs it; stderr captured."""
    return subprocess.run(
        [sys.executable, "-m", "palisade", *args],
        cwd=cwd,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
    )


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Polls ``predicate`` until it returns something truthy (files, log lines, sockets)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
        time.sleep(interval)


def child_pids(pid: int) -> list[int]:
    """The processes ``pid`` has forked (a gateway's workers), from /proc."""
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def sockets_held(pid: int, port: int, state: str) -> int:
    """How many IPv4 TCP sockets on local ``port`` in ``state`` (``/proc/net/tcp``'s hex code:
    ``0A`` listening, ``01`` established) process ``pid`` holds open (from /proc: the kernel's
    socket table and the process's descriptors)."""
    inodes = set()
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[3] == state and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            held += os.readlink(f"/proc/{pid}/fd/{fd}") in inodes
        except FileNotFoundError:
            continue
    return held


def listening_sockets(pid: int, port: int) -> int:
    """How many listening IPv4 TCP sockets on ``port`` process ``pid`` holds open."""
    return sockets_held(pid, port, "0A")


def open_connections(pid: int, port: int) -> int:
    """How many established IPv4 TCP connections to local ``port`` process ``pid`` holds."""
    return sockets_held(pid, port, "01")


@dataclass
class GatewayProcess:
    """A running ``palisade serve`` and the paths it writes to."""

    base: Path
    port: int
    config_path: Path
    sections: dict[str, dict[str, Any]]
    proc: subprocess.Popen[bytes] | None = None
    host: str = "127.0.0.1"
    _stderr: list[bytes] = field(default_factory=list)

    @property
    def log_dir(self) -> Path:
        return self.base / "var" / "log"

    @property
    def mail_dir(self) -> Path:
        return self.base / "var" / "mail"

    @property
    def spool_dir(self) -> Path:
        return self.base / "var" / "spool"

    def mainlog(self) -> str:
        path = self.log_dir / "mainlog"
        return path.read_text() if path.exists() else ""

    def rejectlog(self) -> str:
        path = self.log_dir / "rejectlog"
        return path.read_text() if path.exists() else ""

    def paniclog(self) -> str:
        path = self.log_dir / "paniclog"
        return path.read_text() if path.exists() else ""

    def maildir_messages(self, local_part: str) -> list[bytes]:
        new = self.mail_dir / local_part / "new"
        if not new.is_dir():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir())]

    def start(self, env: dict[str, str] | None = None, greet: bool = True) -> GatewayProcess:
        """Starts it (with ``env`` added to the environment) and, with ``greet``, waits until
        it greets a client."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "palisade", "serve", "--config", str(self.config_path)],
            cwd=self.base,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        if not greet:
            return self
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited at start-up: {self.stderr()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as sock:
                    sock.settimeout(5)
                    if re.match(rb"[2-5]\d\d[ -]", sock.recv(512)):  # up, whatever it says
                        return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"gateway did not greet within 15s: {self.stderr()}")

    def _drain_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    def stderr(self) -> str:
        return b"".join(self._stderr).decode(errors="replace")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 20) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("gateway did not stop within the timeout after SIGTERM") from None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


def gateway_sections(port: int, **overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    sections: dict[str, dict[str, Any]] = {
        "server": {
            "hostname": "mx.example.test",
            "listen": [f"127.0.0.1:{port}"],
            "max_connections_per_ip": 50,
        },
        "limits": {"command_timeout": 20, "data_timeout": 30},
        "domains": {"local": ["example.test"], "relay": []},
        "paths": {
            "spool": "var/spool",
            "mail": "var/mail",
            "log": "var/log",
            "state": "var/state.sqlite",
        },
        "log": {"json": True},
    }
    for name, table in overrides.items():
        sections.setdefault(name, {}).update(table)
    return sections


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[Any]:
    """Factory: ``make_gateway(server={...}, limits={...})`` starts a configured gateway."""
    started: list[GatewayProcess] = []

    def factory(
        start: bool = True, files: dict[str, str] | None = None, **overrides: dict[str, Any]
    ) -> GatewayProcess:
        base = tmp_path / f"gw{len(started)}"
        base.mkdir()
        for relative, text in (files or {}).items():  # list files beside the config
            (base / relative).parent.mkdir(parents=True, exist_ok=True)
            (base / relative).write_text(text)
        port = free_port()
        sections = gateway_sections(port, **overrides)
        config = write_config(base / "palisade.toml", sections)
        gateway = GatewayProcess(base=base, port=port, config_path=config, sections=sections)
        started.append(gateway)
        return gateway.start() if start else gateway

    yield factory
    for gateway in started:
        if gateway.proc is not None and gateway.proc.poll() is None:
            gateway.stop()


@pytest.fixture
def gateway(make_gateway: Any) -> GatewayProcess:
    """A gateway on the defaults: local domain example.test, no TLS."""
    gateway: GatewayProcess = make_gateway()
    return gateway


@pytest.fixture(scope="session")
def test_ca() -> Any:
    import trustme

    return trustme.CA()


@pytest.fixture
def tls_files(test_ca: Any, tmp_path: Path) -> dict[str, Path]:
    """A server chain and key for ``mx.example.test`` issued by the test CA, plus the CA file."""
    cert = test_ca.issue_cert("mx.example.test", "localhost", "127.0.0.1")
    chain = tmp_path / "chain.pem"
    key = tmp_path / "key.pem"
    ca = tmp_path / "ca.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key.write_bytes(cert.private_key_pem.bytes())
    test_ca.cert_pem.write_to_path(str(ca))
    return {"certificate": chain, "private_key": key, "ca": ca}


class RecordingHandler:
    """aiosmtpd handler that keeps every message it receives."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.reply = "250 2.0.0 Ok: queued"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return self.reply


@dataclass
class NextHop:
    port: int
    handler: RecordingHandler
    controller: Any = None

    def start(self) -> NextHop:
        """Starts the server; when ``port`` was taken since it was chosen (free_port hands out
        an ephemeral port, which an outgoing connection may grab first), on a new one: start
        it before writing the port into a config."""
        from aiosmtpd.controller import Controller

        for attempt in range(5):
            self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port)
            try:
                self.controller.start()
                return self
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or attempt == 4:
                    raise
                self.port = free_port()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None


@pytest.fixture
def next_hop() -> Iterator[NextHop]:
    """A real SMTP server (aiosmtpd) on a free loopback port; not started until asked."""
    hop = NextHop(port=free_port(), handler=RecordingHandler())
    yield hop
    hop.stop()
