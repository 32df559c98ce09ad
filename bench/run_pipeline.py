"""The whole pipeline, Palisade against Postfix with the same rspamd as a milter.

    python bench/run_pipeline.py            # as root, from the repository root; <= 5 minutes
    python bench/run_pipeline.py --quick    # small counts, to check the harness (~1.5 min)

Both systems do the seed configuration's checks on every message, in the same run, on the same
messages, alternated (P, G, G, P, P, G ...), medians of --rounds (3):

* perimeter: reverse DNS (PTR + forward A) and the DNSBL at connect, a botnet HELO pattern, a
  botnet sender pattern and sender-domain verification (MX or A) at MAIL;
* SPF, DKIM, DMARC (the sender domain publishes ``p=reject``, enforced by both);
* rspamd (Debian's 3.4, stock rules, network lists off: bench/pipeline_scanners.py) with
  tag/"add header" 6 and kill/"reject" 15;
* clamd with the EICAR test signature only (no official database offline).

Palisade (``bench/palisade-pipeline.toml``, the seed rules that apply here): its own perimeter
rules and ``[authentication]`` (SPF, DKIM, DMARC in-process), ``[rspamd]`` = rspamd's normal
worker over HTTP, ``[clamd]`` = clamd over TCP; the scans run concurrently (DATA findings).
Postfix (bench/postfix_instance.py): ``smtpd_client_restrictions =
reject_unknown_reverse_client_hostname, reject_rbl_client``, ``check_helo_access`` and
``check_sender_access`` regexp tables + ``reject_unknown_sender_domain``, and ``smtpd_milters``
= rspamd's proxy worker in milter mode (``milter_default_action = tempfail``,
``milter_protocol = 6``); rspamd does SPF, DKIM and DMARC for Postfix (its spf/dkim/dmarc
modules, DMARC reject enforced) and calls clamd through its antivirus module (whole message,
once, as Palisade does; a virus forces reject). rspamd's own SPF/DKIM/DMARC and antivirus are
skipped for Palisade's requests (a settings rule matching ``User-Agent: palisade``): Palisade
does both itself, so neither side verifies or scans twice.

DNS: bench/perimeter_dns.py's zone server (bench.test, zen.bench.test, 127.in-addr.arpa, plus the
sender domains' SPF, DKIM key, DMARC, MX and A records) behind a private unbound on
127.0.2.53:53. The harness runs in its own mount namespace (``unshare -m``, re-executed
automatically) where /etc/resolv.conf is a bind mount saying ``nameserver 127.0.2.53``: Postfix's
libc resolver uses it, the machine's /etc/resolv.conf and 127.0.0.1:53 are never touched (other
benchmarks may use them at the same time). Palisade and rspamd are pointed at 127.0.2.53:53.

Load: bench/smtp_load.py, --clients concurrent, one transaction per connection from
127.0.0.10-59 (PTR + A, not listed), the message mix in turn (bench/pipeline_messages.py: 20
messages, 18 legitimate, most DKIM-signed, two of them spammy; GTUBE and EICAR, refused by
both). "accepted msg/s" counts the 250s; the refusals of GTUBE and EICAR are counted and checked.
Every port is a free one (nothing fixed, so it runs beside the other benchmarks).

CPU: server (Palisade's process tree; Postfix's master and children), rspamd (all workers),
clamd, per 1000 accepted messages. rspamd's own scan time: ``/stat``'s scan count and the
rspamd CPU per scan. Afterwards one unmeasured run of Palisade with ``py-spy record --gil``,
summarised by component (--no-profile to skip).

Raw numbers: /tmp/palisade-pipeline/results.json; a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from harness import (  # noqa: E402
    Gateway,
    Sink,
    Target,
    busy_samples,
    cpu_s,
    free_port,
    interrupt_on_term,
    log,
    machine_info,
    med,
    rate_summary,
    reap,
    run_child,
    set_subreaper,
    shares_pct,
    smtp_load,
    start_py_spy,
    stop_all,
    stop_py_spy,
    time_budget,
    write_results,
)
from harness import fmt as f  # noqa: E402
from perimeter_dns import BenchDns  # noqa: E402
from pipeline_messages import HELO, RCPT, SENDER, add_records, write_mix  # noqa: E402
from pipeline_scanners import Clamd, Rspamd  # noqa: E402
from postfix_instance import PostfixInstance, perimeter_settings  # noqa: E402

ROOT = Path("/tmp/palisade-pipeline")
DNS_ADDR = "127.0.2.53"
NS_ENV = "PALISADE_PIPELINE_NAMESPACE"
SOURCES = "127.0.0.10-127.0.0.59"
# Measured systems, in the order of a round (reversed every other round).
SYSTEMS = ("postfix+rspamd", "palisade+rspamd", "postfix", "palisade")
LABELS = {
    "postfix+rspamd": "Postfix + rspamd milter (+ clamd via rspamd)",
    "palisade+rspamd": "Palisade + SPF/DKIM/DMARC + rspamd + clamd",
    "postfix": "Postfix, perimeter only (no milter)",
    "palisade": "Palisade, perimeter only (no content checks)",
}
PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


# --------------------------------------------------------------------------------------
# The mount namespace with its own /etc/resolv.conf


def enter_namespace(argv: list[str]) -> int | None:
    """Re-executes this script under ``unshare -m`` (private mounts) unless already there;
    returns the child's exit code, or None when this process is the one inside."""
    if os.environ.get(NS_ENV) == "1":
        return None
    env = dict(os.environ, **{NS_ENV: "1"})
    cmd = ["unshare", "--mount", "--propagation", "private", sys.executable, __file__, *argv]
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        return proc.wait()


def private_resolv_conf() -> None:
    """/etc/resolv.conf -> ``nameserver 127.0.2.53``, in this mount namespace only."""
    path = ROOT / "resolv.conf"
    path.write_text(f"# palisade pipeline bench (private mount)\nnameserver {DNS_ADDR}\n")
    subprocess.run(["mount", "--bind", str(path), "/etc/resolv.conf"], check=True)


# --------------------------------------------------------------------------------------
# The two systems


POSTFIX_MILTER = {
    "milter_default_action": "tempfail",
    "milter_protocol": "6",
    "milter_mail_macros": "i {mail_addr} {client_addr} {client_name} {auth_authen}",
}


def postfix_settings(root: Path, milter_port: int) -> dict[str, str]:
    """The seed's perimeter checks in Postfix terms, plus rspamd as the milter."""
    helo_map = root / "helo.regexp"
    sender_map = root / "sender.regexp"
    root.mkdir(parents=True, exist_ok=True)
    helo_map.write_text("/^ylmf-pc$/ REJECT Access denied\n")
    sender_map.write_text("/^Anastasia.{2,5}@/ REJECT Access denied\n")
    settings = perimeter_settings("zen.bench.test")
    settings.update(
        {
            "smtpd_helo_required": "yes",
            "smtpd_helo_restrictions": f"check_helo_access regexp:{helo_map}",
            "smtpd_sender_restrictions": (
                f"check_sender_access regexp:{sender_map}, reject_unknown_sender_domain"
            ),
            "smtpd_milters": f"inet:127.0.0.1:{milter_port}",
            **POSTFIX_MILTER,
        }
    )
    return settings


def palisade_config(
    name: str, port: int, sink_port: int, rspamd: Rspamd, clamd: Clamd, content: bool = True
) -> Path:
    """bench/palisade-pipeline.toml filled in; without ``content`` the sections and rules
    between ``# >>> content`` and ``# <<< content`` are left out (the perimeter only)."""
    text = (HERE / "palisade-pipeline.toml").read_text()
    if not content:
        text = re.sub(r"# >>> content.*?# <<< content\n", "", text, flags=re.S)
    for key, value in {
        "@LISTEN@": f"127.0.0.1:{port}",
        "@SINK@": f"127.0.0.1:{sink_port}",
        "@STATE@": str(ROOT / name),
        "@DNS@": f"{DNS_ADDR}:53",
        "@RSPAMD@": rspamd.url,
        "@CLAMD@": clamd.address,
    }.items():
        text = text.replace(key, value)
    path = ROOT / f"{name}.toml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------
# Measured runs


def load(port: int, files: list[Path], n: int, clients: int, bound: float) -> dict:
    argv = ["throughput", "--port", str(port)]
    argv += ["--clients", str(clients), "--messages", str(n), "--duration", str(bound)]
    argv += ["--timeout", "40", "--sender", SENDER, "--rcpt", RCPT, "--helo", HELO]
    argv += ["--source-range", SOURCES]
    for file in files:
        argv += ["--message-file", str(file)]
    return smtp_load(argv, bound + 60, failed={"accepted": 0})


def refusals(res: dict) -> tuple[int, int]:
    """(refused after the final dot with 5xx, other errors)."""
    kinds = res.get("error_kinds") or {}
    refused = sum(v for k, v in kinds.items() if re.fullmatch(r"reply 5\d\d at step 5", k))
    return refused, sum(kinds.values()) - refused


def measured(t: Target, args, sink: Sink, rspamd: Rspamd, clamd: Clamd, files, n: int) -> dict:
    before_sink = sink.count
    scanned0 = rspamd.stat().get("scanned", 0)
    cpu0, rcpu0, ccpu0 = cpu_s(t.pids()), cpu_s(rspamd.pids()), cpu_s(clamd.pids())
    load0 = os.getloadavg()[0]
    res = load(t.port, files, n, args.clients, args.run_bound)
    cpu1, rcpu1, ccpu1 = cpu_s(t.pids()), cpu_s(rspamd.pids()), cpu_s(clamd.pids())
    scanned = rspamd.stat().get("scanned", 0) - scanned0
    res["system"] = t.key
    res["load_avg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    res["server_cpu_s"] = round(cpu1 - cpu0, 2)
    res["rspamd_cpu_s"] = round(rcpu1 - rcpu0, 2)
    res["clamd_cpu_s"] = round(ccpu1 - ccpu0, 2)
    res["rspamd_scans"] = scanned
    res["refused"], res["other_errors"] = refusals(res)
    acc = res.get("accepted") or 0
    done = acc + res["refused"]
    if acc:
        for k in ("server", "rspamd", "clamd"):
            res[f"{k}_cpu_ms_per_msg"] = round(res[f"{k}_cpu_s"] / done * 1000, 2)
    if scanned:
        res["rspamd_cpu_ms_per_scan"] = round(res["rspamd_cpu_s"] / scanned * 1000, 2)
    res["drained"] = sink.wait_for(before_sink + acc, args.drain_timeout)
    res["relayed_to_sink"] = sink.count - before_sink
    if t.postfix is not None:
        t.postfix.wait_queue_empty(args.drain_timeout)
    reap()
    return res


def describe(r: dict) -> str:
    return (
        f"{r.get('msgs_per_s')}/s p50 {r.get('p50_ms')} p99 {r.get('p99_ms')} ms refused "
        f"{r['refused']} other {r['other_errors']} {r.get('error_kinds') or ''} CPU ms/msg "
        f"server {r.get('server_cpu_ms_per_msg')} rspamd {r.get('rspamd_cpu_ms_per_msg')} "
        f"clamd {r.get('clamd_cpu_ms_per_msg')} rspamd scans {r.get('rspamd_scans')} "
        f"load {r['load_avg_1m']}"
    )


def summarize(runs: list[dict], key: str) -> dict | None:
    rows = [r for r in runs if r.get("system") == key and "failed" not in r]
    if not rows:
        return None
    out: dict = {
        **rate_summary(rows, "msgs_per_s"),
        "accepted": sum(r.get("accepted") or 0 for r in rows),
        "refused": sum(r["refused"] for r in rows),
        "other_errors": sum(r["other_errors"] for r in rows),
        "error_kinds": [r.get("error_kinds") for r in rows if r.get("other_errors")],
        "relayed": sum(r.get("relayed_to_sink", 0) for r in rows),
        "load_avg_1m": [r["load_avg_1m"] for r in rows],
    }
    for k in ("server", "rspamd", "clamd"):
        out[f"{k}_cpu_ms_per_msg"] = med([r.get(f"{k}_cpu_ms_per_msg") for r in rows])
    out["rspamd_cpu_ms_per_scan"] = med([r.get("rspamd_cpu_ms_per_scan") for r in rows])
    out["rspamd_scans_per_msg"] = med(
        [r["rspamd_scans"] / max(1, r["accepted"] + r["refused"]) for r in rows]
    )
    return out


# --------------------------------------------------------------------------------------
# Profile (py-spy) of Palisade during one extra run


AREAS = (
    ("dkimpy (DKIM verify)", ("dkim/",)),
    ("pyspf", ("spf.py",)),
    ("DNS (dnspython, adapters/dns)", ("dns/", "palisade/adapters/dns")),
    ("publicsuffixlist", ("publicsuffixlist/",)),
    ("auth checks", ("checks/spf", "checks/dkim", "checks/dmarc", "checks/authres")),
    ("rspamd client", ("palisade/adapters/rspamd",)),
    ("clamd client", ("palisade/adapters/clamd",)),
    ("scanner I/O (spool read, send)", ("palisade/adapters/scanner_io",)),
    ("policy engine + perimeter checks", ("palisade/policy/",)),
    ("spool (write, fsync)", ("palisade/spool/",)),
    ("relay to the next hop", ("palisade/delivery/",)),
    ("SMTP session / conversation", ("palisade/server/", "palisade/smtp/", "conversation/")),
    ("logging + metrics", ("palisade/obs/",)),
    ("asyncio / uvloop", ("asyncio/", "uvloop/")),
)
IDLE = ("_worker (concurrent/futures/thread.py)", "wait (threading.py)")


def profile(gw: Gateway, port: int, files, n: int, args) -> dict:
    out = ROOT / "profile.txt"
    if gw.proc is None or not Path(PY_SPY).exists():
        return {"skipped": "no py-spy"}
    spy = start_py_spy(PY_SPY, gw.proc.pid, out, args.profile_rate, subprocess.DEVNULL)
    time.sleep(1.5)
    res = load(port, files, n, args.clients, args.run_bound)
    stop_py_spy(spy)
    areas: dict[str, int] = {}
    total = 0
    if out.exists():
        areas, total, _idle, _inclusive = busy_samples(out, AREAS, IDLE)
    acc = (res.get("accepted") or 0) + refusals(res)[0]
    return {
        "messages": acc,
        "samples": total,
        # Samples of a thread holding the GIL: on a CPU-starved machine a thread that holds it
        # while descheduled is counted too, so the shares are the figure, not the sum.
        "share_pct": shares_pct(areas, total),
    }


# --------------------------------------------------------------------------------------
# Output


def render(info: dict, args, res: dict) -> str:
    s = res["summary"]
    pf, gw = s.get("postfix+rspamd"), s.get("palisade+rspamd")
    bare = s.get("palisade")
    lines = [
        f"Run {info['date']} on {info['nproc']} x {info['cpu']}, Linux {info['kernel']}, "
        f"Python {info['python']}, Postfix {info['postfix']}, rspamd {res.get('rspamd')}, "
        f"clamd {res.get('clamd')}; load average before/after each run in the JSON "
        f"(range {res.get('load_range')}).",
        f"{args.clients} concurrent clients, one transaction per connection from {SOURCES}, the "
        f"{res.get('mix')}-message mix in turn; {args.rounds} round(s) alternated, "
        f"{args.messages} messages per run (bounded to {args.run_bound:g} s). Medians (runs).",
        "",
        "| system | accepted msg/s | ÷ Postfix | p50 | p99 | server CPU ms/msg | "
        "rspamd CPU ms/msg | rspamd scans/msg | clamd CPU ms/msg | refused (GTUBE, EICAR) | "
        "other errors | relayed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in SYSTEMS:
        label, x = LABELS[key], s.get(key)
        if x is None and key not in ("postfix+rspamd", "palisade+rspamd"):
            continue
        if x is None:
            lines.append(f"| {label} | no runs | | | | | | | | | | |")
            continue
        base = pf if key.endswith("+rspamd") else s.get("postfix")
        ratio = f"{x['rate_med'] / base['rate_med']:.2f}x" if base and base["rate_med"] else "-"
        lines.append(
            f"| {label} | {f(x['rate_med'])} ({', '.join(f(v) for v in x['rate'])}) | {ratio} | "
            f"{f(x['p50_ms'], ' ms')} | {f(x['p99_ms_med'], ' ms')} "
            f"({', '.join(f(v) for v in x['p99_ms'])}) | {f(x['server_cpu_ms_per_msg'])} | "
            f"{f(x['rspamd_cpu_ms_per_msg'])} | {f(x['rspamd_scans_per_msg'])} | "
            f"{f(x['clamd_cpu_ms_per_msg'])} | {x['refused']} | {x['other_errors']} | "
            f"{x['relayed']}/{x['accepted']} |"
        )
    lines += [
        "",
        "÷ Postfix: the content rows against Postfix + milter, the perimeter-only rows against "
        "Postfix perimeter-only. CPU per message handled (accepted + refused).",
    ]
    if gw and bare and gw["server_cpu_ms_per_msg"] and bare["server_cpu_ms_per_msg"]:
        extra = gw["server_cpu_ms_per_msg"] - bare["server_cpu_ms_per_msg"]
        lines.append(
            f"Palisade's content pipeline (SPF/DKIM/DMARC, both scanner clients, the headers) "
            f"costs it {extra:.2f} ms CPU per message beyond the perimeter-only gateway; "
            f"rspamd's own CPU per scan of Palisade's requests: "
            f"{f(gw['rspamd_cpu_ms_per_scan'])} ms (Postfix's milter requests, incl. the proxy "
            f"and rspamd's SPF/DKIM/DMARC: {f(pf and pf['rspamd_cpu_ms_per_scan'])} ms)."
        )
    prof = res.get("profile") or {}
    if prof.get("share_pct"):
        cpu = gw["server_cpu_ms_per_msg"] if gw else None
        parts = ", ".join(
            f"{k} {v}%" + (f" ({v * cpu / 100:.2f} ms)" if cpu else "")
            for k, v in prof["share_pct"].items()
        )
        lines += [
            "",
            "Palisade + content, where its CPU goes (py-spy --gil samples by component, share; "
            f"ms = share x the measured server CPU per message): {parts}.",
        ]
    for k, why in res.get("not_runnable", {}).items():
        lines += ["", f"{k}: not runnable ({why})"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--messages", type=int, default=1200, help="per measured run")
    ap.add_argument("--warmup", type=int, default=300, help="per system")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ttl", type=int, default=600)
    ap.add_argument("--run-bound", type=float, default=25.0, help="seconds per load run")
    ap.add_argument("--drain-timeout", type=float, default=30.0)
    ap.add_argument("--max-seconds", type=float, default=280.0, help="skip runs after this")
    ap.add_argument("--rspamd-workers", type=int, default=2, help="rspamd normal workers")
    ap.add_argument("--clamd-threads", type=int, default=4)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument(
        "--no-breakdown",
        dest="breakdown",
        action="store_false",
        help="skip the perimeter-only rows (both systems without content checks)",
    )
    ap.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second")
    ap.add_argument(
        "--rspamd-log",
        default="warning",
        help='"info": every scan and its symbols in the log (and clamd logs every scan)',
    )
    ap.add_argument("--quick", action="store_true", help="small counts to test the harness")
    ap.add_argument("--json", type=Path, default=ROOT / "results.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.messages, args.warmup, args.rounds = 300, 100, 1
    if os.geteuid() != 0:
        ap.error("run as root (private Postfix, a mount namespace for /etc/resolv.conf)")
    for tool in ("unbound", "unshare", "rspamd", "clamd", "smtp-sink"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            ap.error(f"{tool} not found (Debian packages: unbound rspamd clamav-daemon postfix)")
    rc = enter_namespace(argv)
    if rc is not None:
        return rc

    t_begin = time.monotonic()
    time_left = time_budget(t_begin, args.max_seconds)

    interrupt_on_term()
    set_subreaper()
    shutil.rmtree(ROOT, ignore_errors=True)
    ROOT.mkdir(parents=True)
    private_resolv_conf()

    files, pubkey = write_mix(ROOT / "messages")
    sink_port, pf_port, gw_port = free_port(), free_port(), free_port()
    sink = Sink(sink_port)
    clamd = Clamd(ROOT / "clamd", args.clamd_threads, args.rspamd_log == "info")
    rspamd = Rspamd(
        ROOT / "rspamd",
        f"{DNS_ADDR}:53",
        clamd.port,
        count=args.rspamd_workers,
        log_level=args.rspamd_log,
    )
    pf = PostfixInstance(
        ROOT / "postfix",
        port=pf_port,
        sink_port=sink_port,
        extra_settings=postfix_settings(ROOT / "maps", rspamd.milter_port),
    )
    gw = Gateway(
        ROOT / "palisade.toml",
        gw_port,
        None,
        state_root=ROOT / "palisade",
        logfile=ROOT / "palisade.out",
    )
    # The breakdown rows: the same perimeter checks, no content checks (no milter; no
    # [authentication], rspamd, clamd), to tell the content pipeline's cost from the rest.
    pf0_port, gw0_port = free_port(), free_port()
    pf0_settings = postfix_settings(ROOT / "maps", rspamd.milter_port)
    for k in ("smtpd_milters", *POSTFIX_MILTER):
        pf0_settings.pop(k)
    pf0 = PostfixInstance(
        ROOT / "postfix-perimeter", port=pf0_port, sink_port=sink_port, extra_settings=pf0_settings
    )
    gw0 = Gateway(
        ROOT / "palisade-perimeter.toml",
        gw0_port,
        None,
        state_root=ROOT / "palisade-perimeter",
        logfile=ROOT / "palisade-perimeter.out",
    )
    results: dict = {"runs": [], "warmup": [], "summary": {}, "not_runnable": {}}
    info = machine_info("?")
    try:
        dns = BenchDns(ROOT / "dns", args.ttl, swap_resolv_conf=False, interface=DNS_ADDR)
        add_records(dns.zone, pubkey, args.ttl)
        with dns:
            log(f"DNS: zone server 127.0.0.1:{dns.zone.port}, unbound {DNS_ADDR}:53")
            try:
                sink.start()
                clamd.start()
                log(f"clamd on {clamd.address}; starting rspamd")
                rspamd.start()
                log(f"rspamd: normal {rspamd.port}, milter proxy {rspamd.milter_port}")
                pf.start()
                info = machine_info(pf.version())
                results["rspamd"] = run_child(["rspamd", "--version"], 20)[1].split()[-1:]
                results["clamd"] = run_child(["clamd", "--version"], 20)[1].strip()
                palisade_config("palisade", gw_port, sink_port, rspamd, clamd)
                targets = {
                    "postfix+rspamd": Target("postfix+rspamd", "P", pf_port, pf.process_pids, pf)
                }
                gateways = [("palisade+rspamd", gw)]
                if args.breakdown:
                    pf0.start()
                    targets["postfix"] = Target("postfix", "P0", pf0_port, pf0.process_pids, pf0)
                    palisade_config(
                        "palisade-perimeter", gw0_port, sink_port, rspamd, clamd, content=False
                    )
                    gateways.append(("palisade", gw0))
                for key, g in gateways:
                    if g.start(40):
                        targets[key] = Target(key, key, g.port, g.pids)
                    else:
                        results["not_runnable"][key] = g.why_not
                        log(f"{key}: not runnable ({g.why_not})")
                results["mix"] = len(files)
                for key, t in targets.items():
                    log(f"warm-up {key}: {args.warmup} messages")
                    w = measured(t, args, sink, rspamd, clamd, files, args.warmup)
                    results["warmup"].append(w)
                    log(f"warm-up {key}: {describe(w)}")
                order = [k for k in SYSTEMS if k in targets]
                for rnd in range(args.rounds):
                    for key in order if rnd % 2 == 0 else reversed(order):
                        if not time_left():
                            log("time budget exhausted, skipping the rest of the runs")
                            break
                        r = measured(targets[key], args, sink, rspamd, clamd, files, args.messages)
                        r["round"] = rnd
                        results["runs"].append(r)
                        log(f"round {rnd} {key:16s} {describe(r)}")
                if not args.no_profile and "palisade+rspamd" in targets and time_left():
                    log("profiling Palisade (py-spy, one extra run)")
                    results["profile"] = profile(gw, gw_port, files, args.messages, args)
            finally:
                log("stopping")
                stop_all(gw, gw0, pf, pf0, rspamd, clamd, sink)
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}); everything stopped")
        return 130
    for key in SYSTEMS:
        sm = summarize(results["runs"], key)
        if sm is not None:
            results["summary"][key] = sm
    loads = [x for r in results["runs"] for x in r["load_avg_1m"]]
    results["load_range"] = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "?"
    write_results(results, args, info, t_begin, lambda: render(info, args, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
