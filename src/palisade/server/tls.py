"""TLS for the listener: TLS 1.2 and 1.3 only, strong ciphers, chain and key from config.

Owns: the server SSLContext and how a TLS session is described in logs and Received headers
(``TLS1.3:TLS_AES_256_GCM_SHA384:256``), and the reason a failed handshake gets in the log.
Uses the stdlib ``ssl`` module (OpenSSL) rather than anything hand-written.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path

from palisade.obs.log import escape, escape_field

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


# "[SSL: NO_SHARED_CIPHER] no shared cipher (_ssl.c:1006)" -> "no shared cipher"
_SSL_ERROR_TEXT = re.compile(r"^(?:\[[^\]]*\] )?(?P<text>.*?)(?: \(_ssl\.c:\d+\))?$", re.DOTALL)


def handshake_error_line(helo: str | None, ip: str, port: int, exc: BaseException) -> str:
    """The main-log line for a failed STARTTLS handshake, in exim's words:
    ``TLS error on connection from (helo) [192.0.2.1]:5000 (SSL_accept): no shared cipher``
    (``(helo) `` only when the client said HELO/EHLO before STARTTLS).

    The HELO name is the client's text: besides control characters, brackets, parentheses,
    quotes and angle brackets become ``\\xNN``, so the only bracketed address in the line is
    the one written here and a fail2ban/nftfw pattern cannot be pointed at another host.
    """
    shown = f"({escape_field(helo, 100).translate(_PARENS)}) " if helo else ""
    return (
        f"TLS error on connection from {shown}[{ip}]:{port} (SSL_accept): "
        f"{escape(handshake_failure(exc), 200)}"
    )


_PARENS = {ord(c): f"\\x{ord(c):02x}" for c in "()"}  # the HELO's own delimiters here


def handshake_failure(exc: BaseException) -> str:
    """Why a server-side handshake failed, in OpenSSL's words as exim logs them after
    ``(SSL_accept):`` - ``no shared cipher``, ``unsupported protocol``, ``wrong version
    number`` -, or ``timed out`` / ``connection closed by client``. Not escaped: the caller
    escapes it like any text that reaches a log line."""
    if isinstance(exc, ssl.SSLError):
        match = _SSL_ERROR_TEXT.match(str(exc.args[1]) if len(exc.args) > 1 else str(exc))
        text = match.group("text") if match else ""
        return text or (exc.reason or "").lower().replace("_", " ") or "TLS error"
    if isinstance(exc, TimeoutError) or (
        # asyncio's (and uvloop's) ssl_handshake_timeout: "SSL handshake is taking longer..."
        isinstance(exc, ConnectionAbortedError) and "taking longer" in str(exc)
    ):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror  # "Connection reset by peer"
    return str(exc) or "connection closed by client"
