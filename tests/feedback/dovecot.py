"""A private Dovecot (dovecot-core + dovecot-imapd) on a loopback port for the scan tests.

Owns: the test's dovecot.conf (passwd-file passdb/userdb with one user, ``log_path`` to a file,
``auth_verbose``, no TLS, plaintext LOGIN allowed, base_dir and state_dir in a private
directory), starting ``dovecot -F`` in its own process group and stopping it, and an IMAP client
that connects *from* a chosen loopback address (127.0.0.0/8 is all local on Linux), so that
each test address is a different ``rip=`` in Dovecot's log.

One thing is changed in the running Dovecot: its per-address auth penalty (anvil delays every
further login of an address that failed by 2, 4, 8, then 15 seconds) is turned off by removing
the ``anvil-auth-penalty`` socket before the first client connects (the auth process then runs
without penalty, as Dovecot does when anvil is unreachable). It only makes failed logins answer
at once; what Dovecot logs is unchanged. Must run as root (Dovecot's master drops to the
``dovecot`` and ``dovenull`` users itself).
"""

from __future__ import annotations

import imaplib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from tests.conftest import free_port, wait_for
from tests.services import need_program

PASSWORD = "right-password"

CONF = """\
# written by tests/feedback/dovecot.py
base_dir = {run}
state_dir = {state}
log_path = {log}
info_log_path = {log}
auth_verbose = yes
auth_failure_delay = 0
ssl = no
disable_plaintext_auth = no
protocols = imap
listen = 127.0.0.1
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = 100
mail_location = maildir:{home}/%u/Maildir
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {passwd}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
"""


class Dovecot:
    """A running private Dovecot; ``log`` is its log file."""

    def __init__(self, log: Path) -> None:
        self.binary = need_program("dovecot", "dovecot-core")
        need_program("doveadm", "dovecot-core")
        # base_dir holds Unix sockets: keep its path short (108 bytes at most).
        self.dir = Path(tempfile.mkdtemp(prefix="pal-dv-", dir="/tmp"))
        self.dir.chmod(0o755)  # the auth process (user dovecot) reads the passwd file
        self.log = log
        self.port = free_port()
        self.conf = self.dir / "dovecot.conf"
        home = self.dir / "home"
        (home / "alice").mkdir(parents=True)
        os.chown(home / "alice", 65534, 65534)
        passwd = self.dir / "passwd"
        passwd.write_text(f"alice:{{PLAIN}}{PASSWORD}:65534:65534::{home}/alice\n")
        self.conf.write_text(
            CONF.format(
                run=self.dir / "run",
                state=self.dir / "state",
                log=log,
                home=home,
                passwd=passwd,
                port=self.port,
            )
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "-F", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        penalty = self.dir / "run" / "anvil-auth-penalty"

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"dovecot exited: {self.process.stderr.read()!r}")  # type: ignore[union-attr]
            return penalty.exists() and "starting up" in self._log_text()

        wait_for(ready, timeout=20)
        penalty.unlink()  # see the module docstring: no per-address login delay
        wait_for(self._listening, timeout=20)

    def _log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                return sock.recv(64).startswith(b"* OK")
        except OSError:
            return False

    def reopen_log(self) -> None:
        """``doveadm log reopen``: Dovecot's processes reopen their log file (logrotate's
        postrotate for Dovecot)."""
        subprocess.run(
            ["doveadm", "-c", str(self.conf), "log", "reopen"],
            check=True,
            capture_output=True,
            timeout=20,
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def client(self, source: str) -> _FromAddress:
        return _FromAddress(source, self.port)

    def fail(self, source: str, attempts: int, user: str = "alice") -> None:
        """One connection from ``source`` with ``attempts`` failed LOGINs, then LOGOUT: Dovecot
        logs one line "(auth failed, N attempts ...)" with ``rip=source``."""
        imap = self.client(source)
        for n in range(attempts):
            try:
                imap.login(user, f"wrong-{n}")
            except imaplib.IMAP4.error:
                pass
            else:
                raise AssertionError("a wrong password was accepted")
        imap.logout()

    def fail_raw(self, source: str, attempts: int) -> None:
        """As :meth:`fail`, over a raw socket (TCP_NODELAY), the commands written by hand."""
        with socket.create_connection(
            ("127.0.0.1", self.port), 20, source_address=(source, 0)
        ) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reader = sock.makefile("rb")
            assert reader.readline().startswith(b"* OK")
            for n in range(attempts):
                sock.sendall(f"a{n} LOGIN alice wrong{n}\r\n".encode())
                while not (line := reader.readline()).startswith(f"a{n} ".encode()):
                    assert line, "connection closed"
                assert line.startswith(f"a{n} NO".encode()), line
            sock.sendall(b"z LOGOUT\r\n")
            while reader.readline().startswith(b"* "):
                pass
            reader.close()

    def succeed(self, source: str) -> None:
        imap = self.client(source)
        imap.login("alice", PASSWORD)
        imap.logout()


class _FromAddress(imaplib.IMAP4):
    """imaplib's client, connecting from a chosen local address."""

    def __init__(self, source: str, port: int) -> None:
        self.source = source
        super().__init__("127.0.0.1", port, timeout=20)

    def _create_socket(self, timeout: Any) -> socket.socket:
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self.source, 0)
        )
