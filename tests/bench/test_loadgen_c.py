"""bench/loadgen.c, the second load generator of issue 19, kept honest: it builds with gcc,
its accepted count is what a real gateway stored, and its refused count is what a real
gateway refused. A benchmark whose driver miscounts measures nothing, so CI runs it small."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import wait_for
from tests.services import need_program

SOURCE = Path(__file__).resolve().parents[2] / "bench" / "loadgen.c"


def build(tmp_path: Path) -> Path:
    gcc = need_program("gcc", "gcc")
    binary = tmp_path / "loadgen"
    subprocess.run([gcc, "-O2", "-Wall", "-Werror", "-o", str(binary), str(SOURCE)], check=True)
    return binary


def drive(binary: Path, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [str(binary), *args], capture_output=True, text=True, timeout=120, check=True
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_accepted_messages_are_the_ones_the_gateway_stored(
    tmp_path: Path, make_gateway: Any
) -> None:
    binary = build(tmp_path)
    gateway = make_gateway()
    result = drive(
        binary,
        "throughput",
        "--port", str(gateway.port),
        "--clients", "5",
        "--messages", "40",
        "--source-range", "127.0.0.1-127.0.0.3",
        "--rcpt", "load@example.test",
        "--size", "2048",
    )  # fmt: skip
    assert result["accepted"] == 40 and result["errors"] == 0, result
    stored = wait_for(lambda: len(gateway.maildir_messages("load")) == 40 or None, timeout=30)
    assert stored
    bodies = gateway.maildir_messages("load")
    assert all(len(body) >= 2048 for body in bodies)
    assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]


def test_refusals_are_counted_with_their_codes(tmp_path: Path, make_gateway: Any) -> None:
    binary = build(tmp_path)
    gateway = make_gateway(
        files={"lists/bots": "127.0.0.0/8\n"},
        lists={"bots": {"type": "ip", "file": "lists/bots"}},
        rules={
            "connect": [
                {
                    "check": "ip_list",
                    "list": "bots",
                    "verb": "deny",
                    "message": "go away",
                    "log_message": "DENY - bots",
                }
            ]
        },
    )
    result = drive(
        binary,
        "listed",
        "--port", str(gateway.port),
        "--clients", "5",
        "--connections", "30",
        "--source-range", "127.0.0.1-127.0.0.2",
    )  # fmt: skip
    assert result["attempted"] == 30 and result["refused"] == 30, result
    assert result["codes"] == {"554": 30}
    wait_for(lambda: gateway.rejectlog().count("DENY - bots") >= 30 or None, timeout=30)
