"""A private spamd (Debian's SpamAssassin 4) on loopback for the scanner tests.

It listens on a free TCP port on 127.0.0.1 and on a Unix socket in its own directory, with a
site configuration made for tests: local tests only (``-L``, no DNS, no network checks), no
Bayes, no auto-learn, no user preferences, the stock rules of ``/usr/share/spamassassin`` (not
whatever ``sa-update`` last fetched), so scores are deterministic. The ``.pre`` files that load
the plugins are copied from ``/etc/spamassassin`` (without them spamd loads no Check plugin and
refuses to scan). Run as root (the CI container), spamd is told ``-u nobody``; its directory is
then made world-readable so that the children, which run as nobody, can read it.

Start-up: the parent binds its sockets at once and its first child is ready about a second later;
``start_spamd`` waits for an answered ``PING``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port
from tests.services import need_file, need_program, paused_group, stop_group

SITE_CONFIG = """\
use_bayes 0
bayes_auto_learn 0
skip_rbl_checks 1
dns_available no
"""


@dataclass
class SpamdProcess:
    process: subprocess.Popen[bytes]
    port: int
    socket_path: Path
    base: Path
    started_in: float  # seconds from exec to the first PONG

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return (self.base / "spamd.log").read_text(errors="replace")

    def paused(self) -> AbstractContextManager[None]:
        """spamd and its children stopped (SIGSTOP): a hung daemon."""
        return paused_group(self.process)

    def stop(self) -> None:
        stop_group(self.process)
        shutil.rmtree(self.base, ignore_errors=True)


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"PING SPAMC/1.5\r\n\r\n")
            return b"PONG" in sock.recv(100)
    except OSError:
        return False


def start_spamd(timeout: float = 60.0, site_rules: str = "") -> SpamdProcess:
    """spamd on a free port; ``site_rules`` are added to its ``local.cf`` (a test's own rule
    and score, for a message scored where the test wants it)."""
    spamd = need_program("spamd", "spamassassin")
    need_file(Path("/usr/share/spamassassin/20_body_tests.cf"), "spamassassin")
    pre_files = sorted(Path("/etc/spamassassin").glob("*.pre"))
    if not pre_files:
        need_file(Path("/etc/spamassassin/v320.pre"), "spamassassin")
    base = Path(tempfile.mkdtemp(prefix="palisade-spamd-"))
    base.chmod(0o755)  # the children run as nobody when we are root
    site = base / "site"
    site.mkdir()
    for pre in pre_files:
        shutil.copy(pre, site / pre.name)
    (site / "local.cf").write_text(SITE_CONFIG + site_rules)
    home = base / "home"
    home.mkdir()
    home.chmod(0o777)
    port = free_port()
    socket_path = base / "spamd.sock"
    args = [
        spamd,
        f"--listen=127.0.0.1:{port}",
        f"--listen={socket_path}",
        "--allowed-ips=127.0.0.1",
        "--max-children=2",
        "--min-children=1",
        "--nouser-config",
        "--configpath=/usr/share/spamassassin",
        f"--siteconfigpath={site}",
        f"--helper-home-dir={home}",
        f"--pidfile={base / 'spamd.pid'}",
        "--syslog=stderr",
        "--local",
    ]
    if os.geteuid() == 0:
        args.append("--username=nobody")
    log = (base / "spamd.log").open("wb")
    started = time.monotonic()
    process = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
    )
    log.close()
    result = SpamdProcess(process, port, socket_path, base, 0.0)
    deadline = started + timeout
    while not _ping(port):
        if process.poll() is not None or time.monotonic() > deadline:
            text = result.log()
            result.stop()
            raise RuntimeError(f"spamd did not start:\n{text}")
        time.sleep(0.05)
    result.started_in = time.monotonic() - started
    return result
