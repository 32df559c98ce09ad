"""Signed submissions per second end to end, and the gateway's CPU per signed message.

    python bench/submission_bench.py                      # the whole matrix
    python bench/submission_bench.py --messages 600 --backends dovecot --keys rsa,both

One gateway (``workers = 2``, fsync before 250) with a submission listener (STARTTLS, then
AUTH) relaying to Postfix's ``smtp-sink``; ``submission_load.py`` drives it with ``--clients``
concurrent clients, each session EHLO, STARTTLS, EHLO, AUTH PLAIN, then one message per
connection or ``--reuse`` messages on the same connection, 4 KB each. The matrix:

- password back end: ``file`` (the Argon2id password file, ``palisade passwd add``) or
  ``dovecot`` (a private Dovecot, ``tests/dovecot.py``, passwd-file with SHA512-CRYPT, its auth
  client socket);
- signing: none (the ``[dkim]`` table empty), RSA-2048, Ed25519, both (RFC 8463);
- messages per connection: 1 and ``--reuse``.

Prints, per run: accepted messages per second, the gateway's CPU per message (its process tree,
``/proc``), Dovecot's CPU per message, the driver's p50 of a session's set-up (connect to 235)
and of a transaction; then one JSON document with everything. The signing cost per message is
the difference between a signed run's gateway CPU and the unsigned run's, same back end and
reuse. Runs under ``/tmp/palisade-submission-bench`` on free ports; keys come from ``palisade
dkim keygen``. Needs root for Dovecot (its master drops to dovecot/dovenull itself).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

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
    tree_pids,
)

ROOT = Path("/tmp/palisade-submission-bench")
DOMAIN = DKIM_DOMAIN
USER = f"load@{DOMAIN}"
PASSWORD = "bench password 2026"
KEYS = DKIM_KEYS
SIGNING = DKIM_VARIANTS


def palisade(*args: str, stdin: str | None = None) -> None:
    subprocess.run(
        [sys.executable, "-m", "palisade", *args], check=True, cwd=REPO, input=stdin,
        text=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip


def prepare() -> None:
    """Keys (keygen), a self-signed certificate, the password file."""
    shutil.rmtree(ROOT, ignore_errors=True)
    ROOT.mkdir(parents=True)
    config = ROOT / "tools.toml"
    config.write_text(
        f'[dkim]\nkeys_dir = "{ROOT}/keys"\n[submission]\npassword_file = "{ROOT}/passwd"\n'
    )
    for name, key in KEYS.items():
        extra = ["--ed25519"] if name == "ed25519" else []
        palisade("dkim", "keygen", DOMAIN, "--selector", key["selector"], *extra,
                 "--config", str(config))  # fmt: skip
    palisade("passwd", "add", USER, "--stdin", "--config", str(config), stdin=PASSWORD + "\n")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-subj", "/CN=gw.bench.test", "-days", "2", "-keyout", str(ROOT / "tls.key"),
         "-out", str(ROOT / "tls.crt")],
        check=True, capture_output=True,
    )  # fmt: skip


def write_config(path: Path, port: int, submission: int, sink: int, backend: str,
                 socket_path: str, keys: list[str]) -> None:  # fmt: skip
    lines = [
        "[server]", 'hostname = "gw.bench.test"', f'listen = ["127.0.0.1:{port}"]',
        "workers = 2", "max_connections_per_ip = 20000",
        "[tls]", f'certificate = "{ROOT}/tls.crt"', f'private_key = "{ROOT}/tls.key"',
        "[submission]", f'listen = ["127.0.0.1:{submission}"]', f'auth = "{backend}"',
        f'password_file = "{ROOT}/passwd"', f'dovecot_socket = "{socket_path}"',
        "max_messages = 0", "max_recipients = 0",
        "[delivery]", f'next_hop = "127.0.0.1:{sink}"',
        "[paths]", f'spool = "{ROOT}/spool"', f'mail = "{ROOT}/mail"', f'log = "{ROOT}/log"',
        f'state = "{ROOT}/state.sqlite"',
        "[dkim]", f'keys_dir = "{ROOT}/keys"', "keys = [",
    ]  # fmt: skip
    for name in keys:
        key = KEYS[name]
        lines.append(
            f'  {{ domain = "{key["domain"]}", selector = "{key["selector"]}", '
            f'file = "{key["file"]}" }},'
        )
    lines.append("]")
    path.write_text("\n".join(lines) + "\n")


def one_run(backend: str, signing: str, per_connection: int, messages: int, clients: int,
            dovecot: Any) -> dict[str, Any]:  # fmt: skip
    port, submission, sink_port = free_port(), free_port(), free_port()
    config = ROOT / f"{backend}-{signing}.toml"
    socket_path = str(dovecot.auth_socket) if dovecot is not None else "/nonexistent"
    write_config(config, port, submission, sink_port, backend, socket_path, SIGNING[signing])
    sink = Sink(sink_port)
    sink.start()
    gateway = Gateway(config, port, None, state_root=ROOT, logfile=ROOT / "gateway.out")
    try:
        if not gateway.start(30):
            raise RuntimeError(f"gateway did not start: {gateway.why_not}")
        dovecot_pids = tree_pids(dovecot.process.pid) if dovecot is not None else []
        before, dovecot_before = cpu_s(gateway.pids()), cpu_s(dovecot_pids)
        cmd = [
            sys.executable, str(HERE / "submission_load.py"), "--port", str(submission),
            "--user", USER, "--password", PASSWORD, "--sender", USER,
            "--clients", str(clients), "--messages", str(messages),
            "--per-connection", str(per_connection),
        ]  # fmt: skip
        rc, out, err, _wall, driver_cpu = run_child(cmd, 600)
        if rc != 0 or not out.strip():
            raise RuntimeError(f"driver failed rc={rc}: {err.strip()[-400:]}")
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        accepted = max(1, result["accepted"])
        dovecot_pids = tree_pids(dovecot.process.pid) if dovecot is not None else []
        result["gateway_cpu_ms_per_msg"] = round(
            (cpu_s(gateway.pids()) - before) / accepted * 1000, 3
        )
        result["dovecot_cpu_ms_per_msg"] = round(
            (cpu_s(dovecot_pids) - dovecot_before) / accepted * 1000, 3
        )
        result["driver_cpu_ms_per_msg"] = round(driver_cpu / accepted * 1000, 3)
        if not sink.wait_for(result["accepted"], 60):
            result["sink_short"] = sink.count
        return result
    finally:
        gateway.stop()
        sink.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--reuse", type=int, default=10, help="messages per connection")
    parser.add_argument("--backends", default="file,dovecot")
    parser.add_argument("--keys", default="unsigned,rsa,ed25519,both")
    args = parser.parse_args()
    prepare()
    dovecot = None
    results: list[dict[str, Any]] = []
    try:
        for backend in args.backends.split(","):
            if backend == "dovecot":
                from tests.dovecot import Dovecot

                dovecot = Dovecot(imap=False, scheme="SHA512-CRYPT", users={USER: PASSWORD})
                dovecot.start()
            for per_connection in (1, args.reuse):
                for signing in args.keys.split(","):
                    result = one_run(backend, signing, per_connection, args.messages,
                                     args.clients, dovecot)  # fmt: skip
                    result.update(backend=backend, signing=signing, per_connection=per_connection)
                    results.append(result)
                    log(
                        f"{backend:7} {signing:8} {per_connection:>2}/conn: "
                        f"{result['per_second']:7.1f} msg/s, gateway "
                        f"{result['gateway_cpu_ms_per_msg']:6.2f} ms CPU/msg, dovecot "
                        f"{result['dovecot_cpu_ms_per_msg']:5.2f}, set-up p50 "
                        f"{result['setup_p50_ms']} ms, transaction p50 "
                        f"{result['transaction_p50_ms']} ms, errors {result['errors']}"
                        + (f" ({result['first_error']})" if result["errors"] else "")
                    )
            if dovecot is not None:
                dovecot.stop()
                dovecot = None
    finally:
        if dovecot is not None:
            dovecot.stop()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
