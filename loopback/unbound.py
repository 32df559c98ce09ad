"""A real validating resolver on loopback for tests: unbound, serving zones really signed here.

Owns: signing test zones with a fresh ECDSA P-256 key (dnspython's ``dns.dnssec.sign_zone``:
RRSIG and NSEC records, a DNSKEY), writing them as zone files, and running ``unbound`` in the
foreground on 127.0.0.1 and a free port with those zones as ``auth-zone``s used *as upstream*
(``for-upstream: yes``, ``for-downstream: no``): unbound resolves them as if it had fetched them
from an authoritative server and validates them against the trust anchor it is given, so its
answers carry AD exactly when DNSSEC says they should. It is the set-up the README documents (a
validating unbound on loopback), with the Internet replaced by zone files.

Must not touch: anything of the ``palisade`` package (it is the other side of the wire). Test
code, not shipped.

Kinds of zone (``Unbound(..., zones={apex: (kind, records)})``):

* ``"signed"``: signed, and its key is a trust anchor: answers are validated (AD);
* ``"unsigned"``: served as is, no anchor above it: answers are insecure (no AD);
* ``"bogus"``: signed with one key while the trust anchor names another: every answer fails
  validation and unbound answers SERVFAIL (an attack, or a broken zone).

``records``: ``{name relative to the apex or "@": {rdtype: [rdata text, ...]}}``.

``stubs``: ``{zone: (ip, port)}``, zones unbound asks another server for (a
``loopback/dnsserver.py`` ZoneServer): insecure, as every zone without a trust anchor above it.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import dns.dnssec
import dns.dnssectypes
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rdtypes.ANY.DNSKEY
import dns.zone
from cryptography.hazmat.primitives.asymmetric import ec

Records = Mapping[str, Mapping[str, Sequence[str]]]
KINDS = ("signed", "unsigned", "bogus")


def _zone_text(apex: str, records: Records) -> str:
    lines = [
        f"@ 300 IN SOA ns.{apex}. hostmaster.{apex}. 1 3600 600 86400 60",
        f"@ 300 IN NS ns.{apex}.",
        "ns 300 IN A 127.0.0.1",
    ]
    for name, types in records.items():
        for rdtype, values in types.items():
            lines.extend(f"{name} 300 IN {rdtype} {value}" for value in values)
    return "\n".join(lines) + "\n"


def _new_key() -> tuple[ec.EllipticCurvePrivateKey, dns.rdtypes.ANY.DNSKEY.DNSKEY]:
    key = ec.generate_private_key(ec.SECP256R1())
    dnskey = dns.dnssec.make_dnskey(
        key.public_key(), dns.dnssectypes.Algorithm.ECDSAP256SHA256, flags=257
    )
    return key, dnskey


class Unbound:
    """``unbound -d`` on 127.0.0.1:``port`` with the given zones (see the module docstring)."""

    def __init__(
        self,
        directory: Path,
        zones: Mapping[str, tuple[str, Records]],
        unbound: str = "unbound",
        stubs: Mapping[str, tuple[str, int]] | None = None,
    ) -> None:
        self.directory = directory
        self.zones = dict(zones)
        self.stubs = dict(stubs or {})
        self.unbound = unbound
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def _write_zones(self) -> tuple[list[str], list[str]]:
        """Zone files and trust anchors; returns (auth-zone stanzas, anchor lines)."""
        stanzas, anchors = [], []
        for apex, (kind, records) in self.zones.items():
            if kind not in KINDS:
                raise ValueError(f"zone kind {kind!r}: one of {KINDS}")
            origin = dns.name.from_text(apex)
            zone = dns.zone.from_text(
                _zone_text(apex.rstrip("."), records), origin=origin, relativize=False
            )
            if kind != "unsigned":
                key, dnskey = _new_key()
                with zone.writer() as txn:
                    dns.dnssec.sign_zone(zone, txn, keys=[(key, dnskey)], lifetime=7 * 86400)
                anchor = dnskey if kind == "signed" else _new_key()[1]
                anchors.append(f"{origin.to_text()} 300 IN DNSKEY {anchor.to_text()}")
            path = self.directory / f"{apex.rstrip('.')}.zone"
            zone.to_file(str(path), relativize=False)
            stanzas.append(
                "auth-zone:\n"
                f'  name: "{apex.rstrip(".")}"\n'
                f'  zonefile: "{path}"\n'
                "  for-downstream: no\n  for-upstream: yes\n  fallback-enabled: no\n"
            )
        return stanzas, anchors

    def start(self, timeout: float = 10.0) -> Unbound:
        self.directory.mkdir(parents=True, exist_ok=True)
        stanzas, anchors = self._write_zones()
        anchor_file = self.directory / "anchors"
        anchor_file.write_text("\n".join(anchors) + "\n")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        test_zones = {apex.rstrip(".").split(".")[-1] for apex in (*self.zones, *self.stubs)}
        stub_text = "".join(
            f'stub-zone:\n  name: "{zone.rstrip(".")}"\n  stub-addr: {ip}@{port}\n'
            for zone, (ip, port) in self.stubs.items()
        )
        local = "".join(f'  local-zone: "{tld}." nodefault\n' for tld in sorted(test_zones))
        conf = self.directory / "unbound.conf"
        conf.write_text(
            "server:\n"
            f"  interface: 127.0.0.1\n  port: {self.port}\n"
            '  do-daemonize: no\n  username: ""\n  chroot: ""\n'
            f'  directory: "{self.directory}"\n'
            f'  pidfile: "{self.directory / "unbound.pid"}"\n'
            f'  logfile: "{self.directory / "unbound.log"}"\n'
            "  use-syslog: no\n  verbosity: 1\n  val-log-level: 2\n"
            '  module-config: "validator iterator"\n'
            f'  trust-anchor-file: "{anchor_file}"\n'
            "  do-ip6: no\n  cache-max-ttl: 0\n  cache-max-negative-ttl: 0\n"
            "  do-not-query-localhost: no\n"
            f"{local}" + "".join(stanzas) + stub_text
        )
        self._proc = subprocess.Popen(
            [self.unbound, "-d", "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        probe = dns.message.make_query("ns." + next(iter(self.zones)).rstrip(".") + ".", "A")
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"unbound exited: {self.log()[-2000:]}")
            try:
                dns.query.udp(probe, "127.0.0.1", port=self.port, timeout=0.2)
                return self
            except (dns.exception.Timeout, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"unbound did not answer: {self.log()[-2000:]}") from None

    def log(self) -> str:
        path = self.directory / "unbound.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> Unbound:
        return self.start() if self._proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
