"""A private clamd (Debian's ClamAV 1.4) on loopback, with a signature database made here.

clamd starts with nothing but our database: ``<base>/db/palisade.ndb`` holds one body signature,
``Palisade.Test.EICAR``, the hex of the EICAR test string (target type 0: any file, so it also
hits inside a base64 attachment, which clamd decodes). No official databases are needed (clamd
only refuses to start with *no* signature at all). clamd reports signatures from a database it
does not know as official with the suffix ``.UNOFFICIAL``.

It listens on a free TCP port on 127.0.0.1 and on a Unix socket, with ``StreamMaxLength 1M`` so
that the size-limit error can be provoked cheaply. Start-up takes well under a second.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port
from tests.services import need_program

# Assembled at run time so that no file of the repository holds the EICAR string itself (a
# virus scanner on a developer's machine would quarantine it).
EICAR = ("X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + "EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*").encode()
SIGNATURE = "Palisade.Test.EICAR"
REPORTED = SIGNATURE + ".UNOFFICIAL"
STREAM_MAX = 1024 * 1024


@dataclass
class ClamdProcess:
    process: subprocess.Popen[bytes]
    port: int
    socket_path: Path
    base: Path
    started_in: float

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        path = self.base / "clamd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @contextmanager
    def paused(self) -> Iterator[None]:
        """clamd stopped (SIGSTOP): connections are accepted by the kernel, never answered."""
        os.kill(self.process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.base, ignore_errors=True)


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"zPING\0")
            return sock.recv(100).startswith(b"PONG")
    except OSError:
        return False


def start_clamd(timeout: float = 30.0) -> ClamdProcess:
    clamd = need_program("clamd", "clamav-daemon")
    base = Path(tempfile.mkdtemp(prefix="palisade-clamd-"))
    db = base / "db"
    db.mkdir()
    (db / "palisade.ndb").write_text(f"{SIGNATURE}:0:*:{EICAR.hex()}\n")
    port = free_port()
    socket_path = base / "clamd.sock"
    lines = [
        "Foreground yes",
        f"TCPSocket {port}",
        "TCPAddr 127.0.0.1",
        f"LocalSocket {socket_path}",
        f"DatabaseDirectory {db}",
        f"LogFile {base / 'clamd.log'}",
        f"PidFile {base / 'clamd.pid'}",
        f"StreamMaxLength {STREAM_MAX // 1024}K",
        "MaxThreads 4",
        "SelfCheck 0",
    ]
    if os.geteuid() == 0:
        lines.append("User root")  # stay root: the temp directory is root's
    config = base / "clamd.conf"
    config.write_text("\n".join(lines) + "\n")
    out = (base / "clamd.out").open("wb")
    started = time.monotonic()
    process = subprocess.Popen(
        [clamd, "-c", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=out,
        start_new_session=True,
    )
    out.close()
    result = ClamdProcess(process, port, socket_path, base, 0.0)
    deadline = started + timeout
    while not _ping(port):
        if process.poll() is not None or time.monotonic() > deadline:
            text = (base / "clamd.out").read_text(errors="replace") + result.log()
            result.stop()
            raise RuntimeError(f"clamd did not start:\n{text}")
        time.sleep(0.02)
    result.started_in = time.monotonic() - started
    return result
