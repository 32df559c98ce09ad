"""What the MX delivery tests share: receiving SMTP servers (aiosmtpd, with or without STARTTLS)
on other loopback addresses (127.0.0.2x), all on one free port that the gateway's test-only
``[outbound] port`` names; MX and A records served by the loopback DNS server; and a real
gateway with submission (users from ``palisade passwd``, DKIM keys from ``palisade dkim
keygen``), ``relay_from_hosts`` for 127.0.0.1 and ``[outbound] delivery = "mx"``.

The sender's domain example.org has its own MX (127.0.0.29, STARTTLS, a certificate of the
test CA): the DSNs of failed deliveries go there, as OUTBOUND mail like any other."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from loopback.dnsserver import ZoneServer, start_zone_server
from tests.conftest import GatewayProcess, free_port, wait_for
from tests.outbound.dkimkit import keygen, publish
from tests.submission.conftest import KEYS, SENDERS, USERS, passwd_add

SENDER_MX_IP = "127.0.0.29"


class Handler:
    """Records messages and whether each came over TLS; ``rcpt_replies`` are used once each,
    in order, before the default 250 (a 451 then success on the retry)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.tls_seen: list[bool] = []
        self.rcpt_replies: list[str] = []
        self.data_reply = "250 2.0.0 Ok: queued"
        self.peers: set[Any] = set()  # client (ip, port) of each connection (reuse shows here)

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        self.peers.add(tuple(session.peer))
        return responses

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if self.rcpt_replies:
            return self.rcpt_replies.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_reply.startswith("250"):
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
            self.tls_seen.append(session.ssl is not None)
        return self.data_reply


@dataclass
class MxServer:
    """A receiving MTA on ``ip:port``: STARTTLS offered when ``tls`` is given."""

    ip: str
    port: int
    tls: ssl.SSLContext | None = None
    leaf: bytes = b""  # its certificate (DER)
    handler: Handler = field(default_factory=Handler)
    controller: Controller | None = None

    def start(self) -> MxServer:
        self.controller = Controller(
            self.handler, hostname=self.ip, port=self.port, tls_context=self.tls
        )
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def wait(self, count: int, timeout: float = 20) -> list[tuple[str, list[str], bytes]]:
        wait_for(lambda: len(self.handler.messages) >= count, timeout=timeout)
        return self.handler.messages


def shared_port(ips: list[str]) -> int:
    """A port free on every address of ``ips`` (the MX hosts all listen on the same one)."""
    for _ in range(50):
        port = free_port(ips[0])
        try:
            for ip in ips:
                with socket.socket() as sock:
                    sock.bind((ip, port))
        except OSError:
            continue
        return port
    raise AssertionError("no port free on every MX address")


def server_context(test_ca: Any, *names: str) -> tuple[ssl.SSLContext, bytes]:
    """A server context with a certificate of the test CA for ``names``, and that
    certificate (DER)."""
    cert = test_ca.issue_cert(*names)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    leaf = ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())
    return context, leaf


@dataclass
class World:
    """The DNS, the MX servers made so far and the gateway that delivers to them."""

    zones: ZoneServer
    port: int
    test_ca: Any
    ca_file: Path
    servers: dict[str, MxServer] = field(default_factory=dict)
    gateway: GatewayProcess | None = None
    submission_port: int = 0

    def mx(self, ip: str, *names: str, tls: bool = True) -> MxServer:
        """Starts a receiving server on ``ip`` (STARTTLS with a certificate for ``names``)."""
        context, leaf = server_context(self.test_ca, *names) if tls else (None, b"")
        server = MxServer(ip, self.port, context, leaf=leaf).start()
        self.servers[ip] = server
        return server

    def host(self, name: str, ip: str) -> None:
        self.zones.set(name, "A", [ip])

    def domain(self, domain: str, *mx: tuple[int, str]) -> None:
        """``domain``'s zone with the MX records ``(preference, host)``."""
        self.zones.add_zone(domain)
        self.zones.set(domain, "MX", [f"{pref} {name}." for pref, name in mx])

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()


@pytest.fixture
def world(test_ca: Any, tmp_path: Path) -> Iterator[World]:
    zones = start_zone_server()
    ca_file = tmp_path / "test-ca.pem"
    test_ca.cert_pem.write_to_path(str(ca_file))
    ips = [f"127.0.0.{n}" for n in range(21, 30)]
    w = World(zones, shared_port(ips), test_ca, ca_file)
    # the sender's own MX, where DSNs arrive (TLS with a verifiable certificate)
    zones.add_zone("example.org")
    zones.set("example.org", "MX", ["10 mx.example.org."])
    w.host("mx.example.org", SENDER_MX_IP)
    w.mx(SENDER_MX_IP, "mx.example.org")
    try:
        yield w
    finally:
        w.stop()
        zones.stop()


@pytest.fixture
def make_world_gateway(
    world: World, make_gateway: Any, tls_files: dict[str, Path]
) -> Iterator[Any]:
    """Factory: the gateway delivering to ``world`` (``outbound`` keys override)."""

    def factory(sections: dict[str, Any] | None = None, **outbound: Any) -> GatewayProcess:
        port = free_port()
        settings: dict[str, Any] = {
            "delivery": "mx",
            "port": world.port,
            "tls_ca_file": str(world.ca_file),
        }
        settings.update(outbound)
        domains = settings.pop("domains", None)
        sections = dict(sections or {})  # a "dns" section replaces the loopback DNS server
        dns = sections.pop("dns", {"nameservers": [f"127.0.0.1:{world.zones.port}"]})
        gateway: GatewayProcess = make_gateway(
            start=False,
            files={"senders": SENDERS},
            tls={"certificate": str(tls_files["certificate"]),
                 "private_key": str(tls_files["private_key"])},
            relay={"relay_from_hosts": ["127.0.0.1/32"]},
            delivery={"retry_initial": 1, "retry_max_interval": 2},
            dns=dns,
            dkim={"keys_dir": "keys", "keys": KEYS},
            submission={"listen": [f"127.0.0.1:{port}"], "password_file": "passwd",
                        "senders": "senders"},
            outbound=settings,
            **sections,
        )  # fmt: skip
        if domains:
            text = gateway.config_path.read_text()
            table = "\n".join(f'"{d}" = "{lvl}"' for d, lvl in domains.items())
            gateway.config_path.write_text(text + f"\n[outbound.domains]\n{table}\n")
        for user, password in USERS.items():
            passwd_add(gateway.base, user, password)
        output = ""
        for key in KEYS:
            extra = ("--ed25519",) if key["file"].endswith(".ed25519.key") else ()
            output += keygen(gateway.base, key["domain"], key["selector"], *extra)
        publish(world.zones, output)
        gateway.start()
        world.gateway = gateway
        world.submission_port = port
        return gateway

    yield factory
