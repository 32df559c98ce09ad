"""SMTP load driver for the Palisade benchmark (asyncio + uvloop, raw transports).

Two modes.

``throughput``: N concurrent clients, one transaction per connection, exactly the
reference shape: connect, read the 220, EHLO, MAIL, one RCPT, DATA, a ~4 KB message,
then QUIT written together with the close (FIN) without waiting for the 221.  No
pipelining.  Stops after ``--messages`` transactions or ``--duration`` seconds, whichever
comes first.  Latency is measured per transaction from the connect() call to the 250
reply after the message's final dot.  Prints a human summary on stderr and one JSON
object on stdout::

    python bench/smtp_load.py throughput --port 2527 --clients 20 --messages 5000

``idle``: open ``--connections`` connections, read each greeting, keep them all idle,
then time how long a NEW client takes to get its 220 greeting (several probes), hold a
few seconds (so an observer can sample the server's memory) and close everything::

    python bench/smtp_load.py idle --port 2525 --connections 10000

``listed``: N concurrent clients that are expected to be refused at connect: connect, read the
first reply, count it as refused if it is a 4xx/5xx (a 220 banner is an error: the client was
not refused), then write QUIT together with the close (FIN) without waiting for anything else.
Palisade sends its 554 instead of the banner and closes; Postfix (``smtpd_delay_reject = no``)
sends its 554 as the greeting and waits for QUIT (RFC 5321 section 3.1).  Stops after
``--connections`` attempts or ``--duration`` seconds.  Latency: connect() to the refusal::

    python bench/smtp_load.py listed --port 2535 --clients 20 --connections 5000 \
        --source-range 127.0.1.10-127.0.1.59

``--source-addrs 16`` spreads connections over 127.0.0.1..127.0.0.16 (IP_BIND_ADDRESS_NO_PORT)
in case one source address runs out of ephemeral ports.  ``--source-range FIRST-LAST`` (or a
comma-separated list) binds each new connection to the next address of the range, round-robin
over all connections (not per client), so every client address is used equally; the
perimeter benchmark uses it to give each connection an address with its own PTR / DNSBL data.

The driver shares the CPU with the server under test, so it keeps its own cost low: the
message bytes are built once, replies are parsed only as far as the last line's code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import resource
import socket
import sys
import time

try:
    import uvloop
except ImportError:  # pragma: no cover - the bench expects uvloop, but degrade politely
    uvloop = None

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def build_message(size: int, sender: str, rcpt: str) -> bytes:
    """A dot-terminated message of about ``size`` bytes (headers included)."""
    head = (
        f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: palisade bench\r\n"
        "Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <bench@load.bench.test>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    line = b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ-abcdefghijklm\r\n"
    body_len = max(0, size - len(head))
    body = (line * (body_len // len(line) + 1))[:body_len]
    if not body.endswith(b"\r\n"):
        body = body[:-2] + b"\r\n" if len(body) >= 2 else b"\r\n"
    return head + body + b".\r\n"


def load_message(path: str) -> bytes:
    """The message in ``path`` (LF or CRLF line ends), as sent after DATA: CRLF line ends,
    lines starting with a dot doubled (RFC 5321 section 4.5.2), then the final dot.  The
    bytes are otherwise sent as they are, so a DKIM signature in the file stays valid."""
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines) + b".\r\n"


# --------------------------------------------------------------------------------------
# One transaction as a Protocol state machine.

# states: index into the expected-reply sequence
_S_GREETING, _S_EHLO, _S_MAIL, _S_RCPT, _S_DATA, _S_DOT = range(6)
_EXPECT = (b"220", b"250", b"250", b"250", b"354", b"250")


class Transaction(asyncio.Protocol):
    __slots__ = ("buf", "done", "lines", "state", "transport")

    def __init__(self, lines: tuple[bytes, ...], done: asyncio.Future[str]) -> None:
        self.lines = lines  # what to send after each expected reply
        self.done = done
        self.state = 0
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        # A reply is complete when it ends in CRLF and its last line is "ddd ".
        if not buf.endswith(b"\r\n"):
            self.buf = buf
            return
        start = buf.rfind(b"\n", 0, len(buf) - 2) + 1
        if buf[start + 3 : start + 4] not in (b" ", b"\r"):
            self.buf = buf  # continuation lines of a multi-line reply
            return
        self.buf = b""
        code = buf[start : start + 3]
        state = self.state
        if code != _EXPECT[state]:
            self._finish(f"reply {code.decode(errors='replace')} at step {state}")
            return
        if state == _S_DOT:
            # Accepted.  QUIT goes out with the FIN; the 221 is not awaited.
            self.transport.write(b"QUIT\r\n")
            self.transport.close()
            if not self.done.done():
                self.done.set_result("")
            return
        self.transport.write(self.lines[state])
        self.state = state + 1

    def _finish(self, err: str) -> None:
        if not self.done.done():
            self.done.set_result(err)
        if self.transport is not None:
            self.transport.abort()

    def eof_received(self) -> bool:
        self._finish(f"server closed at step {self.state}")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(f"connection lost at step {self.state}: {exc}")


def _source_socket(addr: str | None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if addr:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((addr, 0))
    return sock


def _sources(n: int) -> list[str | None]:
    return [None] if n <= 1 else [f"127.0.0.{i}" for i in range(1, n + 1)]


def parse_source_range(text: str) -> list[str]:
    """``127.0.0.10-127.0.0.59`` or ``127.0.0.10,127.0.0.11`` -> the IPv4 addresses."""
    import ipaddress

    out: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        first, sep, last = part.partition("-")
        lo = ipaddress.IPv4Address(first.strip())
        hi = ipaddress.IPv4Address(last.strip()) if sep else lo
        if int(hi) < int(lo) or int(hi) - int(lo) > 65535:
            raise ValueError(f"bad source range {part!r}")
        out.extend(str(ipaddress.IPv4Address(i)) for i in range(int(lo), int(hi) + 1))
    if not out:
        raise ValueError("empty source range")
    return out


class SourcePicker:
    """Source address per connection: round-robin over ``--source-range`` across all clients,
    else the per-client address of ``--source-addrs`` (None: let the kernel choose)."""

    def __init__(self, args: argparse.Namespace) -> None:
        rng = getattr(args, "source_range", None)
        self.range = parse_source_range(rng) if rng else None
        self.per_client = _sources(args.source_addrs)
        self.next = 0

    def pick(self, idx: int) -> str | None:
        if self.range is None:
            return self.per_client[idx % len(self.per_client)]
        src = self.range[self.next % len(self.range)]
        self.next += 1
        return src


async def _connect(
    loop: asyncio.AbstractEventLoop, host: str, port: int, src: str | None, factory
) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
    if src is None:
        return await loop.create_connection(factory, host, port)
    sock = _source_socket(src)
    try:
        await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return await loop.create_connection(factory, sock=sock)


async def run_throughput(args: argparse.Namespace) -> dict:
    loop = asyncio.get_running_loop()
    if args.message_file:
        messages = [load_message(path) for path in args.message_file]
    else:
        messages = [build_message(args.size, args.sender, args.rcpt)]
    msg = messages[0]
    head = (
        f"EHLO {args.helo}\r\n".encode(),
        f"MAIL FROM:<{args.sender}>\r\n".encode(),
        f"RCPT TO:<{args.rcpt}>\r\n".encode(),
        b"DATA\r\n",
    )
    # With several --message-file, transaction k sends file k modulo their number (the same
    # sequence against every server).
    variants = [(*head, m) for m in messages]
    sent = 0
    latencies: list[float] = []
    errors: dict[str, int] = {}
    remaining = args.messages
    deadline = time.monotonic() + args.duration
    sources = SourcePicker(args)
    perf = time.perf_counter

    async def client(idx: int) -> None:
        nonlocal remaining, sent
        while remaining > 0 and time.monotonic() < deadline:
            remaining -= 1
            lines = variants[sent % len(variants)]
            sent += 1
            src = sources.pick(idx)
            done: asyncio.Future[str] = loop.create_future()
            t0 = perf()
            try:
                async with asyncio.timeout(args.timeout):
                    tr, _ = await _connect(
                        loop,
                        args.host,
                        args.port,
                        src,
                        lambda d=done, ls=lines: Transaction(ls, d),
                    )
                    try:
                        err = await done
                    finally:
                        if not err_ok(done):
                            tr.abort()
            except TimeoutError:
                err = "timeout"
            except OSError as e:
                err = f"connect: {e.strerror or e}"
            if err:
                errors[err] = errors.get(err, 0) + 1
            else:
                latencies.append(perf() - t0)

    t_start = perf()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.gather(*(client(i) for i in range(args.clients)))
    elapsed = perf() - t_start
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    latencies.sort()
    n = len(latencies)
    return {
        "mode": "throughput",
        "driver": "smtp_load.py",
        "host": args.host,
        "port": args.port,
        "clients": args.clients,
        "message_bytes": len(msg) - 3 if len(messages) == 1 else None,
        "messages_mix": len(messages),
        "source_range": args.source_range,
        "accepted": n,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "elapsed_s": round(elapsed, 3),
        "msgs_per_s": round(n / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": round(_pct(latencies, 50) * 1000, 2) if n else None,
        "p99_ms": round(_pct(latencies, 99) * 1000, 2) if n else None,
        "max_ms": round(latencies[-1] * 1000, 2) if n else None,
        "driver_cpu_s": round(ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime, 3),
    }


def err_ok(done: asyncio.Future[str]) -> bool:
    return done.done() and not done.cancelled() and done.result() == ""


def _pct(sorted_vals: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    if not sorted_vals:
        return float("nan")
    k = max(0, min(len(sorted_vals) - 1, math.ceil(p / 100 * len(sorted_vals)) - 1))
    return sorted_vals[k]


# --------------------------------------------------------------------------------------
# Listed mode: clients that should be refused at connect.


class Refusal(asyncio.Protocol):
    """Reads the first reply; a 4xx/5xx is a refusal.  Then QUIT with the FIN, no waiting."""

    __slots__ = ("buf", "done", "transport")

    def __init__(self, done: asyncio.Future[str]) -> None:
        self.done = done
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if not buf.endswith(b"\r\n"):
            self.buf = buf
            return
        start = buf.rfind(b"\n", 0, len(buf) - 2) + 1
        if buf[start + 3 : start + 4] not in (b" ", b"\r"):
            self.buf = buf
            return
        self.buf = b""
        code = buf[start : start + 3].decode(errors="replace")
        self.transport.write(b"QUIT\r\n")  # a write to a reset socket is dropped, not raised
        self.transport.close()
        if not self.done.done():
            self.done.set_result(code)

    def eof_received(self) -> bool:
        if not self.done.done():
            self.done.set_result("closed without a reply")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(f"connection lost before a reply: {exc}")


async def run_listed(args: argparse.Namespace) -> dict:
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    codes: dict[str, int] = {}
    errors: dict[str, int] = {}
    remaining = args.connections
    deadline = time.monotonic() + args.duration
    sources = SourcePicker(args)
    perf = time.perf_counter

    async def client(idx: int) -> None:
        nonlocal remaining
        while remaining > 0 and time.monotonic() < deadline:
            remaining -= 1
            src = sources.pick(idx)
            done: asyncio.Future[str] = loop.create_future()
            t0 = perf()
            tr = None
            try:
                async with asyncio.timeout(args.timeout):
                    tr, _ = await _connect(
                        loop, args.host, args.port, src, lambda d=done: Refusal(d)
                    )
                    res = await done
            except TimeoutError:
                res = "timeout"
                if tr is not None:
                    tr.abort()
            except OSError as e:
                res = f"connect: {e.strerror or e}"
            if len(res) == 3 and res[:1] in ("4", "5"):
                codes[res] = codes.get(res, 0) + 1
                latencies.append(perf() - t0)
            else:
                key = f"not refused: {res}" if len(res) == 3 else res
                errors[key] = errors.get(key, 0) + 1

    t_start = perf()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.gather(*(client(i) for i in range(args.clients)))
    elapsed = perf() - t_start
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    latencies.sort()
    n = len(latencies)
    return {
        "mode": "listed",
        "driver": "smtp_load.py",
        "host": args.host,
        "port": args.port,
        "clients": args.clients,
        "source_range": args.source_range,
        "attempted": n + sum(errors.values()),
        "refused": n,
        "codes": codes,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "elapsed_s": round(elapsed, 3),
        "refused_per_s": round(n / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": round(_pct(latencies, 50) * 1000, 2) if n else None,
        "p99_ms": round(_pct(latencies, 99) * 1000, 2) if n else None,
        "max_ms": round(latencies[-1] * 1000, 2) if n else None,
        "driver_cpu_s": round(ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime, 3),
    }


# --------------------------------------------------------------------------------------
# Idle mode.


class Idle(asyncio.Protocol):
    __slots__ = ("greeted", "lost", "transport")

    def __init__(self) -> None:
        self.greeted: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.greeted.done():
            self.greeted.set_result(data.startswith(b"220"))

    def eof_received(self) -> bool:
        self.lost = True
        if not self.greeted.done():
            self.greeted.set_result(False)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.greeted.done():
            self.greeted.set_result(False)


async def _probe(loop, host: str, port: int, timeout: float) -> float | None:
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            tr, proto = await loop.create_connection(Idle, host, port)
            try:
                ok = await proto.greeted
            finally:
                tr.write(b"QUIT\r\n")
                tr.close()
    except (TimeoutError, OSError):
        return None
    return time.perf_counter() - t0 if ok else None


async def run_idle(args: argparse.Namespace) -> dict:
    loop = asyncio.get_running_loop()
    sources = SourcePicker(args)
    conns: list[tuple[asyncio.BaseTransport, Idle]] = []
    failures: dict[str, int] = {}
    sem = asyncio.Semaphore(args.connect_concurrency)
    deadline = time.monotonic() + args.duration

    async def open_one(i: int) -> None:
        async with sem:
            if time.monotonic() > deadline:
                failures["deadline"] = failures.get("deadline", 0) + 1
                return
            try:
                async with asyncio.timeout(args.timeout):
                    tr, proto = await _connect(loop, args.host, args.port, sources.pick(i), Idle)
                    conns.append((tr, proto))
                    ok = await proto.greeted
            except TimeoutError:
                failures["no greeting (timeout)"] = failures.get("no greeting (timeout)", 0) + 1
                return
            except OSError as e:
                k = f"connect: {e.strerror or e}"
                failures[k] = failures.get(k, 0) + 1
                return
            if not ok:
                failures["bad greeting/closed"] = failures.get("bad greeting/closed", 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(open_one(i) for i in range(args.connections)))
    open_s = time.perf_counter() - t0
    greeted = sum(
        1
        for _, p in conns
        if p.greeted.done() and not p.greeted.cancelled() and p.greeted.result() and not p.lost
    )
    print(f"READY {greeted}", file=sys.stderr, flush=True)
    await asyncio.sleep(args.settle)
    probes = []
    for _ in range(args.probes):
        probes.append(await _probe(loop, args.host, args.port, args.probe_timeout))
        await asyncio.sleep(0.2)
    await asyncio.sleep(args.hold)
    still_open = sum(1 for _, p in conns if not p.lost)
    for tr, _ in conns:
        tr.abort()
    ok_probes = sorted(p for p in probes if p is not None)
    return {
        "mode": "idle",
        "host": args.host,
        "port": args.port,
        "requested": args.connections,
        "greeted": greeted,
        "still_open_after_hold": still_open,
        "failures": failures,
        "open_s": round(open_s, 2),
        "probe_ms": [None if p is None else round(p * 1000, 2) for p in probes],
        "probe_max_ms": round(ok_probes[-1] * 1000, 2) if ok_probes else None,
        "probe_failed": sum(1 for p in probes if p is None),
    }


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def human(res: dict) -> str:
    if res["mode"] == "throughput":
        return (
            f"{res['driver']} -> {res['host']}:{res['port']}: {res['accepted']} accepted, "
            f"{res['errors']} errors in {res['elapsed_s']} s = {res['msgs_per_s']} msg/s, "
            f"p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, driver CPU {res['driver_cpu_s']} s"
        )
    if res["mode"] == "listed":
        return (
            f"listed -> {res['host']}:{res['port']}: {res['refused']} refused "
            f"{res['codes']}, {res['errors']} errors {res['error_kinds']} in {res['elapsed_s']} s "
            f"= {res['refused_per_s']} refused/s, p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms"
        )
    return (
        f"idle -> {res['host']}:{res['port']}: {res['greeted']}/{res['requested']} greeted "
        f"in {res['open_s']} s, new-client greeting {res['probe_ms']} ms, "
        f"failures {res['failures']}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    for name in ("throughput", "idle", "listed"):
        p = sub.add_parser(name)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--source-addrs", type=int, default=1, help="use 127.0.0.1..N as sources")
        p.add_argument(
            "--source-range",
            help="FIRST-LAST or a comma list: source address per connection, round-robin",
        )
        p.add_argument("--timeout", type=float, default=30.0, help="per-transaction/connect s")
        p.add_argument("--no-uvloop", action="store_true")
    t = sub.choices["throughput"]
    t.add_argument("--clients", type=int, default=20)
    t.add_argument("--messages", type=int, default=5000)
    t.add_argument("--duration", type=float, default=60.0, help="upper bound, seconds")
    t.add_argument("--size", type=int, default=4096, help="message size incl. headers")
    t.add_argument(
        "--message-file",
        action="append",
        help="send this file as every message (e.g. a DKIM-signed one); --size is then ignored;"
        " given several times, the files are sent in turn",
    )
    t.add_argument("--sender", default="load@client.example")
    t.add_argument("--rcpt", default="rcpt@bench.test")
    t.add_argument("--helo", default="client.example")
    ls = sub.choices["listed"]
    ls.add_argument("--clients", type=int, default=20)
    ls.add_argument("--connections", type=int, default=5000)
    ls.add_argument("--duration", type=float, default=60.0, help="upper bound, seconds")
    i = sub.choices["idle"]
    i.add_argument("--connections", type=int, default=10000)
    i.add_argument("--connect-concurrency", type=int, default=256)
    i.add_argument("--duration", type=float, default=90.0, help="bound on the opening phase")
    i.add_argument("--settle", type=float, default=1.0)
    i.add_argument("--probes", type=int, default=5)
    i.add_argument("--probe-timeout", type=float, default=5.0)
    i.add_argument("--hold", type=float, default=3.0, help="seconds to stay idle after probes")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    nofile = raise_nofile()
    if args.mode == "idle" and nofile < args.connections + 100:
        print(f"warning: RLIMIT_NOFILE {nofile} < connections", file=sys.stderr)
    runners = {"throughput": run_throughput, "idle": run_idle, "listed": run_listed}
    coro = runners[args.mode](args)
    use_uvloop = uvloop is not None and not args.no_uvloop
    res = uvloop.run(coro) if use_uvloop else asyncio.run(coro)
    res["uvloop"] = uvloop is not None and not args.no_uvloop
    ru = resource.getrusage(resource.RUSAGE_SELF)
    res["driver_cpu_total_s"] = round(ru.ru_utime + ru.ru_stime, 3)
    res["driver_maxrss_kb"] = ru.ru_maxrss
    print(human(res), file=sys.stderr)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
