"""``palisade dkim keygen``: a new DKIM signing key, and the TXT record to publish for it.

Owns: generating the key (``cryptography``: RSA, 2048 bits by default, or Ed25519), writing it
under ``[dkim] keys_dir`` as ``DOMAIN.SELECTOR.rsa.key`` or ``DOMAIN.SELECTOR.ed25519.key``
(PEM; RSA as PKCS#1, which every DKIM signer reads, Ed25519 as PKCS#8), mode 0600, owned by the
service user ``palisade`` when it exists and we are root (else by whoever runs the command), and
printing the TXT record exactly as it must be published (split into strings of at most 255
bytes, ``t=y`` unless ``--no-testing``) and the config lines that use the key.
An existing key is never replaced without ``--force``; a selector already holding a key of the
other algorithm is refused (a selector publishes one key).
Trust: the arguments are the operator's; the domain and selector are checked as the config
loader checks them, so nothing but a name reaches a path.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import re
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from palisade.adapters.dkim_signer import public_value, record_value, zone_record
from palisade.config import Config

SERVICE_USER = "palisade"
_NAME_RE = re.compile(
    r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_][A-Za-z0-9_-]{0,62})*$"
)


def add_arguments(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "dkim", help="DKIM signing keys and their DNS records"
    )
    sub = parser.add_subparsers(dest="dkim_command", required=True)
    keygen = sub.add_parser("keygen", help="make a signing key and print its TXT record")
    keygen.add_argument("domain", metavar="DOMAIN")
    keygen.add_argument("--selector", required=True, metavar="S")
    keygen.add_argument("--ed25519", action="store_true", help="an Ed25519 key (RFC 8463)")
    keygen.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    keygen.add_argument("--force", action="store_true", help="replace an existing key")
    keygen.add_argument(
        "--no-testing", action="store_true", help="publish without t=y (testing mode)"
    )
    return parser


def key_file_name(domain: str, selector: str, algorithm: str) -> str:
    return f"{domain}.{selector}.{algorithm}.key"


def run(args: argparse.Namespace, config: Config) -> int:
    domain = args.domain.lower().rstrip(".")
    selector = args.selector
    if not _NAME_RE.match(domain) or "." not in domain:
        return _fail(f"expected a domain name, got {args.domain!r}")
    if not _NAME_RE.match(selector):
        return _fail(
            f"expected a selector (letters, digits, '-', '_', dots between labels), "
            f"got {selector!r}"
        )
    algorithm = "ed25519" if args.ed25519 else "rsa"
    if not args.ed25519 and not 1024 <= args.bits <= 8192:
        return _fail(f"--bits: expected 1024 to 8192 (2048 advised), got {args.bits}")
    keys_dir = config.dkim.keys_dir
    path = keys_dir / key_file_name(domain, selector, algorithm)
    other = keys_dir / key_file_name(domain, selector, "rsa" if args.ed25519 else "ed25519")
    if os.path.lexists(other):
        return _fail(
            f"{other} already holds a key for selector {selector!r}: a selector publishes one "
            "key; give this one its own selector"
        )
    if os.path.lexists(path) and not args.force:
        return _fail(f"{path} exists: not replaced (--force replaces it)")
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if args.ed25519:
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        what = "Ed25519"
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=args.bits)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        what = f"RSA {args.bits} bits"
    try:
        owner = _write_key(keys_dir, path, pem)
    except OSError as exc:
        return _fail(f"cannot write {path}: {exc.strerror or exc}")
    record = zone_record(
        f"{selector}._domainkey.{domain}.",
        record_value(algorithm, public_value(key), testing=not args.no_testing),
    )
    print(f"; wrote {path} ({what}, mode 0600, owner {owner})")
    print(f"; publish this record in the zone of {domain}:")
    print(record)
    print("; then add the key to the config (keys_dir is " + str(keys_dir) + "):")
    print(";   [[dkim.keys]]")
    print(f';   domain = "{domain}"')
    print(f';   selector = "{selector}"')
    print(f';   file = "{path.name}"')
    print(f"; and check it once published: palisade dns check {domain}")
    return 0


def _service_ids() -> tuple[int, int] | None:
    """The service user's uid and gid when we are root and it exists, else None."""
    if os.geteuid() != 0:
        return None
    try:
        user = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return None
    return user.pw_uid, user.pw_gid


def _write_key(keys_dir: Path, path: Path, pem: bytes) -> str:
    """Writes ``pem`` to ``path`` (0600) through a temporary file renamed into place, so a
    reader never sees half a key; returns who owns it."""
    ids = _service_ids()
    if not keys_dir.is_dir():
        keys_dir.mkdir(mode=0o700, parents=True)
        if ids is not None:
            os.chown(keys_dir, *ids)
    tmp = keys_dir / f".{path.name}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with open(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fchmod(f.fileno(), 0o600)
            if ids is not None:
                os.fchown(f.fileno(), *ids)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if ids is not None:
        return SERVICE_USER
    return pwd.getpwuid(os.geteuid()).pw_name


def _fail(message: str) -> int:
    print(f"palisade: dkim keygen: {message}", file=sys.stderr)
    return 2
