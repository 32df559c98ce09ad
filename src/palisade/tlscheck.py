"""Certificate-chain analysis: what an operator must know about a TLS certificate chain and key.

Owns: the findings about a chain as a server sends it (or as a ``[tls] certificate`` file holds
it): each certificate's validity period (an error once expired or not yet valid, a warning under
:data:`WARN_DAYS` days), the order (leaf first, each certificate issued by the next: name *and*
signature; the root is not needed), whether a private key belongs to the leaf, and whether the
leaf is valid for a host name or IP address. Used by ``palisade tls check`` (a chain fetched from
a server) and meant for the start-up self-check of the configured certificate and key files
(:func:`check_certificate_files`).

Must not touch: sockets, the config, logs. Verification against a trust store is not done here:
it needs the store and a handshake, and ``palisade tls check`` asks OpenSSL for it.
Trust: certificates and keys are untrusted input; every parse failure becomes an error finding
naming the file, never an exception. Subject and issuer texts come from the certificate and are
escaped before they reach a message (control characters could rewrite a terminal line). Key
material never appears in a finding.

Parsing and signature checks use pyca/cryptography; host-name matching (RFC 6125: DNS names in
subjectAltName, one leftmost wildcard label, IP addresses) uses pyca's ``service-identity``
rather than hand-written matching.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import service_identity
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)

from palisade.obs.log import escape

WARN_DAYS = 14

Level = Literal["error", "warning", "ok"]


class Finding(NamedTuple):
    """One statement about a chain: ``("error", "certificate 1 ... expired on ...")``."""

    level: Level
    message: str


def name(value: x509.Name) -> str:
    """A certificate name as RFC 4514 text, safe for one line of output."""
    return escape(value.rfc4514_string(), 200) or "(empty)"


def days_left(cert: x509.Certificate, now: datetime.datetime) -> int:
    """Whole days from ``now`` until the certificate's notAfter (negative once expired)."""
    return (cert.not_valid_after_utc - now) // datetime.timedelta(days=1)


def _when(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when ``issuer``'s name is ``cert``'s issuer and its key signed ``cert``."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject and issued_by(cert, cert)


def _label(index: int, cert: x509.Certificate) -> str:
    return f"certificate {index} ({name(cert.subject)})"


def _validity(index: int, cert: x509.Certificate, now: datetime.datetime) -> Finding:
    left = days_left(cert, now)
    after = _when(cert.not_valid_after_utc)
    if cert.not_valid_before_utc > now:
        return Finding(
            "error", f"{_label(index, cert)} is not valid before {_when(cert.not_valid_before_utc)}"
        )
    if cert.not_valid_after_utc <= now:
        return Finding("error", f"{_label(index, cert)} expired on {after}")
    if left < WARN_DAYS:
        return Finding("warning", f"{_label(index, cert)} expires on {after} ({left} days left)")
    return Finding("ok", f"{_label(index, cert)} valid until {after} ({left} days left)")


def _order(certs: Sequence[x509.Certificate]) -> list[Finding]:
    findings: list[Finding] = []
    for index in range(len(certs) - 1):
        cert, following = certs[index], certs[index + 1]
        if issued_by(cert, following):
            continue
        elsewhere = [
            other
            for other, candidate in enumerate(certs)
            if other != index and other != index + 1 and issued_by(cert, candidate)
        ]
        if _self_signed(cert):
            why = "it is a self-signed root: only the end of a chain may have one"
        elif elsewhere:
            why = f"its issuer is certificate {elsewhere[0]}: wrong order"
        else:
            why = f"its issuer {name(cert.issuer)} is not in the chain: missing intermediate?"
        findings.append(
            Finding(
                "error",
                f"chain out of order: {_label(index, cert)} is not issued by the next "
                f"certificate ({name(following.subject)}); {why}",
            )
        )
    if not findings:
        findings.append(
            Finding(
                "ok",
                "chain in order: leaf first, each certificate issued by the next"
                if len(certs) > 1
                else "chain is the leaf certificate alone",
            )
        )
    if len(certs) > 1 and _self_signed(certs[-1]):
        findings.append(
            Finding("ok", "chain ends with a self-signed root (not needed; clients have it)")
        )
    return findings


def _public_key(value: x509.Certificate | PrivateKeyTypes) -> bytes:
    return value.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        *san.get_values_for_type(x509.DNSName),
        *map(str, san.get_values_for_type(x509.IPAddress)),
    ]


def _hostname(cert: x509.Certificate, hostname: str) -> Finding:
    try:
        address = ipaddress.ip_address(hostname)
    except ValueError:
        address = None
    try:
        if address is not None:
            verify_certificate_ip_address(cert, str(address))
        else:
            verify_certificate_hostname(cert, hostname)
    except (service_identity.VerificationError, service_identity.CertificateError, ValueError):
        names = ", ".join(escape(n, 100) for n in _names(cert)) or "none"
        return Finding(
            "error",
            f"certificate is not valid for {escape(hostname, 100)} (its names: {names})",
        )
    return Finding("ok", f"certificate is valid for {escape(hostname, 100)}")


def _key(
    private_key: PrivateKeyTypes, leaf: x509.Certificate, key_name: str, cert_name: str
) -> Finding:
    if _public_key(private_key) == _public_key(leaf):
        return Finding("ok", f"{key_name} matches {cert_name}")
    return Finding("error", f"{key_name} does not match {cert_name} (its first certificate)")


def analyse_chain(
    certs: Sequence[x509.Certificate],
    private_key: PrivateKeyTypes | None = None,
    hostname: str | None = None,
    now: datetime.datetime | None = None,
    *,
    serving: bool = False,
) -> list[Finding]:
    """Findings about a chain, leaf first: validity of each certificate, order, whether
    ``private_key`` belongs to the leaf, whether the leaf is valid for ``hostname``.

    ``serving``: the chain is our own, checked before ``serve`` starts. An expired (or not yet
    valid) certificate and a host-name mismatch are then warnings, not errors: senders use
    STARTTLS opportunistically and most do not verify, so refusing to start would turn a TLS
    blemish into a mail outage. A wrong order or a key that does not match stay errors."""
    if not certs:
        return [Finding("error", "no certificate")]
    now = now or datetime.datetime.now(datetime.UTC)
    identity = [_validity(index, cert, now) for index, cert in enumerate(certs)]
    if hostname:
        identity.append(_hostname(certs[0], hostname))
    if serving:
        identity = [Finding("warning", f.message) if f.level == "error" else f for f in identity]
    findings = identity[: len(certs)]
    findings.extend(_order(certs))
    if private_key is not None:
        findings.append(_key(private_key, certs[0], "the private key", "the certificate"))
    findings.extend(identity[len(certs) :])
    return findings


def check_certificate_files(
    cert_path: Path,
    key_path: Path | None,
    hostname: str | None,
    now: datetime.datetime | None = None,
    *,
    serving: bool = False,
) -> list[Finding]:
    """:func:`analyse_chain` (``serving`` as there) for PEM files: the chain (leaf first) in
    ``cert_path``, the key in ``key_path`` (None: also in ``cert_path``). An unreadable file, a
    file without PEM certificates, and a key that cannot be loaded are error findings naming the
    file."""
    try:
        cert_data = cert_path.read_bytes()
    except OSError as exc:
        return [Finding("error", f"{cert_path}: cannot read: {exc.strerror or exc}")]
    try:
        certs = x509.load_pem_x509_certificates(cert_data)
    except ValueError:
        return [Finding("error", f"{cert_path}: no PEM certificate in it (or a damaged one)")]
    key_file = key_path or cert_path
    try:
        key_data = cert_data if key_path is None else key_path.read_bytes()
    except OSError as exc:
        return [Finding("error", f"{key_file}: cannot read: {exc.strerror or exc}")]
    findings = analyse_chain(certs, None, hostname, now, serving=serving)
    try:
        private_key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        findings.append(Finding("error", f"{key_file}: the private key is encrypted"))
    except (ValueError, UnsupportedAlgorithm):
        findings.append(Finding("error", f"{key_file}: no usable PEM private key in it"))
    else:
        findings.append(_key(private_key, certs[0], f"private key {key_file}", str(cert_path)))
    return findings
