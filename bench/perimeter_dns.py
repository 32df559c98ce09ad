"""DNS for the perimeter benchmark: a zone server, a local unbound in front of it, resolv.conf.

Both systems resolve through the same path::

    Postfix (libc resolver, /etc/resolv.conf -> 127.0.0.1:53) --\\
                                                                  unbound 127.0.0.1:53 (cache)
    Palisade ([dns] nameservers = ["127.0.0.1:53"]) -------------/      |  stub-zones
                                                                        v
                      loopback/dnsserver.py ZoneServer on 127.0.0.1:<random port> (the zone data)

* The zone server (``loopback.dnsserver.ZoneServer``, dnslib) holds ``bench.test`` (A records of the
  client names), ``zen.bench.test`` (the DNSBL) and ``127.in-addr.arpa`` (PTR records), all with
  the same TTL and SOA MINIMUM (negative TTL).
* unbound (``unbound -d -c /tmp/palisade-bench/unbound/unbound.conf``) listens on 127.0.0.1:53,
  iterator only (no DNSSEC validation), ``stub-zone`` for ``bench.test`` and
  ``127.in-addr.arpa`` pointing at the zone server (``local-zone: 127.in-addr.arpa nodefault``
  lifts unbound's built-in localhost reverse zone), and ``forward-zone "."`` to the nameservers
  that were in /etc/resolv.conf before the run, so the rest of the machine keeps resolving while
  resolv.conf points at 127.0.0.1.  Its counters (``unbound-control stats_noreset``,
  ``total.num.queries``) are what "DNS queries per transaction" counts: every query a system sent
  to the resolver, cache hit or not.  The zone server's own counter says how many of them missed
  unbound's cache.
* /etc/resolv.conf is replaced by ``nameserver 127.0.0.1`` for the run (Postfix's libc resolver
  only reads that file, port 53) and restored in a ``finally`` (also on SIGTERM/Ctrl-C); a copy
  of the original is kept in /tmp/palisade-bench/resolv.conf.orig until it is restored.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from harness import spawn, stop_proc, wait_ready  # noqa: E402
from loopback.dnsserver import ZoneServer  # noqa: E402  (shared with the tests)

UNBOUND = shutil.which("unbound") or "/usr/sbin/unbound"
UNBOUND_CONTROL = shutil.which("unbound-control") or "/usr/sbin/unbound-control"
RESOLV_CONF = Path("/etc/resolv.conf")

BL_ZONE = "zen.bench.test"


def good_ips(first: int = 10, count: int = 50) -> list[str]:
    """Clients with PTR + matching A, not listed: 127.0.0.10 .. 127.0.0.59."""
    return [f"127.0.0.{i}" for i in range(first, first + count)]


def listed_ips(first: int = 10, count: int = 50) -> list[str]:
    """Clients with PTR + matching A, listed in zen.bench.test: 127.0.1.10 .. 127.0.1.59."""
    return [f"127.0.1.{i}" for i in range(first, first + count)]


def client_name(ip: str) -> str:
    _a, _b, c, d = ip.split(".")
    return f"c{d}.bench.test" if c == "0" else f"l{c}-{d}.bench.test"


def build_zone(ttl: int, good: list[str], listed: list[str]) -> ZoneServer:
    """The bench zones, every record and the negative TTL (SOA MINIMUM) set to ``ttl``."""
    zone = ZoneServer(default_ttl=ttl)
    for apex in ("bench.test", BL_ZONE, "127.in-addr.arpa"):
        zone.add_zone(apex, negative_ttl=ttl, ttl=ttl)
    # 127.0.0.1 too: the harness's start-up probes (wait_greeting) connect from it.
    for ip in ["127.0.0.1", *good, *listed]:
        name = client_name(ip)
        rev = ".".join(reversed(ip.split("."))) + ".in-addr.arpa"
        zone.set(rev, "PTR", [name + "."], ttl=ttl)
        zone.set(name, "A", [ip], ttl=ttl)
    for ip in listed:
        zone.list_address(BL_ZONE, ip, "127.0.0.2", txt=f"{ip} listed (bench)", ttl=ttl)
    # RFC 5782 section 5 test points (Palisade probes them): 127.0.0.2 listed, 127.0.0.1 not.
    zone.list_address(BL_ZONE, "127.0.0.2", "127.0.0.2", txt="test point", ttl=ttl)
    return zone


def original_nameservers(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver" and not parts[1].startswith("127."):
            out.append(parts[1])
    return out


UNBOUND_CONF = """\
# Written by bench/perimeter_dns.py for one benchmark run.
server:
    interface: {interface}
    port: {port}
    do-ip6: no
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{root}"
    pidfile: "{root}/unbound.pid"
    use-syslog: no
    logfile: "{root}/unbound.log"
    verbosity: 1
    num-threads: 1
    access-control: 127.0.0.0/8 allow
    module-config: "iterator"
    do-not-query-localhost: no
    qname-minimisation: no
    prefetch: no
    statistics-cumulative: no
    extended-statistics: yes
    local-zone: "127.in-addr.arpa." nodefault
    local-zone: "test." nodefault
    domain-insecure: "bench.test."
    domain-insecure: "127.in-addr.arpa."

stub-zone:
    name: "bench.test."
    stub-addr: 127.0.0.1@{zone_port}

stub-zone:
    name: "127.in-addr.arpa."
    stub-addr: 127.0.0.1@{zone_port}
{forward}
remote-control:
    control-enable: yes
    control-interface: "{root}/control.sock"
    control-use-cert: no
"""


class Unbound:
    """A private unbound on 127.0.0.1:``port`` in front of the zone server."""

    def __init__(
        self,
        root: Path,
        zone_port: int,
        upstream: list[str],
        port: int = 53,
        interface: str = "127.0.0.1",
    ) -> None:
        self.root = root
        self.port = port
        self.interface = interface  # another loopback address keeps 127.0.0.1:53 free
        self.zone_port = zone_port
        self.upstream = upstream
        self.conf = root / "unbound.conf"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        forward = ""
        if self.upstream:
            forward = '\nforward-zone:\n    name: "."\n' + "".join(
                f"    forward-addr: {a}\n" for a in self.upstream
            )
        self.conf.write_text(
            UNBOUND_CONF.format(
                port=self.port,
                interface=self.interface,
                root=self.root,
                zone_port=self.zone_port,
                forward=forward,
            )
        )
        chk = subprocess.run(
            ["unbound-checkconf", str(self.conf)], capture_output=True, text=True, timeout=30
        )
        if chk.returncode != 0:
            raise RuntimeError(f"unbound-checkconf: {chk.stdout.strip()} {chk.stderr.strip()}")
        self.proc = spawn([UNBOUND, "-d", "-c", str(self.conf)], self.root / "unbound.out")
        if wait_ready(self.proc, lambda: self.stats() is not None, timeout, 0.2):
            return
        log = (self.root / "unbound.log").read_text(errors="replace") if self.root.exists() else ""
        self.stop()
        raise RuntimeError(f"unbound did not start: {log.strip()[-400:]}")

    def stats(self) -> dict[str, float] | None:
        """``unbound-control stats_noreset`` as a dict (None if unbound does not answer)."""
        try:
            out = subprocess.run(
                [UNBOUND_CONTROL, "-c", str(self.conf), "stats_noreset"],
                capture_output=True,
                text=True,
                timeout=10,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode != 0:
            return None
        res = {}
        for line in out.stdout.splitlines():
            k, _, v = line.partition("=")
            with contextlib.suppress(ValueError):
                res[k.strip()] = float(v)
        return res

    def queries(self) -> int:
        """Queries received from clients so far (cache hits included)."""
        s = self.stats() or {}
        return int(s.get("total.num.queries", 0))

    def cache_hits(self) -> int:
        s = self.stats() or {}
        return int(s.get("total.num.cachehits", 0))

    def stop(self) -> None:
        stop_proc(self.proc, 10)


@contextlib.contextmanager
def resolv_conf(text: str, backup: Path) -> Iterator[str]:
    """/etc/resolv.conf replaced by ``text`` inside the block; the original is put back in any
    case (the caller turns SIGTERM into an exception).  Yields the original content."""
    original_bytes = RESOLV_CONF.read_bytes()
    st = RESOLV_CONF.stat()
    backup.parent.mkdir(parents=True, exist_ok=True)
    backup.write_bytes(original_bytes)
    try:
        # Rewrite in place (keeps the inode, owner and mode; resolv.conf may be a bind mount).
        with open(RESOLV_CONF, "w") as f:
            f.write(text)
        yield original_bytes.decode(errors="replace")
    finally:
        with open(RESOLV_CONF, "wb") as f:
            f.write(original_bytes)
        with contextlib.suppress(OSError):
            os.chmod(RESOLV_CONF, st.st_mode & 0o7777)
        if RESOLV_CONF.read_bytes() == original_bytes:
            backup.unlink(missing_ok=True)


class BenchDns:
    """Zone server + unbound (+ resolv.conf) for one run; ``with BenchDns(...) as dns:``."""

    def __init__(
        self,
        root: Path,
        ttl: int,
        port: int = 53,
        swap_resolv_conf: bool = True,
        interface: str = "127.0.0.1",
    ):
        self.root = root
        self.interface = interface
        self.ttl = ttl
        self.port = port
        self.swap = swap_resolv_conf
        self.good = good_ips()
        self.listed = listed_ips()
        self.zone = build_zone(ttl, self.good, self.listed)
        self.unbound: Unbound | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> BenchDns:
        try:
            self.zone.start()
            self._stack.callback(self.zone.stop)
            original = RESOLV_CONF.read_text(errors="replace")
            self.unbound = Unbound(
                self.root / "unbound",
                self.zone.port,
                original_nameservers(original),
                self.port,
                self.interface,
            )
            self.unbound.start()
            self._stack.callback(self.unbound.stop)
            if self.swap:
                self._stack.enter_context(
                    resolv_conf(
                        "# palisade bench (temporary; restored at the end of the run)\n"
                        "nameserver 127.0.0.1\n",
                        self.root / "resolv.conf.orig",
                    )
                )
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def counts(self) -> dict[str, int]:
        """Counters now: queries unbound received (cache hits and per type too; anything else on
        the machine that resolves during the run is counted as well, the per-type numbers show
        it), and queries that reached the zone server (missed unbound's cache)."""
        assert self.unbound is not None
        s = self.unbound.stats() or {}
        res = {
            "resolver_queries": int(s.get("total.num.queries", 0)),
            "resolver_cache_hits": int(s.get("total.num.cachehits", 0)),
            "zone_queries": self.zone.total_queries,
        }
        for t in ("PTR", "A", "AAAA", "TXT", "MX"):
            res[f"resolver_{t}"] = int(s.get(f"num.query.type.{t}", 0))
        return res


def _selftest() -> int:
    """python bench/perimeter_dns.py: start everything, ask a few names, stop (no resolv.conf)."""
    import dns.resolver

    with BenchDns(Path("/tmp/palisade-bench/dns-selftest"), 300, swap_resolv_conf=False) as d:
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = ["127.0.0.1"]
        r.port = d.port
        for name, t in (
            ("10.0.0.127.in-addr.arpa", "PTR"),
            ("c10.bench.test", "A"),
            ("10.1.0.127.zen.bench.test", "A"),
            ("10.1.0.127.zen.bench.test", "TXT"),
            ("10.0.0.127.zen.bench.test", "A"),
            ("debian.org", "A"),
        ):
            try:
                ans = r.resolve(name, t, lifetime=5)
                print(name, t, [a.to_text() for a in ans], ans.rrset.ttl)
            except Exception as e:
                print(name, t, type(e).__name__)
        print(d.counts())
    return 0


if __name__ == "__main__":
    sys.exit(_selftest())
