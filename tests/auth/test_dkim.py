"""DKIM verification through the Resolver port (dkim_outcome) and the ``dkim`` check."""

from __future__ import annotations

import base64
import importlib.util
import re
from typing import Any

import pytest

from loopback.dnsserver import ZoneServer
from palisade.policy.checks import dkim as dkim_module
from palisade.policy.checks.dkim import FACTORIES, DkimOutcome, dkim_outcome
from palisade.policy.rules import CheckError, CheckResult, Facts, Ports
from tests.auth.conftest import (
    Messages,
    data,
    key_record,
    make_facts,
    plain_message,
    publish_key,
    run,
    sign,
)
from tests.checks.harness import NoLists
from tests.messages import FileSource

FOOTBALL = "football.example.com"
HAVE_NACL = importlib.util.find_spec("nacl") is not None


def serve_rfc8463(dns: ZoneServer, test_key: str = "test.txt") -> None:
    dns.add_zone(FOOTBALL)
    dns.set(f"brisbane._domainkey.{FOOTBALL}", "TXT", [key_record("brisbane.txt")])
    dns.set(f"test._domainkey.{FOOTBALL}", "TXT", [key_record(test_key)])


def outcome(facts: Facts, ports: Ports) -> DkimOutcome:
    return run(lambda: dkim_outcome(facts, ports))


def by_selector(result: DkimOutcome) -> dict[str, str]:
    return {s.selector: s.result for s in result.signatures}


def evaluate(facts: Facts, ports: Ports, **options: Any) -> CheckResult:
    check = FACTORIES["dkim"](options, NoLists())
    return run(lambda: check.evaluate(facts, ports))


@pytest.mark.skipif(not HAVE_NACL, reason="ed25519 needs pynacl")
def test_rfc8463_message_verifies_ed25519_and_rsa(
    dns: ZoneServer, ports: Ports, messages: Messages
) -> None:
    serve_rfc8463(dns)
    result = outcome(make_facts(messages.facts(data("rfc6376.signed.msg"))), ports)
    assert by_selector(result) == {"brisbane": "pass", "test": "pass"}
    assert result.result == "pass"
    assert [s.domain for s in result.signatures] == [FOOTBALL, FOOTBALL]
    assert [s.algorithm for s in result.signatures] == ["ed25519-sha256", "rsa-sha256"]
    assert [s.b for s in result.signatures] == ["9/dsDChY", "icKcLSEZ"]
    assert result.passing_domains() == (FOOTBALL, FOOTBALL)


def test_rsa_signature_verifies(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    serve_rfc8463(dns)
    result = outcome(make_facts(messages.facts(data("rfc6376.signed.msg"))), ports)
    assert by_selector(result)["test"] == "pass"


def test_modified_body_fails(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    serve_rfc8463(dns)
    raw = data("rfc6376.signed.msg").replace(b"hungry yet?", b"hungry now?")
    result = outcome(make_facts(messages.facts(raw)), ports)
    expected = {"brisbane": "fail", "test": "fail"}
    if not HAVE_NACL:
        expected["brisbane"] = "permerror"
    assert by_selector(result) == expected
    assert "body hash" in result.signatures[1].reason


def test_modified_signed_header_fails(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    serve_rfc8463(dns)
    raw = data("rfc6376.signed.msg").replace(b"Is dinner ready?", b"Is lunch ready?")
    result = outcome(make_facts(messages.facts(raw)), ports)
    assert by_selector(result)["test"] == "fail"
    assert result.signatures[1].reason == "signature did not verify"


@pytest.mark.parametrize("record", ["badk.txt", "badversion.txt", "test_bad.txt"])
def test_bad_key_records_are_permerror(
    dns: ZoneServer, ports: Ports, messages: Messages, record: str
) -> None:
    dns.set("test._domainkey.example.com", "TXT", [key_record(record)])
    raw = sign(plain_message(), "example.com")
    result = outcome(make_facts(messages.facts(raw)), ports)
    assert [s.result for s in result.signatures] == ["permerror"]
    assert result.signatures[0].reason.startswith("unusable key")
    assert len(result.signatures[0].reason) < 160  # dkimpy's message quotes the whole key


def test_revoked_key_is_permerror(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    dns.set("test._domainkey.example.com", "TXT", ["v=DKIM1; k=rsa; p="])
    raw = sign(plain_message(), "example.com")
    assert outcome(make_facts(messages.facts(raw)), ports).result == "permerror"


def test_other_key_fails(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    """A well-formed key that did not make the signature: fail, not permerror."""
    rsa = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.rsa")
    serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")
    public = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    publish_key(dns, "example.com", record=f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}")
    raw = sign(plain_message(), "example.com")
    result = outcome(make_facts(messages.facts(raw)), ports)
    assert [s.result for s in result.signatures] == ["fail"]


def test_missing_key_is_permerror(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    raw = sign(plain_message(), "example.com")
    result = outcome(make_facts(messages.facts(raw)), ports)
    assert [(s.result, s.reason) for s in result.signatures] == [
        ("permerror", "no key for signature")
    ]


def test_dns_failure_is_temperror(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    publish_key(dns, "example.com")
    dns.behave("test._domainkey.example.com", "servfail")
    raw = sign(plain_message(), "example.com")
    facts = make_facts(messages.facts(raw))
    assert outcome(facts, ports).result == "temperror"


def test_temperror_raises_check_error_unless_listed(
    dns: ZoneServer, ports: Ports, messages: Messages
) -> None:
    dns.behave("test._domainkey.example.com", "servfail")
    message = messages.facts(sign(plain_message(), "example.com"))
    check = FACTORIES["dkim"]({}, NoLists())
    listed = FACTORIES["dkim"]({"result": ["temperror"]}, NoLists())

    async def both() -> tuple[Exception | CheckResult, CheckResult]:
        facts = make_facts(message)
        try:
            first: Exception | CheckResult = await check.evaluate(facts, ports)
        except CheckError as exc:
            first = exc
        return first, await listed.evaluate(facts, ports)

    first, second = run(both)
    assert isinstance(first, CheckError)
    assert second.matched and second.values["result"] == "temperror"


def test_signed_by_us_passes_and_check_default_does_not_match(
    dns: ZoneServer, ports: Ports, messages: Messages
) -> None:
    publish_key(dns, "example.com")
    facts = make_facts(messages.facts(sign(plain_message(), "example.com")))
    result = evaluate(facts, ports)
    assert not result.matched
    assert run(lambda: dkim_outcome(facts, ports)).result == "pass"


def test_check_matches_fail(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    publish_key(dns, "example.com")
    raw = sign(plain_message(), "example.com").replace(b"Hello.", b"Hullo.")
    result = evaluate(make_facts(messages.facts(raw)), ports)
    assert result.matched
    assert result.values == {"result": "fail", "domain": "example.com", "selector": "test"}


def test_unsigned_message_is_none_and_not_read(ports: Ports, messages: Messages) -> None:
    message = messages.facts(plain_message())
    facts = make_facts(message)
    assert outcome(facts, ports) == DkimOutcome()
    assert outcome(facts, ports).result == "none"
    assert isinstance(message.source, FileSource) and message.source.opened == 0
    assert evaluate(make_facts(message), ports, result=["none"]).matched
    assert not evaluate(make_facts(message), ports).matched


def test_domain_option(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    publish_key(dns, "example.com")
    raw = sign(plain_message(), "example.com").replace(b"Hello.", b"Hullo.")
    message = messages.facts(raw)
    assert evaluate(make_facts(message), ports, domain="Example.COM.").matched
    assert not evaluate(make_facts(message), ports, domain="example.org").matched
    other = evaluate(make_facts(message), ports, domain="example.org", result=["none"])
    assert other.matched and other.values["result"] == "none"


def test_malformed_signature_is_neutral(ports: Ports, messages: Messages) -> None:
    extra = "DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=test\n"
    result = outcome(make_facts(messages.facts(plain_message(extra=extra))), ports)
    assert [(s.result, s.domain, s.selector) for s in result.signatures] == [
        ("neutral", "example.com", "test")
    ]
    assert "missing" in result.signatures[0].reason


def test_hostile_domain_is_not_asked(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    signature, _, rest = sign(plain_message(), "example.com").partition(b"From: ")
    raw = signature.replace(b"example.com", b"exa mple..com") + b"From: " + rest
    result = outcome(make_facts(messages.facts(raw)), ports)
    assert [s.result for s in result.signatures] == ["permerror"]
    assert dns.total_queries == 0


def test_signature_count_is_capped(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    publish_key(dns, "example.com")
    raw = sign(plain_message(), "example.com")
    signature, _, rest = raw.partition(b"From: ")
    raw = signature * 7 + b"From: " + rest
    result = outcome(make_facts(messages.facts(raw)), ports)
    assert len(result.signatures) == dkim_module.MAX_SIGNATURES
    assert {s.result for s in result.signatures} == {"pass"}
    assert dns.queries("test._domainkey.example.com", "TXT") == 1


def test_outcome_is_memoised(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    publish_key(dns, "example.com")
    facts = make_facts(messages.facts(sign(plain_message(), "example.com")))

    async def twice() -> tuple[DkimOutcome, DkimOutcome]:
        return await dkim_outcome(facts, ports), await dkim_outcome(facts, ports)

    first, second = run(twice)
    assert first is second
    assert facts.message is not None
    assert isinstance(facts.message.source, FileSource) and facts.message.source.opened == 1


def test_too_large_message_is_neutral(
    ports: Ports, messages: Messages, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dkim_module, "MAX_VERIFY_SIZE", 100)
    raw = sign(plain_message(), "example.com")
    result = outcome(make_facts(messages.facts(raw)), ports)
    assert [(s.result, s.domain) for s in result.signatures] == [("neutral", "example.com")]


def test_no_message_yet(ports: Ports) -> None:
    facts = make_facts()
    assert outcome(facts, ports) == DkimOutcome()
    assert "dkim" not in facts.tx


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"result": ["bogus"]}, "option 'result'"),
        ({"result": []}, "option 'result'"),
        ({"domain": "not a domain"}, "option 'domain'"),
        ({"colour": "red"}, "unknown option"),
    ],
)
def test_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        FACTORIES["dkim"](options, NoLists())
