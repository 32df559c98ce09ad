"""DANE for SMTP (RFC 7672): which TLSA records count, and whether a server's chain matches them.

Owns: looking up ``_<port>._tcp.<host>`` TLSA records through the ``Resolver`` port and keeping
only what RFC 7672 lets an SMTP client use (:class:`DaneTlsaSource`), matching a certificate
chain against those records (:func:`matches`). (The peer's chain is taken off the connection by
``palisade.delivery.nexthop.peer_chain``: on Python 3.11 through the ``_ssl`` object's
``get_unverified_chain()``, public only from 3.13.)

Must not touch: the SMTP conversation or the choice of TLS level (the MX delivery decides that
DANE applies and calls these), and any adapter.

Trust: the records come from the DNS and are trusted only when the resolver said they were
DNSSEC-validated (``DnsAnswer.authentic``; see ``palisade.adapters.dns`` for when that bit is
believed). The certificates come from the server being tested and are hostile input: they are
parsed by pyca/cryptography, and a certificate that does not parse never matches.

RFC 7672 choices:

* usable records are usage 3 (DANE-EE) and 2 (DANE-TA) only (section 3.1.3: PKIX-TA and
  PKIX-EE, usages 0 and 1, are not for SMTP); selectors 0 (the certificate) and 1 (its
  SubjectPublicKeyInfo); matching types 0 (exact), 1 (SHA-256) and 2 (SHA-512). A record with
  anything else is unusable and ignored; when none is usable, the host has no DANE (None);
* DANE-EE (section 3.1.1): the leaf matches, and that is all: no name check, no dates, no chain;
* DANE-TA (section 3.1.2): a certificate the server sent above the leaf matches (a bare public
  key cannot be reconstructed from a digest, so the trust anchor must be in the chain, as the
  RFC requires of servers), every certificate from the leaf up to it is signed by the next, the
  leaf is within its dates and names the MX host (section 3.2.3, wildcards in the left-most
  label allowed): this needs ``hostname``; without it, usage 2 records never match.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from palisade.ports import Resolver, TlsaRecord

__all__ = ["DaneTlsaSource", "matches", "parse_tlsa", "usable"]

DANE_TA = 2
DANE_EE = 3
_SELECTORS = (0, 1)
_MTYPES = (0, 1, 2)


def parse_tlsa(text: str) -> TlsaRecord | None:
    """A TLSA record from its presentation format (``"3 1 1 ab12..."``, the hex possibly split by
    blanks, as dnspython writes long data), or None when it does not parse."""
    fields = text.split()
    if len(fields) < 4:
        return None
    try:
        usage, selector, mtype = (int(f) for f in fields[:3])
        data = bytes.fromhex("".join(fields[3:]))
    except ValueError:
        return None
    if not all(0 <= n <= 255 for n in (usage, selector, mtype)):
        return None
    return TlsaRecord(usage=usage, selector=selector, mtype=mtype, data=data)


def usable(record: TlsaRecord) -> bool:
    """Whether an SMTP client may use ``record`` (RFC 7672 section 3.1)."""
    if record.usage not in (DANE_TA, DANE_EE) or record.selector not in _SELECTORS:
        return False
    if record.mtype == 1:
        return len(record.data) == 32
    if record.mtype == 2:
        return len(record.data) == 64
    return record.mtype == 0 and len(record.data) > 0


class DaneTlsaSource:
    """The ``TlsaSource`` port over a ``Resolver``: authenticated, usable TLSA records only."""

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver

    async def tlsa(self, host: str, port: int) -> tuple[TlsaRecord, ...] | None:
        """The usable records of ``_port._tcp.host``; None when the answer is not authenticated
        or holds none (RFC 7672 section 2.2). A failed lookup raises ``DnsTempError``: the
        delivery defers rather than downgrade a host that may have DANE."""
        name = f"_{int(port)}._tcp.{host.rstrip('.')}"
        answer = await self._resolver.query(name, "TLSA")
        if not answer.authentic:
            return None
        records = []
        for text in answer.records:
            record = parse_tlsa(text)
            if record is not None and usable(record):
                records.append(record)
        return tuple(records) or None


def _associated_data(cert: x509.Certificate, selector: int) -> bytes:
    if selector == 0:
        return cert.public_bytes(serialization.Encoding.DER)
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _digest(data: bytes, mtype: int) -> bytes:
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def _record_matches(record: TlsaRecord, cert: x509.Certificate) -> bool:
    try:
        data = _associated_data(cert, record.selector)
    except (ValueError, TypeError):  # a key type cryptography cannot serialise
        return False
    return _digest(data, record.mtype) == record.data


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:  # InvalidSignature, names that differ, algorithms it cannot check
        return False
    return True


def _names_host(cert: x509.Certificate, hostname: str) -> bool:
    from service_identity import VerificationError
    from service_identity.cryptography import verify_certificate_hostname

    try:
        verify_certificate_hostname(cert, hostname.rstrip(".").lower())
    except (VerificationError, ValueError):
        return False
    except Exception:  # a certificate service_identity cannot read names from (hostile input)
        return False
    return True


def _within_dates(cert: x509.Certificate, now: datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def matches(
    records: Sequence[TlsaRecord],
    chain_der: Sequence[bytes],
    hostname: str | None = None,
    *,
    now: datetime | None = None,
) -> bool:
    """Whether the server's chain (DER, leaf first, as sent) satisfies one usable record.

    ``hostname``: the MX host name, needed for DANE-TA records (their leaf must name it);
    DANE-EE records need nothing but the leaf.
    """
    if not chain_der:
        return False
    chain: list[x509.Certificate] = []
    for der in chain_der:
        try:
            chain.append(x509.load_der_x509_certificate(der))
        except ValueError:
            break  # what follows an unparsable certificate cannot be chained to
    if not chain:
        return False
    leaf = chain[0]
    when = now or datetime.now(UTC)
    for record in records:
        if not usable(record):
            continue
        if record.usage == DANE_EE and _record_matches(record, leaf):
            return True
        if record.usage == DANE_TA and hostname and _ta_matches(record, chain, hostname, when):
            return True
    return False


def _ta_matches(
    record: TlsaRecord, chain: list[x509.Certificate], hostname: str, now: datetime
) -> bool:
    for depth in range(1, len(chain)):
        if not _signed_by(chain[depth - 1], chain[depth]):
            return False  # the chain breaks below any anchor further up
        if _record_matches(record, chain[depth]):
            return _within_dates(chain[0], now) and _names_host(chain[0], hostname)
    return False
