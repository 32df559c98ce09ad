"""Build and run bench/loadgen.c, the C load generator (epoll, one thread), from the harnesses.

``build()`` compiles it with gcc -O2 once per source version (the binary is cached under
/tmp/palisade-bench by the hash of the source); ``drive()`` runs it as a child process and
returns its JSON result with the child's CPU (``os.wait4``, as for smtp_load.py). By hand::

    python bench/loadgen.py build                       # prints the binary's path
    python bench/loadgen.py throughput --port 2535 --clients 20 --messages 3000 \
        --source-range 127.0.0.10-127.0.0.19
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import BENCH_ROOT, run_child  # noqa: E402

SOURCE = HERE / "loadgen.c"


class BuildError(RuntimeError):
    pass


def build(out_dir: Path = BENCH_ROOT) -> Path:
    """The compiled generator, built now if this source version has not been built yet."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise BuildError("no C compiler (apt-get install -y gcc)")
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    binary = out_dir / f"loadgen-{digest}"
    if binary.exists():
        return binary
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_suffix(".tmp")
    proc = subprocess.run(
        [cc, "-O2", "-Wall", "-o", str(tmp), str(SOURCE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        raise BuildError(f"{cc} failed: {proc.stderr.strip()[-500:]}")
    tmp.replace(binary)
    return binary


def drive(args: list[str], bound: float) -> dict:
    """Runs the generator with ``args`` (mode first); its JSON plus the child's CPU."""
    binary = build()
    rc, out, err, _wall, cpu = run_child([str(binary), *args], bound)
    try:
        res = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"driver": "loadgen.c", "failed": f"rc={rc}: {err.strip()[-300:]}"}
    res["driver_process_cpu_s"] = round(cpu, 3)
    return res


def main(argv: list[str]) -> int:
    if argv[:1] == ["build"]:
        print(build())
        return 0
    binary = build()
    return subprocess.call([str(binary), *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
