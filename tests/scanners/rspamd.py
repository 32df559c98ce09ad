"""A private rspamd (Debian's rspamd 3.4) on loopback for the scanner and end-to-end tests.

The configuration is written into a directory the caller gives (the pytest tmp dir): a top-level
``rspamd.conf`` that takes Debian's stock rules, scores and actions from ``/etc/rspamd`` (so
GTUBE and the MIME, header and Received rules score as they do for an operator) but defines its
own options, logging and workers, and a ``local.d`` that switches off every module that asks the
network or redis (RBLs, SURBL, SPF, DKIM, DMARC, ARC, ASN, fuzzy, phishing, reputation, ...):
scores do not depend on the outside world and no scan waits for a lookup. What few lookups stay
(map URLs, received-header checks) go to a resolver on a loopback port where nothing listens.
Everything rspamd writes (its hyperscan cache included) stays in that directory; the public
suffix list is cut to its top-level domains (com, org, de, ...), which rspamd compiles in about
two seconds instead of twelve for the whole list.

Two workers, on free ports of 127.0.0.1: ``normal`` (``/checkv2``, no password) and
``controller`` (``/checkv2`` too, but behind a password, with no ``secure_ip`` that would
exempt loopback). No proxy, no fuzzy storage, no system service: run as root (the CI
container), rspamd is told ``-u root -g root``, which it accepts (without ``-u`` it refuses to
run its workers as root).

Start-up: rspamd loads its Lua rules and compiles the suffix list before it binds its sockets,
about three seconds; ``start_rspamd`` waits for ``GET /ping`` answered ``pong`` on both ports.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port
from tests.services import need_file, need_program, paused_group, stop_group

TLD_FILE = Path("/usr/share/rspamd/effective_tld_names.dat")

# Lua modules that would query DNS lists, fetch from the network or need redis.
NETWORK_MODULES = (
    "arc",
    "asn",
    "dcc",
    "dkim",
    "dmarc",
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
    "spf",
    "surbl",
    "url_redirector",
    "whitelist",
)

CONFIG = """\
lua = "$RULESDIR/rspamd.lua"
.include "$CONFDIR/metrics.conf"
.include "$CONFDIR/actions.conf"
.include "$CONFDIR/groups.conf"
.include "$CONFDIR/composites.conf"
.include "$CONFDIR/modules.conf"
modules {{
  path = "${{PLUGINSDIR}}";
  fallback_path = "${{SHAREDIR}}/lua";
}}
options {{
  pidfile = "$RUNDIR/rspamd.pid";
  filters = "chartable,regexp";
  explicit_modules = ["settings"];
  allow_raw_input = true;
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
    nameserver = ["127.0.0.1:{dns_port}"];
    timeout = 0.2s;
    retransmits = 1;
  }}
}}
logging {{
  type = "file";
  filename = "$LOGDIR/rspamd.log";
  level = "info";
}}
worker "normal" {{
  bind_socket = "127.0.0.1:{port}";
  mime = true;
  count = 1;
}}
worker "controller" {{
  bind_socket = "127.0.0.1:{controller_port}";
  count = 1;
  password = "{password}";
  secure_ip = "192.0.2.255";
  static_dir = "${{WWWDIR}}";
}}
"""


@dataclass
class RspamdProcess:
    process: subprocess.Popen[bytes]
    port: int  # the normal worker
    controller_port: int
    password: str  # the controller's
    base: Path
    started_in: float  # seconds from exec to both workers answering /ping

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def controller_url(self) -> str:
        return f"http://127.0.0.1:{self.controller_port}"

    def log(self) -> str:
        text = ""
        for name in ("rspamd.out", "rspamd.log"):
            path = self.base / name
            if path.exists():
                text += path.read_text(errors="replace")
        return text

    def paused(self) -> AbstractContextManager[None]:
        """rspamd and its workers stopped (SIGSTOP): a hung daemon."""
        return paused_group(self.process)

    def stop(self) -> None:
        stop_group(self.process)


def ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"GET /ping HTTP/1.0\r\n\r\n")
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
            return reply.startswith(b"HTTP/1.") and reply.rstrip().endswith(b"pong")
    except OSError:
        return False


def top_level_domains() -> list[str]:
    """The single-label entries of rspamd's public suffix list (com, org, de, ...)."""
    text = need_file(TLD_FILE, "rspamd").read_text(encoding="utf-8")
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("//") and "." not in line]


def start_rspamd(base: Path, timeout: float = 120.0) -> RspamdProcess:
    """rspamd with its configuration, database, run and log files in ``base`` (created)."""
    rspamd = need_program("rspamd", "rspamd")
    need_file(Path("/etc/rspamd/modules.conf"), "rspamd")
    base.mkdir(parents=True, exist_ok=True)
    local = base / "local.d"
    for name in ("local.d", "db", "run"):
        (base / name).mkdir(exist_ok=True)
    for module in NETWORK_MODULES:
        (local / f"{module}.conf").write_text("enabled = false;\n")
    port, controller_port = free_port(), free_port()
    password = "ctl-" + secrets.token_hex(8)
    url_tld = base / "tld.dat"
    url_tld.write_text("".join(f"{tld}\n" for tld in top_level_domains()))
    config = base / "rspamd.conf"
    config.write_text(
        CONFIG.format(
            dns_port=free_port(),
            url_tld=url_tld,
            port=port,
            controller_port=controller_port,
            password=password,
        )
    )
    args = [rspamd, "-f", "-c", str(config)]
    args += [f"--var={name}={base / sub}" for name, sub in _DIRS]
    if os.geteuid() == 0:
        args += ["-u", "root", "-g", "root"]
    out = (base / "rspamd.out").open("wb")
    started = time.monotonic()
    process = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
    )
    out.close()
    result = RspamdProcess(process, port, controller_port, password, base, 0.0)
    deadline = started + timeout
    while not (ping(port) and ping(controller_port)):
        if process.poll() is not None or time.monotonic() > deadline:
            result.stop()
            raise RuntimeError(f"rspamd did not start:\n{result.log()}")
        time.sleep(0.05)
    result.started_in = time.monotonic() - started
    return result


_DIRS = (("LOCAL_CONFDIR", "."), ("DBDIR", "db"), ("RUNDIR", "run"), ("LOGDIR", "."))
