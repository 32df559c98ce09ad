"""The DKIM check's replacements of dkimpy's RSA helpers give what dkimpy's own give.

``palisade.policy.checks.dkim`` swaps dkimpy's ``RSASSA_PKCS1_v1_5_verify`` (for one without
byte-at-a-time integer conversions) and ``parse_public_key`` (for a cached one) in dkimpy's
namespace. Here each is run beside dkimpy's original (``dkim.crypto``, which stays untouched) on
real keys and signatures, valid and broken, and on hostile key data: same answer, or the same
exception type.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from typing import Any

import dkim
import dkim.crypto
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from palisade.policy.checks import dkim as check

KEYS = [rsa.generate_private_key(public_exponent=65537, key_size=bits) for bits in (1024, 2048)]


def der(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def outcome(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # the type is what must agree
        return ("raised", type(exc))


def test_dkimpy_calls_the_replacements() -> None:
    assert dkim.RSASSA_PKCS1_v1_5_verify is check._verify_rsa
    assert dkim.parse_public_key is check._parse_public_key
    assert dkim.crypto.RSASSA_PKCS1_v1_5_verify is not check._verify_rsa  # the original stays


@pytest.mark.parametrize("key", KEYS, ids=["rsa1024", "rsa2048"])
def test_valid_and_tampered_signatures_agree(key: rsa.RSAPrivateKey) -> None:
    pk = dkim.crypto.parse_public_key(der(key))
    message = b"header and body hash input"
    good = key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    cases = [
        good,
        good[:-1] + bytes([good[-1] ^ 1]),  # one bit flipped
        good[1:],  # too short
        b"\0" + good,  # too long by a leading zero
        b"\xff" * len(good),  # over the modulus
        b"",
    ]
    for signature in cases:
        expected = outcome(
            dkim.crypto.RSASSA_PKCS1_v1_5_verify, hashlib.sha256(message), signature, pk
        )
        assert outcome(check._verify_rsa, hashlib.sha256(message), signature, pk) == expected
    assert check._verify_rsa(hashlib.sha256(message), good, pk) is True


@settings(max_examples=60, deadline=None)
@given(signature=st.binary(max_size=300), which=st.sampled_from([0, 1]))
def test_arbitrary_signatures_agree(signature: bytes, which: int) -> None:
    pk = dkim.crypto.parse_public_key(der(KEYS[which]))
    digest = hashlib.sha256(b"x")
    expected = outcome(dkim.crypto.RSASSA_PKCS1_v1_5_verify, digest.copy(), signature, pk)
    assert outcome(check._verify_rsa, digest.copy(), signature, pk) == expected


@pytest.mark.parametrize(
    "pk",
    [
        {"modulus": 0, "publicExponent": 65537},  # a hostile key: dkimpy's pow raises
        {"modulus": 1, "publicExponent": 3},
        {"modulus": 255, "publicExponent": 3},
        {"modulus": 256, "publicExponent": 3},
    ],
)
def test_degenerate_moduli_agree(pk: dict[str, int]) -> None:
    digest = hashlib.sha256(b"x")
    expected = outcome(dkim.crypto.RSASSA_PKCS1_v1_5_verify, digest.copy(), b"\x01\x02", pk)
    assert outcome(check._verify_rsa, digest.copy(), b"\x01\x02", pk) == expected


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=400))
def test_arbitrary_key_data_parses_the_same_twice(data: bytes) -> None:
    expected = outcome(dkim.crypto.parse_public_key, data)
    assert outcome(check._parse_public_key, data) == expected
    assert outcome(check._parse_public_key, data) == expected  # and again, from the cache


def test_a_cached_key_is_a_fresh_dict_each_time() -> None:
    data = der(KEYS[0])
    first = check._parse_public_key(data)
    first["modulus"] = 7  # whatever a caller does to its copy
    assert check._parse_public_key(data) == dkim.crypto.parse_public_key(data)


def test_a_signed_message_still_verifies_and_a_changed_one_fails() -> None:
    key = KEYS[1]
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der(key))
    message = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nbody\r\n"
    signed = dkim.sign(message, b"s", b"example.org", pem) + message

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return record

    assert dkim.verify(signed, dnsfunc=dnsfunc)
    assert not dkim.verify(signed.replace(b"body", b"bodY"), dnsfunc=dnsfunc)
