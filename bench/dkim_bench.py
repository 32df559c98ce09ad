"""The cost of DKIM signing: CPU per message in-process, and signed relay mail per second end
to end beside unsigned mail in the same run.

    python bench/dkim_bench.py                 # both parts
    python bench/dkim_bench.py --cpu-only      # the in-process part only
    python bench/dkim_bench.py --messages 3000 --rounds 2

Part 1, in this process: ``DkimSigner.sign_bytes`` (what a session's signing does after reading
the spooled message: dkimpy parses it, canonicalises relaxed/relaxed, hashes and signs) with an
RSA-2048 key, an Ed25519 key, and both (two signatures, RFC 8463), for messages of 4 KB and
100 KB (the shape of ``smtp_load.py``'s messages); CPU seconds (``time.process_time``) per
message, median of ``--repeat`` batches.

Part 2, end to end: one gateway (``workers = 2``, fsync before 250) relaying for 127.0.0.1 to
Postfix's ``smtp-sink``, driven by ``smtp_load.py`` (``--clients`` concurrent, 4 KB messages
from ``load@signed.test``); configurations alternate in each round: no ``[dkim]`` (unsigned),
RSA-2048, Ed25519, both. Prints accepted messages per second, the gateway's CPU per 1000
messages and the p99 of the transaction. Everything runs under its own directory
(``/tmp/palisade-dkim-bench``) on free ports; keys come from ``palisade dkim keygen``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "src"))

from harness import (  # noqa: E402
    DKIM_DOMAIN,
    DKIM_KEYS,
    DKIM_VARIANTS,
    Gateway,
    Sink,
    cpu_s,
    free_port,
    log,
    run_child,
)
from palisade.adapters.dkim_signer import DkimSigner  # noqa: E402
from smtp_load import build_message  # noqa: E402

ROOT = Path("/tmp/palisade-dkim-bench")
DOMAIN = DKIM_DOMAIN
KEYS = DKIM_KEYS
VARIANTS = DKIM_VARIANTS


def make_keys() -> None:
    keys = ROOT / "keys"
    shutil.rmtree(keys, ignore_errors=True)
    config = ROOT / "keygen.toml"
    config.write_text(f'[dkim]\nkeys_dir = "{keys}"\n')
    for name, key in KEYS.items():
        extra = ["--ed25519"] if name == "ed25519" else []
        subprocess.run(
            [sys.executable, "-m", "palisade", "dkim", "keygen", DOMAIN, "--selector",
             key["selector"], *extra, "--config", str(config)],
            check=True, stdout=subprocess.DEVNULL, cwd=REPO,
        )  # fmt: skip


# -- part 1 -----------------------------------------------------------------------------------


def cpu_per_message(repeat: int, batch: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for variant in ("rsa", "ed25519", "both"):
        signer = DkimSigner(
            (KEYS[k]["domain"], KEYS[k]["selector"], ROOT / "keys" / KEYS[k]["file"])
            for k in VARIANTS[variant]
        )
        for size in (4096, 102400):
            data = build_message(size, f"load@{DOMAIN}", "rcpt@bench.test")[:-3]
            signer.sign_bytes(data, DOMAIN)  # warm-up
            batches = []
            for _ in range(repeat):
                start = time.process_time()
                for _ in range(batch):
                    signer.sign_bytes(data, DOMAIN)
                batches.append((time.process_time() - start) / batch)
            ms = statistics.median(batches) * 1000
            results.setdefault(variant, {})[f"{size // 1024}KB"] = round(ms, 3)
            log(f"cpu {variant:8} {size // 1024:>4} KB: {ms:.3f} ms per message")
    return results


# -- part 2 -----------------------------------------------------------------------------------


def write_config(path: Path, port: int, sink: int, keys: list[str]) -> None:
    lines = [
        "[server]", 'hostname = "gw.bench.test"', f'listen = ["127.0.0.1:{port}"]',
        "workers = 2", "max_connections_per_ip = 20000",
        "[domains]", "local = []", 'relay = ["bench.test"]',
        "[relay]", 'relay_from_hosts = ["127.0.0.1/32"]',
        "[delivery]", f'next_hop = "127.0.0.1:{sink}"',
        "[paths]", f'spool = "{ROOT}/spool"', f'mail = "{ROOT}/mail"', f'log = "{ROOT}/log"',
        f'state = "{ROOT}/state.sqlite"',
    ]  # fmt: skip
    if keys:
        lines += ["[dkim]", f'keys_dir = "{ROOT}/keys"', "keys = ["]
        for k in keys:
            key = KEYS[k]
            lines.append(
                f'  {{ domain = "{key["domain"]}", selector = "{key["selector"]}", '
                f'file = "{key["file"]}" }},'
            )
        lines.append("]")
    path.write_text("\n".join(lines) + "\n")


def one_run(variant: str, messages: int, clients: int) -> dict[str, Any]:
    port, sink_port = free_port(), free_port()
    config = ROOT / f"{variant}.toml"
    write_config(config, port, sink_port, VARIANTS[variant])
    sink = Sink(sink_port)
    sink.start()
    gateway = Gateway(config, port, None, state_root=ROOT, logfile=ROOT / "gateway.out")
    try:
        if not gateway.start(30):
            raise RuntimeError(f"gateway did not start: {gateway.why_not}")
        before = cpu_s(gateway.pids())
        cmd = [
            sys.executable, str(HERE / "smtp_load.py"), "throughput", "--port", str(port),
            "--clients", str(clients), "--messages", str(messages), "--duration", "300",
            "--sender", f"load@{DOMAIN}", "--rcpt", "rcpt@bench.test",
        ]  # fmt: skip
        rc, out, err, _wall, _cpu = run_child(cmd, 330)
        if rc != 0 or not out.strip():
            raise RuntimeError(f"smtp_load.py failed (rc={rc}): {err.strip()[-300:]}")
        res = json.loads(out.strip().splitlines()[-1])
        sink.wait_for(res["accepted"], 60)
        used = cpu_s(gateway.pids()) - before
        mainlog = (ROOT / "log" / "mainlog").read_text()
        signed = mainlog.count(f"DKIM={DOMAIN}:")
    finally:
        gateway.stop()
        sink.stop()
    row = {
        "variant": variant,
        "accepted": res["accepted"],
        "msg_per_s": res["msgs_per_s"],
        "errors": res["errors"],
        "p99_ms": res.get("p99_ms"),
        "gateway_cpu_per_1k_s": round(used / max(1, res["accepted"]) * 1000, 3),
        "signed": signed,
        "delivered": sink.count,
    }
    log(f"e2e {json.dumps(row)}")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-only", action="store_true")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    ROOT.mkdir(parents=True, exist_ok=True)
    make_keys()
    report: dict[str, Any] = {"cpu_ms_per_message": cpu_per_message(args.repeat, args.batch)}
    if not args.cpu_only:
        rows = []
        for _ in range(args.rounds):
            for variant in VARIANTS:
                rows.append(one_run(variant, args.messages, args.clients))
        report["end_to_end"] = rows
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
