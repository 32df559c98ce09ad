"""Perimeter speed by two load generators of different kinds, Palisade vs. Postfix, same run.

    python bench/run_generators.py            # as root, from the repository root; ~4 minutes
    python bench/run_generators.py --quick    # small counts, to check the harness (~1 minute)

The shape of the independent measurement of issue 19: one transaction per connection, 20
concurrent clients, 10 clean source addresses (127.0.0.10-19, each with a PTR whose A points
back, none listed), QUIT written with the FIN, the same DNSBL + PTR + HELO + sender checks on
both systems, relaying to smtp-sink; refusals from 10 listed addresses (127.0.1.10-19).

Generators (``--generators``, default ``py,c``):

* ``py``: bench/smtp_load.py, Python asyncio + uvloop (the kind of the independent measurement);
* ``c``: bench/loadgen.c, one C process with epoll (built with gcc at run time, bench/loadgen.py),
  which costs the machine a fraction of the Python driver's CPU;
* ``smtp-source``: Postfix's own (HELO, waits for the 221, no source binding, no latencies).

Servers, both resolving through the same private unbound (bench/perimeter_dns.py):

* Postfix (127.0.0.1:2557, bench/postfix_instance.py): perimeter_settings() (PTR, DNSBL, anvil
  rate) plus ``smtpd_helo_required = yes``, ``smtpd_helo_restrictions =
  reject_invalid_helo_hostname, reject_non_fqdn_helo_hostname, reject_unknown_helo_hostname`` and
  ``smtpd_sender_restrictions = reject_non_fqdn_sender, reject_unknown_sender_domain``
  (``smtpd_delay_reject = no``);
* Palisade (127.0.0.1:2555, bench/palisade-generators.toml or ``--gateway-config``): the same
  checks as connect/HELO/MAIL rules.

The clients say ``EHLO client.bench.test`` and ``MAIL FROM:<load@client.bench.test>`` (A and MX
records in the bench zone). Order: warm-up of both, then per round, for each generator (their
order swapped every round): listed Postfix/Palisade, accepted Postfix/Palisade (pair order swapped
every round). Each run waits for the sink to receive every accepted message before the next.
Reported: per generator and system the median over rounds of accepted msg/s, accepted and
relayed msg/s (accepted ÷ the run's time plus the wait for the sink's last message), refused
conns/s, p50 and p99, the ratio Palisade / Postfix of the medians and the median of the
per-round ratios, server and driver CPU per 1000, the load average before each run. Raw JSON in
/tmp/palisade-bench/generators-results.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from harness import (  # noqa: E402
    BENCH_ROOT,
    SMTP_SOURCE,
    Gateway,
    Sink,
    Target,
    cpu_s,
    interrupt_on_term,
    log,
    machine_info,
    med,
    ports_taken,
    raise_nofile_limit,
    reap,
    run_child,
    set_subreaper,
    smtp_load,
    stop_all,
    write_results,
)
from harness import fmt as f  # noqa: E402
from loadgen import drive as drive_c  # noqa: E402
from perimeter_dns import BenchDns  # noqa: E402
from postfix_instance import PostfixInstance, perimeter_settings  # noqa: E402

HELO = "client.bench.test"
SENDER = f"load@{HELO}"
RCPT = "rcpt@bench.test"
GOOD = "127.0.0.10-127.0.0.19"
LISTED = "127.0.1.10-127.0.1.19"
POSTFIX_PORT, PALISADE_PORT, SINK_PORT, BASELINE_PORT = 2557, 2555, 2620, 2556
ROOT = BENCH_ROOT / "generators"


def postfix_settings() -> dict[str, str]:
    """Postfix's side of the checks: the perimeter's, HELO and sender verification."""
    return {
        **perimeter_settings("zen.bench.test"),
        "smtpd_helo_required": "yes",
        "smtpd_helo_restrictions": (
            "reject_invalid_helo_hostname, reject_non_fqdn_helo_hostname, "
            "reject_unknown_helo_hostname"
        ),
        "smtpd_sender_restrictions": "reject_non_fqdn_sender, reject_unknown_sender_domain",
    }


def baseline_gateway(config: Path, src: Path) -> Gateway:
    """The same configuration on BASELINE_PORT with its own state, run from another checkout's
    ``src`` (its PYTHONPATH set in the command: the harness puts this checkout's first)."""
    text = config.read_text()
    text = text.replace(f"127.0.0.1:{PALISADE_PORT}", f"127.0.0.1:{BASELINE_PORT}")
    text = text.replace(str(ROOT) + "/", str(ROOT / "baseline") + "/")
    path = ROOT / "baseline.toml"
    ROOT.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    cmd = ["env", f"PYTHONPATH={src}", sys.executable, "-m", "palisade", "serve"]
    cmd += ["--config", str(path)]
    return Gateway(
        path, BASELINE_PORT, cmd, state_root=ROOT / "baseline", logfile=ROOT / "baseline.out"
    )


def drive(gen: str, mode: str, port: int, args: argparse.Namespace, count: int) -> dict:
    """One load run by generator ``gen``; its JSON result plus the driver process's CPU."""
    src = LISTED if mode == "listed" else args.sources
    bound = args.run_bound
    common = ["--port", str(port), "--clients", str(args.clients), "--duration", str(bound)]
    common += ["--source-range", src, "--timeout", "20"]
    if mode == "throughput":
        common += ["--messages", str(count), "--helo", HELO, "--sender", SENDER, "--rcpt", RCPT]
    else:
        common += ["--connections", str(count)]
    if gen == "c":
        return drive_c([mode, *common], bound + 30)
    if gen == "py":
        return smtp_load([mode, *common], bound + 30)
    if gen == "smtp-source":
        if mode == "listed":
            return {"skipped": "smtp-source has no refusal mode"}
        cmd = [SMTP_SOURCE, "-s", str(args.clients), "-m", str(count), "-l", "4096"]
        cmd += ["-M", HELO, "-f", SENDER, "-t", RCPT, f"127.0.0.1:{port}"]
        rc, _out, err, wall, cpu = run_child(cmd, bound)
        ok = rc == 0
        return {
            "driver": "smtp-source",
            "mode": "throughput",
            "accepted": count if ok else 0,
            "msgs_per_s": round(count / wall, 1) if ok else 0.0,
            "errors": 0 if ok else 1,
            "elapsed_s": round(wall, 3),
            "p50_ms": None,
            "p99_ms": None,
            "driver_process_cpu_s": round(cpu, 3),
            **({} if ok else {"failed": f"rc={rc}: {err.strip()[-300:]}"}),
        }
    raise ValueError(f"unknown generator {gen!r}")


def runqueue_wait_s(pids: list[int]) -> float:
    """Seconds these processes (all their threads) have spent runnable but waiting for a CPU
    (/proc/PID/task/TID/schedstat, second field): how starved a server is on a shared machine.
    Processes that exit during a run take theirs with them: exact for Palisade's long-lived
    processes, meaningless for Postfix's (smtpd processes come and go)."""
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return total / 1e9


def measured(gen: str, t: Target, mode: str, args, sink: Sink, dns: BenchDns, count: int) -> dict:
    before = sink.count
    load1 = os.getloadavg()[0]
    q0 = dns.counts()["resolver_queries"]
    cpu0 = cpu_s(t.pids())
    wait0 = runqueue_wait_s(t.pids())
    res = drive(gen, mode, t.port, args, count)
    driven = time.monotonic()
    cpu1 = cpu_s(t.pids())
    wait1 = runqueue_wait_s(t.pids())
    queries = dns.counts()["resolver_queries"] - q0
    res.update(system=t.key, generator=gen, mode=mode, loadavg_1m=round(load1, 2))
    res["server_cpu_s"] = round(cpu1 - cpu0, 2)
    n = res.get("accepted") if mode == "throughput" else res.get("refused")
    res["server_runqueue_wait_s"] = round(wait1 - wait0, 3)
    if n:
        res["server_runqueue_wait_ms_per_tx"] = round((wait1 - wait0) / n * 1000, 3)
        res["dns_queries_per_tx"] = round(queries / n, 3)
        res["server_cpu_per_1k"] = round(res["server_cpu_s"] / n * 1000, 3)
        res["driver_cpu_per_1k"] = round(res.get("driver_process_cpu_s", 0) / n * 1000, 3)
    if mode == "throughput" and "skipped" not in res:
        res["drained"] = sink.wait_for(before + (res.get("accepted") or 0), args.drain_timeout)
        res["relayed_to_sink"] = sink.count - before
        # Accepted and relayed: the load run's time plus how long the sink still waited for the
        # last message once the driver was done. A system that accepts fast by putting delivery
        # off cannot look faster here than it delivers.
        tail = time.monotonic() - driven
        res["drain_tail_s"] = round(tail, 3)
        elapsed = res.get("elapsed_s")
        if res["drained"] and elapsed and res.get("accepted"):
            res["drained_msgs_per_s"] = round(res["accepted"] / (elapsed + tail), 1)
        if t.postfix is not None:
            t.postfix.wait_queue_empty(args.drain_timeout)
    reap()
    return res


def summarize(runs: list[dict], gens: list[str]) -> dict:
    out: dict = {}
    for gen in gens:
        for mode in ("throughput", "drained", "listed"):
            rate = {
                "throughput": "msgs_per_s",
                "drained": "drained_msgs_per_s",
                "listed": "refused_per_s",
            }[mode]
            per: dict = {}
            for system in ("postfix", "palisade", "baseline"):
                rows = [
                    r
                    for r in runs
                    if r["generator"] == gen
                    and r["mode"] == ("throughput" if mode == "drained" else mode)
                    and r["system"] == system
                    and "failed" not in r
                    and "skipped" not in r
                ]
                if not rows:
                    continue
                per[system] = {
                    "rate": [r.get(rate) for r in rows],
                    "rate_med": med([r.get(rate) for r in rows]),
                    "p50_med": med([r.get("p50_ms") for r in rows]),
                    "p99": [r.get("p99_ms") for r in rows],
                    "p99_med": med([r.get("p99_ms") for r in rows]),
                    "errors": sum(r.get("errors", 0) for r in rows),
                    "server_cpu_per_1k": med([r.get("server_cpu_per_1k") for r in rows]),
                    "driver_cpu_per_1k": med([r.get("driver_cpu_per_1k") for r in rows]),
                    "runqueue_wait_ms_per_tx": med(
                        [r.get("server_runqueue_wait_ms_per_tx") for r in rows]
                    ),
                    "loadavg": [r.get("loadavg_1m") for r in rows],
                }
            p = per.get("postfix")
            for system, prefix in (("palisade", ""), ("baseline", "baseline_")):
                g = per.get(system)
                if p is None or g is None:
                    continue
                per[f"{prefix}ratio_of_medians"] = (
                    round(g["rate_med"] / p["rate_med"], 3) if p["rate_med"] else None
                )
                paired = [
                    round(gr / pr, 3) for gr, pr in zip(g["rate"], p["rate"], strict=False) if pr
                ]
                per[f"{prefix}ratios_per_round"] = paired
                per[f"{prefix}ratio_median_per_round"] = med(paired)
            if per:
                out[f"{gen}/{mode}"] = per
    return out


GEN_NAMES = {
    "py": "smtp_load.py (asyncio)",
    "c": "loadgen.c (epoll)",
    "smtp-source": "smtp-source",
}


def render(info: dict, args, summary: dict, gens: list[str]) -> str:
    lines = [
        f"Run {info['date']} on {info['nproc']} x {info['cpu']}, Linux {info['kernel']}, "
        f"Python {info['python']}, Postfix {info['postfix']}.",
        f"{args.clients} concurrent, one transaction per connection, QUIT with the FIN; accepted "
        f"from {args.sources} ({args.messages} per run), refused from {LISTED} ({args.listed} per "
        f"run); PTR + DNSBL + HELO + sender checks on both; {args.rounds} rounds, medians.",
        "",
        "| generator | metric | Postfix | Palisade | ratio (of medians / median per round) "
        "| load avg |",
        "|---|---|---|---|---|---|",
    ]
    worst: dict[str, float] = {}
    for gen in gens:
        for mode, label in (
            ("throughput", "accepted msg/s"),
            ("drained", "accepted and relayed msg/s"),
            ("listed", "refused conns/s"),
        ):
            s = summary.get(f"{gen}/{mode}")
            if not s or "postfix" not in s or "palisade" not in s:
                continue
            p, g = s["postfix"], s["palisade"]

            def runs(x):
                return f"{f(x['rate_med'])} ({', '.join(f(v) for v in x['rate'])})"

            la = [v for v in p["loadavg"] + g["loadavg"] if v is not None]
            lat = f"{min(la):.1f}-{max(la):.1f}" if la else "-"
            lines.append(
                f"| {GEN_NAMES[gen]} | {label} | {runs(p)} | {runs(g)} | "
                f"{f(s['ratio_of_medians'], 'x')} / {f(s['ratio_median_per_round'], 'x')} "
                f"| {lat} |"
            )
            b = s.get("baseline")
            if b is not None:
                lines.append(
                    f"| {GEN_NAMES[gen]} | {label}, baseline ({args.baseline_src or ''} "
                    f"{args.baseline_config or ''}) | | {runs(b)} | "
                    f"{f(s['baseline_ratio_of_medians'], 'x')} / "
                    f"{f(s['baseline_ratio_median_per_round'], 'x')} | |"
                )
                if b["p99_med"] is not None and mode != "drained":
                    lines.append(
                        f"| {GEN_NAMES[gen]} | p50 / p99 ms, baseline | | "
                        f"{f(b['p50_med'])} / {f(b['p99_med'])} | | |"
                    )
            if s["ratio_of_medians"] is not None:
                worst[mode] = min(worst.get(mode, 99.0), s["ratio_of_medians"])
            if mode == "drained":  # the same runs: latencies and CPU are in the accepted rows
                continue
            if p["p99_med"] is not None or g["p99_med"] is not None:
                lines.append(
                    f"| {GEN_NAMES[gen]} | {'accepted' if mode == 'throughput' else 'refused'} "
                    f"p50 / p99 ms | {f(p['p50_med'])} / {f(p['p99_med'])} | "
                    f"{f(g['p50_med'])} / {f(g['p99_med'])} "
                    f"({', '.join(f(v) for v in g['p99'])}) | | |"
                )
            lines.append(
                f"| {GEN_NAMES[gen]} | {label.split()[0]}: server / driver CPU-s per 1000 | "
                f"{f(p['server_cpu_per_1k'])} / {f(p['driver_cpu_per_1k'])} | "
                f"{f(g['server_cpu_per_1k'])} / {f(g['driver_cpu_per_1k'])} | | |"
            )
            lines.append(
                f"| {GEN_NAMES[gen]} | {label.split()[0]}: server processes' wait for a CPU, "
                f"ms per transaction | n/a (smtpd processes exit and take theirs) | "
                f"{f(g['runqueue_wait_ms_per_tx'])} | | |"
            )
    if worst:
        lines += [
            "",
            "Worse generator: accepted "
            + f(worst.get("throughput"), "x")
            + ", accepted and relayed "
            + f(worst.get("drained"), "x")
            + ", refused "
            + f(worst.get("listed"), "x")
            + " (target ≥ 1.5x).",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--generators", default="py,c", help="comma list of py, c, smtp-source")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--sources", default=GOOD, help="clean source addresses FIRST-LAST")
    ap.add_argument("--messages", type=int, default=2000, help="per accepted-mail run")
    ap.add_argument("--listed", type=int, default=3000, help="connections per refusal run")
    ap.add_argument("--warmup", type=int, default=400, help="messages and refusals per system")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ttl", type=int, default=600, help="TTL of every zone record (s)")
    ap.add_argument("--run-bound", type=float, default=30.0, help="seconds per load run")
    ap.add_argument("--drain-timeout", type=float, default=30.0)
    ap.add_argument("--max-seconds", type=float, default=420.0, help="skip runs after this")
    ap.add_argument("--gateway-config", type=Path, default=HERE / "palisade-generators.toml")
    ap.add_argument("--only", default="postfix,palisade", help="systems to run")
    ap.add_argument(
        "--baseline-src",
        type=Path,
        help="also run a Palisade from this src/ directory (e.g. /work/main/src) on 2556, same "
        "configuration, as a third system in every round: before/after in the same run",
    )
    ap.add_argument(
        "--baseline-config",
        type=Path,
        help="the third system's configuration (listen and paths are moved to its own; "
        "default --gateway-config), e.g. another workers count; src: --baseline-src or this one",
    )
    ap.add_argument("--quick", action="store_true", help="small counts to test the harness")
    ap.add_argument("--json", type=Path, default=BENCH_ROOT / "generators-results.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.messages, args.listed, args.warmup, args.rounds = 400, 600, 200, 1
    gens = [g.strip() for g in args.generators.split(",") if g.strip()]
    for g in gens:
        if g not in GEN_NAMES:
            ap.error(f"--generators: unknown generator {g!r} (py, c, smtp-source)")
    if os.geteuid() != 0:
        ap.error("run as root (private Postfix instance, port 53, /etc/resolv.conf)")
    for tool in ("unbound", "unbound-control", "gcc"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} not found: apt-get install -y {tool}")
    if "c" in gens:
        from loadgen import build

        log(f"loadgen.c built: {build()}")

    t_begin = time.monotonic()

    interrupt_on_term()
    raise_nofile_limit()
    set_subreaper()
    ROOT.mkdir(parents=True, exist_ok=True)
    if ports_taken(
        "run_generators.py", [SINK_PORT, POSTFIX_PORT, PALISADE_PORT, BASELINE_PORT, 53]
    ):
        return 2
    systems = [s.strip() for s in args.only.split(",")]
    sink = Sink(SINK_PORT)
    pf = PostfixInstance(
        ROOT / "postfix", port=POSTFIX_PORT, sink_port=SINK_PORT, extra_settings=postfix_settings()
    )
    gw = Gateway(
        args.gateway_config,
        PALISADE_PORT,
        None,
        state_root=ROOT,
        logfile=ROOT / "gateway.out",
    )
    base = None
    if args.baseline_src is not None or args.baseline_config is not None:
        base = baseline_gateway(
            args.baseline_config or args.gateway_config,
            (args.baseline_src or REPO / "src").resolve(),
        )
    results: dict = {"runs": [], "warmup": [], "not_runnable": {}}
    info = machine_info("?")
    try:
        dns = BenchDns(ROOT / "dns", args.ttl)
        dns.zone.set(HELO, "A", ["192.0.2.25"], ttl=args.ttl)
        dns.zone.set(HELO, "MX", [f"10 {HELO}."], ttl=args.ttl)
        with dns:
            try:
                sink.start()
                targets: dict[str, Target] = {}
                if "postfix" in systems:
                    shutil.rmtree(pf.root, ignore_errors=True)
                    pf.start()
                    targets["postfix"] = Target("postfix", "Postfix", pf.port, pf.process_pids, pf)
                    info = machine_info(pf.version())
                if "palisade" in systems:
                    log(f"starting palisade: {' '.join(gw.cmd)}")
                    if gw.start(20):
                        targets["palisade"] = Target("palisade", "Palisade", gw.port, gw.pids)
                    else:
                        results["not_runnable"]["palisade"] = gw.why_not
                        log(f"palisade: not runnable ({gw.why_not})")
                if base is not None:
                    log(f"starting baseline: {' '.join(base.cmd)}")
                    if base.start(20):
                        targets["baseline"] = Target("baseline", "Baseline", base.port, base.pids)
                    else:
                        results["not_runnable"]["baseline"] = base.why_not
                        log(f"baseline: not runnable ({base.why_not})")
                for key, t in targets.items():
                    for mode in ("throughput", "listed"):
                        log(f"warm-up {key} {mode}: {args.warmup}")
                        w = measured(gens[0], t, mode, args, sink, dns, args.warmup)
                        results["warmup"].append(w)
                        if w.get("errors") or "failed" in w:
                            log(f"warm-up {key} {mode}: {w.get('error_kinds')} {w.get('failed')}")
                for rnd in range(args.rounds):
                    order = gens if rnd % 2 == 0 else list(reversed(gens))
                    pair = ["postfix", "palisade", "baseline"]
                    pair = pair[rnd % 3 :] + pair[: rnd % 3]  # each system first once
                    for gen in order:
                        for mode in ("listed", "throughput"):
                            for key in pair:
                                t = targets.get(key)
                                if t is None:
                                    continue
                                if time.monotonic() - t_begin > args.max_seconds:
                                    log("time budget exhausted, skipping the rest")
                                    break
                                n = args.listed if mode == "listed" else args.messages
                                r = measured(gen, t, mode, args, sink, dns, n)
                                r["round"] = rnd
                                results["runs"].append(r)
                                rate = r.get("msgs_per_s", r.get("refused_per_s"))
                                log(
                                    f"round {rnd} {gen:11s} {mode:10s} {key:8s} {rate}/s "
                                    f"p50 {r.get('p50_ms')} p99 {r.get('p99_ms')} ms errors "
                                    f"{r.get('errors')} {r.get('error_kinds') or ''} server CPU "
                                    f"{r.get('server_cpu_s')} s driver CPU "
                                    f"{r.get('driver_process_cpu_s')} s load {r['loadavg_1m']} "
                                    f"dns/tx {r.get('dns_queries_per_tx')} runqueue wait/tx "
                                    f"{r.get('server_runqueue_wait_ms_per_tx')} ms"
                                    + (f" steps {r['step_mean_ms']}" if "step_mean_ms" in r else "")
                                    + (f" FAILED {r['failed']}" if "failed" in r else "")
                                )
            finally:
                log("stopping servers")
                stop_all(gw, base, pf, sink)
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}); everything stopped, /etc/resolv.conf restored")
        return 130
    summary = summarize(results["runs"], gens)
    results["summary"] = summary
    write_results(results, args, info, t_begin, lambda: render(info, args, summary, gens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
