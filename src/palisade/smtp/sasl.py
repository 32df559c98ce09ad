"""SASL PLAIN (RFC 4616) and LOGIN as SMTP AUTH carries them (RFC 4954): base64 in, text out.

Owns: decoding a client's base64 responses and splitting a PLAIN message into its three parts,
and the LOGIN challenges. Nothing here checks a password (that is the Authenticator port's).

Trust: the input is a hostile line. Every failure is a :class:`SaslError` whose text never
quotes the input (it may carry a password).
"""

from __future__ import annotations

import base64
import binascii

__all__ = ["LOGIN_PASSWORD", "LOGIN_USERNAME", "SaslError", "decode", "split_plain"]

LOGIN_USERNAME = "VXNlcm5hbWU6"  # base64 of "Username:"
LOGIN_PASSWORD = "UGFzc3dvcmQ6"  # base64 of "Password:"
_MAX_FIELD = 255  # RFC 4616 section 2: at most 255 octets per field


class SaslError(Exception):
    """The response cannot be decoded; the text says why without quoting it."""


def decode(text: str) -> str:
    """The UTF-8 text a base64 response carries ("=" is the empty response, RFC 4954)."""
    text = text.strip(" ")
    if text == "=":
        return ""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise SaslError("invalid base64 data") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError("not UTF-8 text") from None


def split_plain(message: str) -> tuple[str, str, str]:
    """(authzid, authcid, password) of a PLAIN message ``authzid NUL authcid NUL passwd``."""
    parts = message.split("\0")
    if len(parts) != 3:
        raise SaslError("PLAIN message is not authzid NUL authcid NUL password")
    authzid, authcid, password = parts
    if not authcid or not password:
        raise SaslError("PLAIN message without a user name or password")
    if any(len(p.encode("utf-8")) > _MAX_FIELD for p in parts):
        raise SaslError("PLAIN field longer than 255 octets")
    return authzid, authcid, password
