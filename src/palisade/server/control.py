"""The control socket: what ``palisade status`` asks the running daemon, and how it answers.

Owns: the socket file (``[server] control_socket``): made by the parent before privileges are
dropped (mode 0600 from the first moment, optionally given to the service user), a stale file
from a killed daemon replaced at start while a live daemon answering on it stops the start, the
file removed at a clean stop by the process that made it; the protocol (one request line,
``status``, one JSON object on one line in reply, then close); gathering the reply in the
process that answers (the single process, or the parent of workers, which asks each worker for
what only the worker knows over a socketpair made at fork: its open connections, its generation,
its DNSBL zones' health); and the client side the ``palisade status`` command uses.

Must not touch: anything a reply could change. There is no request that alters the daemon; a
request is a question.

Trust: the file mode is the whole access control (root and the owner of the socket may
connect). Beyond it a peer is not trusted: a request line is at most :data:`MAX_REQUEST` bytes
and must arrive within :data:`REQUEST_TIMEOUT`, at most :data:`MAX_CLIENTS` are served at once
(more are closed at once), and an unknown request gets an error reply. A worker's answer is read
with a size limit and a timeout, and a worker that does not answer in time is reported as such,
never waited for. The client reads at most :data:`MAX_REPLY` bytes within its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
import stat
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from palisade import installed_version
from palisade.obs.files import make_dirs
from palisade.obs.log import EventLog, escape
from palisade.obs.queueid import queue_id_time
from palisade.server.generation import Generation
from palisade.server.probes import dnsbl_checks
from palisade.spool import Spool, SpoolError

__all__ = [
    "ControlSocket",
    "ControlSocketError",
    "NotRunning",
    "StatusUnknown",
    "WorkerChannels",
    "answer_parent",
    "ask_status",
    "create_control_socket",
    "serve_status",
]

SOCKET_MODE = 0o600
RUN_DIR_MODE = 0o750  # /run/palisade: the service user's (systemd's RuntimeDirectory= too)
MAX_REQUEST = 64  # bytes of a request line, newline included
MAX_REPLY = 1 << 20  # bytes of a reply (a worker's, or the daemon's to the client)
MAX_CLIENTS = 8  # control connections served at once
REQUEST_TIMEOUT = 2.0  # for a peer to send its line, and to take the reply
WORKER_TIMEOUT = 1.0  # for a worker to answer the parent
CLIENT_TIMEOUT = 5.0  # ``palisade status``: connect, ask, read the reply
UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL


class ControlSocketError(Exception):
    """The control socket cannot be made; ``str()`` is the operator's one line."""


class NotRunning(Exception):
    """No daemon answers on the socket (``palisade status`` exit 3); ``str()`` says why."""


class StatusUnknown(Exception):
    """The daemon's state cannot be told (exit 4): permission denied, no or a bad answer."""

    def __init__(self, message: str, *, denied: bool = False) -> None:
        super().__init__(message)
        self.denied = denied


def iso(epoch: float) -> str:
    """``2026-12-02T07:11:10Z`` (UTC, to the second)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


# -- the socket file -----------------------------------------------------------------------


class ControlSocket:
    """The listening socket and the file it is bound to. ``started``: when it was made, which
    is when the daemon started (the parent makes it first, before it binds a port);
    ``version``: the version of the code this daemon runs (read once: a package upgraded under
    a running daemon does not change what it runs)."""

    def __init__(self, sock: socket.socket, path: Path) -> None:
        self.sock = sock
        self.path = path
        self.started = time.time()
        self.version = installed_version()
        self._owner = os.getpid()
        info = os.stat(path)
        self._identity = (info.st_dev, info.st_ino)

    def close_in_child(self) -> None:
        """In a forked worker: its copy of the socket goes (the file stays: the parent's)."""
        with contextlib.suppress(OSError):
            self.sock.close()

    def remove(self) -> None:
        """At a clean stop, in the process that made it: closes the socket and removes the
        file, unless the file is no longer this socket (another daemon's since)."""
        if os.getpid() != self._owner:
            return
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(OSError):
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == self._identity:
                os.unlink(self.path)


def create_control_socket(
    path: Path, *, uid: int | None = None, gid: int | None = None
) -> ControlSocket:
    """Binds the control socket at ``path`` with mode 0600 (there is no moment it is wider) and
    gives it to ``uid``/``gid`` when given (the service user, before the privilege drop). The
    directory is made when missing (0750, given to ``uid``/``gid`` as well, so the user can
    remove the socket at stop). A socket file nobody answers on (a killed daemon's) is replaced;
    a daemon answering on it, or a file that is not a socket, stops the start: raises
    :class:`ControlSocketError` naming the path."""
    where = f"[server] control_socket {path}"
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise ControlSocketError(
            f"{where}: path too long for a Unix socket ({len(os.fsencode(path))} bytes, "
            f"at most {UNIX_PATH_MAX}): choose a shorter one"
        )
    directory = path.parent
    try:
        if not directory.is_dir():
            make_dirs(directory, RUN_DIR_MODE)
            if uid is not None or gid is not None:
                os.chown(directory, -1 if uid is None else uid, -1 if gid is None else gid)
    except OSError as exc:
        raise ControlSocketError(
            f"{where}: cannot create {directory}: {exc.strerror or exc}"
        ) from None
    _clear_stale(path, where)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        before = os.umask(0o177)  # the file is born 0600: no window with a wider mode
        try:
            sock.bind(os.fspath(path))
        finally:
            os.umask(before)
        os.chmod(path, SOCKET_MODE)
        if uid is not None or gid is not None:
            os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
        sock.listen(MAX_CLIENTS)
        sock.setblocking(False)
        return ControlSocket(sock, path)
    except OSError as exc:
        sock.close()
        raise ControlSocketError(f"{where}: cannot listen: {exc.strerror or exc}") from None


def _clear_stale(path: Path, where: str) -> None:
    """Removes a socket file nobody answers on; refuses a live daemon's or a non-socket."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ControlSocketError(f"{where}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise ControlSocketError(
            f"{where} exists and is not a socket: remove it or choose another path"
        )
    try:
        reply = ask_status(path, timeout=REQUEST_TIMEOUT)
    except NotRunning:  # refused: the daemon that made it is gone
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ControlSocketError(
                f"{where}: cannot remove the stale socket: {exc.strerror or exc}"
            ) from None
        return
    except StatusUnknown as exc:
        raise ControlSocketError(
            f"{where}: something listens on it but gave no status ({exc}): another daemon "
            "starting or hung? Stop it first, or choose another path"
        ) from None
    raise ControlSocketError(
        f"{where}: another palisade daemon (pid {reply.get('pid', '?')}) answers on it: "
        "stop it first, or give this one another control_socket"
    )


# -- the client side -----------------------------------------------------------------------


def ask_status(path: Path, *, timeout: float = CLIENT_TIMEOUT) -> dict[str, Any]:
    """Asks the daemon at ``path`` for its status (blocking, within ``timeout``). Raises
    :class:`NotRunning` (no socket, or nobody listening on it) or :class:`StatusUnknown`
    (permission denied, no answer in time, an answer that is not a status)."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except FileNotFoundError:
            raise NotRunning(f"no control socket at {path}") from None
        except ConnectionRefusedError:
            raise NotRunning(f"connection refused: stale socket {path}") from None
        except PermissionError:
            raise StatusUnknown(f"permission denied on {path}", denied=True) from None
        except OSError as exc:
            if exc.errno in (errno.ENOTSOCK, errno.ENOTDIR):
                raise NotRunning(f"no control socket at {path}") from None
            raise StatusUnknown(f"cannot connect to {path}: {exc.strerror or exc}") from None
        data = bytearray()
        try:
            sock.sendall(b"status\n")
            while b"\n" not in data and len(data) <= MAX_REPLY:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise StatusUnknown(f"no answer on {path} within {timeout:g}s") from None
        except OSError as exc:
            raise StatusUnknown(f"{path}: {exc.strerror or exc}") from None
    try:
        reply = json.loads(bytes(data).split(b"\n", 1)[0])
    except ValueError:
        reply = None
    if not isinstance(reply, dict) or "pid" not in reply:
        shown = escape(bytes(data[:200]).decode("utf-8", "replace"))
        raise StatusUnknown(f"unexpected answer on {path}: {shown!r}")
    return reply


# -- what a listening process knows --------------------------------------------------------


class Process(Protocol):
    """What the status needs of a process (``server.app.Gateway`` has it)."""

    @property
    def generation(self) -> Generation: ...

    @property
    def spool(self) -> Spool: ...

    @property
    def log(self) -> EventLog: ...

    @property
    def config_path(self) -> Path | None: ...


def zone_health(generation: Generation) -> list[dict[str, Any]]:
    """Every DNSBL zone of the generation's rules, each with ``disabled`` (and when and why)."""
    zones: dict[str, dict[str, Any]] = {}
    for check in dnsbl_checks(generation.policy):
        for zone in check.zones:
            entry: dict[str, Any] = {"zone": zone.shown, "disabled": False}
            if zone.shown in check.disabled:
                since, reason = check.disabled[zone.shown]
                entry.update(disabled=True, since=since, reason=reason)
            zones.setdefault(zone.shown, entry)
    return list(zones.values())


def worker_report(process: Process, connections: Callable[[], int]) -> dict[str, Any]:
    """What a listening process tells: its connections, generation and DNSBL zones."""
    generation = process.generation
    return {
        "pid": os.getpid(),
        "connections": connections(),
        "generation": generation.number,
        "loaded_at": generation.loaded_at,
        "dnsbl": zone_health(generation),
        "state": state_health(generation),
    }


def state_health(generation: Generation) -> dict[str, Any]:
    """The state store of this process: its backend and, on Redis, whether this process is on
    its fall-back (Redis away) and since when."""
    backend = generation.config.state.backend
    state = None if generation.ports is None else generation.ports.state
    down_since = getattr(state, "down_since", None)
    return {"backend": backend, "fallback": down_since is not None, "since": down_since}


def merge_state(generation: Generation, reports: list[dict[str, Any] | None]) -> dict[str, Any]:
    """The workers' :func:`state_health` as one: the backend, and how many workers are on their
    fall-back (0 on SQLite), from when."""
    down = [r["state"] for r in reports if r is not None and r.get("state", {}).get("fallback")]
    return {
        "backend": generation.config.state.backend,
        "fallback_workers": len(down),
        "since": min((d["since"] for d in down if d.get("since")), default=None),
    }


async def answer_parent(
    channel: socket.socket, process: Process, connections: Callable[[], int]
) -> None:
    """In a worker: answers each ``status SEQ`` line from the parent with its
    :func:`worker_report` as one JSON line carrying ``seq``, until the parent closes its end."""
    loop = asyncio.get_running_loop()
    pending = b""
    while True:
        try:
            data = await loop.sock_recv(channel, 4096)
        except OSError:
            return
        if not data:
            return
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            word, _, seq = line.decode("ascii", "replace").partition(" ")
            if word != "status" or not seq.isdigit():
                continue
            report = {"seq": int(seq), **worker_report(process, connections)}
            reply = json.dumps(report, separators=(",", ":"))
            try:
                await loop.sock_sendall(channel, reply.encode() + b"\n")
            except OSError:
                return
        if len(pending) > MAX_REQUEST:  # the parent never sends such a line
            pending = b""


class _Channel:
    """The parent's end of one worker's socketpair; one question at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = asyncio.Lock()
        self.seq = 0
        self.buffer = bytearray()
        self.closed = False

    async def ask(self, timeout: float) -> dict[str, Any] | None:
        """The worker's report, or None if it does not answer within ``timeout``. A late
        answer to an earlier question is told apart by its ``seq`` and dropped."""
        async with self.lock:
            if self.closed:
                return None
            self.seq += 1
            try:
                return await asyncio.wait_for(self._exchange(self.seq), timeout)
            except (TimeoutError, OSError, ValueError):
                return None
            finally:
                if self.closed:  # the worker was replaced meanwhile: see close()
                    self.close_now()

    async def _exchange(self, seq: int) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self.sock, f"status {seq}\n".encode())
        while True:
            while b"\n" not in self.buffer:
                chunk = await loop.sock_recv(self.sock, 65536)
                if not chunk:
                    raise OSError("the worker closed its end")
                self.buffer += chunk
                if len(self.buffer) > MAX_REPLY:
                    self.buffer.clear()
                    raise ValueError("worker reply too long")
            line, _, rest = bytes(self.buffer).partition(b"\n")
            self.buffer[:] = rest
            reply = json.loads(line)
            if isinstance(reply, dict) and reply.get("seq") == seq:
                return reply

    def close(self) -> None:
        """Closes the socket, or lets the question in flight close it when it ends (a socket
        must not be closed under a pending ``sock_recv``)."""
        self.closed = True
        if not self.lock.locked():
            self.close_now()

    def close_now(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class WorkerChannels:
    """One socketpair per worker slot, made before each fork: the parent asks on its end, the
    worker answers on the other (:func:`answer_parent`)."""

    def __init__(self) -> None:
        self.channels: dict[int, _Channel] = {}
        self._child_end: socket.socket | None = None

    def pair(self, slot: int) -> None:
        """Before forking worker ``slot``: a new pair (a restarted worker's old one goes)."""
        old = self.channels.pop(slot, None)
        if old is not None:
            old.close()
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        parent_end.setblocking(False)
        self.channels[slot] = _Channel(parent_end)
        self._child_end = child_end

    def forked(self) -> None:
        """In the parent after the fork: the worker's end is the worker's alone."""
        if self._child_end is not None:
            self._child_end.close()
            self._child_end = None

    def in_worker(self) -> socket.socket:
        """In the new worker: closes the parent's ends it inherited; returns its own end."""
        for channel in self.channels.values():
            channel.close_now()  # the parent's loop does not run here: no question in flight
        assert self._child_end is not None, "pair() comes before the fork"
        mine = self._child_end
        mine.setblocking(False)
        return mine

    async def ask(self, slot: int) -> dict[str, Any] | None:
        channel = self.channels.get(slot)
        return None if channel is None else await channel.ask(WORKER_TIMEOUT)

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()


# -- the answering process -----------------------------------------------------------------


class StatusServer:
    """Accepts on the control socket and answers ``status`` (see :func:`serve_status`)."""

    def __init__(
        self,
        control: ControlSocket,
        process: Process,
        *,
        connections: Callable[[], int] | None = None,
        workers: Mapping[int, int] | None = None,
        channels: WorkerChannels | None = None,
    ) -> None:
        self.control = control
        self.process = process
        self.connections = connections
        self.workers = workers
        self.channels = channels
        self.clients: set[asyncio.Task[None]] = set()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._accept())

    async def close(self) -> None:
        """Stops answering (the socket file is removed at exit: :meth:`ControlSocket.remove`)."""
        tasks = [t for t in (self.task, *self.clients) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if self.channels is not None:
            self.channels.close()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self.control.sock)
            except OSError as exc:  # out of descriptors: try again shortly
                self.process.log.panic(f"control socket: accept failed: {exc}")
                await asyncio.sleep(0.5)
                continue
            if len(self.clients) >= MAX_CLIENTS:
                conn.close()
                continue
            task = loop.create_task(self._serve(conn))
            self.clients.add(task)
            task.add_done_callback(self.clients.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with conn:
            conn.setblocking(False)
            try:
                line = await asyncio.wait_for(_read_line(loop, conn), REQUEST_TIMEOUT)
            except (TimeoutError, OSError):
                return
            if line == "status":
                try:
                    reply = await self.status()
                except Exception as exc:  # a status must never take the daemon down
                    self.process.log.panic(f"control socket: status failed: {exc!r}")
                    reply = {"error": f"status failed: {type(exc).__name__}"}
            elif line is None:
                reply = {"error": f"request line longer than {MAX_REQUEST} bytes"}
            else:
                reply = {"error": "unknown request (the one request is: status)"}
            data = json.dumps(reply, separators=(",", ":")).encode() + b"\n"
            with contextlib.suppress(TimeoutError, OSError):
                await asyncio.wait_for(loop.sock_sendall(conn, data), REQUEST_TIMEOUT)

    async def status(self) -> dict[str, Any]:
        """The reply to ``status`` (fields: README, "Status")."""
        loop = asyncio.get_running_loop()
        census = loop.run_in_executor(None, queue_census, self.process.spool)
        reports: list[tuple[int, int, dict[str, Any] | None]]
        if self.workers is None or self.channels is None:
            assert self.connections is not None
            reports = [(0, os.getpid(), worker_report(self.process, self.connections))]
        else:
            slots = dict(self.workers)
            channels = self.channels
            answers = await asyncio.gather(*(channels.ask(slot) for slot in slots))
            reports = [
                (slot, pid, a) for (slot, pid), a in zip(slots.items(), answers, strict=True)
            ]
        queue = await census
        now = time.time()
        generation = self.process.generation
        config_path = self.process.config_path
        started = self.control.started
        workers = []
        for slot, pid, report in reports:
            entry: dict[str, Any] = {"slot": slot, "pid": pid, "answered": report is not None}
            if report is not None:
                entry.update(
                    connections=report.get("connections"),
                    generation=report.get("generation"),
                    loaded_at=report.get("loaded_at"),
                )
            workers.append(entry)
        counts = {str(w["pid"]): w["connections"] for w in workers if w["answered"]}
        size, oldest = queue
        return {
            "pid": os.getpid(),
            "version": self.control.version,
            "started": started,
            "started_iso": iso(started),
            "uptime": round(now - started, 3),
            "config": os.path.abspath(config_path) if config_path else generation.config.source,
            "generation": generation.number,
            "loaded_at": generation.loaded_at,
            "loaded_at_iso": iso(generation.loaded_at),
            "workers": workers,
            "connections": {
                "total": sum(c for c in counts.values() if isinstance(c, int)),
                "per_worker": counts,
                "complete": all(w["answered"] for w in workers),
            },
            "queue": {
                "size": size,
                "oldest_age": None if oldest is None else round(max(0.0, now - oldest), 3),
            },
            "dnsbl": merge_zones(generation, [r for _, _, r in reports]),
            "state": merge_state(generation, [r for _, _, r in reports]),
        }


def serve_status(
    control: ControlSocket,
    process: Process,
    *,
    connections: Callable[[], int] | None = None,
    workers: Mapping[int, int] | None = None,
    channels: WorkerChannels | None = None,
) -> StatusServer:
    """Starts answering on ``control``: the single process gives its own ``connections``; the
    parent gives its live ``workers`` (slot -> pid) and their ``channels``."""
    server = StatusServer(
        control, process, connections=connections, workers=workers, channels=channels
    )
    server.start()
    return server


async def _read_line(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> str | None:
    """The request line without its end (None: longer than :data:`MAX_REQUEST`)."""
    data = b""
    while b"\n" not in data:
        chunk = await loop.sock_recv(conn, MAX_REQUEST)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            return None
    return data.split(b"\n", 1)[0].strip().decode("ascii", "replace")


def queue_census(spool: Spool) -> tuple[int, float | None]:
    """Queue size and when its oldest message came (epoch), without reading a message: one
    directory scan, then the oldest one's envelope (its id's second if it is gone meanwhile).
    Blocking: run it in a thread."""
    size, oldest = spool.census()
    if oldest is None:
        return size, None
    try:
        return size, spool.load(oldest)[0].received_at
    except (SpoolError, OSError):
        return size, float(queue_id_time(oldest))


def merge_zones(generation: Generation, reports: list[dict[str, Any] | None]) -> dict[str, Any]:
    """The DNSBL zones of the answering process's generation, with what the workers report:
    a zone is disabled when any worker has it disabled (each worker probes for itself);
    ``unknown`` when no worker answered."""
    interval = generation.config.dns.dnsbl_probe_interval
    answered = [r for r in reports if r is not None]
    zones: dict[str, dict[str, Any]] = {
        z["zone"]: {"zone": z["zone"]} for z in zone_health(generation)
    }
    for report in answered:
        for z in report.get("dnsbl", []):
            entry = zones.setdefault(z["zone"], {"zone": z["zone"]})
            if z.get("disabled"):
                entry.setdefault("disabled_in", []).append(report.get("pid"))
                if "since" not in entry or z["since"] < entry["since"]:
                    entry.update(since=z["since"], reason=z.get("reason", ""))
    for entry in zones.values():
        if "disabled_in" in entry:
            entry["state"] = "disabled"
            entry["since_iso"] = iso(entry["since"])
        elif not answered:
            entry["state"] = "unknown"
        elif interval <= 0:
            entry["state"] = "not probed"
        else:
            entry["state"] = "healthy"
    return {"probe_interval": interval, "zones": list(zones.values())}
