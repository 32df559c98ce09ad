"""What MTA-STS, DANE and TLS-RPT add to one delivery, per call, on this machine.

* ``sts-warm``: ``MtaStsPolicies.policy(domain)`` with the policy cached and the ``_mta-sts``
  TXT answer in the resolver's cache (the case of every message after the first to a domain);
* ``sts-fetch``: a lookup that fetches: the TXT and A answers from the resolver's cache, the
  HTTPS fetch from the loopback policy server (a new client and TLS connection each time, as
  in real use);
* ``dane-ee`` / ``dane-ta``: ``palisade.delivery.dane.matches`` for a ``3 1 1`` record (the
  leaf's key) and a ``2 1 1`` record (the intermediate: chain signatures and the name checked);
* ``tlsrpt``: ``TlsResultFiles.record`` (one JSON line appended).

Runs in one process, in rounds that alternate the cases; prints the median microseconds per
call and the load average::

    python bench/sts_bench.py [--rounds 5] [--calls 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from cryptography.hazmat.primitives import serialization  # noqa: E402

from loopback.dnsserver import start_zone_server  # noqa: E402
from loopback.stsserver import StsServer, policy_text  # noqa: E402
from palisade.adapters.dns import DnsResolver  # noqa: E402
from palisade.adapters.mta_sts import MtaStsPolicies  # noqa: E402
from palisade.adapters.tlsrpt_file import TlsResultFiles  # noqa: E402
from palisade.delivery.dane import matches  # noqa: E402
from palisade.ports import TlsaRecord, TlsResult  # noqa: E402
from tests.tls.certs import Pki  # noqa: E402


def per_call(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sts-bench-"))

    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("mta-sts.bench.test")
    cert, key, ca_file = tmp / "c.pem", tmp / "k.pem", tmp / "ca.pem"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    dns = start_zone_server()
    dns.add_zone("bench.test")
    dns.set("_mta-sts.bench.test", "TXT", ["v=STSv1; id=1;"], ttl=3600)
    dns.set("mta-sts.bench.test", "A", ["127.0.0.1"], ttl=3600)
    https = StsServer(cert, key).start()
    https.set("mta-sts.bench.test", policy_text("enforce", "mx.bench.test"))

    pki = Pki.make("mx.bench.test")
    chain = [c.cert.public_bytes(serialization.Encoding.DER) for c in (pki.leaf, pki.intermediate)]

    def spki(issued: object) -> bytes:
        key = issued.cert.public_key()  # type: ignore[attr-defined]
        raw = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return hashlib.sha256(raw).digest()

    ee = [TlsaRecord(3, 1, 1, spki(pki.leaf))]
    ta = [TlsaRecord(2, 1, 1, spki(pki.intermediate))]
    sink = TlsResultFiles(tmp / "tlsrpt")
    result = TlsResult("bench.test", "sts", ("mode: enforce",), "mx.bench.test", "127.0.0.1", True)

    loop = asyncio.new_event_loop()
    resolver = DnsResolver([dns.address], timeout=1.0)
    warm = MtaStsPolicies(resolver, ca_file=ca_file, port=https.port)
    assert loop.run_until_complete(warm.policy("bench.test")) is not None

    fetcher = MtaStsPolicies(
        DnsResolver([dns.address], timeout=1.0), ca_file=ca_file, port=https.port
    )

    def fetch_once() -> object:
        fetcher.forget("bench.test")
        got = loop.run_until_complete(fetcher.policy("bench.test"))
        assert got is not None
        return got

    cases: dict[str, tuple[Callable[[], object], int]] = {
        "sts-warm": (lambda: loop.run_until_complete(warm.policy("bench.test")), args.calls),
        "sts-fetch": (fetch_once, max(20, args.calls // 50)),
        "dane-ee": (lambda: matches(ee, chain), args.calls),
        "dane-ta": (lambda: matches(ta, chain, "mx.bench.test"), args.calls),
        "tlsrpt": (lambda: sink.record(result), args.calls),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for round_number in range(args.rounds):
        order = names if round_number % 2 == 0 else list(reversed(names))
        for name in order:
            fn, calls = cases[name]
            times[name].append(per_call(fn, calls))
    https.stop()
    dns.stop()
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; cpus {os.cpu_count()}")
    print(f"{'case':<10} {'median us/call':>15} {'min':>10} {'max':>10}")
    for name in names:
        values = times[name]
        print(
            f"{name:<10} {statistics.median(values):>15.1f} {min(values):>10.1f}"
            f" {max(values):>10.1f}"
        )


if __name__ == "__main__":
    main()
