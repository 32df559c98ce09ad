"""What sharing the state on Redis costs: refusals/s and accepted msg/s, SQLite against Redis.

Two Palisade gateways, the same but for ``[state] backend``, run side by side in one run:

* ``sqlite`` (port 2547): ``[paths] state``, as one host runs today;
* ``redis``  (port 2548): a redis-server started here on a free loopback port (no persistence).

Both: ``--workers`` worker processes (default 2), no DNS, and the perimeter's stateful connect
rules in front of everything: ``history`` (a read of the client's incident record), ``ratelimit``
(``limit`` out of reach: every connection is one counted, exact sliding-window hit), then an
``ip_list`` deny of 127.0.1.0/24. So each refused connection (driver ``listed`` from
127.0.1.10-59) and each accepted message (driver ``throughput`` from 127.0.0.1) paid one history
read and one rate hit first. The runs alternate sqlite/redis (the order swapped every round).

Redis round trips are counted on the server: ``INFO commandstats`` before and after each redis
run, the commands the gateway sends (``EVALSHA``, ``GET``, ``SET``, connection set-up; not the
commands its scripts run inside Redis), divided by the connections of the run; the rate check's
share is one ``EVALSHA`` (the history read is the other). Prints a table; raw JSON with
``--json FILE``::

    python bench/state_bench.py [--rounds 3] [--connections 5000] [--messages 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
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
    drive_python,
    free_port,
    log,
    machine_info,
    median_of,
    pair_config,
    port_taken,
    ports_taken,
    start_gateway,
)

SOURCES = "127.0.1.10-127.0.1.59"
# what the gateway sends itself (the rest of commandstats is what its scripts run inside Redis)
CLIENT_COMMANDS = {
    "evalsha", "eval", "get", "set", "ping", "hello", "select", "auth", "client|setname",
    "client|setinfo", "script|load", "script|exists",
}  # fmt: skip
WARM_UP = 500

# The sections and rules of state_bench's gateways that harness.pair_config leaves to it.
CONFIG = """[state]
backend = "{backend}"
url = "redis://127.0.0.1:{redis_port}/0"
prefix = "bench:"

[incidents]
protect_loopback = false

[[rules.connect]]
name = "history"
check = "history"
verb = "deny"
message = "Blocked"

[[rules.connect]]
name = "connection rate"
check = "ratelimit"
limit = 1000000000
window = "15m"
verb = "defer"
message = "Too many connections"
"""


class Redis:
    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if port_taken(self.port, 0.5):
                return
            time.sleep(0.05)
        raise SystemExit("redis-server did not start")

    def commands(self) -> int:
        """Commands sent by clients so far (INFO commandstats): one per round trip. The calls
        a script makes inside Redis (ZADD, ZCARD, ... under EVALSHA) are not round trips and
        are left out, as is INFO itself."""
        out = subprocess.run(
            ["redis-cli", "-p", str(self.port), "INFO", "commandstats"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        total = 0
        for line in out.splitlines():
            name = line.partition(":")[0].removeprefix("cmdstat_")
            if line.startswith("cmdstat_") and name in CLIENT_COMMANDS:
                total += int(line.split("calls=", 1)[1].split(",", 1)[0])
        return total

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


def refusals(port: int, connections: int, clients: int, bound: float) -> dict:
    return drive_listed(port, connections, clients, bound, SOURCES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--messages", type=int, default=2000)
    add_pair_args(parser)
    args = parser.parse_args(argv)
    if ports_taken("state_bench", [2547, 2548]):
        return 1
    root = BENCH_ROOT / "state"
    root.mkdir(parents=True, exist_ok=True)
    redis = Redis(root)
    redis.start()
    gateways: dict[str, Gateway] = {}
    runs: dict[str, dict[str, list[dict]]] = {
        "sqlite": {"refuse": [], "accept": []},
        "redis": {"refuse": [], "accept": []},
    }
    try:
        for name, port in (("sqlite", 2547), ("redis", 2548)):
            base = root / name
            rest = CONFIG.format(backend=name, redis_port=redis.port)
            text = pair_config("state_bench.py", name, port, args.workers, base, rest, 0)
            gw = start_gateway(name, base, text, port)
            if gw is None:
                return 1
            gateways[name] = gw
        for gw in gateways.values():
            refusals(gw.port, WARM_UP, args.clients, args.bound)
            drive_python(gw.port, args.clients, WARM_UP // 5, args.bound)
        for round_no in range(args.rounds):
            order = ["sqlite", "redis"] if round_no % 2 == 0 else ["redis", "sqlite"]
            for kind in ("refuse", "accept"):
                for name in order:
                    gw = gateways[name]
                    cpu0, cmds0 = cpu_s(gw.pids()), redis.commands()
                    if kind == "refuse":
                        res = refusals(gw.port, args.connections, args.clients, args.bound)
                        done = res.get("refused") or 0
                        rate = res.get("refused_per_s")
                    else:
                        res = drive_python(gw.port, args.clients, args.messages, args.bound)
                        done = res.get("accepted") or 0
                        rate = res.get("msgs_per_s") or res.get("accepted_per_s")
                    res["rate"] = rate
                    res["server_cpu_s"] = round(cpu_s(gw.pids()) - cpu0, 2)
                    if name == "redis" and done:
                        # the INFO call of the "after" reading is not counted
                        res["redis_commands_per_connection"] = round(
                            (redis.commands() - cmds0) / done, 3
                        )
                    runs[name][kind].append(res)
                    log(
                        f"round {round_no + 1} {kind} {name}: {rate}/s, p99 "
                        f"{res.get('p99_ms')} ms, errors {res.get('errors')}, redis round trips "
                        f"per connection {res.get('redis_commands_per_connection', '-')}"
                    )
        load = os.getloadavg()
    finally:
        for gw in gateways.values():
            gw.stop()
        redis.stop()

    def med(name: str, kind: str, key: str) -> float | None:
        return median_of(runs[name][kind], key)

    table = ["| | sqlite | redis | redis / sqlite |", "|---|---|---|---|"]
    for label, kind, key in (
        ("refused connections /s (median)", "refuse", "rate"),
        ("refusal latency p99 (ms)", "refuse", "p99_ms"),
        ("accepted messages /s (median)", "accept", "rate"),
        ("message latency p99 (ms)", "accept", "p99_ms"),
    ):
        a, b = med("sqlite", kind, key), med("redis", kind, key)
        ratio = f"{b / a:.2f}" if a and b else "-"
        table.append(f"| {label} | {a} | {b} | {ratio} |")
    for kind in ("refuse", "accept"):
        runs_text = {
            n: ", ".join(str(r.get("rate")) for r in runs[n][kind]) for n in ("sqlite", "redis")
        }
        table.append(f"| runs ({kind}) | {runs_text['sqlite']} | {runs_text['redis']} | |")
    for kind in ("refuse", "accept"):
        table.append(
            f"| Redis round trips per connection ({kind}) | - | "
            f"{med('redis', kind, 'redis_commands_per_connection')} | |"
        )
    print("\n".join(table))
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        info = machine_info("")
        args.json.write_text(json.dumps({"machine": info, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
