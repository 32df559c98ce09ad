"""``dkim``: DKIM signatures of the message (RFC 6376), verified with dkimpy.

Owns: verifying up to ``MAX_SIGNATURES`` DKIM-Signature header fields of the spooled message and
the per-transaction finding :class:`DkimOutcome` (memoised under ``facts.tx["dkim"]``, read by
``dmarc``, by the Authentication-Results header and by the ``dkim`` check).

How: the signatures are parsed by dkimpy, the key records (``<s>._domainkey.<d>`` TXT) are asked
concurrently through the ``Resolver`` port, then dkimpy verifies each signature with a
``dnsfunc`` that only serves those prefetched answers (dkimpy never touches the network). The
parsing and the RSA / Ed25519 work run in a worker thread (``asyncio.to_thread``). The spool copy
is read whole (dkimpy needs bytes) only for a signed message and only up to ``MAX_VERIFY_SIZE``;
the bytes are handed to dkimpy and not kept beside its parsed copy.

Two of dkimpy's RSA helpers are replaced, once, in dkimpy's own namespace (any other user of
dkimpy in the process gets them too, with the same results): ``RSASSA_PKCS1_v1_5_verify`` by
one that converts between bytes and integers with ``int.from_bytes`` / ``int.to_bytes`` instead
of dkimpy's byte-at-a-time loops (a 2048-bit modulus cost three 256-step Python loops per
signature, ~15 % of a verification; the arithmetic, the padding and the comparison are dkimpy's
own), and ``parse_public_key`` by a cached one (a sender's key is the same record message after
message; dkimpy parsed its ASN.1 in Python for every signature). Both give what the originals
give for every input, exceptions included (tests/checks/test_dkim_rsa.py compares them).

Result per signature (RFC 8601 section 2.7.1 words):

* ``pass``: the signature verifies;
* ``fail``: it does not (bad signature, body hash mismatch, a key that does not match);
* ``neutral``: the signature could not be processed: syntax errors, unknown algorithm, a
  ``t=`` in the future, an expired ``x=``, a message too large to verify;
* ``permerror``: the key is missing (NXDOMAIN, no TXT record) or unusable (bad syntax, wrong
  version, revoked ``p=``, too small, of another service type, or unsupported);
* ``temperror``: the key lookup failed temporarily (timeout, SERVFAIL).

An unsigned message gives an outcome without signatures whose ``result`` is ``none``.
Signatures past ``MAX_SIGNATURES`` are ignored (a hostile message may carry hundreds).

The check ``dkim`` (stage DATA) matches when a considered signature has one of the results of
the option ``result`` (default ``["fail"]``; ``"none"`` matches an unsigned message); the option
``domain`` restricts it to signatures whose ``d=`` is that domain (no signature of that domain:
``none``). A ``temperror`` signature that is not itself listed makes the check raise
``CheckError`` when nothing else matched: the rule's ``on_error`` decides (a key that could not
be fetched may hide a failing signature).
Values: ``$result``, ``$domain``, ``$selector``.
Must not touch: the reply, logs, globals; the message is only read.
Trust: the signature fields and the key records are attacker-controlled: dkimpy's exceptions are
caught (any exception, it parses hostile text) and turned into results; names are checked to be
host names before they are asked; texts are cleaned before they reach ``reason``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import dkim as dkimpy

from palisade.policy.checks.dnsnames import is_hostname, normalise_name, safe_text
from palisade.policy.checks.options import Options
from palisade.policy.rules import (
    NO_MATCH,
    Check,
    CheckError,
    CheckFactory,
    CheckResult,
    Facts,
    Key,
    ListLookup,
    Ports,
    Stage,
    memo,
)
from palisade.ports import DnsAnswer, DnsTempError

MAX_SIGNATURES = 5
MAX_VERIFY_SIZE = 32 * 1024 * 1024  # bytes of the spool copy read for verification at most
B_PREFIX = 8  # characters of b= shown as header.b (RFC 6008)
RESULTS = ("pass", "fail", "neutral", "permerror", "temperror", "none")

_QUIET = logging.getLogger("palisade.dkimpy")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False
_QUIET.setLevel(logging.CRITICAL + 1)

_BLANKS = re.compile(rb"\s+")


def _verify_rsa(hash_obj: Any, signature: bytes, public_key: Mapping[str, int]) -> bool:
    """dkimpy's ``RSASSA_PKCS1_v1_5_verify`` with its integer conversions done by ``int``:
    ``len(int2str(n))`` is ``n``'s byte length (1 for 0), ``str2int`` is ``int.from_bytes`` and
    ``int2str(x, k)`` is ``x.to_bytes(k)`` for the ``x < n < 256**k`` that ``pow`` returns."""
    modulus = public_key["modulus"]
    if modulus < 0:  # never from dkimpy's parser; its int2str would assert
        return bool(_DKIMPY_VERIFY(hash_obj, signature, public_key))
    modlen = max(1, (modulus.bit_length() + 7) // 8)
    encoded: bytes = dkimpy.crypto.EMSA_PKCS1_v1_5_encode(hash_obj, modlen)
    value = pow(int.from_bytes(signature, "big"), public_key["publicExponent"], modulus)
    return encoded == value.to_bytes(modlen, "big")


@functools.lru_cache(maxsize=64)
def _parse_key_cached(data: bytes) -> tuple[int, int]:
    pk = _DKIMPY_PARSE(data)
    return pk["modulus"], pk["publicExponent"]


def _parse_public_key(data: bytes) -> dict[str, int]:
    """dkimpy's ``parse_public_key``, remembered per key (a fresh dict every call, as dkimpy's;
    a key it refuses raises every time, nothing is cached for it)."""
    if not isinstance(data, bytes):
        return dict(_DKIMPY_PARSE(data))
    modulus, exponent = _parse_key_cached(data)
    return {"modulus": modulus, "publicExponent": exponent}


_DKIMPY_VERIFY = dkimpy.crypto.RSASSA_PKCS1_v1_5_verify
_DKIMPY_PARSE = dkimpy.crypto.parse_public_key
dkimpy.RSASSA_PKCS1_v1_5_verify = _verify_rsa  # what DKIM.verify_sig calls
dkimpy.parse_public_key = _parse_public_key  # what load_pk_from_dns calls


@dataclass(frozen=True, slots=True)
class DkimSignatureResult:
    """The verdict on one DKIM-Signature (texts already cleaned, lower-case domain)."""

    result: str
    domain: str = ""  # d=
    selector: str = ""  # s=
    b: str = ""  # the first B_PREFIX characters of b= (header.b)
    algorithm: str = ""  # a=
    reason: str = ""  # why, when not pass


@dataclass(frozen=True, slots=True)
class DkimOutcome:
    """Every considered signature of the message, in header order."""

    signatures: tuple[DkimSignatureResult, ...] = ()

    @property
    def result(self) -> str:
        """One word for the message: ``none`` unsigned, else the best signature result
        (pass > fail > temperror > permerror > neutral)."""
        if not self.signatures:
            return "none"
        found = {s.result for s in self.signatures}
        for word in ("pass", "fail", "temperror", "permerror", "neutral"):
            if word in found:
                return word
        return "neutral"

    def passing_domains(self) -> tuple[str, ...]:
        """The d= of every signature that passed (DMARC's DKIM identifiers)."""
        return tuple(s.domain for s in self.signatures if s.result == "pass")


DKIM: Key[DkimOutcome] = Key("dkim")  # the per-transaction finding


@dataclass
class _Parsed:
    """What the first worker-thread step learnt: dkimpy's verifier and each signature."""

    verifier: Any  # dkim.DKIM, holding the parsed message
    signatures: list[dict[bytes, bytes] | DkimSignatureResult]


async def dkim_outcome(facts: Facts, ports: Ports) -> DkimOutcome:
    """The DKIM verdicts of the message, computed once per transaction.

    Before the message is known (``facts.message`` None) the outcome is empty and not kept.
    Never raises for DNS or message trouble: those become signature results.
    """
    if facts.message is None:
        return DkimOutcome()
    return await memo(facts, DKIM, lambda: _compute(facts, ports))


async def _compute(facts: Facts, ports: Ports) -> DkimOutcome:
    message = facts.message
    assert message is not None
    if not message.get_all("DKIM-Signature"):
        return DkimOutcome()
    if message.source.size > MAX_VERIFY_SIZE:
        return _too_large(message.get_all("DKIM-Signature"))
    # The key names come from the header fields already parsed while the message streamed
    # in, so the keys are fetched first and dkimpy parses and verifies in ONE thread hop.
    names: dict[bytes, str] = {}
    for value in message.get_all("DKIM-Signature")[:MAX_SIGNATURES]:
        tags = _loose_tags(value.encode("utf-8", "replace"))
        if tags:
            names[_key_name(tags)] = _query_name(tags)
    lookups = [n for n in dict.fromkeys(names.values()) if n]
    answers = await asyncio.gather(
        *(ports.resolver.query(n, "TXT") for n in lookups), return_exceptions=True
    )
    by_name: dict[str, DnsAnswer | BaseException] = dict(zip(lookups, answers, strict=True))
    keys = {raw: by_name.get(query) if query else None for raw, query in names.items()}
    return await asyncio.to_thread(_parse_and_verify, message.source, keys)


def _parse_and_verify(
    source: Any, keys: Mapping[bytes, DnsAnswer | BaseException | None]
) -> DkimOutcome:
    """Worker thread: dkimpy parses the spool copy and verifies every signature."""
    parsed = _parse(source)
    if isinstance(parsed, DkimOutcome):
        return parsed
    return DkimOutcome(tuple(_verify_all(parsed, keys)))


def _too_large(values: list[str]) -> DkimOutcome:
    return DkimOutcome(
        tuple(
            _result(_loose_tags(v.encode("utf-8", "replace")), "neutral", "message too large")
            for v in values[:MAX_SIGNATURES]
        )
    )


def _loose_tags(value: bytes) -> dict[bytes, bytes]:
    """The tags of a DKIM-Signature for reporting only (d=, s=, b=); {} when unparsable."""
    try:
        tags = dkimpy.util.parse_tag_value(_BLANKS.sub(b" ", value))
    except Exception:
        return {}
    return tags if isinstance(tags, dict) else {}


def _parse(source: Any) -> _Parsed | DkimOutcome:
    """Worker thread: reads the spool copy and lets dkimpy parse it and its signatures."""
    try:
        with source.open() as reader:
            data = reader.read(MAX_VERIFY_SIZE + 1)
        if len(data) > MAX_VERIFY_SIZE:
            return DkimOutcome((DkimSignatureResult("neutral", reason="message too large"),))
        verifier = dkimpy.DKIM(data, logger=_QUIET, minkey=1024)
        del data
    except Exception as exc:  # a header dkimpy cannot parse, an unreadable spool file
        return DkimOutcome((DkimSignatureResult("neutral", reason=_why(exc)),))
    values = [v for name, v in verifier.headers if name.lower() == b"dkim-signature"]
    signatures: list[dict[bytes, bytes] | DkimSignatureResult] = []
    for idx, value in enumerate(values[:MAX_SIGNATURES]):
        try:
            prep = verifier.verify_headerprep(idx)
        except Exception as exc:
            signatures.append(_result(_loose_tags(value), "neutral", _why(exc)))
            continue
        signatures.append(prep[0])
    return _Parsed(verifier, signatures)


def _key_name(sig: Mapping[bytes, bytes]) -> bytes:
    """The name dkimpy asks its ``dnsfunc`` for (see ``DomainSigner.verify_sig``)."""
    return sig.get(b"s", b"") + b"._domainkey." + sig.get(b"d", b"") + b"."


def _query_name(sig: Mapping[bytes, bytes]) -> str:
    """The key record's name if it is a valid host name, else "" (not asked)."""
    try:
        name = _key_name(sig).decode("ascii")
    except UnicodeDecodeError:
        return ""
    name = normalise_name(name)
    return name if is_hostname(name) else ""


def _verify_all(
    parsed: _Parsed, keys: Mapping[bytes, DnsAnswer | BaseException | None]
) -> list[DkimSignatureResult]:
    """Worker thread: one verdict per signature, with the prefetched key records."""
    out: list[DkimSignatureResult] = []
    for idx, sig in enumerate(parsed.signatures):
        if isinstance(sig, DkimSignatureResult):
            out.append(sig)
            continue
        out.append(_verify_one(parsed.verifier, idx, sig, keys.get(_key_name(sig))))
    return out


def _verify_one(
    verifier: Any, idx: int, sig: dict[bytes, bytes], answer: DnsAnswer | BaseException | None
) -> DkimSignatureResult:
    if answer is None:
        return _result(sig, "permerror", "invalid key record name")
    if isinstance(answer, DnsTempError):
        return _result(sig, "temperror", f"key lookup failed: {safe_text(answer.reason, 100)}")
    if isinstance(answer, BaseException):
        return _result(sig, "temperror", f"key lookup failed: {_why(answer)}")
    if not answer.records:
        return _result(sig, "permerror", "no key for signature")
    record, problem = _usable_key(_key_name(sig), answer.records)
    if record is None:
        return _result(sig, "permerror", problem)
    served = {_key_name(sig): record}

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return served.get(name)

    try:
        verified = verifier.verify(idx, dnsfunc=dnsfunc)
    except dkimpy.ValidationError as exc:
        word = "fail" if "body hash" in str(exc) else "neutral"
        return _result(sig, word, _why(exc))
    except (dkimpy.KeyFormatError, dkimpy.UnknownKeyTypeError, dkimpy.NaClNotFoundError) as exc:
        return _result(sig, "permerror", _why(exc))
    except Exception as exc:
        return _result(sig, "neutral", _why(exc))
    if verified:
        return _result(sig, "pass", "")
    return _result(sig, "fail", "signature did not verify")


def _usable_key(name: bytes, records: tuple[str, ...]) -> tuple[bytes | None, str]:
    """The first TXT record dkimpy accepts as a key, or (None, why none is usable)."""
    problem = "no usable key"
    for text in records:
        raw = text.encode("latin-1", "replace")
        try:
            pk, _size, _ktag, _tlsrpt = dkimpy.evaluate_pk(name, raw)
        except Exception as exc:
            problem = f"unusable key: {_why(exc)}"
            continue
        if pk is None:
            problem = "unusable key"
            continue
        return raw, ""
    return None, problem


def _result(sig: Mapping[bytes, bytes], word: str, reason: str) -> DkimSignatureResult:
    b = _BLANKS.sub(b"", sig.get(b"b", b""))[:B_PREFIX]
    return DkimSignatureResult(
        result=word,
        domain=normalise_name(_text(sig.get(b"d", b""))),
        selector=_text(sig.get(b"s", b"")),
        b=_text(b),
        algorithm=_text(sig.get(b"a", b"")),
        reason=reason,
    )


def _text(raw: bytes) -> str:
    return safe_text(raw.decode("utf-8", "replace"), 255)


def _why(exc: BaseException) -> str:
    """A short, single-line account of a dkimpy exception (its messages can quote whole keys)."""
    text = safe_text(str(exc), 120)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class DkimCheck:
    name: ClassVar[str] = "dkim"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.DATA})
    uses_dns: ClassVar[bool] = True

    def __init__(self, results: frozenset[str], domain: str | None) -> None:
        self.results = results
        self.domain = domain

    async def evaluate(self, facts: Facts, ports: Ports) -> CheckResult:
        if facts.message is None:
            return NO_MATCH
        outcome = await dkim_outcome(facts, ports)
        sigs = [s for s in outcome.signatures if self.domain is None or s.domain == self.domain]
        if not sigs:
            if "none" in self.results:
                scope = f" by {self.domain}" if self.domain else ""
                return CheckResult(
                    True,
                    f"message is not DKIM-signed{scope}",
                    {"result": "none", "domain": self.domain or "", "selector": ""},
                )
            return NO_MATCH
        for sig in sigs:
            if sig.result in self.results:
                why = f" ({sig.reason})" if sig.reason else ""
                return CheckResult(
                    True,
                    f"DKIM signature d={sig.domain} s={sig.selector}: {sig.result}{why}",
                    {"result": sig.result, "domain": sig.domain, "selector": sig.selector},
                )
        for sig in sigs:
            if sig.result == "temperror":
                raise CheckError(
                    f"DKIM signature d={sig.domain} s={sig.selector}: {sig.reason or 'temperror'}"
                )
        return NO_MATCH


def build(options: Mapping[str, Any], lists: ListLookup) -> Check:
    opts = Options(options, "dkim")
    results = opts.texts("result", ["fail"])
    for word in results:
        if word not in RESULTS:
            raise ValueError(
                f"option 'result': expected some of {', '.join(RESULTS)}, got {word!r}"
            )
    if not results:
        raise ValueError("option 'result': needs at least one result")
    domain = opts.text("domain", None)
    opts.done()
    if domain is not None:
        domain = normalise_name(domain)
        if not is_hostname(domain):
            raise ValueError(f"option 'domain': not a domain name: {domain!r}")
    return DkimCheck(frozenset(results), domain)


FACTORIES: dict[str, CheckFactory] = {"dkim": build}
