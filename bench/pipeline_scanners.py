"""rspamd and clamd for the pipeline benchmark (bench/run_pipeline.py): private instances on
free loopback ports, with their configuration, run, database and log files in one directory.

One rspamd serves both systems under test::

    Palisade --HTTP /checkv2------------------------------> rspamd normal worker(s) --> clamd
    Postfix --milter--> rspamd proxy worker (milter = yes) --HTTP--^       (antivirus module)

* The normal worker is the scanner: Palisade's rspamd adapter talks to it directly; the proxy
  worker in milter mode (Debian's worker-proxy.inc shape: an ``upstream`` pointing at the normal
  worker, not ``self_scan``) is what Postfix's ``smtpd_milters`` talks to. So the same rspamd
  workers, with the same rules, score every message of both sides; the proxy's hop is the
  price of the milter setup as packaged.
* Stock rules, scores, groups and composites from ``/etc/rspamd`` (as an operator gets them);
  modules that would ask the Internet or need redis are off (RBLs, SURBL, fuzzy, phishing,
  reputation, ...: the same list as tests/scanners/rspamd.py minus the three below), so scores
  do not depend on the outside world. **On**: ``spf``, ``dkim`` and ``dmarc`` (they resolve
  through the run's unbound, which serves the sender domain's SPF, DKIM key and DMARC records),
  ``antivirus`` (clamd, below) and ``milter_headers`` (Authentication-Results and X-Spam-Status
  for the milter side, as Palisade adds its own). DMARC's ``p=reject`` is enforced
  (``actions { reject = "reject" }``) and a virus forces ``reject``, as Palisade's rules do.
* ``local_addrs`` is narrowed to TEST-NET-1: rspamd skips SPF, DKIM and DMARC for clients in
  its local networks (127.0.0.0/8 by default), and the benchmark's clients are on 127.0.0.0/8.
* Actions: reject 15, add header 6 (stock); the greylist action is off (no greylist module, and
  Palisade has no counterpart: it compares rspamd's score with its own tag and kill levels, 6
  and 15 by default, the same numbers).
* clamd: Debian's ClamAV with no official database (none offline): one body signature of the
  EICAR test string (the database tests/scanners/clamd.py makes), ``MaxThreads`` 4. Palisade's
  clamd adapter sends it every message whole (INSTREAM); rspamd's antivirus module is set to do
  the same (``scan_mime_parts = false``: the whole message, once; its default would send only
  the non-text MIME parts, i.e. nothing for a plain-text message), so both sides cost clamd the
  same work per message.

Run as root, rspamd is told ``-u root -g root`` and clamd ``User root`` (the directories are
root's). Start-up: rspamd ~3-10 s (Lua rules, hyperscan), clamd < 1 s.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from pathlib import Path

from harness import free_port, port_taken, spawn, stop_proc, tree_pids, wait_ready

RSPAMD = shutil.which("rspamd") or "/usr/bin/rspamd"
CLAMD = shutil.which("clamd") or "/usr/sbin/clamd"
TLD_FILE = Path("/usr/share/rspamd/effective_tld_names.dat")

# The EICAR test string, assembled at run time so no file of the repository holds it whole.
EICAR = ("X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + "EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*").encode()
EICAR_SIGNATURE = "Palisade.Test.EICAR"

# Lua modules that would query DNS lists, fetch from the network or need redis (spf, dkim and
# dmarc stay on: they are part of the pipeline and resolve through the run's unbound).
OFF_MODULES = (
    "arc",
    "asn",
    "dcc",
    "dkim_signing",
    "emails",
    "fuzzy_check",
    "greylist",
    "hfilter",
    "history_redis",
    "mx_check",
    "neural",
    "phishing",
    "ratelimit",
    "rbl",
    "replies",
    "reputation",
    "rspamd_update",
    "surbl",
    "url_redirector",
    "whitelist",
)

RSPAMD_CONF = """\
# Written by bench/pipeline_scanners.py for one benchmark run.
lua = "$RULESDIR/rspamd.lua"
.include "$CONFDIR/metrics.conf"
.include "$CONFDIR/actions.conf"
.include "$CONFDIR/groups.conf"
.include "$CONFDIR/composites.conf"
.include "$CONFDIR/modules.conf"
.include "$CONFDIR/settings.conf"
modules {{
  path = "${{PLUGINSDIR}}";
  fallback_path = "${{SHAREDIR}}/lua";
}}
options {{
  pidfile = "$RUNDIR/rspamd.pid";
  filters = "chartable,dkim,regexp";
  explicit_modules = ["settings"];
  allow_raw_input = true;
  local_addrs = "192.0.2.255/32";
  task_timeout = 8s;
  tempdir = "$DBDIR";
  cache_file = "$DBDIR/symbols.cache";
  dynamic_conf = "$DBDIR/rspamd_dynamic";
  history_file = "$DBDIR/rspamd.history";
  stats_file = "$DBDIR/stats.ucl";
  control_socket = "$RUNDIR/rspamd.sock mode=0600";
  hs_cache_dir = "$DBDIR/";
  url_tld = "{url_tld}";
  dns {{
    nameserver = ["{dns}"];
    timeout = 1s;
    retransmits = 2;
  }}
}}
logging {{
  type = "file";
  filename = "$LOGDIR/rspamd.log";
  level = "{log_level}";
}}
worker "normal" {{
  bind_socket = "127.0.0.1:{port}";
  mime = true;
  count = {count};
}}
worker "rspamd_proxy" {{
  bind_socket = "127.0.0.1:{milter_port}";
  milter = yes;
  timeout = 120s;
  count = {proxy_count};
  upstream "local" {{
    default = yes;
    hosts = "127.0.0.1:{port}";
  }}
  discard_on_reject = false;
  quarantine_on_reject = false;
  reject_message = "Spam message rejected";
}}
worker "controller" {{
  bind_socket = "127.0.0.1:{controller_port}";
  count = 1;
  password = "{password}";
  secure_ip = "192.0.2.255";
}}
"""

LOCAL_D = {
    "actions.conf": "greylist = null;\n",
    "spf.conf": "check_local = true;\ncheck_authed = true;\n",
    "dkim.conf": "check_local = true;\ncheck_authed = true;\n",
    "dmarc.conf": (
        "check_local = true;\ncheck_authed = true;\n"
        'actions {{ reject = "reject"; quarantine = "add header"; }}\n'
    ),
    "antivirus.conf": (
        "clamav {{\n"
        '  type = "clamav";\n'
        '  servers = "127.0.0.1:{clamd_port}";\n'
        '  symbol = "CLAM_VIRUS";\n'
        '  action = "reject";\n'
        "  scan_mime_parts = false;\n"
        "  max_size = 26214400;\n"
        "  timeout = 30s;\n"
        "  retransmits = 1;\n"
        "}}\n"
    ),
    # Palisade checks SPF, DKIM and DMARC and calls clamd itself: rspamd skips its own for
    # Palisade's requests (its adapter sends "User-Agent: palisade"), so nothing runs twice.
    "settings.conf": (
        "palisade {{\n"
        "  priority = high;\n"
        '  request_header = {{ "User-Agent" = "/^palisade$/"; }}\n'
        "  apply {{\n"
        '    symbols_disabled = ["CLAM_VIRUS", "DKIM_CHECK", "SPF_CHECK", "DMARC_CHECK"];\n'
        "  }}\n"
        "}}\n"
    ),
    "milter_headers.conf": 'use = ["authentication-results", "x-spam-status"];\n'
    "skip_local = false;\nskip_authenticated = false;\n",
}


def _http_get(port: int, path: str, timeout: float = 2.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


class _Daemon:
    """A scanner this harness started in its own session: its processes and its stop."""

    proc: subprocess.Popen[bytes] | None = None

    def pids(self) -> list[int]:
        return tree_pids(self.proc.pid) if self.proc and self.proc.poll() is None else []

    def stop(self) -> None:
        stop_proc(self.proc, 15)


class Rspamd(_Daemon):
    """rspamd with a normal worker (``port``), a milter proxy (``milter_port``) and a
    controller (``controller_port``, for ``/stat``), files under ``root``."""

    def __init__(
        self,
        root: Path,
        dns: str,
        clamd_port: int,
        *,
        count: int = 2,
        proxy_count: int = 1,
        log_level: str = "warning",
    ):
        self.log_level = log_level  # "info" logs every scan with its symbols (costs CPU)
        self.root = root
        self.dns = dns
        self.clamd_port = clamd_port
        self.count = count
        self.proxy_count = proxy_count
        self.port = free_port()
        self.milter_port = free_port()
        self.controller_port = free_port()
        self.password = "bench-" + os.urandom(6).hex()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        local = self.root / "local.d"
        for sub in ("local.d", "db", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for module in OFF_MODULES:
            (local / f"{module}.conf").write_text("enabled = false;\n")
        for name, text in LOCAL_D.items():
            (local / name).write_text(text.format(clamd_port=self.clamd_port))
        url_tld = self.root / "tld.dat"
        lines = TLD_FILE.read_text(encoding="utf-8").splitlines()
        tlds = [s.strip() for s in lines if s.strip() and not s.startswith("//") and "." not in s]
        url_tld.write_text("".join(f"{t}\n" for t in tlds))
        conf = self.root / "rspamd.conf"
        conf.write_text(
            RSPAMD_CONF.format(
                url_tld=url_tld,
                dns=self.dns,
                port=self.port,
                count=self.count,
                milter_port=self.milter_port,
                proxy_count=self.proxy_count,
                controller_port=self.controller_port,
                password=self.password,
                log_level=self.log_level,
            )
        )
        dirs = (("LOCAL_CONFDIR", "."), ("DBDIR", "db"), ("RUNDIR", "run"), ("LOGDIR", "."))
        cmd = [RSPAMD, "-f", "-c", str(conf)] + [f"--var={k}={self.root / v}" for k, v in dirs]
        if os.geteuid() == 0:
            cmd += ["-u", "root", "-g", "root"]
        self.proc = spawn(cmd, self.root / "rspamd.out", subprocess.DEVNULL)
        if wait_ready(self.proc, self._ready, timeout, 0.2):
            return
        text = self.log()[-1500:]
        self.stop()
        raise RuntimeError(f"rspamd did not start: {text}")

    def _ready(self) -> bool:
        with contextlib.suppress(OSError):
            pong = _http_get(self.port, "/ping").rstrip().endswith(b"pong")
            return pong and port_taken(self.milter_port)
        return False

    def log(self) -> str:
        out = ""
        for name in ("rspamd.out", "rspamd.log"):
            path = self.root / name
            if path.exists():
                out += path.read_text(errors="replace")
        return out

    def stat(self) -> dict:
        """The controller's ``/stat`` (scanned, actions, ...), {} when it does not answer."""
        import json

        try:
            with socket.create_connection(("127.0.0.1", self.controller_port), timeout=5) as s:
                s.sendall(f"GET /stat HTTP/1.0\r\nPassword: {self.password}\r\n\r\n".encode())
                reply = b""
                while chunk := s.recv(65536):
                    reply += chunk
            return json.loads(reply.split(b"\r\n\r\n", 1)[1])
        except (OSError, ValueError, IndexError):
            return {}


class Clamd(_Daemon):
    """clamd with the EICAR test signature only, TCP on a free port of 127.0.0.1."""

    def __init__(self, root: Path, threads: int = 4, log_clean: bool = False) -> None:
        self.root = root
        self.log_clean = log_clean  # a log line per scan, clean or not (to count them)
        self.threads = threads
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        db = self.root / "db"
        db.mkdir(parents=True)
        (db / "palisade.ndb").write_text(f"{EICAR_SIGNATURE}:0:*:{EICAR.hex()}\n")
        lines = [
            "Foreground yes",
            f"TCPSocket {self.port}",
            "TCPAddr 127.0.0.1",
            f"DatabaseDirectory {db}",
            f"LogFile {self.root / 'clamd.log'}",
            f"PidFile {self.root / 'clamd.pid'}",
            "StreamMaxLength 25M",
            f"MaxThreads {self.threads}",
            "SelfCheck 0",
        ]
        if self.log_clean:
            lines.append("LogClean yes")
        if os.geteuid() == 0:
            lines.append("User root")
        conf = self.root / "clamd.conf"
        conf.write_text("\n".join(lines) + "\n")
        self.proc = spawn([CLAMD, "-c", str(conf)], self.root / "clamd.out", subprocess.DEVNULL)
        if wait_ready(self.proc, self._pong, timeout, 0.1):
            return
        text = (self.root / "clamd.out").read_text(errors="replace")[-800:]
        self.stop()
        raise RuntimeError(f"clamd did not start: {text}")

    def _pong(self) -> bool:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), timeout=2) as s,
        ):
            s.sendall(b"zPING\0")
            return s.recv(100).startswith(b"PONG")
        return False
