"""Content checks benchmark: accepted messages/s with SPF + DKIM + DMARC, and with spamd.

    python bench/run_content.py              # as root, from the repository root; ~3-4 minutes
    python bench/run.py --content            # the same
    python bench/run_content.py --quick      # small counts, to check the harness

What runs (everything on 127.0.0.1, every loop bounded in count and time):

* DNS: the zone server of loopback/dnsserver.py (dnslib, threads of this process) on a random
  loopback port, serving ``client.example`` (the sender's domain): ``v=spf1 ip4:127.0.0.0/8
  -all``, the DKIM key ``bench._domainkey.client.example`` (an RSA-2048 key generated for this
  run) and ``_dmarc.client.example`` ``v=DMARC1; p=reject``; TTLs --ttl.  The gateways with
  content checks resolve through it directly (``[dns] nameservers = ["127.0.0.1:PORT"]``).
* The message: the reference ~4 KB message of bench/smtp_load.py, DKIM-signed (dkimpy,
  relaxed/relaxed, d=client.example, s=bench), written to a file and sent as every message
  (``smtp_load.py --message-file``) to every server, Postfix included, so the load is the same.
* spamd: Debian's /usr/sbin/spamd started privately on 127.0.0.1 (--spamd-port) with
  ``--max-children`` = ``--min-children`` = --spamd-children, ``--nouser-config``, ``-L`` (local
  tests only) and a private site config directory (Debian's ``*.pre`` plugin files plus a
  local.cf that turns off DNS, RBL, Bayes, Razor, Pyzor and DCC).
* smtp-sink on 127.0.0.1:2600, shared by everything (as bench/run.py).
* Servers, all relaying bench.test to the sink:
    - Postfix (127.0.0.1:2527): bench/postfix_instance.py, plain relay.  Debian's postfix
      package has no SPF/DKIM/DMARC milter and no spamass-milter, so Postfix does none of the
      content checks: every ratio is against plain Postfix;
    - (a) Palisade baseline (127.0.0.1:2525): bench/palisade-bench.toml, no content checks;
    - (b) Palisade + auth (2545): palisade-bench.toml + ``[authentication] enabled = true``;
    - (c) Palisade + spamd (2546): palisade-bench.toml + ``[spamd]``;
    - (d) Palisade + auth + spamd (2547): both.
  The (b)-(d) configs are written to /tmp/palisade-bench/content/<name>.toml (state there too).
* Check (before the measured load): a capture SMTP server (aiosmtpd) stands in for the sink for
  one message through each server, and the harness prints and records the Authentication-Results
  / Received-SPF / X-Spam-* headers each one added.  Then smtp-sink takes over port 2600.
* Warm-up of every server, then --rounds rounds of one load run per server (order reversed every
  other round), --clients concurrent clients, one transaction per connection; --messages per run
  (--spamd-messages for the spamd configurations, which are ~30x slower), each run bounded by
  --run-bound seconds.  Server CPU (the gateway's processes; spamd's separately) and the queries
  the zone server received are read before and after every run.
* spamd alone: in each round also one run of SYMBOLS requests straight to spamd from --clients
  threads of the harness (no gateway), the ceiling the (c)/(d) numbers are to be read against.
* After the rounds, one extra unmeasured run of each --profile configuration with
  ``py-spy record --gil`` on the gateway's processes, summarised by area (innermost known frame).
* A table on stdout, raw JSON in /tmp/palisade-bench/content-results.json, everything stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))  # loopback.dnsserver

from harness import (  # noqa: E402
    BENCH_ROOT,
    Gateway,
    Sink,
    Target,
    busy_samples,
    cpu_s,
    interrupt_on_term,
    log,
    machine_info,
    make_key,
    med,
    own_control_socket,
    ports_taken,
    raise_nofile_limit,
    rate_summary,
    ratio,
    reap,
    run_child,
    set_subreaper,
    shares_pct,
    smtp_load,
    start_py_spy,
    stop_all,
    stop_proc,
    stop_py_spy,
    time_budget,
    tree_pids,
    write_results,
)
from harness import fmt as f  # noqa: E402
from postfix_instance import PostfixInstance  # noqa: E402
from smtp_load import build_message  # noqa: E402

SENDER = "load@client.example"
RCPT = "rcpt@bench.test"
DOMAIN = "client.example"
SELECTOR = "bench"
SPAMD = shutil.which("spamd") or "/usr/sbin/spamd"
PY_SPY = shutil.which("py-spy")
CONTENT_ROOT = BENCH_ROOT / "content"

# key -> (label, port, authentication, spamd); "palisade" is bench/palisade-bench.toml as is.
CONFIGS = {
    "palisade": ("(a) Palisade, no content checks", 2525, False, False),
    "palisade+auth": ("(b) Palisade + SPF/DKIM/DMARC", 2545, True, False),
    "palisade+spamd": ("(c) Palisade + spamd", 2546, False, True),
    "palisade+auth+spamd": ("(d) Palisade + SPF/DKIM/DMARC + spamd", 2547, True, True),
}


def uses_spamd(key: str) -> bool:
    return key in CONFIGS and CONFIGS[key][3]


SPAMD_LOCAL_CF = """\
# Written by bench/run_content.py: local tests only, nothing learnt, nothing on the network.
dns_available no
skip_rbl_checks 1
use_bayes 0
bayes_auto_learn 0
ifplugin Mail::SpamAssassin::Plugin::Razor2
use_razor2 0
endif
ifplugin Mail::SpamAssassin::Plugin::Pyzor
use_pyzor 0
endif
ifplugin Mail::SpamAssassin::Plugin::DCC
use_dcc 0
endif
ifplugin Mail::SpamAssassin::Plugin::AWL
use_auto_whitelist 0
endif
"""


# --------------------------------------------------------------------------------------
# The signed message and the DNS data


def signed_message(pem: bytes, size: int) -> bytes:
    """The reference message of about ``size`` bytes in all, DKIM signature included."""
    import dkim

    def sign(body_size: int) -> bytes:
        msg = build_message(body_size, SENDER, RCPT)[:-3]  # without the final dot
        sig = dkim.sign(
            msg,
            SELECTOR.encode(),
            DOMAIN.encode(),
            pem,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=[
                b"from",
                b"to",
                b"subject",
                b"date",
                b"message-id",
                b"mime-version",
                b"content-type",
            ],
        )
        return sig + msg

    first = sign(size)
    return sign(max(1024, size - (len(first) - size)))


def zone_records(pubkey: str, ttl: int) -> dict:
    return {
        DOMAIN: {"TXT": (["v=spf1 ip4:127.0.0.0/8 -all"], ttl)},
        f"{SELECTOR}._domainkey.{DOMAIN}": {"TXT": ([f"v=DKIM1; k=rsa; p={pubkey}"], ttl)},
        f"_dmarc.{DOMAIN}": {"TXT": (["v=DMARC1; p=reject"], ttl)},
        # iprev: 127.0.0.1 -> localhost.client.example -> 127.0.0.1
        "1.0.0.127.in-addr.arpa": {"PTR": ([f"localhost.{DOMAIN}."], ttl)},
        f"localhost.{DOMAIN}": {"A": (["127.0.0.1"], ttl)},
    }


def verify_locally(message: bytes, records: dict) -> bool:
    import dkim

    def dnsfunc(name, timeout=5):
        name = name.decode() if isinstance(name, bytes) else name
        recs = records.get(name.rstrip("."), {}).get("TXT")
        return recs[0][0].encode() if recs else None

    return bool(dkim.verify(message, dnsfunc=dnsfunc))


# --------------------------------------------------------------------------------------
# spamd


class Spamd:
    def __init__(self, root: Path, port: int, children: int) -> None:
        self.root = root
        self.port = port
        self.children = children
        self.proc: subprocess.Popen[bytes] | None = None
        self.logfile = root / "spamd.log"
        self.why_not: str | None = None
        self.version = "?"

    def start(self) -> None:
        """Starts spamd in the background; ready() says when it answers PING."""
        shutil.rmtree(self.root, ignore_errors=True)
        site = self.root / "site"
        home = self.root / "home"
        site.mkdir(parents=True)
        home.mkdir()
        for pre in Path("/etc/spamassassin").glob("*.pre"):
            shutil.copy(pre, site / pre.name)
        (site / "local.cf").write_text(SPAMD_LOCAL_CF)
        cmd = [
            SPAMD,
            f"--listen=127.0.0.1:{self.port}",
            "--allowed-ips=127.0.0.1",
            f"--min-children={self.children}",
            f"--max-children={self.children}",
            "--nouser-config",
            "--local",
            f"--siteconfigpath={site}",
            f"--helper-home-dir={home}",
            f"--pidfile={self.root / 'spamd.pid'}",
            "--syslog=stderr",
        ]
        if os.geteuid() == 0:
            import pwd

            nobody = pwd.getpwnam("nobody")
            os.chown(home, nobody.pw_uid, nobody.pw_gid)
            cmd.append("--username=nobody")
        out = open(self.logfile, "wb")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        except OSError as e:
            self.why_not = f"cannot exec {SPAMD}: {e}"
        finally:
            out.close()
        with contextlib.suppress(OSError, IndexError):
            ver = subprocess.run([SPAMD, "--version"], capture_output=True, text=True, timeout=20)
            self.version = ver.stdout.split("version", 1)[1].split()[0]

    def ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.proc is not None and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.why_not = f"spamd exited rc={self.proc.returncode}; see {self.logfile}"
                return False
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=5) as s,
            ):
                s.sendall(b"PING SPAMC/1.5\r\n\r\n")
                if b"PONG" in s.recv(256):
                    return True
            time.sleep(0.3)
        self.why_not = self.why_not or f"no PONG on 127.0.0.1:{self.port} in {timeout} s"
        return False

    def pids(self) -> list[int]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        return tree_pids(self.proc.pid)

    def stop(self) -> None:
        stop_proc(self.proc)


# --------------------------------------------------------------------------------------
# Gateway configurations


def write_config(key: str, port: int, auth: bool, spamd: bool, dns_port: int, spamd_port: int):
    """bench/palisade-bench.toml with its own port and state directory, plus the checks."""
    state = CONTENT_ROOT / key
    text = (HERE / "palisade-bench.toml").read_text()
    text = text.replace('"127.0.0.1:2525"', f'"127.0.0.1:{port}"')
    text = text.replace('"/tmp/palisade-bench/', f'"{state}/')
    text = text.replace("# Palisade configuration used by bench/run.py", "# Written by")
    text = f"# bench/run_content.py from bench/palisade-bench.toml ({key}).\n" + text
    text = own_control_socket(text, state / "control.sock")
    text += f'\n[dns]\nnameservers = ["127.0.0.1:{dns_port}"]   # the run\'s zone server\n'
    if auth:
        text += "\n[authentication]\nenabled = true\n"
    if spamd:
        text += (
            f'\n[spamd]\naddress = "127.0.0.1:{spamd_port}"\ntimeout = "30s"\n'
            'tag_level = 4.5\nkill_level = 16.0\non_failure = "accept"\n'
        )
    path = CONTENT_ROOT / f"{key}.toml"
    path.write_text(text)
    return path, state


def config_check(path: Path) -> str | None:
    """None if ``palisade config check`` accepts the file, else the reason."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "palisade", "config", "check", "--config", str(path)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    if p.returncode == 0:
        return None
    lines = (p.stderr or p.stdout).strip().splitlines()
    return f"config check rc={p.returncode}: {lines[-1][:200] if lines else ''}"


# --------------------------------------------------------------------------------------
# The one-message check through a capture server


class Capture:
    """An aiosmtpd server on the sink's port keeping every message it receives."""

    def __init__(self, port: int) -> None:
        from aiosmtpd.controller import Controller

        self.messages: list[bytes] = []
        outer = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                outer.messages.append(envelope.original_content or envelope.content)
                return "250 OK"

        self.controller = Controller(Handler(), hostname="127.0.0.1", port=port)

    def __enter__(self) -> Capture:
        self.controller.start()
        return self

    def __exit__(self, *exc) -> None:
        self.controller.stop()

    def wait_for(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.messages) < n:
            time.sleep(0.05)
        return len(self.messages) >= n


def send_one(port: int, message_file: Path) -> str | None:
    """One transaction through smtp_load.py (same bytes as the load); None if accepted."""
    cmd = [sys.executable, str(HERE / "smtp_load.py"), "throughput", "--port", str(port)]
    cmd += ["--clients", "1", "--messages", "1", "--duration", "40", "--timeout", "40"]
    cmd += ["--sender", SENDER, "--rcpt", RCPT, "--message-file", str(message_file)]
    rc, out, err, _wall, _cpu = run_child(cmd, 60)
    try:
        res = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return f"rc={rc}: {err.strip()[-200:]}"
    return None if res.get("accepted") == 1 else f"not accepted: {res.get('error_kinds')}"


def added_headers(raw: bytes) -> dict[str, list[str]]:
    from email.parser import BytesHeaderParser

    msg = BytesHeaderParser().parsebytes(raw)
    out: dict[str, list[str]] = {}
    for name in ("Authentication-Results", "Received-SPF", "X-Spam-Status", "X-Spam-Score"):
        vals = [re.sub(r"\s+", " ", str(v)).strip() for v in msg.get_all(name) or []]
        if vals:
            out[name] = vals
    return out


# --------------------------------------------------------------------------------------
# Measured runs


def count_log(path: Path | None) -> dict[str, int]:
    """Arrival lines in a gateway mainlog, and how many carry a spam score (or skipped/...)."""
    out = {"arrivals": 0, "spam_scored": 0, "spam_skipped": 0, "spam_unchecked": 0}
    if path is None or not path.exists():
        return out
    with open(path, "rb") as f:
        for line in f:
            if b" <= " not in line:
                continue
            out["arrivals"] += 1
            m = re.search(rb" spam=(\S+)", line)
            if m is None:
                continue
            v = m.group(1)
            k = {b"skipped": "spam_skipped", b"unchecked": "spam_unchecked"}.get(v, "spam_scored")
            out[k] += 1
    return out


def last_spam_field(path: Path | None) -> str | None:
    """The ``spam=`` field of the last arrival line in a gateway mainlog."""
    if path is None or not path.exists():
        return None
    found = None
    with open(path, "rb") as f:
        for line in f:
            if b" <= " in line:
                m = re.search(rb" (spam=\S+)", line)
                found = m.group(1).decode() if m else None
    return found


def measured(t: Target, args, sink: Sink, zone, spamd: Spamd, message_file: Path, n: int):
    before_sink = sink.count
    q0 = zone.total_queries
    log0 = count_log(t.mainlog)
    cpu0, scpu0 = cpu_s(t.pids()), cpu_s(spamd.pids())
    bound = args.run_bound
    argv = ["throughput", "--port", str(t.port)]
    argv += ["--clients", str(args.clients), "--messages", str(n), "--duration", str(bound)]
    argv += ["--timeout", "40", "--sender", SENDER, "--rcpt", RCPT]
    argv += ["--message-file", str(message_file)]
    res = smtp_load(argv, bound + 60, failed={"accepted": 0})
    cpu1, scpu1 = cpu_s(t.pids()), cpu_s(spamd.pids())
    res["system"] = t.key
    res["server_cpu_s"] = round(cpu1 - cpu0, 2)
    res["spamd_cpu_s"] = round(scpu1 - scpu0, 2)
    res["zone_queries"] = zone.total_queries - q0
    acc = res.get("accepted") or 0
    if acc:
        res["server_cpu_per_1k"] = round(res["server_cpu_s"] / acc * 1000, 2)
        res["spamd_cpu_per_1k"] = round(res["spamd_cpu_s"] / acc * 1000, 2)
        res["zone_queries_per_msg"] = round(res["zone_queries"] / acc, 3)
    ok = sink.wait_for(before_sink + acc, args.drain_timeout)
    res["relayed_to_sink"] = sink.count - before_sink
    res["drained"] = ok
    if t.postfix is not None:
        t.postfix.wait_queue_empty(args.drain_timeout)
    log1 = count_log(t.mainlog)
    res["mainlog"] = {k: log1[k] - log0[k] for k in log1}
    reap()
    return res


# Where a busy sample goes: the innermost frame whose file matches one of these (in order).
AREAS = (
    ("dkimpy (DKIM verify, incl. RSA)", ("dkim/",)),
    ("pyspf", ("spf.py",)),
    ("DNS (dnspython, palisade/adapters/dns)", ("dns/", "palisade/adapters/dns")),
    ("publicsuffixlist", ("publicsuffixlist/",)),
    ("palisade auth checks", ("checks/spf", "checks/dkim", "checks/dmarc", "checks/authres")),
    ("spamd client", ("palisade/adapters/spamd",)),
    ("palisade policy", ("palisade/policy/",)),
    ("spool (write, fsync)", ("palisade/spool/",)),
    ("relay to the next hop", ("palisade/delivery/", "aiosmtplib/")),
    ("SMTP session / DATA", ("palisade/server/", "palisade/smtp/")),
    ("logging", ("palisade/obs/",)),
    ("asyncio / uvloop", ("asyncio/", "uvloop/")),
)


# Leaf frames of a thread that is waiting, not working (py-spy --gil still shows a few).
IDLE_LEAVES = (
    "_worker (concurrent/futures/thread.py)",
    "Condition.wait (threading.py)",
    "Event.wait (threading.py)",
)


class Profiler:
    """py-spy on a gateway's process tree for one extra (unmeasured) run: samples of threads
    holding the GIL (``--gil``: Python running, not waiting), 100 Hz, all processes."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        err = open(out.with_suffix(".err"), "wb")  # noqa: SIM115 - handed to py-spy
        self.proc = start_py_spy(PY_SPY or "py-spy", pid, out, 100, err)
        time.sleep(1.0)  # let it attach

    def stop(self) -> dict:
        stop_py_spy(self.proc)
        return summarize_profile(self.out)


def summarize_profile(path: Path) -> dict:
    """Busy samples by area (innermost matching frame) and the top inclusive functions."""
    if not path.exists():
        return {"samples": 0}
    areas, total, idle, inclusive = busy_samples(path, AREAS, IDLE_LEAVES)
    top = sorted(inclusive.items(), key=lambda kv: -kv[1])
    top = [(k, v) for k, v in top if "palisade/__main__" not in k and "runpy" not in k][:30]
    return {
        "samples": total,
        "idle_samples_dropped": idle,
        "areas_pct": shares_pct(areas, total),
        "top_inclusive_pct": shares_pct(dict(top), total),
    }


def spamd_direct(port: int, message: bytes, n: int, clients: int, bound: float) -> dict:
    """spamd alone: ``n`` SYMBOLS requests with the message, ``clients`` at a time (threads of
    this process, one connection per request, as the gateway does), bounded by ``bound`` s."""
    from concurrent.futures import ThreadPoolExecutor

    head = b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(message)
    deadline = time.monotonic() + bound
    lat: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    todo = [n]

    def client() -> None:
        while True:
            with lock:
                if todo[0] <= 0 or time.monotonic() > deadline:
                    return
                todo[0] -= 1
            t0 = time.perf_counter()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
                    sock.sendall(head + message)
                    sock.shutdown(socket.SHUT_WR)
                    reply = b""
                    while chunk := sock.recv(65536):
                        reply += chunk
                ok = reply.startswith(b"SPAMD/") and b" 0 EX_OK" in reply.split(b"\r\n", 1)[0]
                err = None if ok else f"reply {reply[:40]!r}"
            except OSError as e:
                err = f"{type(e).__name__}: {e}"
            with lock:
                if err:
                    errors[err] = errors.get(err, 0) + 1
                else:
                    lat.append(time.perf_counter() - t0)

    t_start = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        for fut in [ex.submit(client) for _ in range(clients)]:
            fut.result()
    elapsed = time.perf_counter() - t_start
    lat.sort()

    def pct(p: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000, 2) if lat else None

    return {
        "driver": "SYMBOLS from the harness",
        "accepted": len(lat),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "elapsed_s": round(elapsed, 3),
        "msgs_per_s": round(len(lat) / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": pct(50),
        "p99_ms": pct(99),
    }


def measured_spamd(args, spamd: Spamd, message: bytes, n: int) -> dict:
    scpu0 = cpu_s(spamd.pids())
    res = spamd_direct(spamd.port, message, n, args.clients, args.run_bound)
    res["system"] = "spamd"
    res["spamd_cpu_s"] = round(cpu_s(spamd.pids()) - scpu0, 2)
    res["server_cpu_s"] = res["spamd_cpu_s"]
    res["zone_queries"] = 0
    res["relayed_to_sink"] = 0
    res["mainlog"] = {}
    if res["accepted"]:
        res["spamd_cpu_per_1k"] = round(res["spamd_cpu_s"] / res["accepted"] * 1000, 2)
    reap()
    return res


def summarize(runs: list[dict], key: str) -> dict | None:
    rows = [r for r in runs if r.get("system") == key and "failed" not in r]
    if not rows:
        return None
    return {
        **rate_summary(rows, "msgs_per_s"),
        "errors": sum(r.get("errors", 0) for r in rows),
        "error_kinds": [r.get("error_kinds") for r in rows if r.get("errors")],
        "accepted": sum(r.get("accepted") or 0 for r in rows),
        "relayed": sum(r.get("relayed_to_sink", 0) for r in rows),
        "server_cpu_per_1k": med([r.get("server_cpu_per_1k") for r in rows]),
        "spamd_cpu_per_1k": med([r.get("spamd_cpu_per_1k") for r in rows]),
        "zone_queries_per_msg": med([r.get("zone_queries_per_msg") for r in rows]),
        "mainlog": {k: sum(r["mainlog"].get(k, 0) for r in rows) for k in rows[0]["mainlog"]},
        "elapsed_s": [r.get("elapsed_s") for r in rows],
    }


def render(info: dict, args, res: dict) -> str:
    s = res["summary"]
    P = s.get("postfix")
    lines = [
        f"Run {info['date']} on {info['nproc']} x {info['cpu']}, Linux {info['kernel']}, "
        f"Python {info['python']}, Postfix {info['postfix']}, spamd {res.get('spamd_version')} "
        f"({args.spamd_children} children, local tests only).",
        f"{args.clients} concurrent clients, one transaction per connection, the same "
        f"DKIM-signed {res.get('message_bytes')}-byte message to every server; "
        f"{args.rounds} round(s), order reversed every other round; {args.messages} messages per "
        f"run ({args.spamd_messages} with spamd), each run bounded to {args.run_bound:g} s. "
        "Medians over rounds (each run in brackets).",
        "Postfix is a plain relay: Debian's postfix has no SPF/DKIM/DMARC milter and no "
        "spamass-milter, so every ratio is against Postfix doing none of the content checks.",
        "",
        "| configuration | accepted msg/s | ÷ Postfix (plain) | p50 | p99 | "
        "server CPU-s / 1000 msgs | spamd CPU-s / 1000 msgs | DNS queries / msg | "
        "errors / accepted / relayed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def row(label: str, x: dict | None, why: str | None = None) -> str:
        if x is None:
            return f"| {label} | {why or 'no runs'} | | | | | | | |"
        gw = label.startswith("(")  # a gateway configuration
        done = f"{x['errors']} / {x['accepted']} / {x['relayed'] if x is P or gw else '-'}"
        runs = f"{f(x['rate_med'])} ({', '.join(f(v) for v in x['rate'])})"
        p99 = f"{f(x['p99_ms_med'], ' ms')} ({', '.join(f(v) for v in x['p99_ms'])})"
        rr = ratio(x["rate_med"], P and P["rate_med"]) if gw or x is P else "-"
        return (
            f"| {label} | {runs} | {rr} | "
            f"{f(x['p50_ms'], ' ms')} | {p99} | {f(x['server_cpu_per_1k'])} | "
            f"{f(x['spamd_cpu_per_1k']) if 'spamd' in label else '-'} | "
            f"{f(x['zone_queries_per_msg']) if gw else 'n/a'} | {done} |"
        )

    lines.append(row("Postfix, plain relay (no milters)", P))
    for key, (label, _port, _a, _s) in CONFIGS.items():
        x = s.get(key)
        if x is not None and uses_spamd(key) and not x["mainlog"]["spam_scored"]:
            label += " — **spamd not consulted** (no spam score logged)"
        lines.append(row(label, x, res["not_runnable"].get(key)))
    if s.get("spamd"):
        lines.append(
            row(
                f"spamd alone, no gateway ({args.clients} concurrent SYMBOLS requests)",
                s.get("spamd"),
            )
        )
    notes = []
    for key, (label, *_rest) in CONFIGS.items():
        x = s.get(key)
        if x is None or not uses_spamd(key):
            continue
        m = x["mainlog"]
        notes.append(
            f"* {label}: {m['spam_scored']} of {m['arrivals']} arrivals logged with a spam score "
            f"({m['spam_skipped']} spam=skipped, {m['spam_unchecked']} spam=unchecked)."
        )
    if notes:
        lines += ["", "Gateway main log, measured runs:", *notes]
    for key, r in res.get("profiles", {}).items():
        pr = r.get("profile") or {}
        ms = pr.get("areas_ms_per_msg") or {}
        areas = ", ".join(
            f"{k} {v}% ({ms.get(k, '-')} ms/msg)" for k, v in (pr.get("areas_pct") or {}).items()
        )
        lines += [
            "",
            f"py-spy on {key} (extra run, not in the table: {r.get('accepted')} messages at "
            f"{r.get('msgs_per_s')} msg/s under the profiler; {pr.get('samples', 0)} samples of "
            "the gateway's threads holding the GIL, 100 Hz, all its processes), by innermost "
            f"known frame: {areas or '-'}.",
        ]
    checks = res.get("check", {})
    if checks:
        lines += ["", "Headers added to one message (capture server in place of the sink):"]
        for key, hdrs in checks.items():
            if isinstance(hdrs, str):
                lines.append(f"* {key}: {hdrs}")
                continue
            shown = "; ".join(f"{k}: {' | '.join(v)}" for k, v in hdrs.items()) or "none"
            lines.append(f"* {key}: {shown}")
    for key, why in res["not_runnable"].items():
        lines += ["", f"{key}: not runnable ({why})"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--messages", type=int, default=1000, help="per run without spamd")
    ap.add_argument("--spamd-messages", type=int, default=150, help="per run with spamd")
    ap.add_argument("--warmup", type=int, default=200, help="per server (a fifth with spamd)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--size", type=int, default=4096, help="message size, signature included")
    ap.add_argument("--ttl", type=int, default=600, help="TTL of every DNS record (s)")
    ap.add_argument("--spamd-children", type=int, default=2)
    ap.add_argument(
        "--no-spamd-direct", action="store_true", help="skip the runs of spamd alone (no gateway)"
    )
    ap.add_argument("--spamd-port", type=int, default=2783)
    ap.add_argument("--run-bound", type=float, default=60.0, help="seconds per load run")
    ap.add_argument("--drain-timeout", type=float, default=30.0)
    ap.add_argument("--max-seconds", type=float, default=420.0, help="skip runs after this")
    ap.add_argument("--gateway-start-timeout", type=float, default=20.0)
    ap.add_argument("--sink-port", type=int, default=2600)
    ap.add_argument("--only", help="comma list of configuration keys (default: all)")
    ap.add_argument(
        "--profile",
        default="palisade,palisade+auth,palisade+spamd",
        help="after the rounds, one extra unmeasured run of each of these under py-spy "
        "(comma list of configuration keys; empty: none)",
    )
    ap.add_argument("--quick", action="store_true", help="small counts to test the harness")
    ap.add_argument("--json", type=Path, default=BENCH_ROOT / "content-results.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.messages, args.spamd_messages, args.warmup, args.rounds = 300, 60, 50, 1
    if os.geteuid() != 0:
        ap.error("run as root (the private Postfix instance needs it)")
    from loopback.dnsserver import start_zone_server

    t_begin = time.monotonic()
    time_left = time_budget(t_begin, args.max_seconds)

    interrupt_on_term()
    raise_nofile_limit()
    set_subreaper()
    ports = [args.sink_port, 2527, args.spamd_port] + [
        port for _l, port, _a, _s in CONFIGS.values()
    ]
    if ports_taken("run_content.py", ports):
        return 2
    shutil.rmtree(CONTENT_ROOT, ignore_errors=True)
    CONTENT_ROOT.mkdir(parents=True, exist_ok=True)

    keys = list(CONFIGS)
    if args.only:
        keys = [k for k in keys if k in args.only.split(",")]
    results: dict = {"runs": [], "warmup": [], "summary": {}, "not_runnable": {}, "check": {}}

    log("generating the DKIM key and the signed message")
    pem, pub = make_key()
    records = zone_records(pub, args.ttl)
    message = signed_message(pem, args.size)
    if not verify_locally(message, records):
        log("the signed message does not verify with dkimpy: giving up")
        return 1
    message_file = CONTENT_ROOT / "message.eml"
    message_file.write_bytes(message)
    results["message_bytes"] = len(message)

    zone = start_zone_server(default_ttl=args.ttl)
    zone.add_zone(DOMAIN, negative_ttl=args.ttl, ttl=args.ttl)
    zone.add_zone("127.in-addr.arpa", negative_ttl=args.ttl, ttl=args.ttl)
    for name, types in records.items():
        for rdtype, (vals, ttl) in types.items():
            zone.set(name, rdtype, vals, ttl=ttl)
    log(f"DNS: zone server on 127.0.0.1:{zone.port}")

    sink = Sink(args.sink_port)
    pf = PostfixInstance(BENCH_ROOT / "postfix", port=2527, sink_port=args.sink_port)
    spamd = Spamd(CONTENT_ROOT / "spamd", args.spamd_port, args.spamd_children)
    gateways: dict[str, Gateway] = {}
    info = machine_info("?")
    try:
        need_spamd = any(CONFIGS[k][3] for k in keys)
        if need_spamd:
            log(f"starting spamd on 127.0.0.1:{args.spamd_port} ({args.spamd_children} children)")
            spamd.start()
        log(f"starting Postfix on 127.0.0.1:{pf.port} ({pf.root})")
        shutil.rmtree(pf.root, ignore_errors=True)
        pf.start()
        info = machine_info(pf.version())
        targets: dict[str, Target] = {
            "postfix": Target("postfix", "Postfix", pf.port, pf.process_pids, pf)
        }
        for key in keys:
            _label, port, auth, use_spamd = CONFIGS[key]
            if key == "palisade":
                gw = Gateway(HERE / "palisade-bench.toml", port, None)
            else:
                path, state = write_config(key, port, auth, use_spamd, zone.port, args.spamd_port)
                why = config_check(path)
                if why:
                    results["not_runnable"][key] = why
                    log(f"{key}: not runnable ({why})")
                    continue
                gw = Gateway(path, port, None, state_root=state, logfile=state / "gateway.out")
                state.mkdir(parents=True, exist_ok=True)
            log(f"starting {key}: {' '.join(gw.cmd)}")
            gateways[key] = gw
            if gw.start(args.gateway_start_timeout):
                t = Target(key, key, port, gw.pids)
                t.mainlog = gw.state_root / "log" / "mainlog"
                targets[key] = t
            else:
                results["not_runnable"][key] = gw.why_not
                log(f"{key}: not runnable ({gw.why_not})")
        if need_spamd and not spamd.ready(90):
            log(f"spamd: {spamd.why_not}")
            for key in [k for k in targets if uses_spamd(k)]:
                results["not_runnable"][key] = f"spamd did not start: {spamd.why_not}"
                del targets[key]
        results["spamd_version"] = spamd.version

        # One message through each server to a capture server: what did each one add?
        log("check: one message through each server to a capture server on the sink's port")
        with Capture(args.sink_port) as cap:
            for key, t in targets.items():
                n = len(cap.messages)
                err = send_one(t.port, message_file)
                if err:
                    results["check"][key] = f"not accepted: {err}"
                elif not cap.wait_for(n + 1, 30):
                    results["check"][key] = "accepted but not relayed within 30 s"
                else:
                    results["check"][key] = added_headers(cap.messages[n])
                    spam = last_spam_field(t.mainlog)
                    if spam:
                        results["check"][key]["mainlog"] = [spam]
                log(f"check {key}: {results['check'][key]}")
        log(f"starting smtp-sink on 127.0.0.1:{args.sink_port}")
        sink.start()

        for key, t in targets.items():
            n = args.warmup // 5 if uses_spamd(key) else args.warmup
            log(f"warm-up {key}: {n} messages")
            results["warmup"].append(measured(t, args, sink, zone, spamd, message_file, n))
        time.sleep(1)

        direct = any(uses_spamd(k) for k in targets) and not args.no_spamd_direct
        if direct:
            log(f"warm-up spamd alone: {args.warmup // 5} scans")
            results["warmup"].append(measured_spamd(args, spamd, message, args.warmup // 5))
        for rnd in range(args.rounds):
            order = list(targets) + (["spamd"] if direct else [])
            if rnd % 2:
                order.reverse()
            for key in order:
                if not time_left():
                    log("time budget exhausted, skipping the rest of the runs")
                    break
                if key == "spamd":
                    r = measured_spamd(args, spamd, message, args.spamd_messages)
                else:
                    t = targets[key]
                    n = args.spamd_messages if uses_spamd(key) else args.messages
                    r = measured(t, args, sink, zone, spamd, message_file, n)
                r["round"] = rnd
                results["runs"].append(r)
                log(
                    f"round {rnd} {key:20s} {r.get('msgs_per_s')} msg/s p50 {r.get('p50_ms')} "
                    f"p99 {r.get('p99_ms')} ms accepted {r.get('accepted')} errors "
                    f"{r.get('errors')} {r.get('error_kinds') or ''} relayed "
                    f"{r.get('relayed_to_sink')} server CPU {r.get('server_cpu_s')} s spamd CPU "
                    f"{r.get('spamd_cpu_s')} s DNS {r.get('zone_queries')} mainlog "
                    f"{r.get('mainlog')}" + (f" FAILED {r['failed']}" if "failed" in r else "")
                )
        for key in [k for k in (args.profile or "").split(",") if k in targets]:
            if PY_SPY is None:
                log("py-spy not found: no profile")
                break
            if not time_left():
                log("time budget exhausted, no profile")
                break
            t = targets[key]
            gw_proc = gateways[key].proc
            if gw_proc is None:
                continue
            n = args.spamd_messages // 3 if uses_spamd(key) else args.messages // 2
            log(f"profile {key}: py-spy on pid {gw_proc.pid} and its workers, {n} messages")
            prof = Profiler(gw_proc.pid, CONTENT_ROOT / f"py-spy-{key}.txt")
            r = measured(t, args, sink, zone, spamd, message_file, n)
            r["profile"] = prof.stop()
            acc = r.get("accepted") or 0
            if acc:  # 100 samples per second of a thread holding the GIL = 10 ms each
                r["profile"]["areas_ms_per_msg"] = {
                    k: round(v / 100 * r["profile"]["samples"] / 100 / acc * 1000, 2)
                    for k, v in r["profile"]["areas_pct"].items()
                }
            results.setdefault("profiles", {})[key] = r
            log(f"profile {key}: {r.get('msgs_per_s')} msg/s under py-spy; {r['profile']}")
    except KeyboardInterrupt as e:
        log(f"interrupted ({e})")
        return 130
    finally:
        log("stopping")
        stop_all(*gateways.values(), spamd, pf, sink, zone)

    for key in ("postfix", *CONFIGS, "spamd"):
        sm = summarize(results["runs"], key)
        if sm is not None:
            results["summary"][key] = sm
    results["zone_queries_by_name"] = _query_names(zone)
    write_results(results, args, info, t_begin, lambda: render(info, args, results))
    return 0


def _query_names(zone) -> dict[str, int]:
    counts: dict[str, int] = {}
    for transport, name, rdtype in list(zone.log):
        k = f"{name} {rdtype} {transport}"
        counts[k] = counts.get(k, 0) + 1
    return counts


if __name__ == "__main__":
    sys.exit(main())
