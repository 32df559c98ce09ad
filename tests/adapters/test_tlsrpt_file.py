"""The TLS-RPT result files: real files, real processes appending at once, a real failure."""

from __future__ import annotations

import calendar
import dataclasses
import json
import multiprocessing
from pathlib import Path

from palisade.adapters.tlsrpt_file import TlsResultFiles
from palisade.ports import TlsResult, TlsResultSink

DAY1 = calendar.timegm((2026, 12, 1, 23, 59, 59))
DAY2 = DAY1 + 1


def result(**kw: object) -> TlsResult:
    fields: dict[str, object] = {
        "domain": "example.test",
        "policy_type": "sts",
        "policy_strings": ("version: STSv1", "mode: enforce", "mx: mx.example.test"),
        "mx_host": "mx.example.test",
        "ip": "127.0.0.21",
        "success": False,
        "failure_type": "certificate-host-mismatch",
        "detail": "certificate names other.test",
        "time": DAY1,
    }
    fields.update(kw)
    return TlsResult(**fields)  # type: ignore[arg-type]


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_satisfies_the_port(tmp_path: Path) -> None:
    assert isinstance(TlsResultFiles(tmp_path), TlsResultSink)


def test_one_line_per_result_in_the_file_of_its_utc_day(tmp_path: Path) -> None:
    sink = TlsResultFiles(tmp_path / "tlsrpt")
    first = result()
    sink.record(first)
    sink.record(result(success=True, failure_type=None, detail="", time=DAY2))
    sink.record(result(domain="other.test", time=DAY2 + 10))
    sink.close()
    day1 = lines(tmp_path / "tlsrpt" / "2026-12-01.jsonl")
    assert day1 == [json.loads(json.dumps(dataclasses.asdict(first)))]
    day2 = lines(tmp_path / "tlsrpt" / "2026-12-02.jsonl")
    assert [(r["domain"], r["success"]) for r in day2] == [
        ("example.test", True),
        ("other.test", False),
    ]
    assert (tmp_path / "tlsrpt" / "2026-12-01.jsonl").stat().st_mode & 0o777 == 0o640


def test_time_zero_means_now(tmp_path: Path) -> None:
    sink = TlsResultFiles(tmp_path, wall=lambda: float(DAY2 + 5))
    sink.record(result(time=0.0))
    assert lines(tmp_path / "2026-12-02.jsonl")[0]["time"] == DAY2 + 5


def test_a_file_removed_meanwhile_is_made_again(tmp_path: Path) -> None:
    sink = TlsResultFiles(tmp_path)
    sink.record(result())
    (tmp_path / "2026-12-01.jsonl").unlink()
    sink.record(result(domain="again.test"))
    assert [r["domain"] for r in lines(tmp_path / "2026-12-01.jsonl")] == ["again.test"]


def _writer(directory: str, tag: int, count: int) -> None:
    sink = TlsResultFiles(Path(directory))
    for i in range(count):
        sink.record(result(domain=f"d{tag}.test", detail=f"{tag}-{i}-" + "x" * 900))


def test_processes_appending_at_once_never_interleave(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), n, 300)) for n in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    got = lines(tmp_path / "2026-12-01.jsonl")  # every line parses: none was cut or mixed
    assert len(got) == 1200
    for n in range(4):
        details = [r["detail"] for r in got if r["domain"] == f"d{n}.test"]
        assert [str(d).split("-")[1] for d in details] == [str(i) for i in range(300)]


def test_failure_never_raises_and_is_told_once_a_minute(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the directory should be")
    told: list[str] = []
    sink = TlsResultFiles(blocker / "tlsrpt", on_error=told.append)
    for _ in range(5):
        sink.record(result())
    assert len(told) == 1
    assert "TLS-RPT results: cannot write to" in told[0] and str(blocker) in told[0]


def test_long_texts_are_cut(tmp_path: Path) -> None:
    sink = TlsResultFiles(tmp_path)
    sink.record(result(detail="y" * 50_000, policy_strings=("mx: " + "z" * 5000,)))
    got = lines(tmp_path / "2026-12-01.jsonl")[0]
    assert len(str(got["detail"])) == 1000
    assert len(str(got["policy_strings"][0])) == 1000  # type: ignore[index]
