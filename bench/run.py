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
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    BENCH_ROOT,
    HERE,
    Gateway,
    MemSampler,
    Sink,
    System,
    cpu_s,
    drive_idle,
    drive_python,
    drive_smtp_source,
    fmt,
    log,
    machine_info,
    ports_taken,
    pss_kb,
    raise_nofile_limit,
    ratio,
    reap,
    rss_kb,
    set_subreaper,
    stop_all,
    time_budget,
    write_results,
)
from postfix_instance import PostfixInstance


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
    time_left = time_budget(t_begin, args.max_seconds)

    raise_nofile_limit()  # inherited by Postfix
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
        stop_all(gw, pf, sink)
    write_results(results, args, info, t_begin, lambda: render(info, args, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
