"""What recording incidents costs on the refusal path: refusals per second with and without.

Two Palisade gateways, the same but for one setting, run side by side in one run:

* ``off`` (127.0.0.1:2545): a connect rule ``ip_list`` (127.0.1.0/24) ``verb = "deny"``,
  ``incident = 0``: refused, nothing recorded;
* ``on``  (127.0.0.1:2546): the same rule with ``incident = 1``: every refusal writes one
  incident into the state database (``[incidents] protect_loopback = false`` so that the
  127.0.1.x clients are not protected, ``block_at`` out of reach so that nobody is blocked and
  every connection is refused by the rule, as in a flood).

Both: ``workers`` worker processes (default 2), no DNS, no other rule. The listed-clients driver
of bench/smtp_load.py (``listed`` mode: connect, read the refusal, QUIT) connects from
127.0.1.10-59 (50 incident keys), ``--clients`` at a time, ``--connections`` per run; the runs
alternate off/on (the order swapped every other round) for ``--rounds`` rounds. Afterwards the
``on`` gateway's incidents are counted in its database (each refusal must be there once the
recorder has drained). Prints a table; raw JSON with ``--json FILE``::

    python bench/incident_bench.py [--rounds 3] [--connections 20000] [--clients 20]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import (  # noqa: E402
    BENCH_ROOT,
    Gateway,
    add_pair_args,
    cpu_s,
    drive_listed,
    log,
    machine_info,
    median_of,
    pair_config,
    ports_taken,
    start_gateway,
)

SOURCES = "127.0.1.10-127.0.1.59"
WARM_UP = 2000  # connections per gateway before the measured runs

# The section of incident_bench's gateways that harness.pair_config leaves to it.
CONFIG = """[incidents]
protect_loopback = false
block_at = 1000000000
"""


def load(port: int, connections: int, clients: int, bound: float) -> dict:
    return drive_listed(port, connections, clients, bound, SOURCES)


def recorded(root: Path) -> int:
    path = root / "state.sqlite"
    if not path.exists():
        return 0
    with sqlite3.connect(path) as conn:
        row = conn.execute("SELECT coalesce(sum(weight), 0) FROM incident_events").fetchone()
    return int(row[0])


def wait_recorded(expected: int, timeout: float = 30.0) -> int:
    """The incidents in the ``on`` database once ``expected`` are there (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    while (count := recorded(BENCH_ROOT / "incidents-on")) < expected:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=20000)
    add_pair_args(parser)
    args = parser.parse_args(argv)
    if ports_taken("incident_bench", [2545, 2546]):
        return 1
    gateways: dict[str, Gateway] = {}
    try:
        for name, port, incident in (("off", 2545, 0), ("on", 2546, 1)):
            root = BENCH_ROOT / f"incidents-{name}"
            text = pair_config(
                "incident_bench.py", name, port, args.workers, root, CONFIG, incident
            )
            gw = start_gateway(name, root, text, port)
            if gw is None:
                return 1
            gateways[name] = gw
        for gw in gateways.values():  # warm-up: imports, first connections, the database
            load(gw.port, WARM_UP, args.clients, args.bound)
        wait_recorded(WARM_UP)
        warm = recorded(BENCH_ROOT / "incidents-on")
        runs: dict[str, list[dict]] = {"off": [], "on": []}
        for round_no in range(args.rounds):
            order = ["off", "on"] if round_no % 2 == 0 else ["on", "off"]
            for name in order:
                gw = gateways[name]
                cpu0 = cpu_s(gw.pids())
                res = load(gw.port, args.connections, args.clients, args.bound)
                res["server_cpu_s"] = round(cpu_s(gw.pids()) - cpu0, 2)
                if res.get("refused"):
                    res["server_cpu_per_1k"] = round(res["server_cpu_s"] / res["refused"] * 1000, 3)
                runs[name].append(res)
                log(
                    f"round {round_no + 1} {name}: {res.get('refused_per_s')} refused/s, "
                    f"p99 {res.get('p99_ms')} ms, errors {res.get('errors')}"
                )
        refused_on = sum(r.get("refused") or 0 for r in runs["on"])
        stored = wait_recorded(warm + refused_on) - warm
    finally:
        for gw in gateways.values():
            gw.stop()

    def med(name: str, key: str) -> float | None:
        return median_of(runs[name], key)

    table = [
        "| | incidents off (`incident = 0`) | incidents on (`incident = 1`) |",
        "|---|---|---|",
    ]
    for label, key in (
        ("refused connections /s (median of runs)", "refused_per_s"),
        ("refusal latency p50 (ms)", "p50_ms"),
        ("refusal latency p99 (ms)", "p99_ms"),
        ("server CPU per 1,000 refusals (s)", "server_cpu_per_1k"),
    ):
        table.append(f"| {label} | {med('off', key)} | {med('on', key)} |")
    runs_text = {n: ", ".join(str(r.get("refused_per_s")) for r in runs[n]) for n in runs}
    table.append(f"| runs (refused/s) | {runs_text['off']} | {runs_text['on']} |")
    errors = {n: sum(r.get("errors") or 0 for r in runs[n]) for n in runs}
    table.append(f"| errors (not refused) | {errors['off']} | {errors['on']} |")
    table.append(f"| incidents stored / refusals | - | {stored} / {refused_on} |")
    print("\n".join(table))
    if args.json:
        info = machine_info("")
        args.json.write_text(
            json.dumps({"machine": info, "runs": runs, "stored": stored}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
