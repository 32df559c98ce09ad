"""Real certificate chains and keys for the TLS tests, made with pyca/cryptography.

trustme makes good chains but fixes the dates and names; these tests need expired and nearly
expired certificates, wrong names and chains in the wrong order.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DAY = datetime.timedelta(days=1)
NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def issue(
    common_name: str,
    issuer: Issued | None = None,
    *,
    ca: bool = False,
    names: tuple[str, ...] = (),
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Issued:
    """A certificate for ``common_name`` signed by ``issuer`` (None: self-signed)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - datetime.timedelta(days=1))
        .not_valid_after(not_after or NOW + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
    signer = issuer.key if issuer else key
    return Issued(builder.sign(signer, hashes.SHA256()), key)


@dataclass
class Pki:
    root: Issued
    intermediate: Issued
    leaf: Issued

    @classmethod
    def make(
        cls,
        hostname: str = "mx.example.test",
        *,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> Pki:
        """The leaf's validity is ``issue``'s default unless ``not_before``/``not_after`` say."""
        root = issue("Palisade Test Root", ca=True)
        intermediate = issue("Palisade Test Intermediate", root, ca=True)
        leaf = issue(
            hostname,
            intermediate,
            names=(hostname,),
            not_before=not_before,
            not_after=not_after,
        )
        return cls(root, intermediate, leaf)

    def write(
        self, directory: Path, *chain: Issued, key: Issued | None = None
    ) -> tuple[Path, Path]:
        """Writes ``chain`` (default: leaf, intermediate) and the leaf's key (or ``key``'s)."""
        cert_path, key_path = directory / "chain.pem", directory / "key.pem"
        cert_path.write_bytes(b"".join(c.pem() for c in chain or (self.leaf, self.intermediate)))
        key_path.write_bytes((key or self.leaf).key_pem())
        ca_path = directory / "ca.pem"
        ca_path.write_bytes(self.root.pem())
        return cert_path, key_path
