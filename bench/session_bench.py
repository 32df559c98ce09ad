"""What Palisade's own session code costs per SMTP command and per transaction, in-process.

A client thread talks to a real ``server.session.Session`` (with its conversation, the bundled
demo config, no rules, a real spool in a temporary directory without fsync) over a socketpair:
first N ``NOOP`` round trips, then N/10 transactions (MAIL, RCPT, DATA, a 1 KB message, RSET)
in one connection, without pipelining. Run it beside an older checkout to compare::

    python bench/session_bench.py [--n 20000]
    PYTHONPATH=/path/to/old/src python bench/session_bench.py

Prints wall time and process CPU (both sides, same process) per round trip / per transaction.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import tempfile
import time
from pathlib import Path

try:
    import uvloop
except ImportError:  # pragma: no cover - the benchmark machine has it
    uvloop = None  # type: ignore[assignment]

from palisade.config import load_config
from palisade.obs.log import MemoryEventLog
from palisade.obs.queueid import QueueIdGenerator
from palisade.server.context import ServerContext
from palisade.server.generation import Generation, build_generation
from palisade.server.session import Session
from palisade.server.stream import ClientStream
from palisade.spool import Spool

HEADER = b"Subject: bench\r\nFrom: a@outside.test\r\nMessage-ID: <bench@outside.test>\r\n\r\n"
BODY = HEADER + (b"y" * 62 + b"\r\n") * 15 + b".\r\n"  # about 1 KB


def _recv_reply(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n") or data.split(b"\r\n")[-2][3:4] == b"-":
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


async def measure(
    ctx: ServerContext, generation: Generation, n: int
) -> tuple[float, float, float, float]:
    loop = asyncio.get_running_loop()
    server_side, client_side = socket.socketpair()
    done: asyncio.Future[None] = loop.create_future()

    def on_connect(stream: ClientStream) -> None:
        task = loop.create_task(Session(ctx, generation, stream, ("192.0.2.1", 40000)).run())
        task.add_done_callback(lambda _: done.done() or done.set_result(None))

    await loop.connect_accepted_socket(lambda: ClientStream(on_connect, loop), server_side)
    client_side.setblocking(True)
    results: list[tuple[float, float]] = []

    def usage() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def client() -> None:
        _recv_reply(client_side)  # banner
        client_side.send(b"EHLO client.test\r\n")
        _recv_reply(client_side)
        start, cpu = time.perf_counter(), usage()
        for _ in range(n):
            client_side.send(b"NOOP\r\n")
            _recv_reply(client_side)
        results.append((time.perf_counter() - start, usage() - cpu))
        start, cpu = time.perf_counter(), usage()
        for _ in range(n // 10):
            for command in (b"MAIL FROM:<a@outside.test>\r\n", b"RCPT TO:<user@example.test>\r\n"):
                client_side.send(command)
                _recv_reply(client_side)
            client_side.send(b"DATA\r\n")
            _recv_reply(client_side)
            client_side.send(BODY)
            reply = _recv_reply(client_side)
            assert reply.startswith(b"250"), reply
        results.append((time.perf_counter() - start, usage() - cpu))
        client_side.send(b"QUIT\r\n")
        _recv_reply(client_side)

    await loop.run_in_executor(None, client)
    await done
    client_side.close()
    (noop_wall, noop_cpu), (tx_wall, tx_cpu) = results
    m = n // 10
    return noop_wall / n * 1e6, noop_cpu / n * 1e6, tx_wall / m * 1e6, tx_cpu / m * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="palisade-session-bench-") as tmp:
        os.chdir(tmp)  # the demo config's relative paths (state, spool) land here
        config = load_config(None)
        generation = build_generation(config, delivering=False)
        spool = Spool(Path(tmp) / "spool", fsync=False)
        ctx = ServerContext(
            log=MemoryEventLog(),
            spool=spool,
            queue_ids=QueueIdGenerator(),
            submit=lambda _queue_id: None,
            current=lambda: generation,
        )
        run = uvloop.run if uvloop is not None else asyncio.run
        for _ in range(2):
            noop_wall, noop_cpu, tx_wall, tx_cpu = run(measure(ctx, generation, args.n))
            print(
                f"NOOP {noop_wall:6.1f} us wall, {noop_cpu:6.1f} us CPU per round trip; "
                f"transaction {tx_wall:7.1f} us wall, {tx_cpu:7.1f} us CPU"
            )


if __name__ == "__main__":
    main()
