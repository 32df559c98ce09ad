"""Messages per second delivered to loopback MX hosts over TLS, with and without connection reuse.

    python bench/mx_bench.py                      # 3 MX hosts, verify, 1500 msgs x 3 rounds
    python bench/mx_bench.py --level opportunistic --messages 3000

The MX transport (palisade.delivery.mxdelivery.MxDelivery) runs in this process; the MX hosts
are a small TLS-capable SMTP sink (below, ``--sink`` mode: EHLO with PIPELINING and STARTTLS,
every command answered, the data discarded; Postfix's smtp-sink has no TLS) in a child process
listening on 127.0.0.31-33 with a certificate for each MX name from a throwaway CA (trustme).
The loopback DNS server (loopback/dnsserver.py, in a thread here) serves ``--domains`` domains,
each with the three hosts as MX records of equal preference, so the deliveries spread over
them. Each round delivers ``--messages`` messages of ~4 KB (one recipient each, the domains in
turn) with ``--concurrency`` tasks, once with the connection cache (``reuse``: up to 100
transactions per connection) and once without (``no-reuse``: a TCP connection and a TLS
handshake per message), alternating A/B within the round. Prints per round and the medians:
messages/s (wall clock) and this process's CPU seconds per 1000 messages (the client's work;
the sink's is its own process), plus the load average. Bounded: about a minute by default.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

IPS = ("127.0.0.31", "127.0.0.32", "127.0.0.33")
NAMES = ("mx1.bench.test", "mx2.bench.test", "mx3.bench.test")


# -- the sink (child process) -------------------------------------------------------------------


class SinkProtocol(asyncio.Protocol):
    """Just enough SMTP server: pipelined commands, STARTTLS, DATA discarded."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.buffer = b""
        self.in_data = False
        self.upgrading = False  # between STARTTLS and the TLS transport in hand
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(b"220 sink.bench.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.upgrading:  # the client's EHLO may arrive before start_tls returns
            return
        out: list[bytes] = []
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    if len(self.buffer) > 1 << 20:
                        self.buffer = self.buffer[-8:]
                    break
                self.buffer = self.buffer[end + 5 :]
                self.in_data = False
                out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                break
            line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
            verb = line[:4].upper()
            if verb == b"EHLO":
                tls = self.transport.get_extra_info("ssl_object") is not None
                ext = b"" if tls else b"250-STARTTLS\r\n"
                out.append(b"250-sink.bench.test\r\n250-PIPELINING\r\n" + ext + b"250 8BITMIME\r\n")
            elif verb == b"STAR":
                self.transport.pause_reading()  # the ClientHello is not SMTP
                self.transport.write(b"".join(out) + b"220 2.0.0 Ready to start TLS\r\n")
                out = []
                self.buffer = b""
                self.upgrading = True
                asyncio.get_running_loop().create_task(self._starttls())
                return
            elif verb == b"DATA":
                self.in_data = True
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            else:
                out.append(b"250 2.0.0 Ok\r\n")
        if out:
            self.transport.write(b"".join(out))

    async def _starttls(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.transport = await loop.start_tls(
                self.transport, self, self.context, server_side=True
            )
            self.upgrading = False
            self.data_received(b"")
        except (OSError, ConnectionError) as exc:
            print(f"sink: handshake failed: {exc!r}", file=sys.stderr, flush=True)
            self.transport.close()


async def sink_main(port: int, certdir: Path) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for ip, name in zip(IPS, NAMES, strict=True):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certdir / f"{name}.pem", certdir / f"{name}.key")

        def factory(context: ssl.SSLContext = context) -> SinkProtocol:
            return SinkProtocol(context)

        servers.append(await loop.create_server(factory, ip, port, backlog=512))
    print("ready", flush=True)
    await asyncio.Event().wait()


# -- the client (this process) ------------------------------------------------------------------


def free_port() -> int:
    import socket

    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((IPS[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for ip in IPS[1:]:
                with socket.socket() as sock:
                    sock.bind((ip, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every MX address")


def make_body(size: int) -> bytes:
    head = (
        b"From: Load <load@client.example>\r\nTo: rcpt@bench.test\r\n"
        b"Subject: MX benchmark\r\nMessage-ID: <bench@client.example>\r\n\r\n"
    )
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def one_run(
    args: argparse.Namespace, port: int, dns: Any, ca: Path, reuse: bool
) -> tuple[float, float]:
    from palisade.adapters.dns import DnsResolver
    from palisade.delivery.mx import MxResolver
    from palisade.delivery.mxdelivery import MxDelivery
    from palisade.obs.queueid import QueueIdGenerator
    from palisade.ports import TlsLevel
    from palisade.spool import Envelope

    resolver = DnsResolver([dns.address], timeout=2.0, retries=1)
    mx = MxDelivery(
        resolver,
        helo_name="bench.palisade.test",
        port=port,
        default_level=TlsLevel(args.level),
        verify_context=ssl.create_default_context(cafile=str(ca)),
        concurrency_per_destination=args.per_destination,
        mx=MxResolver(resolver, rng=random.Random(1)),
        cache_uses=100 if reuse else 1,
    )
    body = make_body(args.size)
    domains = [f"d{n}.bench.test" for n in range(args.domains)]
    env = Envelope(
        queue_id=QueueIdGenerator().new(), sender="load@client.example",
        recipients=("rcpt@d0.bench.test",), received_at=time.time(), client_ip="127.0.0.1",
        client_port=40000, helo="client.example", client_name=None, protocol="esmtp", tls=None,
    )  # fmt: skip
    failures = 0

    async def deliver_all(count: int) -> None:
        nonlocal failures
        todo = iter(range(count))

        async def worker() -> None:
            nonlocal failures
            for n in todo:
                rcpt = f"rcpt@{domains[n % len(domains)]}"
                results = await mx.deliver(env, [rcpt], body)
                if results[0].outcome != "delivered":
                    failures += 1
                    if failures == 1:
                        print(f"  first failure: {results[0]}", file=sys.stderr)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))

    try:
        await deliver_all(args.warmup)
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        await deliver_all(args.messages)
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    finally:
        mx.close_idle()
    if failures:
        raise RuntimeError(f"{failures} deliveries did not succeed")
    return args.messages / wall, cpu * 1000 / args.messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--domains", type=int, default=4)
    parser.add_argument("--per-destination", type=int, default=5)
    parser.add_argument("--level", default="verify", choices=["opportunistic", "require", "verify"])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--sink", nargs=2, metavar=("PORT", "CERTDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        asyncio.run(sink_main(int(args.sink[0]), Path(args.sink[1])))
        return

    import trustme

    from loopback.dnsserver import start_zone_server

    ca = trustme.CA()
    tmp = Path(tempfile.mkdtemp(prefix="mx-bench-"))
    for name in NAMES:
        cert = ca.issue_cert(name)
        cert.private_key_pem.write_to_path(str(tmp / f"{name}.key"))
        cert.cert_chain_pems[0].write_to_path(str(tmp / f"{name}.pem"))
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    port = free_port()
    sink = subprocess.Popen(
        [sys.executable, __file__, "--sink", str(port), str(tmp)],
        stdout=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    assert sink.stdout is not None
    if sink.stdout.readline().strip() != b"ready":
        sink.kill()
        raise SystemExit("the sink did not start")
    dns = start_zone_server()
    dns.add_zone("bench.test")
    for ip, name in zip(IPS, NAMES, strict=True):
        dns.set(name, "A", [ip])
    for n in range(args.domains):
        dns.set(f"d{n}.bench.test", "MX", [f"10 {name}." for name in NAMES])
    print(
        f"# python bench/mx_bench.py --messages {args.messages} --rounds {args.rounds}"
        f" --concurrency {args.concurrency} --domains {args.domains}"
        f" --per-destination {args.per_destination} --level {args.level} --size {args.size}"
    )
    print(f"# MX hosts {', '.join(IPS)} (one TLS sink process), {os.cpu_count()} CPUs")
    print(f"# load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    results: dict[str, list[tuple[float, float]]] = {"reuse": [], "no-reuse": []}
    started = time.monotonic()
    try:
        for round_no in range(args.rounds):
            order = ["reuse", "no-reuse"] if round_no % 2 == 0 else ["no-reuse", "reuse"]
            for mode in order:
                rate, cpu = asyncio.run(one_run(args, port, dns, tmp / "ca.pem", mode == "reuse"))
                results[mode].append((rate, cpu))
                print(
                    f"round {round_no + 1} {mode:9s} {rate:8.0f} msg/s  {cpu:6.2f} CPU-s/1000 msgs"
                )
    finally:
        sink.kill()
        sink.wait()
        dns.stop()
    print("# medians")
    med = {}
    for mode, values in results.items():
        rate = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        med[mode] = (rate, cpu)
        print(f"{mode:9s} {rate:8.0f} msg/s  {cpu:6.2f} CPU-s/1000 msgs")
    ratio = med["reuse"][0] / med["no-reuse"][0]
    print(
        f"reuse / no-reuse: {ratio:.2f}x msg/s,"
        f" {med['no-reuse'][1] / med['reuse'][1]:.2f}x less CPU per message"
    )
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())};"
          f" {time.monotonic() - started:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
