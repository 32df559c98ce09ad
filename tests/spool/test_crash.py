"""Kill -9 at each step of a commit, then recover: no acknowledged loss, nothing torn delivered.

Each scenario runs a child process that queues a message and SIGKILLs ITSELF at one exact point
(the child wraps ``os.fsync`` / the spool's ``rename_noreplace`` only to place the kill; the real
calls still run before and after). A final test kills a busy child from outside at an arbitrary
moment.
A process kill keeps the page cache, so these tests cover the program's ordering (what is renamed
before what is written); power loss is covered by the fsync calls whose order they pin.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from palisade.obs.log import MemoryEventLog
from palisade.spool import Spool

CHILD = textwrap.dedent(
    """
    import asyncio, os, signal, stat, sys, time
    from palisade.spool import Envelope, Spool
    from palisade.spool import commit
    from palisade.obs.queueid import QueueIdGenerator

    root, mode = sys.argv[1], sys.argv[2]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    real_fsync, real_rename = os.fsync, commit.rename_noreplace

    def fsync(fd):
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        if mode == "before_file_fsync" and not is_dir:
            die()
        if mode == "before_dir_fsync" and is_dir:
            die()
        real_fsync(fd)

    def rename(src, dst):
        if mode == "before_rename":
            die()
        real_rename(src, dst)
        if mode == "after_rename":
            die()

    os.fsync, commit.rename_noreplace = fsync, rename  # placing the kill, not changing behaviour

    async def main():
        spool = Spool(root)
        env = Envelope(queue_id=QueueIdGenerator().new(), sender="s@x.test",
                       recipients=("r@y.test",), received_at=time.time(), client_ip="192.0.2.1",
                       client_port=1, helo="h", client_name=None, protocol="esmtp", tls=None)
        print("ID", env.queue_id, flush=True)
        writer = spool.open_message(env)
        writer.write(b"Subject: crash\\r\\n\\r\\n" + b"x" * 100_000)
        if mode == "mid_write":
            writer._file.flush()
            die()
        await writer.commit()
        print("ACK", env.queue_id, flush=True)
        die()

    asyncio.run(main())
    """
)

BODY = b"Subject: crash\r\n\r\n" + b"x" * 100_000


@pytest.mark.parametrize(
    ("mode", "may_survive"),
    [
        ("mid_write", False),
        ("before_file_fsync", False),
        ("before_rename", False),
        ("after_rename", True),  # renamed but not acknowledged: the client retries (RFC 1047)
        ("before_dir_fsync", True),
        ("after_ack", True),
    ],
)
def test_kill_at_each_step(tmp_path: Path, mode: str, may_survive: bool) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), mode], capture_output=True, timeout=30
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    lines = proc.stdout.decode().split()
    queue_id = lines[1]
    acked = "ACK" in lines
    assert acked == (mode == "after_ack")
    spool = Spool(tmp_path, fsync=False)
    log = MemoryEventLog()
    ready = spool.recover(log)
    assert os.listdir(tmp_path / "tmp") == []
    assert os.listdir(tmp_path / "corrupt") == []  # a kill never leaves a torn file in queue/
    if acked:
        assert ready == [queue_id]
    if not may_survive:
        assert ready == []
    for qid in ready:
        assert b"".join(spool.iter_body(qid)) == BODY


BUSY_CHILD = textwrap.dedent(
    """
    import asyncio, sys, time
    from palisade.spool import Envelope, Spool
    from palisade.spool import commit
    from palisade.obs.queueid import QueueIdGenerator

    ids = QueueIdGenerator()

    async def one(spool):
        env = Envelope(queue_id=ids.new(), sender="s@x.test", recipients=("r@y.test",),
                       received_at=time.time(), client_ip="192.0.2.1", client_port=1, helo="h",
                       client_name=None, protocol="esmtp", tls=None)
        writer = spool.open_message(env)
        for _ in range(20):
            writer.write(env.queue_id.encode() * 500)
        await writer.commit()
        sys.stdout.write(f"ACK {env.queue_id}\\n")
        sys.stdout.flush()

    async def main():
        spool = Spool(sys.argv[1])
        while True:
            await asyncio.gather(*(one(spool) for _ in range(20)))

    asyncio.run(main())
    """
)


def test_kill_a_busy_spool_from_outside(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", BUSY_CHILD, str(tmp_path)], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    acked = []
    for line in proc.stdout:
        acked.append(line.split()[1].decode())
        if len(acked) >= 150:
            break
    proc.kill()
    rest = proc.stdout.read()
    proc.wait()
    acked += [line.split()[1].decode() for line in rest.splitlines() if line.startswith(b"ACK")]
    spool = Spool(tmp_path, fsync=False)
    ready = spool.recover(MemoryEventLog())
    assert set(acked) <= set(ready), "an acknowledged message was lost"
    assert len(ready) == len(set(ready))
    assert os.listdir(tmp_path / "corrupt") == [] and os.listdir(tmp_path / "tmp") == []
    for qid in ready:
        assert b"".join(spool.iter_body(qid)) == qid.encode() * 500 * 20
