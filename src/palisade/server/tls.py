"""TLS for the listener: TLS 1.2 and 1.3 only, strong ciphers, chain and key from config.

Owns: the server SSLContext and how a TLS session is described in logs and Received headers
(``TLS1.3:TLS_AES_256_GCM_SHA384:256``). Uses the stdlib ``ssl`` module (OpenSSL) rather than
anything hand-written.
"""

from __future__ import annotations

import ssl
from pathlib import Path

# TLS 1.2 suites: forward secret AEAD only. No NULL, EXPORT, RC4, 3DES, MD5, CBC-SHA1 or static RSA.
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "DHE-RSA-AES256-GCM-SHA384:DHE-RSA-AES128-GCM-SHA256"
)


def server_context(certificate: Path, private_key: Path) -> ssl.SSLContext:
    """A context for STARTTLS; raises ``ssl.SSLError``/``OSError`` on a bad chain or key."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.load_cert_chain(str(certificate), str(private_key))
    return context


def client_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """A verifying client context (for the next hop), TLS 1.2 or newer."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def describe(info: tuple[str, str, int] | None) -> str | None:
    """exim's ``X=`` field: ``TLS1.3:TLS_AES_256_GCM_SHA384:256``."""
    if info is None:
        return None
    version, cipher, bits = info
    return f"{version.replace('v', '')}:{cipher}:{bits}"
