"""The parts every benchmark harness here shares: process trees and their memory and CPU, the
smtp-sink, the gateway under test, the load drivers, the check that nothing already listens
on a harness's ports, py-spy profiles, medians and the table cells, and the start and end of
a run (signals, file limit, the JSON written and the table printed). ``run.py``,
``run_perimeter.py``, ``run_content.py``, ``run_generators.py``, ``run_pipeline.py`` and the
smaller ``*_bench.py`` import it; it imports none of them (they used to import ``run.py``,
which imported them back), so one fix here reaches every benchmark.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from postfix_instance import _ppid_table  # noqa: E402

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
            time.sleep(0.005)  # fine enough for the drained rate of a run of a few seconds
        return self.count >= target

    def stop(self) -> None:
        stop_proc(self.proc)


def spawn(cmd: list[str], logfile: Path, stdin: int | None = None) -> subprocess.Popen[bytes]:
    """``cmd`` in a session of its own (stop_proc stops it with its children), its stdout and
    stderr to ``logfile``."""
    out = logfile.open("wb")
    try:
        return subprocess.Popen(
            cmd, stdin=stdin, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    finally:
        out.close()


def wait_ready(
    proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float, interval: float
) -> bool:
    """True once ``ready()`` is, every ``interval`` s for ``timeout`` s; False at once when
    the process has exited (nothing to wait for)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            return True
        time.sleep(interval)
    return False


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


def smtp_load(
    argv: list[str], timeout: float, failed: dict | None = None, driver_cpu: bool = True
) -> dict:
    """Runs bench/smtp_load.py with ``argv`` as a child (its CPU measured as the servers' is)
    and returns the JSON result it prints last, with ``driver_process_cpu_s`` unless
    ``driver_cpu`` is false; when it prints none, ``{"failed": "rc=...: stderr tail"}`` plus
    ``failed`` (e.g. ``{"accepted": 0}`` for callers that add the run's counts up)."""
    cmd = [sys.executable, str(HERE / "smtp_load.py"), *argv]
    rc, out, err, _wall, cpu = run_child(cmd, timeout)
    try:
        res = dict(json.loads(out.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return {"failed": f"rc={rc}: {err.strip()[-300:]}", **(failed or {})}
    if driver_cpu:
        res["driver_process_cpu_s"] = round(cpu, 3)
    return res


def drive_listed(port: int, connections: int, clients: int, bound: float, sources: str) -> dict:
    """``connections`` connections from the listed ``sources`` (FIRST-LAST), each refused by
    the server: smtp_load.py's ``listed`` mode (connect, read the refusal, QUIT)."""
    argv = ["listed", "--port", str(port), "--clients", str(clients), "--duration", str(bound)]
    argv += ["--source-range", sources, "--timeout", "20", "--connections", str(connections)]
    return smtp_load(argv, bound + 30, driver_cpu=False)


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


PAIR_CONFIG = """# bench/{script}: {name}
[server]
hostname = "gw.bench.test"
listen = ["127.0.0.1:{port}"]
workers = {workers}
max_connections = 20000
max_connections_per_ip = 20000
control_socket = "{root}/control.sock"

[domains]
local = ["bench.test"]

[paths]
spool = "{root}/spool"
mail = "{root}/mail"
log = "{root}/log"
state = "{root}/state.sqlite"

[log]
echo = false

[lists]
listed = {{ type = "ip", entries = ["127.0.1.0/24"] }}

{rest}
[[rules.connect]]
name = "listed"
check = "ip_list"
list = "listed"
verb = "deny"
incident = {incident}
message = "Access denied"
"""


def pair_config(
    script: str, name: str, port: int, workers: int, root: Path, rest: str, incident: int
) -> str:
    """The configuration of one gateway of a benchmark of two side by side (state_bench.py,
    incident_bench.py): on ``port`` with ``workers``, no DNS, everything under ``root``;
    ``rest`` (the sections and rules that differ), then the last connect rule, which refuses
    127.0.1.0/24 and records ``incident``."""
    return PAIR_CONFIG.format(
        script=script,
        name=name,
        port=port,
        workers=workers,
        root=root,
        rest=rest,
        incident=incident,
    )


def own_control_socket(text: str, path: Path) -> str:
    """A bench configuration (palisade-bench.toml, palisade-perimeter.toml: ``[server]`` then
    ``[limits]``) with ``control_socket = path``: a second gateway of the same run on the
    default var/run/control.sock refuses to start beside the first."""
    return text.replace("[limits]", f'control_socket = "{path}"\n\n[limits]', 1)


def start_gateway(
    name: str, root: Path, config: str, port: int, timeout: float = 20
) -> Gateway | None:
    """A gateway on ``port`` with the configuration text ``config`` in root/palisade.toml (its
    state and output under ``root`` too), started; None, with the reason logged, when it did
    not greet within ``timeout`` seconds."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "palisade.toml"
    path.write_text(config)
    gw = Gateway(path, port, None, state_root=root, logfile=root / "gateway.out")
    if not gw.start(timeout):
        log(f"{name}: {gw.why_not}")
        return None
    return gw


def add_pair_args(parser) -> None:
    """The options every benchmark of two gateways side by side shares (state_bench.py,
    incident_bench.py): load, gateway workers, the bound of a run, the raw JSON file."""
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--bound", type=float, default=120.0, help="seconds per run at most")
    parser.add_argument("--json", type=Path)


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


def stop_all(*servers) -> None:
    """Stops each of ``servers`` that was made (None: never made), in the order given, then
    reaps what is left of their children: the end of every run, an interrupted one too."""
    for server in servers:
        if server is not None:
            server.stop()
    reap()


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


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# The DKIM keys the signing benchmarks make with ``palisade dkim keygen`` (under their keys
# directory), and which of them each variant signs with.
DKIM_DOMAIN = "signed.test"
DKIM_KEYS = {
    "rsa": {"domain": DKIM_DOMAIN, "selector": "r1", "file": f"{DKIM_DOMAIN}.r1.rsa.key"},
    "ed25519": {"domain": DKIM_DOMAIN, "selector": "e1", "file": f"{DKIM_DOMAIN}.e1.ed25519.key"},
}
DKIM_VARIANTS = {"unsigned": [], "rsa": ["rsa"], "ed25519": ["ed25519"], "both": ["rsa", "ed25519"]}


def port_taken(port: int, timeout: float = 1) -> bool:
    """True when a server already accepts connections on 127.0.0.1:``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=timeout).close()
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


def make_key() -> tuple[bytes, str]:
    """A fresh RSA-2048 key: (private key PEM, public key base64 for the DKIM TXT p= tag)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, base64.b64encode(der).decode()


# --------------------------------------------------------------------------------------
# The start and the end of a run


def time_budget(t_begin: float, seconds: float) -> Callable[[], bool]:
    """A check, true while less than ``seconds`` have passed since ``t_begin``: the runs
    after it are skipped, so that a benchmark ends in bounded time."""
    return lambda: time.monotonic() - t_begin < seconds


def interrupt_on_term() -> None:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, so that a killed run still goes through its
    ``finally`` blocks: every server stopped, /etc/resolv.conf put back."""

    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)


def raise_nofile_limit() -> None:
    """Open files up to the hard limit (inherited by Postfix and the gateways): thousands of
    connections at once must not fail for want of descriptors and skew a run."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def write_results(
    results: dict, args, info: dict, t_begin: float, render: Callable[[], str]
) -> None:
    """The end of a run: the machine, the arguments and the elapsed time added to
    ``results``, the raw JSON written to ``args.json``, then the table ``render`` makes
    printed on stdout (after the JSON, so that a failing table loses no numbers)."""
    results["machine"] = info
    results["args"] = {k: str(v) for k, v in vars(args).items()}
    results["elapsed_s"] = round(time.monotonic() - t_begin, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(render())
    log(f"done in {results['elapsed_s']} s; raw results in {args.json}")


# --------------------------------------------------------------------------------------
# Medians and table cells


def rate_summary(rows: list[dict], rate: str) -> dict:
    """What every summary of load runs starts with: their count, the rate ``rate`` of each
    and its median, the median p50, each p99 and their median."""
    return {
        "runs": len(rows),
        "rate": [r[rate] for r in rows],
        "rate_med": med([r[rate] for r in rows]),
        "p50_ms": med([r.get("p50_ms") for r in rows]),
        "p99_ms": [r.get("p99_ms") for r in rows],
        "p99_ms_med": med([r.get("p99_ms") for r in rows]),
    }


def med(vals: list) -> float | None:
    """The median of the values that are not None (the mean of the middle two, to 3 places,
    for an even count); None when there are none."""
    vals = sorted(v for v in vals if v is not None)
    if not vals:
        return None
    n = len(vals)
    return vals[n // 2] if n % 2 else round((vals[n // 2 - 1] + vals[n // 2]) / 2, 3)


def median_of(rows: list[dict], key: str) -> float | None:
    """The median of ``key`` over the rows that have it, to 2 places; None when none has."""
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(values), 2) if values else None


def fmt(v, unit: str = "") -> str:
    """A table cell: "-" for None, floats to 1 place from 10 up and to 2 below."""
    if v is None:
        return "-"
    if isinstance(v, float):
        v = f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"
    return f"{v}{unit}"


def ratio(a, b) -> str:
    """a / b as "1.23x", "-" when either is missing or b is 0."""
    return "-" if a is None or not b else f"{a / b:.2f}x"


# --------------------------------------------------------------------------------------
# py-spy profiles of a gateway during an extra, unmeasured run


def start_py_spy(py_spy: str, pid: int, out: Path, rate: int, stderr) -> subprocess.Popen[bytes]:
    """``py-spy record --gil`` (samples of threads holding the GIL: Python running, not
    waiting) of ``pid`` and its subprocesses, ``rate`` per second, raw stacks to ``out``."""
    cmd = [py_spy, "record", "-p", str(pid), "--subprocesses", "-r", str(rate)]
    cmd += ["-f", "raw", "--nolineno", "--gil", "-o", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)


def stop_py_spy(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT makes py-spy write its file; killed if it has not within 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        stop_proc(proc)


def busy_samples(
    path: Path, areas: tuple[tuple[str, tuple[str, ...]], ...], idle: tuple[str, ...]
) -> tuple[dict[str, int], int, int, dict[str, int]]:
    """py-spy's raw stacks in ``path`` added up: (samples by area, busy samples, samples
    dropped as idle, samples by function, inclusive). A stack whose leaf frame starts with one
    of ``idle`` is a thread waiting, not working; a busy one goes to the area of its innermost
    frame that matches one of the area's patterns (in the order of ``areas``), else "other"."""
    by_area: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = idle_n = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        if frames[-1].startswith(idle):
            idle_n += n
            continue
        total += n
        area = "other"
        for fr in reversed(frames):
            hit = next((a for a, pats in areas if any(p in fr for p in pats)), None)
            if hit:
                area = hit
                break
        by_area[area] = by_area.get(area, 0) + n
        for fr in set(frames):
            if "(" in fr:
                inclusive[fr] = inclusive.get(fr, 0) + n
    return by_area, total, idle_n, inclusive


def shares_pct(counts: dict[str, int], total: int) -> dict[str, float]:
    """Each count as a percentage of ``total`` (1 place), largest first; {} for no samples."""
    if not total:
        return {}
    return {k: round(100 * v / total, 1) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}
