"""Does ``palisade status`` stall SMTP when the queue is large? (loopback, no root, ~1 minute)

Writes N messages (default 10,000) into a fresh spool with a delivery state that makes them due
in an hour, starts ``palisade serve`` (one process: the one that counts the queue also runs the
sessions) relaying to a next hop that refuses, then measures NOOP round trips on one SMTP
connection (TCP_NODELAY): first alone, then while another process asks the control socket for
the status back to back. Prints the round-trip percentiles of both, and the status latency.

    python bench/status_bench.py [--messages 10000] [--rounds 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from palisade.obs.queueid import QueueIdGenerator  # noqa: E402
from palisade.server.control import ask_status  # noqa: E402
from palisade.spool import DeliveryState, Envelope, Spool  # noqa: E402

HAMMER = """
import json, sys, time
from pathlib import Path
from palisade.server.control import ask_status
path, stop, times = Path(sys.argv[1]), Path(sys.argv[2]), []
while not stop.exists():
    t = time.perf_counter()
    ask_status(path)
    times.append(time.perf_counter() - t)
print(json.dumps(times))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def fill(spool: Spool, count: int) -> None:
    ids = QueueIdGenerator()
    later = time.time() + 3600
    for n in range(count):
        env = Envelope(
            queue_id=ids.new(),
            sender="s@outside.test",
            recipients=(f"r{n}@corp.test",),
            received_at=time.time() - 600,
            client_ip="192.0.2.1",
            client_port=1,
            helo="h.test",
            client_name=None,
            protocol="esmtp",
            tls=None,
        )
        writer = spool.open_message(env)
        writer.write(b"Subject: queued\r\n\r\n" + b"x" * 2000 + b"\r\n")
        await writer.commit()
        spool.save_state(env.queue_id, DeliveryState.fresh(env.recipients, next_attempt=later))


def percentiles(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p99 = ms[int(len(ms) * 0.99) - 1]
    return f"p50 {statistics.median(ms):.3f} ms, p99 {p99:.3f} ms, max {ms[-1]:.3f} ms"


def round_trips(port: int, rounds: int) -> list[float]:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.recv(512)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            sock.sendall(b"NOOP\r\n")
            data = b""
            while not data.endswith(b"\r\n"):
                data += sock.recv(512)
            times.append(time.perf_counter() - start)
        sock.sendall(b"QUIT\r\n")
    return times


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="palisade-status-bench-"))
    proc = None
    try:
        start = time.perf_counter()
        spool = Spool(base / "var" / "spool", fsync=False)
        asyncio.run(fill(spool, args.messages))
        spool.close()
        print(f"{args.messages} messages written in {time.perf_counter() - start:.1f}s")
        port = free_port()
        (base / "palisade.toml").write_text(
            f'[server]\nlisten = ["127.0.0.1:{port}"]\n'
            '[domains]\nlocal = ["example.test"]\nrelay = ["corp.test"]\n'
            f'[delivery]\nnext_hop = "127.0.0.1:{free_port()}"\nretry_initial = "1h"\n'
            "[log]\necho = false\n[dns]\ndnsbl_probe_interval = 0\n"
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "palisade", "serve", "--config", "palisade.toml"],
            cwd=base,
            stdout=subprocess.DEVNULL,
        )
        path = base / "var" / "run" / "control.sock"
        deadline = time.monotonic() + 120
        while True:
            try:
                reply = ask_status(path)
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        print(f"status: queue {reply['queue']}")
        round_trips(port, 200)  # warm-up
        alone = round_trips(port, args.rounds)
        stop = base / "stop"
        hammer = subprocess.Popen(  # another process: it must not share this one's GIL
            [sys.executable, "-c", HAMMER, str(path), str(stop)],
            stdout=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
        )
        try:
            while not ask_status(path):  # the hammer is under way when its first ask is
                pass
            busy = round_trips(port, args.rounds)
        finally:
            stop.touch()
            out, _ = hammer.communicate(timeout=60)
        asked = json.loads(out)
        print(f"NOOP alone:                 {percentiles(alone)}")
        print(f"NOOP with status in a loop: {percentiles(busy)}")
        print(f"status ({len(asked)} asked):  {percentiles(asked)}")
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main())
