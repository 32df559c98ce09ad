"""A private, throw-away Postfix instance for benchmarking (the reference system).

Importable (``PostfixInstance``) and a small CLI::

    python bench/postfix_instance.py start --port 2527 --sink-port 2600 --dir /tmp/pf
    python bench/postfix_instance.py stop --dir /tmp/pf

The instance has its own config_directory (main.cf, master.cf), queue_directory and
data_directory under one directory, logs to a file through postlogd (no syslog), runs
without chroot, listens on one loopback port and relays ``bench.test`` to a sink on
loopback.  Nothing trusts the client: ``mynetworks`` does not contain loopback, mail is
accepted only because ``bench.test`` is a relay domain.  Queue durability is Postfix's
default (cleanup fsyncs each queue file before the 250 reply).

Must run as root (Postfix drops to the ``postfix`` user itself).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
POSTCONF = shutil.which("postconf") or "/usr/sbin/postconf"

MAIN_CF = """\
# Private Postfix instance written by bench/postfix_instance.py.  Do not edit.
compatibility_level = 3.6
config_directory = {etc}
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
myhostname = pf.bench.test
mydomain = bench.test
myorigin = pf.bench.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
# Trust nobody: loopback is NOT in mynetworks (TEST-NET-1 address only).
mynetworks = 192.0.2.1/32
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relay_domains = bench.test
relay_recipient_maps =
relayhost = [127.0.0.1]:{sink_port}
relay_transport = relay:[127.0.0.1]:{sink_port}
default_transport = smtp:[127.0.0.1]:{sink_port}
smtpd_delay_reject = no
smtpd_banner = $myhostname ESMTP
# The gateway is configured with a 20000 per-IP connection limit; do not let anvil
# cap the (single-IP) benchmark clients at its default of 50.
smtpd_client_connection_count_limit = 0
smtp_tls_security_level = none
smtpd_tls_security_level = none
message_size_limit = 10485760
biff = no
append_dot_mydomain = no
maillog_file = {log}
maillog_file_prefixes = {root}
"""

# Same services as Debian's master.cf minus the ones a relay-only instance never uses,
# all with chroot = n.  The smtpd maxproc is a parameter (idle-connection mode needs one
# smtpd process per connection); everything else keeps default_process_limit.
MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{listen} inet  n       -       n       -       {smtpd_maxproc}       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

QUEUE_SUBDIRS = ("maildrop", "incoming", "active", "deferred", "hold")


def perimeter_settings(zone: str = "zen.bench.test", rate_limit: int = 1_000_000) -> dict[str, str]:
    """main.cf additions for the perimeter benchmark: the checks Palisade's connect rules do.

    ``smtpd_delay_reject = no`` is already in the base main.cf, so the client restrictions are
    evaluated when the client connects and a refusal is sent as the greeting (554), after which
    smtpd answers every command but QUIT with 503.  The client's PTR and the forward lookup of
    its name are done by smtpd for every connection anyway (``smtpd_peername_lookup = yes``,
    the default); ``reject_unknown_reverse_client_hostname`` refuses a client without a PTR.
    ``smtpd_client_connection_rate_limit`` is anvil's per-client connection rate (per
    ``anvil_rate_time_unit``, 60 s): set high so that it counts but never triggers, as the
    gateway's ratelimit rule (1,000,000 per 15 min).
    """
    return {
        "smtpd_client_restrictions": (
            f"reject_unknown_reverse_client_hostname, reject_rbl_client {zone}=127.0.0.[2..11]"
        ),
        "smtpd_client_connection_rate_limit": str(rate_limit),
        "anvil_rate_time_unit": "60s",
    }


class PostfixError(RuntimeError):
    pass


class PostfixInstance:
    """One private Postfix instance rooted at ``root`` (created if needed)."""

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 2527,
        sink_port: int = 2600,
        smtpd_maxproc: int = 100,
        extra_settings: dict[str, str] | None = None,
    ) -> None:
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="palisade-bench-postfix-")).resolve()
        self.host = host
        self.port = port
        self.sink_port = sink_port
        self.smtpd_maxproc = smtpd_maxproc
        self.extra_settings = dict(extra_settings or {})
        self.etc = self.root / "etc"
        self.queue = self.root / "queue"
        self.data = self.root / "data"
        self.log = self.root / "log" / "postfix.log"

    # -- setup -----------------------------------------------------------------------
    def write_config(self) -> None:
        if os.geteuid() != 0:
            raise PostfixError("a private Postfix instance needs root")
        for d in (self.etc, self.queue, self.data, self.log.parent):
            d.mkdir(parents=True, exist_ok=True)
        # Postfix refuses group/world-writable parents of its queue.
        os.chmod(self.root, 0o755)
        os.chown(self.data, _uid("postfix"), _gid("postfix"))
        main_cf = MAIN_CF.format(
            etc=self.etc,
            queue=self.queue,
            data=self.data,
            sink_port=self.sink_port,
            log=self.log,
            root=self.root,
        )
        if self.extra_settings:
            main_cf += "# Extra settings (PostfixInstance extra_settings)\n" + "".join(
                f"{k} = {v}\n" for k, v in self.extra_settings.items()
            )
        (self.etc / "main.cf").write_text(main_cf)
        (self.etc / "master.cf").write_text(
            MASTER_CF.format(
                listen=f"{self.host}:{self.port}",
                smtpd_maxproc=self.smtpd_maxproc,
            )
        )
        # Creates the queue subdirectories with the right owners and modes.
        self._postfix("set-permissions", check=False)
        self._postfix("check")

    # -- lifecycle -------------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> None:
        self.write_config()
        if self.running():
            raise PostfixError(f"an instance is already running in {self.root}")
        self._postfix("start")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.master_pid() and _port_greets(self.host, self.port):
                return
            time.sleep(0.1)
        self.stop()
        raise PostfixError(f"postfix did not come up on {self.host}:{self.port}; see {self.log}")

    def stop(self, timeout: float = 20.0) -> None:
        pid = self.master_pid()
        if pid is None:
            return
        self._postfix("stop", check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):  # only our own master, by pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        # smtpd children exit when master's status pipe closes; wait for them too.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process_pids(pid):
            time.sleep(0.1)

    def cleanup(self) -> None:
        self.stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostfixInstance:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- introspection ---------------------------------------------------------------
    def master_pid(self) -> int | None:
        try:
            pid = int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) else None

    def running(self) -> bool:
        return self.master_pid() is not None

    def process_pids(self, master: int | None = None) -> list[int]:
        """The master and its direct children (smtpd, cleanup, qmgr, ...)."""
        master = master or self.master_pid()
        if master is None:
            return []
        kids = [p for p, ppid in _ppid_table().items() if ppid == master]
        return ([master] if _alive(master) else []) + kids

    def queue_size(self) -> int:
        n = 0
        for sub in QUEUE_SUBDIRS:
            for _dirpath, _dirs, files in os.walk(self.queue / sub):
                n += len(files)
        return n

    def wait_queue_empty(self, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.queue_size() == 0:
                return True
            time.sleep(0.2)
        return False

    def version(self) -> str:
        out = subprocess.run([POSTCONF, "-h", "mail_version"], capture_output=True, text=True)
        return out.stdout.strip()

    def _postfix(self, *args: str, check: bool = True) -> None:
        proc = subprocess.run(
            [POSTFIX, "-c", str(self.etc), *args], capture_output=True, text=True, timeout=60
        )
        if check and proc.returncode != 0:
            raise PostfixError(f"postfix {' '.join(args)} failed: {proc.stderr.strip()}")


def _uid(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_uid


def _gid(name: str) -> int:
    import grp

    return grp.getgrnam(name).gr_gid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _ppid_table() -> dict[int, int]:
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                table[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return table


def _port_greets(host: str, port: int, timeout: float = 2.0) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            ok = s.recv(512).startswith(b"220")
            s.sendall(b"QUIT\r\n")
            return ok
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("action", choices=["start", "stop", "status"])
    ap.add_argument("--dir", required=True, help="instance root directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=2527)
    ap.add_argument("--sink-port", type=int, default=2600)
    ap.add_argument("--smtpd-maxproc", type=int, default=100)
    ap.add_argument(
        "--perimeter",
        metavar="ZONE",
        help="add the perimeter checks (PTR, reject_rbl_client ZONE, anvil rate limit)",
    )
    args = ap.parse_args(argv)
    inst = PostfixInstance(
        args.dir,
        host=args.host,
        port=args.port,
        sink_port=args.sink_port,
        smtpd_maxproc=args.smtpd_maxproc,
        extra_settings=perimeter_settings(args.perimeter) if args.perimeter else None,
    )
    if args.action == "start":
        inst.start()
        print(f"postfix {inst.version()} running, master pid {inst.master_pid()}, ", end="")
        print(f"smtpd on {args.host}:{args.port}, relaying to [127.0.0.1]:{args.sink_port}")
        print(f"config {inst.etc}, log {inst.log}")
    elif args.action == "stop":
        inst.stop()
        print("stopped")
    else:
        pid = inst.master_pid()
        print(f"running, master pid {pid}, queue {inst.queue_size()}" if pid else "not running")
        return 0 if pid else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
