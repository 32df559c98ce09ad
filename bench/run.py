"""One complete, bounded benchmark run: Palisade vs. a private Postfix, same sink, same load.

    sudo python bench/run.py                 # everything (~3-4 minutes)
    python bench/run.py --quick              # smaller counts, for checking the harness

Steps: start ``smtp-sink`` on 127.0.0.1:2600 (shared by both systems), start a private
Postfix instance (bench/postfix_instance.py) on 127.0.0.1:2527 relaying to the sink, start
the gateway with ``python -m palisade serve --config bench/palisade-bench.toml`` on
127.0.0.1:2525 relaying to the same sink, warm both up, then run the reference load
(20 clients, one transaction per connection, ~4 KB message, no pipelining) alternately
P, G, P, G with both drivers (bench/smtp_load.py and Postfix's smtp-source), then the idle
mode, print a table with Palisade / Postfix, and stop everything.

If the gateway does not start (or does not greet within --gateway-start-timeout seconds)
its column says "not runnable" and the Postfix numbers are still produced.

Memory: RSS of a process tree is sampled every 0.25 s (peak of the sum) and VmHWM of each
live process is summed at the end of a phase; for the idle mode PSS (smaps_rollup) is
summed too, because summing RSS over hundreds of smtpd processes counts their shared
pages many times.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from postfix_instance import PostfixInstance, _ppid_table  # noqa: E402

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
BENCH_ROOT = Path("/tmp/palisade-bench")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

SENDER = "load@client.example"
RCPT = "rcpt@bench.test"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Process trees, memory, CPU


def tree_pids(root: int) -> list[int]:
    table = _ppid_table()
    kids: dict[int, list[int]] = {}
    for pid, ppid in table.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = [], [root] if root in table else []
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def _status_kb(pid: int, fields: tuple[str, ...]) -> dict[str, int]:
    res = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k = line.split(":", 1)[0]
                if k in fields:
                    res[k] = int(line.split()[1])
    except OSError:
        pass
    return res


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE_KB
        except (OSError, ValueError, IndexError):
            pass
    return total


def pss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError):
            pass
    return total


def hwm_kb(pids: list[int]) -> int:
    return sum(_status_kb(p, ("VmHWM",)).get("VmHWM", 0) for p in pids)


def cpu_s(pids: list[int]) -> float:
    """utime+stime of live processes plus what they have reaped from dead children."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += sum(int(x) for x in fields[11:15])
        except (OSError, ValueError, IndexError):
            pass
    return ticks / CLK_TCK


class System:
    """A system under test: where it listens and which processes are its own."""

    def __init__(self, name: str, port: int, pids_fn) -> None:
        self.name = name
        self.port = port
        self.pids_fn = pids_fn

    def pids(self) -> list[int]:
        return self.pids_fn()


class Target:
    """One server under test in run_perimeter.py and run_content.py: its key and label in the
    results, its port and processes, its Postfix instance (None for a gateway: to wait for its
    queue to drain) and, for a gateway, its main log."""

    def __init__(self, key: str, label: str, port: int, pids_fn, postfix=None) -> None:
        self.key = key
        self.label = label
        self.port = port
        self.pids_fn = pids_fn
        self.postfix = postfix
        self.mainlog: Path | None = None

    def pids(self) -> list[int]:
        return self.pids_fn()


class MemSampler(threading.Thread):
    def __init__(self, system: System, interval: float = 0.25, pss_every: int = 0) -> None:
        super().__init__(daemon=True)
        self.system = system
        self.interval = interval
        self.pss_every = pss_every
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_procs = 0
        self.hwm = 0
        self._stop_evt = threading.Event()

    def run(self) -> None:
        i = 0
        while not self._stop_evt.is_set():
            pids = self.system.pids()
            self.peak_procs = max(self.peak_procs, len(pids))
            self.peak_rss = max(self.peak_rss, rss_kb(pids))
            self.hwm = max(self.hwm, hwm_kb(pids))
            if self.pss_every and i % self.pss_every == 0:
                self.peak_pss = max(self.peak_pss, pss_kb(pids))
            i += 1
            self._stop_evt.wait(self.interval)

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(5)


# --------------------------------------------------------------------------------------
# The sink


class Sink:
    def __init__(self, port: int) -> None:
        self.port = port
        self.count = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                SMTP_SINK,
                "-c",
                "-4",
                "-u",
                "postfix",
                "-m",
                "2000",
                f"127.0.0.1:{self.port}",
                "2000",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        if not wait_greeting(self.port, 10):
            raise RuntimeError("smtp-sink did not start")

    def _read(self) -> None:
        assert self.proc and self.proc.stdout
        rx = re.compile(rb"mesg=(\d+)")
        tail = b""
        while True:
            chunk = self.proc.stdout.read1(65536)
            if not chunk:
                return
            tail = (tail + chunk)[-256:]
            m = rx.findall(tail)
            if m:
                self.count = int(m[-1])

    def wait_for(self, target: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count >= target:
                return True
            time.sleep(0.1)
        return self.count >= target

    def stop(self) -> None:
        stop_proc(self.proc)


def stop_proc(proc: subprocess.Popen | None, timeout: float = 10) -> None:
    """Stop a process we started (its own session) by its process-group id."""
    if proc is None or proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
            break
        except subprocess.TimeoutExpired:
            continue
    # Descendants that left the group are not ours to hunt; the gateway's workers share it.


def wait_greeting(port: int, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


# --------------------------------------------------------------------------------------
# Drivers (run as child processes so that their CPU is measured the same way)


def run_child(cmd: list[str], timeout: float) -> tuple[int, str, str, float, float]:
    """Run cmd, return (rc, stdout, stderr, wall_s, cpu_s of the child)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    out_chunks: list[bytes] = []
    err_chunks: list[bytes] = []
    t_out = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)
    t_err = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
    t_out.start()
    t_err.start()
    timer = threading.Timer(timeout, lambda: stop_proc(proc, 2))
    timer.start()
    _, status, ru = os.wait4(proc.pid, 0)
    timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    t_out.join(5)
    t_err.join(5)
    out = b"".join(out_chunks).decode(errors="replace")
    err = b"".join(err_chunks).decode(errors="replace")
    return proc.returncode, out, err, wall, ru.ru_utime + ru.ru_stime


def drive_python(port: int, clients: int, messages: int, bound_s: float) -> dict:
    cmd = [
        sys.executable,
        str(HERE / "smtp_load.py"),
        "throughput",
        "--port",
        str(port),
        "--clients",
        str(clients),
        "--messages",
        str(messages),
        "--duration",
        str(bound_s),
        "--sender",
        SENDER,
        "--rcpt",
        RCPT,
    ]
    rc, out, err, _wall, cpu = run_child(cmd, bound_s + 30)
    try:
        res = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"driver": "smtp_load.py", "failed": f"rc={rc}: {err.strip()[-300:]}"}
    res["driver_process_cpu_s"] = round(cpu, 3)
    res["driver_cpu_per_1k"] = round(cpu / max(1, res["accepted"]) * 1000, 3)
    return res


def drive_smtp_source(port: int, clients: int, messages: int, bound_s: float) -> dict:
    cmd = [
        SMTP_SOURCE,
        "-s",
        str(clients),
        "-m",
        str(messages),
        "-l",
        "4096",
        "-M",
        "client.example",
        "-f",
        SENDER,
        "-t",
        RCPT,
        f"127.0.0.1:{port}",
    ]
    rc, _out, err, wall, cpu = run_child(cmd, bound_s)
    accepted = messages if rc == 0 else 0
    res = {
        "driver": "smtp-source",
        "port": port,
        "clients": clients,
        "accepted": accepted,
        "errors": 0 if rc == 0 else 1,
        "elapsed_s": round(wall, 3),
        "msgs_per_s": round(accepted / wall, 1) if rc == 0 else 0.0,
        "p50_ms": None,
        "p99_ms": None,
        "driver_process_cpu_s": round(cpu, 3),
        "driver_cpu_per_1k": round(cpu / max(1, accepted) * 1000, 3),
    }
    if rc != 0:
        res["failed"] = f"rc={rc}: {err.strip()[-300:]}"
    return res


def drive_idle(port: int, connections: int, bound_s: float, source_addrs: int) -> dict:
    cmd = [
        sys.executable,
        str(HERE / "smtp_load.py"),
        "idle",
        "--port",
        str(port),
        "--connections",
        str(connections),
        "--duration",
        str(bound_s),
        "--source-addrs",
        str(source_addrs),
        "--timeout",
        "20",
    ]
    rc, out, err, _wall, _cpu = run_child(cmd, bound_s + 60)
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"failed": f"rc={rc}: {err.strip()[-300:]}"}


# --------------------------------------------------------------------------------------
# Orchestration


class Gateway:
    def __init__(
        self,
        config: Path,
        port: int,
        cmd: list[str] | None,
        state_root: Path = BENCH_ROOT,
        logfile: Path | None = None,
    ) -> None:
        self.config = config
        self.port = port
        self.cmd = cmd or [sys.executable, "-m", "palisade", "serve", "--config", str(config)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.why_not: str | None = None
        # spool/, mail/, log/ and state.sqlite under state_root, as the config's [paths] say
        self.state_root = state_root
        self.logfile = logfile or BENCH_ROOT / "gateway.out"

    def start(self, timeout: float) -> bool:
        for d in ("spool", "mail", "log"):
            shutil.rmtree(self.state_root / d, ignore_errors=True)
            (self.state_root / d).mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            (self.state_root / "state.sqlite").unlink()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])]
        )
        out = open(self.logfile, "wb")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as e:
            self.why_not = f"cannot exec: {e}"
            return False
        finally:
            out.close()
        if wait_greeting(self.port, timeout, self.proc):
            return True
        rc = self.proc.poll()
        out_lines = self.logfile.read_text(errors="replace").strip().splitlines()
        tail = out_lines[-1][-300:] if out_lines else ""
        self.why_not = (
            f"exited rc={rc}" if rc is not None else f"no 220 on port {self.port} in {timeout}s"
        ) + (f": {tail}" if tail else "")
        self.stop()
        return False

    def pids(self) -> list[int]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        return tree_pids(self.proc.pid)

    def stop(self) -> None:
        stop_proc(self.proc)


def set_subreaper() -> None:
    """Become the reaper of orphaned descendants (Postfix's master daemonizes)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def machine_info(postfix_version: str) -> dict:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postfix": postfix_version,
    }


def throughput_phase(
    system: System, driver: str, sink: Sink, args: argparse.Namespace, messages: int
) -> dict:
    before = sink.count
    sampler = MemSampler(system, pss_every=4)
    cpu0 = cpu_s(system.pids())
    sampler.start()
    if driver == "py":
        res = drive_python(system.port, args.clients, messages, args.run_bound)
    else:
        res = drive_smtp_source(system.port, args.clients, messages, args.run_bound)
    cpu1 = cpu_s(system.pids())
    sampler.stop()
    res["system"] = system.name
    res["server_cpu_s"] = round(cpu1 - cpu0, 2)
    res["server_peak_rss_mb"] = round(sampler.peak_rss / 1024, 1)
    res["server_peak_pss_mb"] = round(sampler.peak_pss / 1024, 1)
    res["server_hwm_sum_mb"] = round(sampler.hwm / 1024, 1)
    # Wait until everything accepted has reached the sink, so runs do not overlap.
    relayed = sink.wait_for(before + res.get("accepted", 0), args.drain_timeout)
    res["relayed_to_sink"] = sink.count - before
    res["drained"] = relayed
    return res


def idle_phase(system: System, connections: int, args: argparse.Namespace) -> dict:
    sampler = MemSampler(system, interval=0.5, pss_every=2)
    base_rss = rss_kb(system.pids())
    base_pss = pss_kb(system.pids())
    sampler.start()
    res = drive_idle(system.port, connections, args.idle_bound, args.source_addrs)
    sampler.stop()
    res["system"] = system.name
    res["baseline_rss_mb"] = round(base_rss / 1024, 1)
    res["baseline_pss_mb"] = round(base_pss / 1024, 1)
    res["peak_rss_sum_mb"] = round(sampler.peak_rss / 1024, 1)
    res["peak_pss_sum_mb"] = round(sampler.peak_pss / 1024, 1)
    res["hwm_sum_mb"] = round(sampler.hwm / 1024, 1)
    res["peak_processes"] = sampler.peak_procs
    held = res.get("greeted") or 0
    if held:
        res["pss_kb_per_conn"] = round((sampler.peak_pss - base_pss) / held, 1)
        res["rss_kb_per_conn"] = round((sampler.peak_rss - base_rss) / held, 1)
    return res


def summarize(results: list[dict], name: str, driver: str) -> dict | None:
    rows = [r for r in results if r.get("system") == name and r.get("driver") == driver]
    rows = [r for r in rows if "failed" not in r]
    if not rows:
        return None

    def med(key: str) -> float | None:
        vals = sorted(r[key] for r in rows if r.get(key) is not None)
        return vals[len(vals) // 2] if vals else None

    return {
        "runs": len(rows),
        "msgs_per_s": [r["msgs_per_s"] for r in rows],
        "msgs_per_s_med": med("msgs_per_s"),
        "p50_ms": med("p50_ms"),
        "p99_ms": max((r["p99_ms"] for r in rows if r.get("p99_ms") is not None), default=None),
        "errors": sum(r.get("errors", 0) for r in rows),
        "accepted_relayed": f"{sum(r.get('accepted', 0) for r in rows)}"
        f"/{sum(r.get('relayed_to_sink', 0) for r in rows)}",
        "peak_rss_mb": max(r["server_peak_rss_mb"] for r in rows),
        "peak_pss_mb": max(r["server_peak_pss_mb"] for r in rows),
        "server_cpu_per_1k": med("server_cpu_per_1k"),
        "driver_cpu_per_1k": med("driver_cpu_per_1k"),
    }


def fmt(v, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        v = f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"
    return f"{v}{unit}"


def ratio(a, b) -> str:
    if a is None or b in (None, 0):
        return "-"
    return f"{a / b:.2f}x"


def render(info: dict, args: argparse.Namespace, results: dict) -> str:
    pf, gw = "postfix", "palisade"
    gw_ok = results["gateway_runnable"]
    gw_note = "" if gw_ok else f"not runnable ({(results['gateway_why_not'] or '')[:120]})"
    lines = [
        f"Run {info['date']} on {info['nproc']} x {info['cpu']}, Linux {info['kernel']}, "
        f"Python {info['python']}, Postfix {info['postfix']}.",
        "",
        f"Throughput: {args.clients} clients, one transaction per connection, "
        f"{args.messages} messages per run, {args.rounds} rounds alternating "
        "Postfix/Palisade; median msg/s (all runs in brackets), p50 median, p99 worst run.",
        "",
        "| metric | Postfix | Palisade | Palisade ÷ Postfix |",
        "|---|---|---|---|",
    ]
    for drv, label in (("py", "smtp_load.py"), ("c", "smtp-source")):
        p = results["summary"].get(f"{pf}/{drv}")
        g = results["summary"].get(f"{gw}/{drv}")

        missing = "pending" if not gw_ok else "-"

        def cell(s, key, unit="", missing=missing):
            return missing if s is None else fmt(s[key], unit)

        def runs(s, missing=missing):
            if s is None:
                return missing
            return f"{fmt(s['msgs_per_s_med'])} ({', '.join(fmt(x) for x in s['msgs_per_s'])})"

        lines.append(
            f"| accepted msg/s ({label}) | {runs(p)} | {runs(g)} | "
            f"{ratio(g and g['msgs_per_s_med'], p and p['msgs_per_s_med'])} |"
        )
        if drv == "py":
            lines.append(
                f"| p50 latency ({label}) | {cell(p, 'p50_ms', ' ms')} | "
                f"{cell(g, 'p50_ms', ' ms')} | {ratio(g and g['p50_ms'], p and p['p50_ms'])} |"
            )
            lines.append(
                f"| p99 latency ({label}) | {cell(p, 'p99_ms', ' ms')} | "
                f"{cell(g, 'p99_ms', ' ms')} | {ratio(g and g['p99_ms'], p and p['p99_ms'])} |"
            )
        lines.append(f"| errors ({label}) | {cell(p, 'errors')} | {cell(g, 'errors')} | |")
        lines.append(
            f"| accepted/relayed to sink ({label}) | {cell(p, 'accepted_relayed')} | "
            f"{cell(g, 'accepted_relayed')} | |"
        )
        lines.append(
            f"| server CPU-s per 1000 msgs ({label}) | {cell(p, 'server_cpu_per_1k')} | "
            f"{cell(g, 'server_cpu_per_1k')} | "
            f"{ratio(g and g['server_cpu_per_1k'], p and p['server_cpu_per_1k'])} |"
        )
        lines.append(
            f"| server peak RSS / PSS, sum of processes ({label}) | "
            f"{cell(p, 'peak_rss_mb', ' MB')} / {cell(p, 'peak_pss_mb', ' MB')} | "
            f"{cell(g, 'peak_rss_mb', ' MB')} / {cell(g, 'peak_pss_mb', ' MB')} | |"
        )
        lines.append(
            f"| driver CPU-s per 1000 msgs ({label}) | {cell(p, 'driver_cpu_per_1k')} | "
            f"{cell(g, 'driver_cpu_per_1k')} | |"
        )
    for key, label in ((pf, "Postfix"), (gw, "Palisade")):
        r = results["idle"].get(key)
        if r is None:
            continue
        if "failed" in r:
            lines += ["", f"Idle ({label}): failed: {r['failed']}"]
            continue
        lines += [
            "",
            f"Idle ({label}): {r['greeted']}/{r['requested']} connections greeted and held "
            f"(opened in {r['open_s']} s, {r['still_open_after_hold']} still open at the end); "
            f"new-client greeting {', '.join(fmt(x) for x in r['probe_ms'])} ms "
            f"(failed probes: {r['probe_failed']}); server memory: peak RSS sum "
            f"{r['peak_rss_sum_mb']} MB, peak PSS sum {r['peak_pss_sum_mb']} MB, "
            f"VmHWM sum {r['hwm_sum_mb']} MB (baseline RSS {r['baseline_rss_mb']} MB, "
            f"PSS {r['baseline_pss_mb']} MB; increment per held connection "
            f"{r.get('rss_kb_per_conn')} KB RSS, {r.get('pss_kb_per_conn')} KB PSS), "
            f"up to {r['peak_processes']} processes"
            + (f"; failures {r['failures']}" if r.get("failures") else "")
            + ".",
        ]
    if not gw_ok:
        lines += ["", f"Palisade: {gw_note}"]
    return "\n".join(lines)


def port_taken(port: int) -> bool:
    """True when a server already accepts connections on 127.0.0.1:``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def ports_taken(program: str, ports: list[int]) -> bool:
    """Says on stderr which of ``ports`` a server already listens on; True if any.

    A leftover server on one of them (several processes can share a port with SO_REUSEPORT)
    would silently take part of the load and falsify every number of the run.
    """
    busy = [p for p in ports if port_taken(p)]
    if busy:
        print(
            f"{program}: something already listens on 127.0.0.1 port(s) {busy}; stop it first",
            file=sys.stderr,
        )
    return bool(busy)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--perimeter" in argv:  # the perimeter-checks benchmark: bench/run_perimeter.py
        from run_perimeter import main as perimeter_main

        return perimeter_main([a for a in argv if a != "--perimeter"])
    if "--content" in argv:  # the content-checks benchmark: bench/run_content.py
        from run_content import main as content_main

        return content_main([a for a in argv if a != "--content"])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--perimeter", action="store_true", help="run bench/run_perimeter.py instead")
    ap.add_argument("--content", action="store_true", help="run bench/run_content.py instead")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--messages", type=int, default=3000, help="per measured run")
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of (Postfix, Palisade); the median is reported",
    )
    ap.add_argument("--drivers", default="py,c", help="py (smtp_load.py), c (smtp-source)")
    ap.add_argument("--run-bound", type=float, default=30.0, help="seconds per load run")
    ap.add_argument("--drain-timeout", type=float, default=30.0)
    ap.add_argument("--idle-connections", type=int, default=10000, help="for the gateway")
    ap.add_argument(
        "--postfix-idle-connections",
        type=int,
        default=1000,
        help="Postfix needs one smtpd process per connection; its maxproc is raised to this+50",
    )
    ap.add_argument("--idle-bound", type=float, default=60.0)
    ap.add_argument("--source-addrs", type=int, default=1)
    ap.add_argument("--no-idle", action="store_true")
    ap.add_argument("--sink-port", type=int, default=2600)
    ap.add_argument("--postfix-port", type=int, default=2527)
    ap.add_argument("--gateway-port", type=int, default=2525)
    ap.add_argument("--gateway-config", type=Path, default=HERE / "palisade-bench.toml")
    ap.add_argument("--gateway-cmd", help="override the gateway command (shell words)")
    ap.add_argument("--gateway-start-timeout", type=float, default=20.0)
    ap.add_argument("--no-gateway", action="store_true")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="skip phases after this")
    ap.add_argument("--quick", action="store_true", help="small counts to test the harness")
    ap.add_argument("--json", type=Path, default=BENCH_ROOT / "results.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.messages, args.warmup, args.rounds = 500, 100, 1
        args.idle_connections, args.postfix_idle_connections = 1000, 200
    if os.geteuid() != 0:
        ap.error("run as root (the private Postfix instance needs it)")

    t_begin = time.monotonic()

    def time_left() -> bool:
        return time.monotonic() - t_begin < args.max_seconds

    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by Postfix
    set_subreaper()
    BENCH_ROOT.mkdir(parents=True, exist_ok=True)
    drivers = [d for d in args.drivers.split(",") if d in ("py", "c")]
    if ports_taken("run.py", [args.sink_port, args.postfix_port, args.gateway_port]):
        return 2

    sink = Sink(args.sink_port)
    pf = PostfixInstance(
        BENCH_ROOT / "postfix",
        port=args.postfix_port,
        sink_port=args.sink_port,
        smtpd_maxproc=max(100, args.postfix_idle_connections + 50),
    )
    gw = Gateway(
        args.gateway_config,
        args.gateway_port,
        args.gateway_cmd.split() if args.gateway_cmd else None,
    )
    results: dict = {"throughput": [], "idle": {}, "summary": {}}
    info = machine_info("?")
    try:
        log(f"starting smtp-sink on 127.0.0.1:{args.sink_port}")
        sink.start()
        log(f"starting Postfix on 127.0.0.1:{args.postfix_port} ({pf.root})")
        shutil.rmtree(pf.root, ignore_errors=True)
        pf.start()
        info = machine_info(pf.version())
        systems = [System("postfix", args.postfix_port, pf.process_pids)]
        if not args.no_gateway:
            log(f"starting Palisade: {' '.join(gw.cmd)}")
            if gw.start(args.gateway_start_timeout):
                systems.append(System("palisade", args.gateway_port, gw.pids))
            else:
                log(f"palisade: not runnable ({gw.why_not})")
        else:
            gw.why_not = "--no-gateway"
        results["gateway_runnable"] = len(systems) == 2
        results["gateway_why_not"] = gw.why_not

        for s in systems:
            log(f"warm-up {s.name}: {args.warmup} messages")
            before = sink.count
            w = drive_python(s.port, args.clients, args.warmup, args.run_bound)
            sink.wait_for(before + w.get("accepted", 0), args.drain_timeout)
            if s.name == "postfix":
                pf.wait_queue_empty(args.drain_timeout)
        time.sleep(1)

        for rnd in range(args.rounds):
            for s in systems:  # P, G, P, G
                for drv in drivers:
                    if not time_left():
                        log("time budget exhausted, skipping the rest of the throughput runs")
                        break
                    res = throughput_phase(s, drv, sink, args, args.messages)
                    res["round"] = rnd
                    acc = res.get("accepted", 0) or 0
                    if acc:
                        res["server_cpu_per_1k"] = round(res["server_cpu_s"] / acc * 1000, 3)
                    results["throughput"].append(res)
                    log(
                        f"round {rnd} {s.name:8s} {res['driver']:12s} "
                        f"{res.get('msgs_per_s')} msg/s p50 {res.get('p50_ms')} "
                        f"p99 {res.get('p99_ms')} ms errors {res.get('errors')} "
                        f"relayed {res['relayed_to_sink']} server CPU {res['server_cpu_s']} s "
                        f"driver CPU {res.get('driver_process_cpu_s')} s"
                        + (f" FAILED {res['failed']}" if "failed" in res else "")
                    )
                    if s.name == "postfix":
                        pf.wait_queue_empty(args.drain_timeout)
                    reap()
        for s in systems:
            for drv in drivers:
                name = "smtp_load.py" if drv == "py" else "smtp-source"
                results["summary"][f"{s.name}/{drv}"] = summarize(
                    results["throughput"], s.name, name
                )

        if not args.no_idle:
            for s in systems:
                if not time_left():
                    log("time budget exhausted, skipping idle mode")
                    break
                n = args.postfix_idle_connections if s.name == "postfix" else args.idle_connections
                log(f"idle {s.name}: {n} connections")
                r = idle_phase(s, n, args)
                results["idle"][s.name] = r
                log(f"idle {s.name}: {json.dumps(r)}")
                time.sleep(2)  # let the server notice the closed connections
                reap()
    finally:
        log("stopping")
        gw.stop()
        pf.stop()
        sink.stop()
        reap()
    results["machine"] = info
    results["args"] = {k: str(v) for k, v in vars(args).items()}
    results["elapsed_s"] = round(time.monotonic() - t_begin, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(render(info, args, results))
    log(f"done in {results['elapsed_s']} s; raw results in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
