"""What the greeting delay costs a returning client, with and without the pregreet pass cache.

Palisade runs with ``[server] greeting_delay`` (default 1 s) twice: with the pass cache
(``pregreet_pass_ttl = "1d"``) and without it (``pregreet_pass_ttl = 0``). Beside it, when
Postfix is installed and we are root, a private Postfix instance (bench/postfix_instance.py)
whose port is served by postscreen with the same ``postscreen_greet_wait`` and a
``postscreen_cache_map`` (its pregreet test, nothing else: no DNSBL, no deep protocol tests).

N clients, each from its own loopback address (127.0.1.1 ... 127.0.1.N), send one message
each (banner, EHLO, MAIL, RCPT, DATA with ~1 KB, QUIT); then the same N clients do it again.
For every connection: the time to the (whole) 220 banner and the time to the 250 after the
final dot, from the start of connect. Clients run ``--concurrency`` at a time::

    python bench/pregreet_bench.py [--n 20] [--delay 1] [--concurrency 10] [--no-postfix]

Prints a table (median and max per round) and, with ``--json FILE``, the raw figures.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
_REPLY_END = re.compile(rb"(?:^|\r\n)(\d{3}) [^\r\n]*\r\n")
BODY = b"Subject: pregreet bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * 13 + b".\r\n"


# -- a client -----------------------------------------------------------------------------------
class Client:
    def __init__(self, port: int, source: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), 30, source_address=(source, 0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def reply(self) -> int:
        while True:
            match = _REPLY_END.search(self.buffer)
            if match:
                self.buffer = self.buffer[match.end() :]
                return int(match.group(1))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by server")
            self.buffer += chunk

    def command(self, line: bytes) -> int:
        self.sock.sendall(line + b"\r\n")
        return self.reply()


def visit(port: int, source: str) -> tuple[float, float]:
    """One message from ``source``: (seconds to the banner, seconds to the 250 after DATA)."""
    started = time.monotonic()
    client = Client(port, source)
    try:
        code = client.reply()
        banner = time.monotonic() - started
        if code != 220:
            raise RuntimeError(f"{source}: banner {code}")
        for line, want in (
            (b"EHLO client.bench.test", 250),
            (b"MAIL FROM:<sender@outside.test>", 250),
            (b"RCPT TO:<user@bench.test>", 250),
            (b"DATA", 354),
        ):
            code = client.command(line)
            if code != want:
                raise RuntimeError(f"{source}: {line!r} answered {code}")
        client.sock.sendall(BODY)
        if (code := client.reply()) != 250:
            raise RuntimeError(f"{source}: message answered {code}")
        done = time.monotonic() - started
        client.command(b"QUIT")
    finally:
        client.sock.close()
    return banner, done


def run_round(port: int, sources: list[str], concurrency: int) -> list[tuple[float, float]]:
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda s: visit(port, s), sources))


# -- the systems --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Palisade:
    def __init__(self, base: Path, delay: float, ttl: str) -> None:
        self.base = base
        self.port = free_port()
        base.mkdir(parents=True, exist_ok=True)
        (base / "palisade.toml").write_text(
            f"""[server]
hostname = "gw.bench.test"
listen = ["127.0.0.1:{self.port}"]
workers = 1
greeting_delay = {delay}
pregreet_pass_ttl = "{ttl}"
max_connections_per_ip = 1000

[domains]
local = ["bench.test"]
relay = []

[paths]
spool = "{base}/spool"
mail = "{base}/mail"
log = "{base}/log"
state = "{base}/state.sqlite"
"""
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "palisade", "serve", "--config", str(base / "palisade.toml")],
            cwd=base,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while (
            not (base / "log" / "mainlog").exists()
            or "daemon started" not in (base / "log" / "mainlog").read_text()
        ):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"palisade did not start; see {base}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def postscreen_instance(root: Path, delay: float):  # type: ignore[no-untyped-def]
    """A private Postfix whose listening port is postscreen's (pregreet test and cache only)."""
    from postfix_instance import PostfixInstance

    class Postscreen(PostfixInstance):
        def write_config(self) -> None:
            super().write_config()
            master = (self.etc / "master.cf").read_text().splitlines(keepends=True)
            listen = f"{self.host}:{self.port}"
            out = []
            for line in master:
                if line.startswith(listen):
                    out.append(
                        f"{listen} inet  n       -       n       -       1       postscreen\n"
                    )
                    out.append("smtpd     pass  -       -       n       -       -       smtpd\n")
                    out.append("dnsblog   unix  -       -       n       -       0       dnsblog\n")
                    out.append("tlsproxy  unix  -       -       n       -       0       tlsproxy\n")
                else:
                    out.append(line)
            (self.etc / "master.cf").write_text("".join(out))
            self._postfix("check")

    whole = f"{delay:g}s"
    return Postscreen(
        root,
        port=free_port(),
        sink_port=free_port(),  # nothing listens there: accepted mail waits in the queue
        extra_settings={
            "postscreen_greet_action": "enforce",
            "postscreen_greet_wait": whole,
            "postscreen_greet_ttl": "1d",
            "postscreen_cache_map": "btree:$data_directory/postscreen_cache",
            "postscreen_dnsbl_sites": "",
            "postscreen_access_list": "permit_mynetworks",
            "postscreen_blacklist_action": "ignore",
            "postscreen_pipelining_enable": "no",
            "postscreen_non_smtp_command_enable": "no",
            "postscreen_bare_newline_enable": "no",
        },
    )


# -- the run ------------------------------------------------------------------------------------
def summary(results: list[tuple[float, float]]) -> dict[str, float]:
    banners = [b for b, _ in results]
    messages = [m for _, m in results]
    return {
        "banner_median": statistics.median(banners),
        "banner_max": max(banners),
        "message_median": statistics.median(messages),
        "message_max": max(messages),
    }


def measure(port: int, sources: list[str], concurrency: int) -> dict[str, dict[str, float]]:
    first = run_round(port, sources, concurrency)
    time.sleep(0.5)  # let the first round's sessions finish writing their passes
    later = run_round(port, sources, concurrency)
    return {"first": summary(first), "later": summary(later)}


def machine() -> dict[str, object]:
    load = os.getloadavg()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load": f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--n", type=int, default=20, help="client addresses (connections per round)")
    ap.add_argument("--delay", type=float, default=1.0, help="greeting_delay / greet_wait (s)")
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--no-postfix", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sources = [f"127.0.1.{i}" for i in range(1, args.n + 1)]
    results: dict[str, object] = {"machine": machine(), "n": args.n, "delay": args.delay}
    with tempfile.TemporaryDirectory(prefix="palisade-pregreet-") as tmp:
        os.chmod(tmp, 0o755)  # the postfix user must reach its queue below it
        for label, ttl in (("palisade, pass cache 1d", "1d"), ("palisade, no cache", "0")):
            gw = Palisade(Path(tmp) / ttl, args.delay, ttl)
            try:
                results[label] = measure(gw.port, sources, args.concurrency)
            finally:
                gw.stop()
        postfix = shutil.which("postfix") or (
            "/usr/sbin/postfix" if Path("/usr/sbin/postfix").exists() else None
        )
        if args.no_postfix:
            pass
        elif postfix is None or os.geteuid() != 0:
            print("Postfix not installed or not root: postscreen not measured", file=sys.stderr)
        else:
            pf = postscreen_instance(Path(tmp) / "postfix", args.delay)
            pf.start()
            try:
                version = subprocess.run(
                    [pf_postconf(), "-d", "-h", "mail_version"], capture_output=True, text=True
                ).stdout.strip()
                results["machine"]["postfix"] = version  # type: ignore[index]
                results[f"postscreen (Postfix {version})"] = measure(
                    pf.port, sources, args.concurrency
                )
            finally:
                with contextlib.suppress(Exception):
                    pf.stop()
    print(json.dumps(results["machine"]))
    print(f"N={args.n} clients, delay {args.delay:g}s, concurrency {args.concurrency}")
    print(f"{'system':<38} {'round':<6} {'banner med/max (s)':>20} {'message med/max (s)':>21}")
    for label, value in results.items():
        if not isinstance(value, dict) or "first" not in value:
            continue
        for rnd in ("first", "later"):
            s = value[rnd]
            print(
                f"{label:<38} {rnd:<6} {s['banner_median']:>9.3f} / {s['banner_max']:<8.3f} "
                f"{s['message_median']:>9.3f} / {s['message_max']:<8.3f}"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def pf_postconf() -> str:
    return shutil.which("postconf") or "/usr/sbin/postconf"


if __name__ == "__main__":
    raise SystemExit(main())
