"""What ``[record] facts`` costs: the same gateway with and without it, alternated in one run.

    python bench/record_bench.py            # ~2 minutes, bounded; as root (smtp-sink -u postfix)
    python bench/record_bench.py --quick    # small counts, to check the harness

What runs (all on 127.0.0.0/8, every loop bounded in count and time):

* the zone server of loopback/dnsserver.py on a random loopback port: good clients
  127.0.0.10-59 (PTR cNN.bench.test, A back), listed clients 127.0.1.10-59 (PTR + A, listed at
  zen.bench.test), the RFC 5782 test point;
* smtp-sink, the next hop of both gateways;
* two gateways on bench/palisade-perimeter.toml's rules (rate limit, rDNS, DNSBL at connect; one
  worker each, resolving straight from the zone server, warm in-process caches): ``off``
  without ``[record]``, ``on`` with ``[record] facts``;
* a warm-up of both, then --rounds rounds, the order of off/on swapped every other round, of
    listed:   --listed connections from the listed clients (refused at connect), 20 concurrent;
    accepted: --messages messages from the good clients through every check, 20 concurrent.
* medians per side and the on/off ratio on stdout, with the load average and the facts file's
  bytes per refused and per accepted connection; raw JSON in
  /tmp/palisade-bench/record/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import harness  # noqa: E402
from harness import BENCH_ROOT, Gateway, Sink, cpu_s, free_port, log, run_child  # noqa: E402
from loopback.dnsserver import start_zone_server  # noqa: E402

ROOT = BENCH_ROOT / "record"
GOOD = [f"127.0.0.{n}" for n in range(10, 60)]
LISTED = [f"127.0.1.{n}" for n in range(10, 60)]


def ptr(ip: str) -> str:
    return ".".join(reversed(ip.split("."))) + ".in-addr.arpa"


def zone() -> object:
    server = start_zone_server()
    server.add_zone("zen.bench.test")
    server.list_address("zen.bench.test", "127.0.0.2")
    for ip in ["127.0.0.1", *GOOD, *LISTED]:  # 127.0.0.1: the harness's readiness probe
        name = f"c{ip.replace('.', '-')}.bench.test"
        server.set(ptr(ip), "PTR", [f"{name}."], ttl=3600)
        server.set(name, "A", [ip], ttl=3600)
    for ip in LISTED:
        server.list_address("zen.bench.test", ip, ttl=3600)
    return server


def config(side: str, port: int, dns_port: int, sink_port: int) -> Path:
    base = ROOT / side
    text = (HERE / "palisade-perimeter.toml").read_text()
    text = text.replace('listen = ["127.0.0.1:2535"]', f'listen = ["127.0.0.1:{port}"]')
    text = text.replace("workers = 2 ", "workers = 1 ")
    text = text.replace('"127.0.0.1:2600"', f'"127.0.0.1:{sink_port}"')
    text = text.replace('"127.0.0.1:53"', f'"127.0.0.1:{dns_port}"')
    text = text.replace("/tmp/palisade-bench/perimeter", str(base))
    text = harness.own_control_socket(text, base / "control.sock")
    if side == "on":
        text += f'\n[record]\nfacts = "{base}/log/facts.jsonl"\n'
    base.mkdir(parents=True, exist_ok=True)
    path = base / "palisade.toml"
    path.write_text(text)
    return path


def load(mode: str, port: int, count: int, bound: float) -> dict:
    src = "127.0.1.10-127.0.1.59" if mode == "listed" else "127.0.0.10-127.0.0.59"
    cmd = [sys.executable, str(HERE / "smtp_load.py"), mode, "--port", str(port)]
    cmd += ["--clients", "20", "--duration", str(bound), "--source-range", src, "--timeout", "20"]
    if mode == "throughput":
        cmd += ["--messages", str(count), "--sender", "load@client.example"]
        cmd += ["--rcpt", "rcpt@bench.test"]
    else:
        cmd += ["--connections", str(count)]
    rc, out, err, _wall, _cpu = run_child(cmd, bound + 30)
    try:
        return dict(json.loads(out.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return {"failed": f"rc={rc}: {err.strip()[-300:]}"}


def facts_size(side: str) -> tuple[int, int]:
    path = ROOT / side / "log" / "facts.jsonl"
    if not path.exists():
        return 0, 0
    data = path.read_bytes()
    return len(data), data.count(b"\n")


def line_sizes(side: str) -> dict[str, dict[str, float]]:
    """Bytes per facts line, refused and accepted connections apart (the probe's left out)."""
    sizes: dict[str, list[int]] = {"refused": [], "accepted": []}
    path = ROOT / side / "log" / "facts.jsonl"
    for line in path.read_bytes().splitlines() if path.exists() else []:
        record = json.loads(line)
        if record["ip"] != "127.0.0.1":
            sizes[record["decision"]["result"]].append(len(line) + 1)
    return {
        kind: {"lines": len(v), "mean_bytes": round(statistics.mean(v)) if v else 0}
        for kind, v in sizes.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--listed", type=int, default=3000)
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--bound", type=float, default=30.0, help="seconds per load run, at most")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.listed, args.messages = 2, 300, 150
    ROOT.mkdir(parents=True, exist_ok=True)
    dns = zone()
    sink = Sink(free_port())
    sink.start()
    gateways: dict[str, Gateway] = {}
    sizes: dict[str, dict[str, float]] = {}
    results: dict[str, list[dict]] = {"listed": [], "throughput": []}
    try:
        for side in ("off", "on"):
            port = free_port()
            path = config(side, port, dns.port, sink.port)  # type: ignore[attr-defined]
            gw = Gateway(path, port, None, state_root=ROOT / side, logfile=ROOT / f"{side}.out")
            if not gw.start(20):
                raise SystemExit(f"gateway {side} did not start: {gw.why_not}")
            gateways[side] = gw
        log("warm-up")
        for gw in gateways.values():
            load("listed", gw.port, 200, args.bound)
            load("throughput", gw.port, 100, args.bound)
        for number in range(args.rounds):
            order = ("off", "on") if number % 2 == 0 else ("on", "off")
            for mode, count in (("listed", args.listed), ("throughput", args.messages)):
                for side in order:
                    cpu0 = cpu_s(gateways[side].pids())
                    res = load(mode, gateways[side].port, count, args.bound)
                    cpu = cpu_s(gateways[side].pids()) - cpu0
                    done = res.get("refused" if mode == "listed" else "accepted") or 0
                    res["server_cpu_us_per_conn"] = round(cpu / done * 1e6) if done else None
                    res["side"], res["round"] = side, number
                    res["loadavg"] = os.getloadavg()[0]
                    results[mode].append(res)
                    rate = res.get("refused_per_s" if mode == "listed" else "msgs_per_s")
                    log(
                        f"round {number} {mode} {side}: {rate}/s, server CPU "
                        f"{res['server_cpu_us_per_conn']} us/conn (load {res['loadavg']:.2f})"
                    )
    finally:
        for gw in gateways.values():
            gw.stop()
        sizes = line_sizes("on")
        sink.stop()
        dns.stop()  # type: ignore[attr-defined]
    summary: dict[str, object] = {"facts_bytes": sizes, "loadavg_end": os.getloadavg()}
    for mode, key in (("listed", "refused_per_s"), ("throughput", "msgs_per_s")):
        for side in ("off", "on"):
            vals = [r[key] for r in results[mode] if r["side"] == side and key in r]
            summary[f"{mode}_{side}"] = statistics.median(vals) if vals else None
        for side in ("off", "on"):
            cpus = [r["server_cpu_us_per_conn"] for r in results[mode] if r["side"] == side]
            cpus = [c for c in cpus if c]
            summary[f"{mode}_{side}_cpu_us"] = statistics.median(cpus) if cpus else None
        off, on = summary[f"{mode}_off"], summary[f"{mode}_on"]
        summary[f"{mode}_ratio"] = round(on / off, 3) if off and on else None  # type: ignore[operator]
    (ROOT / "results.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
