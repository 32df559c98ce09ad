"""DKIM signing of outbound mail with dkimpy, and the key files it signs with.

Owns: reading a signing key file (PEM: RSA, PKCS#1 or PKCS#8, or Ed25519, PKCS#8) with
``cryptography``, turning it into what dkimpy signs with and into the public ``p=`` value of its
DNS record; the record's text (``v=DKIM1; k=...; t=y; p=...``) and its split into 255-byte
strings for a zone file; and :class:`DkimSigner`, the ``ports.Signer`` one generation uses. The
signatures themselves are dkimpy's (relaxed/relaxed, rsa-sha256 or ed25519-sha256, RFC 8463):
no cryptography is written here.

Signed header fields: those RFC 6376 section 5.4.1 recommends plus Message-ID, MIME-Version and
the Content-* fields (dkimpy's ``DKIM.SHOULD``), each as often as present; From, To, Subject and
Date once more than present (oversigned), so none of them can be added after signing.

Keys are read once, when the signer is built (one generation: a reload reads them again). A key
that cannot be used is kept as broken: the domain's mail is deferred with the reason
(``SigningKeyError``), never sent unsigned.
Must not touch: the spool, the conversation, the config (keys are handed in as paths).
Trust: key files are operator input, checked (type, RSA size) before use; the message comes from
a client that may relay, but is still parsed only by dkimpy.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from palisade.ports import DkimSignature, MessageSource, SigningKeyError, UnsignableMessage

__all__ = [
    "MIN_RSA_BITS",
    "OVERSIGNED",
    "SIGNED_HEADERS",
    "DkimSigner",
    "SigningKey",
    "load_key",
    "public_value",
    "record_strings",
    "record_value",
    "zone_record",
]

SIGNED_HEADERS: frozenset[bytes] = frozenset(dkim.DKIM.SHOULD)
OVERSIGNED: tuple[bytes, ...] = (b"from", b"to", b"subject", b"date")
MIN_RSA_BITS = 1024  # RFC 8301: verifiers must refuse smaller keys
_ALGORITHMS = {"rsa": b"rsa-sha256", "ed25519": b"ed25519-sha256"}

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One usable key: dkimpy's form of it (``private``) and its public ``p=`` value."""

    domain: str
    selector: str
    path: str
    algorithm: str  # "rsa" or "ed25519"
    private: bytes  # RSA: PKCS#1 PEM; Ed25519: the base64 32-byte seed (what dkimpy takes)
    public: str  # the p= value of its DNS record
    bits: int  # RSA modulus size; 256 for Ed25519


def read_private_key(path: Path) -> PrivateKey:
    """The key in ``path``; :class:`SigningKeyError` naming the file when it cannot be used."""
    shown = str(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise SigningKeyError(shown, "is a directory, not a key file") from None
    except OSError as exc:
        raise SigningKeyError(shown, f"cannot be read: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SigningKeyError(
            shown, "is encrypted (a signing key must have no passphrase)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SigningKeyError(shown, f"is not a PEM private key ({reason})") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise SigningKeyError(
                shown, f"RSA key of {key.key_size} bits: at least {MIN_RSA_BITS} (2048 advised)"
            )
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise SigningKeyError(shown, f"a {type(key).__name__}: DKIM signs with RSA or Ed25519 keys")


def algorithm_of(key: PrivateKey) -> str:
    return "rsa" if isinstance(key, rsa.RSAPrivateKey) else "ed25519"


def public_value(key: PrivateKey) -> str:
    """The ``p=`` value: RSA, the base64 DER SubjectPublicKeyInfo (RFC 6376 3.6.1); Ed25519,
    the base64 raw 32-byte public key (RFC 8463 4.2)."""
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        der = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(der).decode("ascii")
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def load_key(domain: str, selector: str, path: Path) -> SigningKey:
    """The key of ``domain``/``selector`` in ``path``, ready to sign; SigningKeyError if not."""
    key = read_private_key(path)
    if isinstance(key, rsa.RSAPrivateKey):
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        bits = key.key_size
    else:
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        private, bits = base64.b64encode(seed), 256
    return SigningKey(
        domain.lower(), selector, str(path), algorithm_of(key), private, public_value(key), bits
    )


def record_value(algorithm: str, public: str, *, testing: bool = True) -> str:
    """The TXT record's text: ``v=DKIM1; k=rsa; t=y; p=...`` (``t=y``: testing, RFC 6376
    3.6.1: verifiers must not treat the mail differently for a failure)."""
    flags = "t=y; " if testing else ""
    return f"v=DKIM1; k={algorithm}; {flags}p={public}"


def record_strings(value: str, size: int = 255) -> list[str]:
    """``value`` cut into character-strings of at most ``size`` bytes (RFC 1035 3.3; DKIM
    joins them without a separator, RFC 6376 3.6.2.2)."""
    return [value[i : i + size] for i in range(0, len(value), size)] or [""]


def zone_record(name: str, value: str) -> str:
    """One TXT record in zone-file syntax, split into strings of at most 255 bytes."""
    strings = " ".join(f'"{part}"' for part in record_strings(value))
    return f"{name} IN TXT ( {strings} )"


@dataclass(frozen=True, slots=True)
class _Broken:
    path: str
    reason: str


class DkimSigner:
    """The signing keys of one generation, by domain (a ``ports.Signer``)."""

    def __init__(self, keys: Iterable[tuple[str, str, Path]]) -> None:
        """``keys``: (domain, selector, key file) in config order. Every file is read now."""
        self._keys: dict[str, list[SigningKey | _Broken]] = {}
        for domain, selector, path in keys:
            entry: SigningKey | _Broken
            try:
                entry = load_key(domain, selector, path)
            except SigningKeyError as exc:
                entry = _Broken(exc.path, exc.reason)
            self._keys.setdefault(domain.lower().rstrip("."), []).append(entry)

    @property
    def problems(self) -> list[SigningKeyError]:
        """The keys that cannot be used, for the self-check and the log."""
        return [
            SigningKeyError(k.path, k.reason)
            for entries in self._keys.values()
            for k in entries
            if isinstance(k, _Broken)
        ]

    @property
    def domains(self) -> frozenset[str]:
        return frozenset(self._keys)

    def signing_domain(self, domain: str) -> str | None:
        """``domain`` if it has keys, else its nearest parent with keys (mail of
        ``news.example.org`` is signed with ``d=example.org``: aligned under DMARC's relaxed
        rule), else None."""
        labels = domain.lower().rstrip(".").split(".")
        for start in range(len(labels) - 1):
            candidate = ".".join(labels[start:])
            if candidate in self._keys:
                return candidate
        return None

    async def sign(self, message: MessageSource, domain: str) -> DkimSignature:
        keys = self._usable(domain)
        return await asyncio.to_thread(self._sign_source, message, domain, keys)

    def _usable(self, domain: str) -> list[SigningKey]:
        entries = self._keys.get(domain, [])
        for entry in entries:
            if isinstance(entry, _Broken):
                raise SigningKeyError(entry.path, entry.reason)
        return [e for e in entries if isinstance(e, SigningKey)]

    def _sign_source(
        self, message: MessageSource, domain: str, keys: list[SigningKey]
    ) -> DkimSignature:
        with message.open() as f:
            data = f.read(message.size)
        return sign_message(data, domain, keys)

    def sign_bytes(self, data: bytes, domain: str) -> DkimSignature:
        """Signs a message in memory (the benchmark's entry: the same work as :meth:`sign`)."""
        return sign_message(data, domain, self._usable(domain))


def signed_header_list(headers: Iterable[bytes]) -> list[bytes]:
    """``h=``: each recommended field as often as present, then each of :data:`OVERSIGNED`
    once more (present or not: a missing To or Subject cannot be added either)."""
    names = [name.lower() for name in headers if name.lower() in SIGNED_HEADERS]
    return names + list(OVERSIGNED)


def sign_message(data: bytes, domain: str, keys: list[SigningKey]) -> DkimSignature:
    """One DKIM-Signature field per key, in config order; dkimpy parses the message once."""
    lines: list[bytes] = []
    try:
        signer = dkim.DKIM(data, linesep=b"\r\n")
        include = signed_header_list(name for name, _ in signer.headers)
        for key in keys:
            line = signer.sign(
                key.selector.encode("ascii"),
                domain.encode("ascii"),
                key.private,
                signature_algorithm=_ALGORITHMS[key.algorithm],
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=include,
            )
            lines.append(line if line.endswith(b"\r\n") else line + b"\r\n")
    except dkim.DKIMException as exc:
        raise UnsignableMessage(str(exc) or type(exc).__name__) from None
    return DkimSignature(b"".join(lines), domain, tuple(k.selector for k in keys))
