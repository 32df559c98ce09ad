"""A private Dovecot (dovecot-core, plus dovecot-imapd for IMAP) started by the tests, shared by
the submission tests (its auth client socket, the one Postfix and exim talk to) and the scan
tests (its IMAP logins and its log).

Owns: the test's dovecot.conf (passwd-file passdb/userdb, ``log_path`` to a file,
``auth_verbose``, no TLS, base_dir and state_dir in a private directory under /tmp), the auth
service's listeners (``unix_listener auth-client`` mode 0666 in base_dir and an
``inet_listener`` on a loopback port), starting ``dovecot -F`` in its own process group,
restarting, pausing (SIGSTOP: a hung Dovecot) and stopping it, and an IMAP client that connects
*from* a chosen loopback address (127.0.0.0/8 is all local on Linux), so that each test address
is a different ``rip=`` in Dovecot's log.

Passwords are stored hashed with a scheme Debian's Dovecot supports (``doveadm pw``:
SHA512-CRYPT by default, ARGON2ID, or PLAIN as the scan tests use).

With IMAP, one thing is changed in the running Dovecot: its per-address auth penalty (anvil
delays every further login of an address that failed by 2, 4, 8, then 15 seconds) is turned off
by removing the ``anvil-auth-penalty`` socket before the first client connects (the auth
process then runs without penalty, as Dovecot does when anvil is unreachable). It only makes
failed logins answer at once; what Dovecot logs is unchanged. Must run as root (Dovecot's master
drops to the ``dovecot`` and ``dovenull`` users itself).
"""

from __future__ import annotations

import imaplib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.conftest import free_port, wait_for
from tests.services import need_program, need_root

PASSWORD = "right-password"

CONF = """\
# written by tests/dovecot.py
base_dir = {run}
state_dir = {state}
log_path = {log}
info_log_path = {log}
auth_verbose = yes
auth_failure_delay = {failure_delay}
auth_mechanisms = plain login
ssl = no
disable_plaintext_auth = no
protocols = {protocols}
listen = 127.0.0.1
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = 100
mail_location = maildir:{home}/%u/Maildir
{passdb}
userdb {{
  driver = passwd-file
  args = username_format=%u {passwd}
}}
service auth {{
  unix_listener auth-client {{
    mode = 0666
  }}
  inet_listener auth-inet {{
    address = 127.0.0.1
    port = {auth_port}
  }}
}}
service anvil {{
  chroot =
}}
"""

PASSDB = """\
passdb {{
  driver = passwd-file
  args = scheme={scheme} username_format=%u {passwd}
}}"""

IMAP_CONF = """\
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""


class Dovecot:
    """A private Dovecot; ``log`` is its log file, ``auth_socket`` the auth client Unix socket
    and ``auth_address`` ("127.0.0.1:port") its TCP listener. ``imap`` adds an IMAP listener on
    ``port``; ``users`` maps user names to passwords (hashed with ``scheme``); ``passdb``
    replaces the passwd-file passdb block (the userdb stays)."""

    def __init__(
        self,
        log: Path | None = None,
        *,
        imap: bool = True,
        users: dict[str, str] | None = None,
        scheme: str = "PLAIN",
        failure_delay: str = "0s",
        passdb: str | None = None,
    ) -> None:
        need_root("Dovecot's master process runs as root and drops to dovecot/dovenull")
        self.binary = need_program("dovecot", "dovecot-core")
        need_program("doveadm", "dovecot-core")
        # base_dir holds Unix sockets: keep its path short (108 bytes at most).
        self.dir = Path(tempfile.mkdtemp(prefix="pal-dv-", dir="/tmp"))
        self.dir.chmod(0o755)  # the auth process (user dovecot) reads the passwd file
        self.log = log if log is not None else self.dir / "dovecot.log"
        self.imap = imap
        self.port = free_port()
        self.auth_port = free_port()
        self.auth_address = f"127.0.0.1:{self.auth_port}"
        self.auth_socket = self.dir / "run" / "auth-client"
        self.conf = self.dir / "dovecot.conf"
        home = self.dir / "home"
        users = {"alice": PASSWORD} if users is None else users
        lines = []
        for user, password in users.items():
            (home / user).mkdir(parents=True)
            os.chown(home / user, 65534, 65534)
            lines.append(f"{user}:{self._hash(scheme, password)}:65534:65534::{home / user}\n")
        passwd = self.dir / "passwd"
        passwd.write_text("".join(lines))
        text = CONF.format(
            run=self.dir / "run",
            state=self.dir / "state",
            log=self.log,
            home=home,
            passwd=passwd,
            passdb=passdb or PASSDB.format(scheme=scheme, passwd=passwd),
            failure_delay=failure_delay,
            protocols="imap" if imap else "none",
            auth_port=self.auth_port,
        )
        if imap:
            text += IMAP_CONF.format(port=self.port)
        self.conf.write_text(text)
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def _hash(scheme: str, password: str) -> str:
        if scheme == "PLAIN":
            return f"{{PLAIN}}{password}"
        done = subprocess.run(
            ["doveadm", "pw", "-s", scheme, "-p", password],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return done.stdout.strip()

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
            return penalty.exists() and self.auth_socket.exists()

        wait_for(ready, timeout=20)
        if self.imap:
            penalty.unlink()  # see the module docstring: no per-address login delay
            wait_for(self._listening, timeout=20)
        wait_for(self._auth_answers, timeout=20)

    def log_text(self) -> str:
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

    def _auth_answers(self) -> bool:
        """The auth service answers its handshake on the TCP listener."""
        try:
            with socket.create_connection(("127.0.0.1", self.auth_port), timeout=2) as sock:
                sock.sendall(b"VERSION\t1\t2\nCPID\t1\n")
                data = b""
                while b"\nDONE\n" not in data:
                    chunk = sock.recv(4096)
                    if not chunk:
                        return False
                    data += chunk
                return True
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

    def halt(self) -> None:
        """Stops Dovecot (SIGTERM to its process group, SIGKILL after 15 s); the private
        directory stays, so :meth:`start` can start it again."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()

    def restart(self) -> None:
        self.halt()
        self.start()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Dovecot's master and auth processes stopped (SIGSTOP to the process group):
        connections are accepted by the kernel but never answered, as with a hung Dovecot."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.halt()
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
