"""The listening sockets: accept, enforce connection caps, start one session per client.

Owns: the sockets (SO_REUSEPORT so that several worker processes share a port), the caps on
connections (421 when over, before any SMTP is spoken) and graceful shutdown (stop accepting,
let transactions in flight finish, then tempfail the rest). ``max_connections`` counts this
process's sessions (with workers, each worker has that many); ``max_connections_per_ip`` is
counted by the ``counts`` it is given, across all workers (see :mod:`.conncount`). Each
session gets the process's newest generation at connect and holds it (acquire/release) until it
ends; the caps a client meets are that generation's.

Each socket has a role (:func:`socket_role`): the perimeter's port 25, or submission (587,
STARTTLS) or submissions (465, implicit TLS) by the ``[submission]`` addresses it is bound to;
the session and its conversation follow it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import socket

from palisade.config import Config, parse_host_port
from palisade.conversation import Role
from palisade.server.conncount import LocalCounts, SlotCounts
from palisade.server.context import ServerContext
from palisade.server.generation import Generation
from palisade.server.session import Session
from palisade.server.stream import ClientStream


def bind_socket(address: str, reuse_port: bool) -> socket.socket:
    """A listening TCP socket for ``host:port``; IPv6 literals in brackets."""
    host, port = parse_host_port(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def listen_addresses(config: Config) -> list[str]:
    """Every address to bind, as ``host:port``: ``[server] listen``, then the submission ones
    (587 and 465 when an entry gives no port)."""
    addresses = list(config.server.listen)
    for entries, default in ((config.submission.listen, 587), (config.submission.listen_tls, 465)):
        for entry in entries:
            host, port = parse_host_port(entry, default)
            addresses.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return addresses


def socket_role(sock: socket.socket, config: Config) -> Role:
    """The role of a bound socket: the ``[submission]`` entry with its port (and its address,
    when the entry names one), else the perimeter's."""
    host, port = sock.getsockname()[:2]
    for role, entries, default in (
        (Role.SUBMISSIONS, config.submission.listen_tls, 465),
        (Role.SUBMISSION, config.submission.listen, 587),
    ):
        for entry in entries:
            want_host, want_port = parse_host_port(entry, default)
            if want_port != port:
                continue
            try:
                if ipaddress.ip_address(want_host) != ipaddress.ip_address(host):
                    continue
            except ValueError:
                pass  # a host name: the port decides
            return role
    return Role.SMTP


class Listener:
    """Accepts clients on the configured addresses and runs their sessions."""

    def __init__(
        self,
        ctx: ServerContext,
        sockets: list[socket.socket],
        counts: LocalCounts | SlotCounts | None = None,
    ) -> None:
        """``counts``: open connections per client IP; by default this process's alone (one
        worker, or steered workers)."""
        self.ctx = ctx
        self.sockets = sockets
        self.servers: list[asyncio.Server] = []
        self.sessions: dict[asyncio.Task[None], Session] = {}
        self.counts = counts if counts is not None else LocalCounts()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        config = self.ctx.current().config
        for sock in self.sockets:
            role = socket_role(sock, config)
            on_connect = functools.partial(self._on_connect, role=role)
            server = await loop.create_server(
                functools.partial(
                    ClientStream, on_connect, loop, implicit_tls=role is Role.SUBMISSIONS
                ),
                sock=sock,
            )
            self.servers.append(server)

    def _on_connect(self, stream: ClientStream, role: Role = Role.SMTP) -> None:
        peer = stream.peer
        ip, port = peer
        generation = self.ctx.current()  # the session keeps this one to its end
        limits = generation.config.server
        host = limits.hostname
        if len(self.sessions) >= limits.max_connections:
            self._turn_away(stream, f"421 4.7.0 {host} Too many connections, try later\r\n")
            self.ctx.log.reject(
                f"Connection from [{ip}]:{port} refused: too many connections "
                f"({len(self.sessions)}, max={limits.max_connections})"
            )
            return
        admitted, open_now = self.counts.admit(ip, limits.max_connections_per_ip)
        if not admitted:
            self._turn_away(stream, f"421 4.7.0 {host} Too many connections from your host\r\n")
            self.ctx.log.reject(
                f"Connection from [{ip}]:{port} refused: too many connections from that IP "
                f"address ({open_now}, max={limits.max_connections_per_ip})"
            )
            return
        generation.acquire()
        session = Session(self.ctx, generation, stream, peer, role=role)
        task = stream.loop.create_task(session.run())
        self.sessions[task] = session
        task.add_done_callback(functools.partial(self._finished, ip=ip, generation=generation))

    @staticmethod
    def _turn_away(stream: ClientStream, reply: str) -> None:
        stream.write(reply.encode())
        stream.close()

    def _finished(self, task: asyncio.Task[None], *, ip: str, generation: Generation) -> None:
        self.sessions.pop(task, None)
        self.counts.release(ip)
        generation.release()  # the last session of a replaced generation closes its clients
        if not task.cancelled() and task.exception() is not None:
            self.ctx.log.panic(f"session for [{ip}] failed: {task.exception()!r}")

    async def shutdown(self, grace: float) -> None:
        """Stops accepting, lets transactions finish for ``grace`` seconds, then ends the rest.

        Sessions that are still open get ``421 4.3.2`` at their next command (``draining``), and
        those still running after the grace period are cancelled: their open transaction is
        aborted, so the client keeps responsibility for the message (nothing acknowledged is lost).
        """
        self.ctx.draining = True
        for server in self.servers:
            server.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()
        for session in list(self.sessions.values()):
            session.notify_shutdown()
        if self.sessions:
            _, pending = await asyncio.wait(set(self.sessions), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
