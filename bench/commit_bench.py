"""The spool's group committer alone, several versions side by side on this machine's disk.

    python bench/commit_bench.py                      # HEAD's working tree against main
    python bench/commit_bench.py --revs main,57071d7,WORKTREE --clients 10 --commits 600

Each version's ``src/palisade/spool/commit.py`` (``git show REV:...``; ``WORKTREE`` is the file
as it is now) is loaded in turn and put behind this checkout's ``Spool``; ``--clients`` coroutines
each write a 4 KB message and commit it, ``--commits`` in all (a 2 ms pause between a client's
commits stands for the rest of a transaction), in a fresh spool under /tmp/palisade-bench.
Versions alternate within each of ``--rounds`` rounds. Prints commits/s and the commit's p50 and
p99 per version and round: what the disk's flushes cost a message between its final dot and its
250, without the SMTP around it. No root needed; a few seconds per version and round.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))

import palisade.spool.queue as spool_queue  # noqa: E402
from palisade.obs.queueid import QueueIdGenerator  # noqa: E402
from palisade.spool import Envelope, Spool  # noqa: E402

COMMIT_PY = "src/palisade/spool/commit.py"
ROOT = Path("/tmp/palisade-bench")


def load_version(rev: str, into: Path) -> type:
    """The GroupCommitter class of ``rev``'s commit.py."""
    if rev == "WORKTREE":
        source = (REPO / COMMIT_PY).read_text()
    else:
        source = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{rev}:{COMMIT_PY}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    name = f"commit_{rev.replace('-', '_').replace('/', '_')}"
    path = into / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.GroupCommitter  # type: ignore[no-any-return]


IDS = QueueIdGenerator()


def envelope() -> Envelope:
    return Envelope(
        queue_id=IDS.new(),
        sender="load@client.example",
        recipients=("rcpt@bench.test",),
        received_at=time.time(),
        client_ip="127.0.0.10",
        client_port=40000,
        helo="client.example",
        client_name="c10.bench.test",
        protocol="esmtp",
        tls=None,
    )


async def load(spool: Spool, clients: int, commits: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    left = [commits]
    body = (b"abcdefghijklmnopqrstuvwxyz0123456789" * 2 + b"\r\n") * 55

    async def client() -> None:
        while left[0] > 0:
            left[0] -= 1
            writer = spool.open_message(envelope())
            writer.write(body)
            t0 = time.perf_counter()
            await writer.commit()
            latencies.append(time.perf_counter() - t0)
            await asyncio.sleep(0.002)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return commits / (time.perf_counter() - t0), sorted(latencies)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--revs", default="main,WORKTREE", help="git revisions; WORKTREE = as now")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--commits", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    ROOT.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="commit-bench-", dir=ROOT))
    try:
        versions = {rev: load_version(rev, scratch) for rev in args.revs.split(",")}
        for rnd in range(args.rounds):
            for rev, committer in versions.items():
                spool_queue.GroupCommitter = committer  # type: ignore[misc]
                root = Path(tempfile.mkdtemp(prefix="spool-", dir=scratch))
                spool = Spool(root)
                try:
                    rate, lat = asyncio.run(load(spool, args.clients, args.commits))
                finally:
                    spool.close()
                    shutil.rmtree(root, ignore_errors=True)
                p50 = lat[len(lat) // 2] * 1000
                p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
                print(
                    f"round {rnd} {rev:10s} {rate:7.0f} commits/s  p50 {p50:6.1f} ms  "
                    f"p99 {p99:6.1f} ms",
                    flush=True,
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
