"""Lines per second of ``palisade scan --once`` on a large, real-looking mail log.

Writes a log of N lines (default 1,000,000) in Debian's rsyslog format, made of the lines real
Postfix and Dovecot write (the shapes of tests/data/scan/): mostly connects, disconnects,
deliveries and auth-process chatter that match nothing, and a given share of refusals and
failed logins (default 5 %) from 5,000 addresses, stamped over the last 6 hours. Then runs
``palisade scan --once --quiet`` on it as an operator would (a subprocess, a fresh state
database and offsets file), and reports wall time and lines per second; also the parser alone
(in this process, no store) for the same lines, to show what the store costs.

    python bench/scan_bench.py [--lines 1000000] [--hits 0.05] [--keep DIR]
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from palisade.feedback.logscan import LineParser

NOISE = (
    "{t} mx postfix/smtpd[{pid}]: connect from mail{n}.example.net[{ip}]",
    "{t} mx postfix/smtpd[{pid}]: disconnect from mail{n}.example.net[{ip}] ehlo=1 mail=1 "
    "rcpt=1 data=1 quit=1 commands=5",
    "{t} mx postfix/cleanup[{pid}]: 4F3A{n:06X}: message-id=<{n}.{pid}@example.net>",
    "{t} mx postfix/qmgr[{pid}]: 4F3A{n:06X}: from=<news@example.net>, size={pid}, nrcpt=1 "
    "(queue active)",
    "{t} mx postfix/local[{pid}]: 4F3A{n:06X}: to=<user{n}@example.org>, relay=local, "
    "delay=0.2, delays=0.1/0/0/0.1, dsn=2.0.0, status=sent (delivered to mailbox)",
    "{t} mx dovecot: imap-login: Login: user=<user{n}@example.org>, method=PLAIN, rip={ip}, "
    "lip=192.0.2.1, mpid={pid}, TLS, session=<AbCdEf{n}>",
    "{t} mx dovecot: imap(user{n}@example.org)<{pid}><AbCdEf{n}>: Disconnected: Logged out "
    "in=120 out=4410 deleted=0 expunged=0 trashed=0 hdr_count=0 hdr_bytes=0 body_count=0",
    "{t} mx dovecot: auth: passwd-file(user{n},{ip},<AbCdEf{n}>): Password mismatch",
)
HITS = (
    "{t} mx postfix/smtpd[{pid}]: NOQUEUE: reject: RCPT from unknown[{ip}]: 554 5.7.1 "
    "<x{n}@elsewhere.example>: Relay access denied; from=<a@b.example> "
    "to=<x{n}@elsewhere.example> proto=ESMTP helo=<bot{n}>",
    "{t} mx postfix/smtpd[{pid}]: warning: unknown[{ip}]: SASL LOGIN authentication failed: "
    "UGFzc3dvcmQ6",
    "{t} mx dovecot: imap-login: Disconnected: Connection closed (auth failed, 2 attempts in "
    "6 secs): user=<admin>, method=PLAIN, rip={ip}, lip=192.0.2.1, TLS, session=<Zz{n}>",
    "{t} mx postfix/smtpd[{pid}]: improper command pipelining after CONNECT from "
    "unknown[{ip}]: EHLO bot\\r\\n",
)


def write_log(path: Path, lines: int, share: float, seed: int = 16) -> int:
    """The log; returns how many lines are hits."""
    rng = random.Random(seed)
    now = time.time()
    hits = 0
    with path.open("w") as out:
        for i in range(lines):
            at = now - 6 * 3600 + 6 * 3600 * i / lines
            t = time.strftime("%b %e %H:%M:%S", time.localtime(at))
            n = rng.randrange(1_000_000)
            if rng.random() < share:
                ip = f"198.51.{rng.randrange(20)}.{rng.randrange(250)}"  # 5,000 addresses
                template = rng.choice(HITS)
                hits += 1
            else:
                ip = f"203.0.{rng.randrange(256)}.{rng.randrange(256)}"
                template = rng.choice(NOISE)
            out.write(template.format(t=t, pid=rng.randrange(1000, 99999), n=n, ip=ip) + "\n")
    return hits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--hits", type=float, default=0.05, help="share of lines that count")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="palisade-scan-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        log = work / "mail.log"
        hits = write_log(log, args.lines, args.hits)
        size = log.stat().st_size
        print(f"log: {args.lines:,} lines, {size / 1e6:.0f} MB, {hits:,} hits ({args.hits:.0%})")

        line_parser = LineParser()
        now = time.time()
        started = time.perf_counter()
        found = 0
        with log.open(errors="replace") as f:
            for line in f:
                if line_parser.parse(line.rstrip("\n"), now) is not None:
                    found += 1
        parse_s = time.perf_counter() - started
        print(
            f"parser alone: {parse_s:.2f} s, {args.lines / parse_s:,.0f} lines/s ({found:,} hits)"
        )

        config = work / "scan.toml"
        config.write_text(
            f'[paths]\nstate = "{work}/state.sqlite"\n\n[scan]\nfiles = ["{log}"]\n'
            f"\n[incidents]\nprotect_loopback = true\n"
        )
        for name in ("state.sqlite", "state.sqlite-wal", "state.sqlite-shm", "scan-offsets.json"):
            (work / name).unlink(missing_ok=True)
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "palisade", "scan", "--once", "--quiet", "--config",
             str(config)],
            capture_output=True,
            text=True,
        )  # fmt: skip
        scan_s = time.perf_counter() - started
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return 1
        summary = [line for line in done.stdout.splitlines() if "scan: pass:" in line]
        print(f"palisade scan --once: {scan_s:.2f} s, {args.lines / scan_s:,.0f} lines/s, "
              f"{hits / scan_s:,.0f} hits/s recorded")  # fmt: skip
        print(f"  {summary[-1] if summary else done.stdout.strip()[-200:]}")
        started = time.perf_counter()
        again = subprocess.run(
            [sys.executable, "-m", "palisade", "scan", "--once", "--quiet", "--config",
             str(config)],
            capture_output=True,
            text=True,
        )  # fmt: skip
        print(f"second run (nothing new): {time.perf_counter() - started:.2f} s, "
              f"{again.stdout.strip().splitlines()[-1][20:]}")  # fmt: skip
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
