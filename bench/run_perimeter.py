"""Perimeter checks benchmark: Palisade vs. Postfix with PTR + DNSBL + rate limit, same run.

    python bench/run_perimeter.py            # as root, from the repository root; ~2.5 minutes
    python bench/run.py --perimeter          # the same
    python bench/run_perimeter.py --quick    # small counts, to check the harness

What runs (all on 127.0.0.0/8, every loop bounded in count and time):

* DNS (bench/perimeter_dns.py): the zone server of loopback/dnsserver.py on a random loopback
  port, a private unbound on 127.0.0.1:53 (stub zones to the zone server, TTLs --ttl), and
  /etc/resolv.conf pointing at it for the run (restored in a ``finally``, also on SIGTERM).
  Good clients 127.0.0.10-59 (PTR cNN.bench.test, A back, not listed), listed clients
  127.0.1.10-59 (PTR + A too, so that the DNSBL is what refuses them; listed at zen.bench.test
  with 127.0.0.2 and a TXT).
* smtp-sink on 127.0.0.1:2600, shared by everything.
* Four servers, all relaying bench.test to the sink:
    - Postfix with checks (127.0.0.1:2537): bench/postfix_instance.py + perimeter_settings()
      (reject_unknown_reverse_client_hostname, reject_rbl_client zen.bench.test=127.0.0.[2..11],
      smtpd_delay_reject = no, anvil connection rate limit set high);
    - Palisade with checks (127.0.0.1:2535): bench/palisade-perimeter.toml (ratelimit, rdns,
      dnsbl connect rules, [dns] nameservers = 127.0.0.1:53);
    - Postfix without checks (127.0.0.1:2527) and Palisade without checks (127.0.0.1:2525,
      bench/palisade-bench.toml): the existing bench configurations, for the p99 difference.
* Warm-up of every server (good and listed clients through the checks, so both unbound's cache
  and Palisade's in-process caches are warm), then --rounds rounds of
    listed:   Postfix, Palisade  (--listed connections from the listed clients, 20 concurrent)
    accepted: Postfix+checks, Palisade+checks, Postfix, Palisade (order of the with/without pairs
              swapped every other round), --messages each from the good clients.
  DNS counters of unbound (and of the zone server) are read before and after every run.
* A table on stdout, raw JSON in /tmp/palisade-bench/perimeter-results.json, everything stopped.
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
    Gateway,
    Sink,
    Target,
    cpu_s,
    interrupt_on_term,
    log,
    machine_info,
    med,
    own_control_socket,
    ports_taken,
    raise_nofile_limit,
    rate_summary,
    ratio,
    reap,
    run_child,
    set_subreaper,
    smtp_load,
    stop_all,
    time_budget,
    tree_pids,
    write_results,
)
from harness import fmt as f  # noqa: E402
from perimeter_dns import BenchDns  # noqa: E402
from postfix_instance import PostfixInstance, perimeter_settings  # noqa: E402

SENDER = "load@client.example"
RCPT = "rcpt@bench.test"
GOOD_RANGE = "127.0.0.10-127.0.0.59"
LISTED_RANGE = "127.0.1.10-127.0.1.59"


def load(mode: str, port: int, src: str, count: int, clients: int, bound: float) -> dict:
    argv = [mode, "--port", str(port)]
    argv += ["--clients", str(clients), "--duration", str(bound), "--source-range", src]
    argv += ["--timeout", "20"]
    if mode == "throughput":
        argv += ["--messages", str(count), "--sender", SENDER, "--rcpt", RCPT]
    else:
        argv += ["--connections", str(count)]
    return smtp_load(argv, bound + 30)


def measured(
    t: Target, mode: str, args, sink: Sink, dns: BenchDns, unbound_pids, count: int
) -> dict:
    before_sink = sink.count
    c0 = dns.counts()
    cpu0 = cpu_s(t.pids())
    ucpu0 = cpu_s(unbound_pids())
    src = LISTED_RANGE if mode == "listed" else GOOD_RANGE
    res = load(mode, t.port, src, count, args.clients, args.run_bound)
    cpu1 = cpu_s(t.pids())
    ucpu1 = cpu_s(unbound_pids())
    c1 = dns.counts()
    res["system"] = t.key
    res["server_cpu_s"] = round(cpu1 - cpu0, 2)
    res["unbound_cpu_s"] = round(ucpu1 - ucpu0, 2)
    res["dns"] = {k: c1[k] - c0[k] for k in c0}
    n = res.get("accepted") if mode == "throughput" else res.get("refused")
    if n:
        res["dns_queries_per_tx"] = round(res["dns"]["resolver_queries"] / n, 3)
        res["zone_queries_per_tx"] = round(res["dns"]["zone_queries"] / n, 3)
        res["server_cpu_per_1k"] = round(res["server_cpu_s"] / n * 1000, 3)
    if mode == "throughput":
        ok = sink.wait_for(before_sink + (res.get("accepted") or 0), args.drain_timeout)
        res["relayed_to_sink"] = sink.count - before_sink
        res["drained"] = ok
        if t.postfix is not None:
            t.postfix.wait_queue_empty(args.drain_timeout)
    reap()
    return res


def summarize(runs: list[dict], key: str, mode: str) -> dict | None:
    rows = [r for r in runs if r.get("system") == key and r.get("mode") == mode]
    rows = [r for r in rows if "failed" not in r]
    if not rows:
        return None
    rate = "refused_per_s" if mode == "listed" else "msgs_per_s"
    return {
        **rate_summary(rows, rate),
        "errors": sum(r.get("errors", 0) for r in rows),
        "error_kinds": [r.get("error_kinds") for r in rows if r.get("errors")],
        "done": sum((r.get("accepted") or r.get("refused") or 0) for r in rows),
        "relayed": sum(r.get("relayed_to_sink", 0) for r in rows) if mode != "listed" else None,
        "dns_per_tx": [r.get("dns_queries_per_tx") for r in rows],
        "dns_per_tx_med": med([r.get("dns_queries_per_tx") for r in rows]),
        "zone_per_tx_med": med([r.get("zone_queries_per_tx") for r in rows]),
        "dns_types": {
            k: sum(r["dns"][k] for r in rows)
            for k in rows[0]["dns"]
            if k.startswith("resolver_") and k not in ("resolver_queries", "resolver_cache_hits")
        },
        "server_cpu_per_1k": med([r.get("server_cpu_per_1k") for r in rows]),
        "unbound_cpu_s": round(sum(r.get("unbound_cpu_s", 0) for r in rows), 2),
    }


def render(info: dict, args, res: dict) -> str:
    s = res["summary"]
    P, G = s.get("postfix/listed"), s.get("palisade/listed")
    Pc, Gc = s.get("postfix+checks/throughput"), s.get("palisade+checks/throughput")
    P0, G0 = s.get("postfix/throughput"), s.get("palisade/throughput")

    def runs(x):
        return "-" if x is None else f"{f(x['rate_med'])} ({', '.join(f(v) for v in x['rate'])})"

    def g(x, k, unit=""):
        return "-" if x is None else f(x[k], unit)

    def p99s(x):
        if x is None:
            return "-"
        return f"{f(x['p99_ms_med'], ' ms')} ({', '.join(f(v) for v in x['p99_ms'])})"

    lines = [
        f"Run {info['date']} on {info['nproc']} x {info['cpu']}, Linux {info['kernel']}, "
        f"Python {info['python']}, Postfix {info['postfix']}, {res.get('unbound', '?')}.",
        f"{args.clients} concurrent clients; {args.rounds} rounds alternating Postfix/Palisade; "
        f"listed: {args.listed} connections per run from {LISTED_RANGE}; accepted: "
        f"{args.messages} messages per run from {GOOD_RANGE}; DNS TTLs {args.ttl} s, warm caches.",
        "Medians over rounds (each run in brackets). DNS queries = queries unbound received.",
        "",
        "| metric | Postfix | Palisade | Palisade vs Postfix | target |",
        "|---|---|---|---|---|",
    ]
    rr = ratio(G and G["rate_med"], P and P["rate_med"])
    met = "-"
    if G and P and P["rate_med"]:
        met = "met" if G["rate_med"] >= 1.5 * P["rate_med"] else "**not met**"
    lines.append(
        f"| listed clients refused at connect /s | {runs(P)} | {runs(G)} | {rr} | ≥ 1.5x — {met} |"
    )
    lines.append(
        f"| refusal latency p50 / p99 | {g(P, 'p50_ms', ' ms')} / {g(P, 'p99_ms_med', ' ms')} | "
        f"{g(G, 'p50_ms', ' ms')} / {g(G, 'p99_ms_med', ' ms')} | | |"
    )
    lines.append(
        f"| DNS queries per refused connection | {g(P, 'dns_per_tx_med')} | "
        f"{g(G, 'dns_per_tx_med')} | | |"
    )
    lines.append(f"| listed: errors (not refused) | {g(P, 'errors')} | {g(G, 'errors')} | | |")
    lines.append(
        f"| accepted msg/s, checks on | {runs(Pc)} | {runs(Gc)} | "
        f"{ratio(Gc and Gc['rate_med'], Pc and Pc['rate_med'])} | |"
    )
    lines.append(
        f"| accepted msg/s, checks off | {runs(P0)} | {runs(G0)} | "
        f"{ratio(G0 and G0['rate_med'], P0 and P0['rate_med'])} | |"
    )
    lines.append(f"| p50, checks on | {g(Pc, 'p50_ms', ' ms')} | {g(Gc, 'p50_ms', ' ms')} | | |")
    lines.append(f"| p50, checks off | {g(P0, 'p50_ms', ' ms')} | {g(G0, 'p50_ms', ' ms')} | | |")
    lines.append(f"| p99, checks on | {p99s(Pc)} | {p99s(Gc)} | | |")
    lines.append(f"| p99, checks off | {p99s(P0)} | {p99s(G0)} | | |")
    diffs = res.get("p99_added_ms", {})
    pd, gd = diffs.get("postfix"), diffs.get("palisade")

    def dtxt(d):
        if not d:
            return "-"
        return f"{f(med(d), ' ms')} ({', '.join(f(v) for v in d)})"

    met = "-"
    if gd:
        met = "met" if med(gd) <= 5.0 else "**not met**"
    lines.append(
        f"| p99 added by the checks (on - off, per round) | {dtxt(pd)} | {dtxt(gd)} | | "
        f"≤ 5 ms — {met} |"
    )
    met = "-"
    if Gc and Gc["dns_per_tx_med"] is not None:
        met = "met" if Gc["dns_per_tx_med"] <= 4 else "**not met**"
    lines.append(
        f"| DNS queries per accepted transaction, checks on | {g(Pc, 'dns_per_tx_med')} | "
        f"{g(Gc, 'dns_per_tx_med')} | | ≤ 4 — {met} |"
    )
    lines.append(
        f"| … of which reached the zone server (unbound cache misses) | "
        f"{g(Pc, 'zone_per_tx_med')} | {g(Gc, 'zone_per_tx_med')} | | |"
    )
    lines.append(
        f"| DNS queries per accepted transaction, checks off | {g(P0, 'dns_per_tx_med')} | "
        f"{g(G0, 'dns_per_tx_med')} | | |"
    )
    for lab, a, b in (("checks on", Pc, Gc), ("checks off", P0, G0), ("listed", P, G)):
        lines.append(
            f"| server CPU-s per 1000 ({lab}) | {g(a, 'server_cpu_per_1k')} | "
            f"{g(b, 'server_cpu_per_1k')} | "
            f"{ratio(b and b['server_cpu_per_1k'], a and a['server_cpu_per_1k'])} | |"
        )
    lines.append(
        f"| unbound CPU-s, all runs with checks (accepted + listed) | "
        f"{round((Pc or {}).get('unbound_cpu_s', 0) + (P or {}).get('unbound_cpu_s', 0), 2)} | "
        f"{round((Gc or {}).get('unbound_cpu_s', 0) + (G or {}).get('unbound_cpu_s', 0), 2)} | | |"
    )
    lines.append(
        f"| errors / accepted / relayed (checks on) | "
        f"{g(Pc, 'errors')} / {g(Pc, 'done')} / {g(Pc, 'relayed')} | "
        f"{g(Gc, 'errors')} / {g(Gc, 'done')} / {g(Gc, 'relayed')} | | |"
    )
    lines.append(
        f"| errors / accepted / relayed (checks off) | "
        f"{g(P0, 'errors')} / {g(P0, 'done')} / {g(P0, 'relayed')} | "
        f"{g(G0, 'errors')} / {g(G0, 'done')} / {g(G0, 'relayed')} | | |"
    )
    types = []
    for lab, x in (("Postfix+checks", Pc), ("Palisade+checks", Gc), ("Postfix listed", P)):
        if x:
            t = ", ".join(f"{k.removeprefix('resolver_')} {v}" for k, v in x["dns_types"].items())
            types.append(f"{lab}: {t}")
    if types:
        lines += ["", "DNS queries by type, summed over runs: " + "; ".join(types) + "."]
    for k, why in res.get("not_runnable", {}).items():
        lines += ["", f"{k}: not runnable ({why})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--messages", type=int, default=3000, help="per accepted-mail run")
    ap.add_argument("--listed", type=int, default=5000, help="connections per listed run")
    ap.add_argument("--warmup", type=int, default=1000, help="per server with checks")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ttl", type=int, default=600, help="TTL of every zone record (s)")
    ap.add_argument("--run-bound", type=float, default=30.0, help="seconds per load run")
    ap.add_argument("--drain-timeout", type=float, default=30.0)
    ap.add_argument("--max-seconds", type=float, default=300.0, help="skip runs after this")
    ap.add_argument("--gateway-start-timeout", type=float, default=20.0)
    ap.add_argument("--sink-port", type=int, default=2600)
    ap.add_argument("--quick", action="store_true", help="small counts to test the harness")
    ap.add_argument("--json", type=Path, default=BENCH_ROOT / "perimeter-results.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.messages, args.listed, args.warmup, args.rounds = 500, 1000, 400, 1
    if os.geteuid() != 0:
        ap.error("run as root (private Postfix instances, port 53, /etc/resolv.conf)")
    for tool in ("unbound", "unbound-control", "unbound-checkconf"):
        if shutil.which(tool) is None:
            ap.error(
                f"{tool} not found: apt-get install -y unbound (it is not started as a service)"
            )

    t_begin = time.monotonic()
    time_left = time_budget(t_begin, args.max_seconds)

    interrupt_on_term()
    raise_nofile_limit()
    set_subreaper()
    BENCH_ROOT.mkdir(parents=True, exist_ok=True)
    if ports_taken("run_perimeter.py", [args.sink_port, 2537, 2527, 2535, 2525]):
        return 2

    sink = Sink(args.sink_port)
    pf_chk = PostfixInstance(
        BENCH_ROOT / "postfix-perimeter",
        port=2537,
        sink_port=args.sink_port,
        extra_settings=perimeter_settings("zen.bench.test"),
    )
    pf_off = PostfixInstance(BENCH_ROOT / "postfix", port=2527, sink_port=args.sink_port)
    chk_config = BENCH_ROOT / "palisade-perimeter.toml"  # its own control socket
    chk_text = (HERE / "palisade-perimeter.toml").read_text()
    chk_config.write_text(own_control_socket(chk_text, BENCH_ROOT / "perimeter" / "control.sock"))
    gw_chk = Gateway(
        chk_config,
        2535,
        None,
        state_root=BENCH_ROOT / "perimeter",
        logfile=BENCH_ROOT / "gateway-perimeter.out",
    )
    gw_off = Gateway(HERE / "palisade-bench.toml", 2525, None)
    results: dict = {"runs": [], "warmup": [], "summary": {}, "not_runnable": {}}
    info = machine_info("?")
    unbound_version = "unbound ?"
    try:
        with BenchDns(BENCH_ROOT / "dns", args.ttl) as dns:
            uproc = dns.unbound.proc

            def unbound_pids() -> list[int]:
                return tree_pids(uproc.pid) if uproc and uproc.poll() is None else []

            ver = run_child(["unbound", "-V"], 10)[1].splitlines()
            unbound_version = f"unbound {ver[0].split()[-1]}" if ver else unbound_version
            results["unbound"] = unbound_version
            log(f"DNS: zone server 127.0.0.1:{dns.zone.port}, unbound 127.0.0.1:53, resolv.conf")
            try:
                log(f"starting smtp-sink on 127.0.0.1:{args.sink_port}")
                sink.start()
                targets: dict[str, Target] = {}
                for key, pf in (("postfix+checks", pf_chk), ("postfix", pf_off)):
                    log(f"starting {key} on 127.0.0.1:{pf.port} ({pf.root})")
                    shutil.rmtree(pf.root, ignore_errors=True)
                    pf.start()
                    targets[key] = Target(key, key, pf.port, pf.process_pids, pf)
                info = machine_info(pf_chk.version())
                for key, gw in (("palisade+checks", gw_chk), ("palisade", gw_off)):
                    log(f"starting {key}: {' '.join(gw.cmd)}")
                    if gw.start(args.gateway_start_timeout):
                        targets[key] = Target(key, key, gw.port, gw.pids)
                    else:
                        results["not_runnable"][key] = gw.why_not
                        log(f"{key}: not runnable ({gw.why_not})")

                # Warm-up: every client address through each server with checks (fills
                # unbound's cache and each Palisade worker's cache), a little for the others.
                for key in ("postfix+checks", "palisade+checks", "postfix", "palisade"):
                    t = targets.get(key)
                    if t is None:
                        continue
                    n = args.warmup if "checks" in key else max(200, args.warmup // 4)
                    log(f"warm-up {key}: {n} messages")
                    w = measured(t, "throughput", args, sink, dns, unbound_pids, n)
                    results["warmup"].append(w)
                    if "checks" in key:
                        log(f"warm-up {key}: {n} listed connections")
                        w = measured(t, "listed", args, sink, dns, unbound_pids, n)
                        results["warmup"].append(w)
                time.sleep(1)

                for rnd in range(args.rounds):
                    order = [("listed", "postfix+checks"), ("listed", "palisade+checks")]
                    pairs = [("postfix+checks", "palisade+checks"), ("postfix", "palisade")]
                    if rnd % 2:
                        pairs.reverse()
                    order += [("throughput", k) for pair in pairs for k in pair]
                    for mode, key in order:
                        t = targets.get(key)
                        if t is None:
                            continue
                        if not time_left():
                            log("time budget exhausted, skipping the rest of the runs")
                            break
                        n = args.listed if mode == "listed" else args.messages
                        r = measured(t, mode, args, sink, dns, unbound_pids, n)
                        r["round"] = rnd
                        results["runs"].append(r)
                        rate = r.get("refused_per_s") if mode == "listed" else r.get("msgs_per_s")
                        log(
                            f"round {rnd} {mode:10s} {key:16s} {rate}/s p50 {r.get('p50_ms')} "
                            f"p99 {r.get('p99_ms')} ms errors {r.get('errors')} "
                            f"{r.get('error_kinds') or ''} dns/tx {r.get('dns_queries_per_tx')} "
                            f"(zone {r.get('zone_queries_per_tx')}) server CPU "
                            f"{r.get('server_cpu_s')} s unbound CPU {r.get('unbound_cpu_s')} s"
                            + (f" FAILED {r['failed']}" if "failed" in r else "")
                        )
            finally:
                log("stopping servers")
                stop_all(gw_chk, gw_off, pf_chk, pf_off, sink)
        log("DNS stopped, /etc/resolv.conf restored")
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}); everything stopped, /etc/resolv.conf restored")
        return 130

    runs = results["runs"]
    for key in ("postfix", "palisade", "postfix+checks", "palisade+checks"):
        for mode in ("listed", "throughput"):
            sm = summarize(runs, key, mode)
            if sm is not None:
                base = key.removesuffix("+checks") if mode == "listed" else key
                results["summary"][f"{base}/{mode}"] = sm
    added: dict[str, list[float]] = {}
    for sysname in ("postfix", "palisade"):
        for rnd in range(args.rounds):
            on = [
                r
                for r in runs
                if r.get("system") == f"{sysname}+checks"
                and r.get("mode") == "throughput"
                and r.get("round") == rnd
                and r.get("p99_ms") is not None
            ]
            off = [
                r
                for r in runs
                if r.get("system") == sysname
                and r.get("mode") == "throughput"
                and r.get("round") == rnd
                and r.get("p99_ms") is not None
            ]
            if on and off:
                added.setdefault(sysname, []).append(round(on[0]["p99_ms"] - off[0]["p99_ms"], 2))
    results["p99_added_ms"] = added
    write_results(results, args, info, t_begin, lambda: render(info, args, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
