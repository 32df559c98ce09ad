"""Would RSA signatures computed by OpenSSL (``cryptography``) instead of dkimpy's pure-Python
RSA be byte-identical, and how much would they save? An experiment, not what Palisade runs.

    python bench/dkim_openssl_bench.py --messages 500

dkimpy 1.1 signs RSA with ``dkim.crypto.RSASSA_PKCS1_v1_5_sign`` (EMSA-PKCS1-v1_5 encoding,
then CRT exponentiation with Python's ``pow``), called by name from ``DKIM.gen_header``; it has
no hook for another RSA implementation. The only ways to put OpenSSL under it are replacing the
module attribute ``dkim.RSASSA_PKCS1_v1_5_sign`` (process-wide) or re-implementing
``gen_header`` (dkimpy's header hashing and folding) in Palisade. This script does the first,
inside this process only, to measure and to check the outputs: for ``--messages`` generated
messages (varied headers, folding, bodies, sizes) it signs each with dkimpy as shipped and with
the OpenSSL replacement, with the same ``t=`` second, and requires the two DKIM-Signature fields
to be identical bytes (RSASSA-PKCS1-v1_5 is deterministic, so they must be). Then it prints the
CPU per signature (``DkimSigner.sign_bytes``, RSA-2048 and both keys) each way.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import dkim  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils  # noqa: E402

from palisade.adapters.dkim_signer import DkimSigner  # noqa: E402

DOMAIN = "signed.test"
_KEYS: dict[int, rsa.RSAPrivateKey] = {}
_HASHES = {"sha256": hashes.SHA256(), "sha1": hashes.SHA1()}
DKIMPY_SIGN = dkim.RSASSA_PKCS1_v1_5_sign


def openssl_sign(digest: Any, key: dict[str, int]) -> bytes:
    """dkimpy's ``RSASSA_PKCS1_v1_5_sign(hash, key)`` contract, computed by OpenSSL: the key
    is dkimpy's parsed dict (cached by modulus as an OpenSSL key), ``digest`` its hash object."""
    private = _KEYS.get(key["modulus"])
    if private is None:
        public = rsa.RSAPublicNumbers(key["publicExponent"], key["modulus"])
        private = rsa.RSAPrivateNumbers(
            p=key["prime1"],
            q=key["prime2"],
            d=key["privateExponent"],
            dmp1=key["exponent1"],
            dmq1=key["exponent2"],
            iqmp=key["coefficient"],
            public_numbers=public,
        ).private_key()
        _KEYS[key["modulus"]] = private
    algorithm = _HASHES[digest.name.lower()]
    return private.sign(digest.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm))


def write_keys(directory: Path) -> list[tuple[str, str, Path]]:
    directory.mkdir(parents=True, exist_ok=True)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    files = []
    for name, key in (("r1", rsa_key), ("e1", ed_key)):
        path = directory / f"{name}.key"
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        files.append((DOMAIN, name, path))
    return files


def message(rng: random.Random, n: int) -> bytes:
    """A varied message: header order and folding, optional fields, body size and line ends."""
    words = ["alpha", "beta", "gamma", "delta", "Grüße", "  spaced  ", "tab\tbed", "x" * 80]
    headers = [
        f"From: Sender {n} <s{n}@{DOMAIN}>",
        f"To: r{n}@example.org" + (",\r\n\tother@example.net" if rng.random() < 0.3 else ""),
        f"Subject: {' '.join(rng.choices(words, k=rng.randint(1, 12)))}",
        f"Date: Wed, 02 Dec 2026 08:{n % 60:02d}:00 +0000",
        f"Message-ID: <{n}.{rng.randint(0, 10**9)}@{DOMAIN}>",
    ]
    if rng.random() < 0.5:
        headers.append("MIME-Version: 1.0")
        headers.append("Content-Type: text/plain;\r\n charset=utf-8")
    if rng.random() < 0.3:
        headers.append("Cc: c@example.org")
    if rng.random() < 0.2:
        headers.append("X-Mailer:   folded\r\n   value  ")
    rng.shuffle(headers)
    lines = [" ".join(rng.choices(words, k=rng.randint(0, 15))) for _ in range(rng.randint(0, 400))]
    body = "\r\n".join(lines) + ("\r\n" * rng.randint(0, 3))
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode()


def cpu_per_call(call: Callable[[], object], count: int) -> float:
    started = time.process_time()
    for _ in range(count):
        call()
    return (time.process_time() - started) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    keys = write_keys(Path("/tmp/palisade-dkim-openssl-bench"))
    rsa_only = DkimSigner(keys[:1])
    both = DkimSigner(keys)
    rng = random.Random(14)

    identical = 0
    for n in range(args.messages):
        data = message(rng, n)
        while True:  # the same t= second for both signatures
            second = int(time.time())
            dkim.RSASSA_PKCS1_v1_5_sign = DKIMPY_SIGN
            shipped = both.sign_bytes(data, DOMAIN).lines
            dkim.RSASSA_PKCS1_v1_5_sign = openssl_sign
            fast = both.sign_bytes(data, DOMAIN).lines
            if int(time.time()) == second:
                break
        if shipped != fast:
            raise SystemExit(f"message {n}: signatures differ\n{shipped!r}\n{fast!r}")
        identical += 1
    print(f"{identical} messages: dkimpy's and OpenSSL's DKIM-Signature fields identical")

    samples = {}
    while len(samples) < 2:  # one message of about 4 KB, one of about 40 KB
        data = message(rng, 0)
        size = "4KB" if 3000 < len(data) < 5000 else "40KB" if 35000 < len(data) < 45000 else ""
        if size:
            samples.setdefault(size, data)
    print(f"CPU per signing call (DkimSigner.sign_bytes), median of 5 x {args.repeat}:")
    for size, sample in sorted(samples.items()):
        for label, function in (("dkimpy", DKIMPY_SIGN), ("openssl", openssl_sign)):
            dkim.RSASSA_PKCS1_v1_5_sign = function
            for name, signer in (("rsa", rsa_only), ("rsa+ed25519", both)):
                runs = [
                    cpu_per_call(lambda s=signer, m=sample: s.sign_bytes(m, DOMAIN), args.repeat)
                    for _ in range(5)
                ]
                median = statistics.median(runs) * 1000
                print(f"  {size:5} {label:8} {name:12} {median:7.3f} ms")
    dkim.RSASSA_PKCS1_v1_5_sign = DKIMPY_SIGN


if __name__ == "__main__":
    main()
