"""CPU per relayed message of the next-hop SMTP client (SmtpNextHop), against smtp-sink.

    python bench/nexthop_bench.py                       # 3000 msgs, 10 concurrent, 3 runs
    python bench/nexthop_bench.py --no-pipelining       # smtp-sink -p: one command per trip
    python bench/nexthop_bench.py --impl /tmp/x/old.py  # an SmtpNextHop from another file

Starts Postfix's ``smtp-sink`` on a free loopback port (it advertises PIPELINING unless
``--no-pipelining``), then per run: a fresh event loop (uvloop when installed, unless
``--no-uvloop``), one ``SmtpNextHop`` shared by ``--concurrency`` tasks that together deliver
``--messages`` messages of ~4 KB (one recipient each; the connection cache is used as in the
gateway), after ``--warmup`` untimed messages. Prints, per run and as the median over runs,
messages/s (wall clock) and this process's CPU seconds (user + system, ``getrusage``) per
1000 messages. Everything runs in this process, so the CPU is the client's alone (plus the
benchmark's own loop, the same for every implementation). Loopback only; the sink is stopped
at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from palisade.obs.queueid import QueueIdGenerator  # noqa: E402
from palisade.spool import Envelope  # noqa: E402

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_greeting(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                if sock.recv(100).startswith(b"220"):
                    return True
        except OSError:
            time.sleep(0.05)
    return False


def start_sink(port: int, pipelining: bool) -> subprocess.Popen[bytes]:
    cmd = [SMTP_SINK, "-c"]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody"]
    if not pipelining:
        cmd.append("-p")
    cmd += ["-m", "2000", f"127.0.0.1:{port}", "1000"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    if not wait_greeting(port, 10):
        proc.kill()
        raise RuntimeError("smtp-sink did not start")
    return proc


def load_hop_class(impl: str | None) -> Any:
    if impl is None:
        from palisade.delivery.nexthop import SmtpNextHop

        return SmtpNextHop
    spec = importlib.util.spec_from_file_location("nexthop_under_test", impl)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.SmtpNextHop


def make_body(size: int) -> bytes:
    head = (
        b"From: Load <load@client.example>\r\nTo: rcpt@bench.test\r\n"
        b"Subject: next-hop benchmark\r\nMessage-ID: <bench@client.example>\r\n\r\n"
    )
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    lines = [head]
    total = len(head)
    n = 0
    while total < size:
        lines.append(b"." + line if n % 20 == 0 else line)  # some lines need dot-stuffing
        total += len(lines[-1])
        n += 1
    return b"".join(lines)


def envelope() -> Envelope:
    return Envelope(
        queue_id=QueueIdGenerator().new(),
        sender="load@client.example",
        recipients=("rcpt@bench.test",),
        received_at=time.time(),
        client_ip="127.0.0.1",
        client_port=40000,
        helo="client.example",
        client_name=None,
        protocol="esmtp",
        tls=None,
    )


async def deliver_all(hop: Any, count: int, concurrency: int, body: bytes) -> int:
    """Delivers ``count`` messages with ``concurrency`` tasks; returns how many failed."""
    todo = iter(range(count))
    failures = 0
    env = envelope()  # the same envelope every time: only the client's work is measured

    async def worker() -> None:
        nonlocal failures
        for _ in todo:
            results = await hop.deliver(env, ["rcpt@bench.test"], body)
            if any(r.outcome != "delivered" for r in results):
                failures += 1
                if failures == 1:
                    print(f"  first failure: {results[0]}", file=sys.stderr)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failures


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def one_run(hop_class: Any, args: argparse.Namespace, port: int) -> tuple[float, float]:
    hop = hop_class(
        "127.0.0.1", port, helo_name="bench.palisade.test", tls_context=None, cache_uses=100
    )
    body = make_body(args.size)
    try:
        await deliver_all(hop, args.warmup, args.concurrency, body)
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        failures = await deliver_all(hop, args.messages, args.concurrency, body)
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    finally:
        hop.close_idle()
    if failures:
        raise RuntimeError(f"{failures} of {args.messages} deliveries did not succeed")
    return args.messages / wall, cpu * 1000 / args.messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--size", type=int, default=4096, help="body bytes (approximate)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--impl", help="a file defining SmtpNextHop (default: the package's)")
    parser.add_argument("--no-pipelining", action="store_true", help="smtp-sink -p")
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args()

    hop_class = load_hop_class(args.impl)
    loop_factory: Any = None
    if not args.no_uvloop:
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            pass
    port = free_port()
    sink = start_sink(port, pipelining=not args.no_pipelining)
    rates, cpus = [], []
    loop_name = "uvloop" if loop_factory else "asyncio"
    print(
        f"impl={args.impl or 'palisade.delivery.nexthop'} loop={loop_name}"
        f" pipelining={'no' if args.no_pipelining else 'yes'} messages={args.messages}"
        f" concurrency={args.concurrency} size~{args.size}"
    )
    try:
        for run in range(args.runs):
            if loop_factory is not None:
                with asyncio.Runner(loop_factory=loop_factory) as runner:
                    rate, cpu = runner.run(one_run(hop_class, args, port))
            else:
                rate, cpu = asyncio.run(one_run(hop_class, args, port))
            rates.append(rate)
            cpus.append(cpu)
            print(f"run {run + 1}: {rate:8.1f} msg/s  {cpu:6.3f} CPU-s per 1000 msgs")
    finally:
        sink.terminate()
        sink.wait(5)
    print(
        f"median: {statistics.median(rates):8.1f} msg/s  "
        f"{statistics.median(cpus):6.3f} CPU-s per 1000 msgs"
    )


if __name__ == "__main__":
    main()
