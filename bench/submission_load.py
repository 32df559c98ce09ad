"""Submission load driver: authenticated, TLS-protected submissions (asyncio streams).

Each of ``--clients`` concurrent clients repeats: connect to the submission port, read the 220,
EHLO, STARTTLS (or TLS at once with ``--implicit-tls``), EHLO again, AUTH PLAIN (or LOGIN with
``--login``), then ``--per-connection`` transactions (MAIL, RCPT, DATA, a ~4 KB message) on
that connection, then QUIT. Stops after ``--messages`` accepted messages in all. The server's
certificate is not verified (a benchmark on loopback). Prints one JSON object on stdout:
accepted, refused, seconds, messages per second, the p50/p99 of a transaction (MAIL to the 250
after the dot), and the p50 of a session's set-up (connect to the 235).

    python bench/submission_load.py --port 2587 --user alice --password pw \
        --sender alice@signed.test --clients 10 --messages 2000 --per-connection 10
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import ssl
import sys
import time

from smtp_load import build_message


class Failed(Exception):
    pass


async def reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    """The code and the text of one (possibly multi-line) reply."""
    text = []
    while True:
        line = await reader.readline()
        if not line:
            raise Failed("connection closed")
        text.append(line.decode("latin-1").rstrip())
        if line[3:4] != b"-":
            return int(line[:3]), "\n".join(text)


async def command(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes, want: int
) -> None:
    writer.write(line)
    code, text = await reply(reader)
    if code != want:
        raise Failed(f"{line[:20]!r} -> {text[:200]}")


async def session(args: argparse.Namespace, context: ssl.SSLContext, message: bytes,
                  count: int, stats: dict[str, list[float]]) -> int:  # fmt: skip
    started = time.perf_counter()
    if args.implicit_tls:
        reader, writer = await asyncio.open_connection(
            args.host, args.port, ssl=context, server_hostname=None
        )
    else:
        reader, writer = await asyncio.open_connection(args.host, args.port)
    try:
        if (await reply(reader))[0] != 220:
            raise Failed("no 220")
        await command(reader, writer, b"EHLO bench.client\r\n", 250)
        if not args.implicit_tls:
            await command(reader, writer, b"STARTTLS\r\n", 220)
            await writer.start_tls(context, server_hostname=None)
            await command(reader, writer, b"EHLO bench.client\r\n", 250)
        if args.login:
            await command(reader, writer, b"AUTH LOGIN\r\n", 334)
            await command(reader, writer, base64.b64encode(args.user.encode()) + b"\r\n", 334)
            await command(reader, writer, base64.b64encode(args.password.encode()) + b"\r\n", 235)
        else:
            token = base64.b64encode(f"\0{args.user}\0{args.password}".encode())
            await command(reader, writer, b"AUTH PLAIN " + token + b"\r\n", 235)
        stats["setup"].append(time.perf_counter() - started)
        done = 0
        for _ in range(count):
            began = time.perf_counter()
            await command(reader, writer, f"MAIL FROM:<{args.sender}>\r\n".encode(), 250)
            await command(reader, writer, f"RCPT TO:<{args.rcpt}>\r\n".encode(), 250)
            await command(reader, writer, b"DATA\r\n", 354)
            await command(reader, writer, message, 250)
            stats["transaction"].append(time.perf_counter() - began)
            done += 1
        writer.write(b"QUIT\r\n")
        await reply(reader)
        return done
    finally:
        writer.close()


async def run(args: argparse.Namespace) -> dict[str, object]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    message = build_message(args.size, args.sender, args.rcpt)
    stats: dict[str, list[float]] = {"setup": [], "transaction": []}
    remaining = args.messages
    accepted = 0
    errors: list[str] = []

    async def client() -> None:
        nonlocal remaining, accepted
        while remaining > 0:
            count = min(args.per_connection, remaining)
            remaining -= count
            try:
                done = await session(args, context, message, count, stats)
                accepted += done  # not `accepted += await ...`: that reads it before awaiting
            except (Failed, OSError) as exc:
                errors.append(str(exc))
                if len(errors) > 20:
                    return

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(args.clients)))
    seconds = time.perf_counter() - started

    def pct(values: list[float], p: float) -> float:
        if not values:
            return 0.0
        ordered = sorted(values)
        return round(ordered[min(len(ordered) - 1, int(len(ordered) * p))] * 1000, 2)

    return {
        "accepted": accepted,
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "seconds": round(seconds, 3),
        "per_second": round(accepted / seconds, 1) if seconds else 0.0,
        "transaction_p50_ms": pct(stats["transaction"], 0.50),
        "transaction_p99_ms": pct(stats["transaction"], 0.99),
        "setup_p50_ms": pct(stats["setup"], 0.50),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--implicit-tls", action="store_true")
    parser.add_argument("--login", action="store_true", help="AUTH LOGIN instead of PLAIN")
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--sender", required=True)
    parser.add_argument("--rcpt", default="rcpt@bench.test")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--per-connection", type=int, default=1)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(run(args))
    print(json.dumps(result))
    return 0 if result["accepted"] else 1


if __name__ == "__main__":
    sys.exit(main())
