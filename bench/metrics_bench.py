"""What the Prometheus metrics cost on the accepted and the refusal paths, with and without, in
the same run.

Two parts:

* **micro**: in fresh interpreters (prometheus-client picks its value class at import), the cost
  of one counter increment in multiprocess mode (an mmap write under a lock) and in the
  library's single-process mode, and of :meth:`palisade.obs.metrics.Metrics.observe` for the
  events one refused connection and one accepted message produce (multiprocess mode, as the
  gateway runs it). ``--micro-n`` calls each, best of 5.
* **gateway**: two Palisade gateways on the same config (2 workers, a DNSBL connect rule answered
  by the loopback zone server, relay to smtp-sink), one with ``[metrics] listen``; ``--rounds``
  rounds, the order swapped every other round, of ``--messages`` accepted messages
  (bench/smtp_load.py throughput, 20 clients) and ``--listed`` connections refused at connect
  by the DNSBL (smtp_load.py listed, from 127.0.1.10-59). Reports median msg/s, refused/s, p99
  and the gateway's CPU per 1,000. The metrics gateway is scraped once per round (the scrape
  is outside the measured window).

    python bench/metrics_bench.py [--rounds 3] [--messages 2000] [--listed 3000] [--quick]

Prints a table; ``--json FILE`` writes the raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from harness import Gateway, Sink, cpu_s, free_port, log, reap, run_child  # noqa: E402
from loopback.dnsserver import start_zone_server  # noqa: E402

SENDER = "load@client.example"
RCPT = "rcpt@bench.test"
GOOD = "127.0.0.10-127.0.0.59"
LISTED = "127.0.1.10-127.0.1.59"

MICRO = textwrap.dedent(
    """
    import json, os, sys, tempfile, time
    n = int(sys.argv[1]); mode = sys.argv[2]
    if mode != "single":
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp()
    from prometheus_client import Counter
    def best(fn):
        times = []
        for _ in range(5):
            t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
        return min(times) / n * 1e9
    c = Counter("x", "x", ["stage", "rule", "verb"])
    child = c.labels("connect", "bl", "deny")
    def inc():
        for _ in range(n): child.inc()
    def labels_inc():
        for _ in range(n): c.labels("connect", "bl", "deny").inc()
    out = {"inc_ns": best(inc), "labels_inc_ns": best(labels_inc)}
    if mode == "observe":
        from palisade.obs.metrics import Metrics
        m = Metrics()
        refused = [
            ("checks", {"stage": "connect", "rules": [("bl", 0.0002, False)],
                        "zones": [("bl.test", 0.0001, False)], "spam_score": None}),
            ("refused", {"stage": "connect", "rule": "bl", "verb": "deny",
                         "connection": "refused"}),
            ("closed", {}),
        ]
        accepted = [
            ("checks", {"stage": "connect", "rules": [("bl", 0.0002, False)],
                        "zones": [("bl.test", 0.0001, False)], "spam_score": None}),
            ("greeted", {}),
            ("accepted", {}),
            ("delivered", {}),
            ("closed", {}),
        ]
        def run(events):
            def go():
                for _ in range(n):
                    for name, fields in events:
                        m.observe(name, fields)
            return go
        out["refused_connection_ns"] = best(run(refused))
        out["accepted_message_ns"] = best(run(accepted))
    print(json.dumps(out))
    """
)


def micro(n: int) -> dict[str, dict[str, float]]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    out = {}
    for mode in ("single", "multiprocess", "observe"):
        done = subprocess.run(
            [sys.executable, "-c", MICRO, str(n), mode],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        out[mode] = {k: round(v, 1) for k, v in json.loads(done.stdout).items()}
    return out


def config(root: Path, port: int, sink: int, dns: int, metrics: int | None) -> Path:
    text = f"""
[server]
hostname = "gw.bench.test"
listen = ["127.0.0.1:{port}"]
control_socket = "{root}/control.sock"
workers = 2
max_connections = 20000
max_connections_per_ip = 20000

[domains]
local = []
relay = ["bench.test"]

[delivery]
next_hop = "127.0.0.1:{sink}"
require_tls = false

[dns]
nameservers = ["127.0.0.1:{dns}"]
dnsbl_probe_interval = 0

[paths]
spool = "{root}/spool"
mail = "{root}/mail"
log = "{root}/log"
state = "{root}/state.sqlite"

[[rules.connect]]
name = "bl"
check = "dnsbl"
zones = ["bl.bench.test"]
verb = "deny"
"""
    if metrics is not None:
        text += f'\n[metrics]\nlisten = "127.0.0.1:{metrics}"\n'
    root.mkdir(parents=True, exist_ok=True)
    path = root / "palisade.toml"
    path.write_text(text)
    return path


def load(mode: str, port: int, count: int, clients: int, bound: float) -> dict:
    cmd = [sys.executable, str(HERE / "smtp_load.py"), mode, "--port", str(port)]
    cmd += ["--clients", str(clients), "--duration", str(bound), "--timeout", "20"]
    if mode == "throughput":
        cmd += ["--messages", str(count), "--sender", SENDER, "--rcpt", RCPT]
        cmd += ["--source-range", GOOD]
    else:
        cmd += ["--connections", str(count), "--source-range", LISTED]
    rc, out, err, _wall, _cpu = run_child(cmd, bound + 30)
    try:
        result: dict = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"failed": f"rc={rc}: {err.strip()[-300:]}"}
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--listed", type=int, default=3000)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--micro-n", type=int, default=200_000)
    ap.add_argument("--quick", action="store_true", help="small counts, to check the harness")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.messages, args.listed, args.micro_n = 1, 200, 300, 20_000
    results: dict = {"micro": micro(args.micro_n)}
    log(f"micro: {results['micro']}")

    dns = start_zone_server()
    dns.add_zone("bl.bench.test")
    dns.list_address("bl.bench.test", "127.0.0.2")
    for last in range(10, 60):
        dns.list_address("bl.bench.test", f"127.0.1.{last}")
    sink = Sink(free_port())
    sink.start()
    base = Path(tempfile.mkdtemp(prefix="palisade-metrics-bench-"))
    metrics_port = free_port()
    gateways = {}
    for key, mport in (("without", None), ("with", metrics_port)):
        port = free_port()
        root = base / key
        path = config(root, port, sink.port, dns.port, mport)
        gateways[key] = Gateway(path, port, None, state_root=root, logfile=root / "out")
    runs: dict[str, dict[str, list[dict]]] = {k: {"accepted": [], "refused": []} for k in gateways}
    try:
        for key, gw in gateways.items():
            if not gw.start(20):
                raise SystemExit(f"{key}: {gw.why_not}")
            load("throughput", gw.port, 200, args.clients, 60)  # warm-up: caches, imports
            load("listed", gw.port, 300, args.clients, 60)
        for round_no in range(args.rounds):
            order = list(gateways) if round_no % 2 == 0 else list(reversed(gateways))
            for mode, count, what in (
                ("throughput", args.messages, "accepted"),
                ("listed", args.listed, "refused"),
            ):
                for key in order:
                    gw = gateways[key]
                    before = sink.count
                    cpu0 = cpu_s(gw.pids())
                    res = load(mode, gw.port, count, args.clients, 120)
                    res["server_cpu_s"] = round(cpu_s(gw.pids()) - cpu0, 3)
                    n = res.get("accepted" if mode == "throughput" else "refused") or 0
                    res["server_cpu_per_1k"] = round(res["server_cpu_s"] / max(1, n) * 1000, 3)
                    if mode == "throughput":
                        sink.wait_for(before + n, 60)
                    runs[key][what].append(res)
                    log(f"round {round_no + 1} {what} {key}: {n} in {res.get('elapsed_s')} s")
                    reap()
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as response:
                scraped = response.read().decode()
            results.setdefault("scrape_bytes", []).append(len(scraped))
    finally:
        for gw in gateways.values():
            gw.stop()
        sink.stop()
        dns.stop()
    results["runs"] = runs
    rate = {"accepted": "msgs_per_s", "refused": "refused_per_s"}
    table = ["path      metrics   rate/s   p99 ms   server CPU s per 1k"]
    for what in ("accepted", "refused"):
        for key in gateways:
            got = runs[key][what]

            def med(field: str, got: list[dict] = got) -> float:
                return statistics.median(r[field] for r in got if r.get(field) is not None)

            table.append(
                f"{what:9} {key:8} {med(rate[what]):8.1f} {med('p99_ms'):8.2f} "
                f"{med('server_cpu_per_1k'):10.3f}"
            )
    m = results["micro"]
    table.append("")
    table.append(
        f"counter inc: {m['single']['inc_ns']} ns single-process, "
        f"{m['multiprocess']['inc_ns']} ns multiprocess (mmap); with labels(): "
        f"{m['single']['labels_inc_ns']} / {m['multiprocess']['labels_inc_ns']} ns"
    )
    table.append(
        f"observe(): {m['observe']['refused_connection_ns']} ns per refused connection, "
        f"{m['observe']['accepted_message_ns']} ns per accepted message (events of one each)"
    )
    print("\n".join(table))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
