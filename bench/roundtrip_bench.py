"""What one SMTP command round trip costs the server in asyncio machinery.

A client thread sends ``NOOP`` and waits for the reply, N times, over a socketpair, to a server
protocol written two ways: answering straight from ``data_received`` (a callback), and the way
Palisade's sessions do it (a coroutine awaiting a future with a timer, woken by
``data_received``). The difference is the price of the coroutine shape per command; an SMTP
transaction in the reference benchmark has about seven round trips::

    python bench/roundtrip_bench.py [--n 20000]

Prints wall time and process CPU (both sides, same process) per round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import time

try:
    import uvloop
except ImportError:  # pragma: no cover - the benchmark machine has it
    uvloop = None  # type: ignore[assignment]


class Callback(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"250 2.0.0 Ok\r\n")  # type: ignore[attr-defined]


class Coroutine(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        self.task = self.loop.create_task(self.run())

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def read(self) -> bytes:
        if not self.buffer:
            self.waiter = self.loop.create_future()
            timer = self.loop.call_later(300, lambda: None)
            try:
                await self.waiter
            finally:
                timer.cancel()
                self.waiter = None
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    async def run(self) -> None:
        while True:
            await self.read()
            self.transport.write(b"250 2.0.0 Ok\r\n")  # type: ignore[attr-defined]


async def measure(protocol: type[asyncio.Protocol], n: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    server_side, client_side = socket.socketpair()
    await loop.connect_accepted_socket(protocol, server_side)
    client_side.setblocking(True)

    def client() -> None:
        for _ in range(n):
            client_side.send(b"NOOP\r\n")
            client_side.recv(100)

    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    await loop.run_in_executor(None, client)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    client_side.close()
    return wall / n * 1e6, cpu / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    args = ap.parse_args()
    run = uvloop.run if uvloop is not None else asyncio.run
    for protocol in (Callback, Coroutine, Callback, Coroutine):
        wall, cpu = run(measure(protocol, args.n))
        print(f"{protocol.__name__:9} {wall:6.1f} us wall, {cpu:6.1f} us CPU per round trip")


if __name__ == "__main__":
    main()
