"""``domain_list`` with ``require_alignment``: a sender-domain whitelist that needs SPF or DKIM."""

from __future__ import annotations

from typing import Any

import pytest

from loopback.dnsserver import ZoneServer
from palisade.policy.checks.lists import FACTORIES
from palisade.policy.lists import ListKind, OperatorList, parse_list
from palisade.policy.rules import Check, Facts, MessageFacts, Ports, Stage
from tests.auth.conftest import Messages, make_facts, plain_message, publish_key, run, sign


class Handle:
    def __init__(self, text: str) -> None:
        self.kind = ListKind.DOMAIN
        self.value = parse_list(text, ListKind.DOMAIN)

    def current(self) -> OperatorList:
        return self.value


class Lists:
    def __init__(self, **lists: str) -> None:
        self.lists = {name: Handle(text) for name, text in lists.items()}

    def get(self, name: str) -> Any:
        return self.lists.get(name)


LISTS = Lists(partners="example.com\n")


def build(**options: Any) -> Check:
    return FACTORIES["domain_list"](
        {"list": "partners", "field": "sender_domain", **options}, LISTS
    )


def matched(check: Check, facts: Facts, ports: Ports) -> bool:
    return run(lambda: check.evaluate(facts, ports)).matched


def test_without_the_option_nothing_changes(ports: Ports) -> None:
    check = build()
    assert Stage.MAIL in check.stages
    assert matched(check, make_facts(sender="x@example.com"), ports)


def test_option_makes_a_data_check() -> None:
    assert build(require_alignment="any").stages == frozenset({Stage.DATA})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"require_alignment": "dmarc"}, "require_alignment"),
        ({"require_alignment": "spf", "field": "helo"}, "sender_domain"),
    ],
)
def test_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FACTORIES["domain_list"]({"list": "partners", "field": "sender_domain", **options}, LISTS)


def test_dkim_aligned_sender_matches(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    publish_key(dns, "example.com")
    message = messages.facts(sign(plain_message(), "example.com"))
    assert matched(build(require_alignment="dkim"), make_facts(message), ports)
    assert matched(build(require_alignment="any"), make_facts(message), ports)
    assert not matched(build(require_alignment="spf"), make_facts(message), ports)


def test_spf_aligned_sender_matches(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    dns.set("example.com", "TXT", ["v=spf1 ip4:192.0.2.1 -all"])
    message = messages.facts(plain_message())
    assert matched(build(require_alignment="spf"), make_facts(message), ports)
    assert not matched(build(require_alignment="dkim"), make_facts(message), ports)


def test_forged_listed_sender_does_not_match(ports: Ports, messages: Messages) -> None:
    """MAIL FROM and From claim the listed domain, but nothing authenticates them."""
    message = messages.facts(plain_message())
    assert not matched(build(require_alignment="any"), make_facts(message), ports)


def test_other_authenticated_from_domain_does_not_match(
    dns: ZoneServer, ports: Ports, messages: Messages
) -> None:
    """Listed envelope sender, but the From domain (authenticated) is someone else's."""
    publish_key(dns, "example.net")
    message = messages.facts(sign(plain_message("x@example.net"), "example.net"))
    assert not matched(build(require_alignment="dkim"), make_facts(message), ports)


def test_unlisted_sender_is_not_looked_at(ports: Ports, messages: Messages) -> None:
    message = messages.facts(plain_message())
    facts = make_facts(message, sender="x@example.org")
    assert not matched(build(require_alignment="any"), facts, ports)
    assert "dmarc" not in facts.tx


def test_strict_record_is_respected(dns: ZoneServer, ports: Ports, messages: Messages) -> None:
    publish_key(dns, "mail.example.com")
    dns.set("_dmarc.example.com", "TXT", ["v=DMARC1; p=none; adkim=s"])
    message: MessageFacts = messages.facts(sign(plain_message(), "mail.example.com"))
    assert not matched(build(require_alignment="dkim"), make_facts(message), ports)
