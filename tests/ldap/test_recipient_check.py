"""The ``recipient`` check with a real list file and a real LdapDirectory on slapd, through the
rule engine: 550 5.1.1 for an unknown address, 451 4.4.3 when LDAP cannot answer and the static
file does not know the address, acceptance for an address in the file even with LDAP down."""

from __future__ import annotations

import asyncio
import ipaddress
import os
from pathlib import Path
from typing import Any

import pytest

from palisade.config.lists import ListHandle
from palisade.policy.checks import REGISTRY
from palisade.policy.engine import TEMPFAIL_REPLY, Rule, StageOutcome, evaluate_stage
from palisade.policy.lists import ListKind
from palisade.policy.policy import ListRegistry
from palisade.policy.rules import Check, Facts, Ports, Stage
from palisade.policy.verdict import Verb
from palisade.smtp.replies import Reply
from tests.ldap.slapd import SlapdServer
from tests.unused_ports import NoClock, NoResolver, NoState

MESSAGE = "<$recipient>: Recipient address rejected: User unknown"


@pytest.fixture
def registry(tmp_path: Path) -> ListRegistry:
    path = tmp_path / "recipients.txt"
    path.write_text("# static recipients\nlisted@example.test\n@catchall.test\n")
    handle = ListHandle.load("recipients", ListKind.ADDRESS, path, check_interval=0.0)
    return ListRegistry({"recipients": handle})


def build(registry: ListRegistry, **options: Any) -> Check:
    return REGISTRY["recipient"](options, registry)


def rcpt(check: Check, recipient: str, directory: Any) -> StageOutcome:
    rule = Rule(
        name="valid_recipients",
        stage=Stage.RCPT,
        check=check,
        verb=Verb.DENY,
        message=MESSAGE,
        code=550,
        enhanced="5.1.1",
    )
    facts = Facts(
        client_ip=ipaddress.ip_address("192.0.2.1"),
        client_port=1,
        sender="s@example.org",
        recipient=recipient,
    )
    ports = Ports(resolver=NoResolver(), state=NoState(), clock=NoClock(), recipients=directory)
    return asyncio.run(evaluate_stage(Stage.RCPT, [rule], facts, ports))


def accepted(outcome: StageOutcome) -> bool:
    return outcome.verdict is None


def reply_of(outcome: StageOutcome) -> Reply:
    """The reply of the outcome's verdict; fails the test when there is no verdict or reply."""
    assert outcome.verdict is not None and outcome.verdict.reply is not None
    return outcome.verdict.reply


def test_in_ldap_or_in_the_file_is_accepted(registry: ListRegistry, make_directory: Any) -> None:
    check = build(registry, list="recipients")
    directory = make_directory()
    assert accepted(rcpt(check, "ann@example.test", directory))
    assert accepted(rcpt(check, "Listed@Example.test", directory))
    assert accepted(rcpt(check, "anyone@catchall.test", directory))  # @domain catch-all


def test_unknown_recipient_is_550_5_1_1(registry: ListRegistry, make_directory: Any) -> None:
    outcome = rcpt(build(registry, list="recipients"), "nobody@example.test", make_directory())
    assert outcome.verdict is not None
    assert outcome.verdict.action is Verb.DENY
    reply = outcome.verdict.reply
    assert reply is not None
    assert (reply.code, reply.enhanced) == (550, "5.1.1")
    assert reply.text == "<nobody@example.test>: Recipient address rejected: User unknown"
    decision = outcome.decisions[-1]
    assert decision.reason == "unknown recipient (not in list recipients, not in LDAP)"
    assert decision.log_text == (
        "valid_recipients: unknown recipient (not in list recipients, not in LDAP)"
    )


def test_ldap_down_and_not_in_file_is_451_4_4_3(
    registry: ListRegistry, make_directory: Any, slapd: SlapdServer
) -> None:
    directory = make_directory()
    slapd.stop()
    outcome = rcpt(build(registry, list="recipients"), "ann@example.test", directory)
    assert outcome.verdict is not None
    assert outcome.verdict.action is Verb.DEFER
    assert outcome.verdict.reply == TEMPFAIL_REPLY  # 451 4.4.3
    decision = outcome.decisions[-1]
    assert decision.error is not None
    assert decision.log_text.startswith(
        "DEFER - recipient lookup failed: recipient ann@example.test: "
        "not in list recipients, LDAP lookup failed: no LDAP server answered: "
    )
    assert slapd.uri in decision.log_text


def test_ldap_hanging_is_451_too(
    registry: ListRegistry, make_directory: Any, slapd: SlapdServer
) -> None:
    directory = make_directory(timeout=0.5)
    slapd.pause()
    try:
        outcome = rcpt(build(registry, list="recipients"), "ann@example.test", directory)
    finally:
        slapd.resume()
    assert outcome.verdict is not None and outcome.verdict.reply == TEMPFAIL_REPLY
    assert "LDAP lookup timed out after 0.5s" in outcome.decisions[-1].log_text


def test_ldap_down_still_accepts_what_the_file_knows(
    registry: ListRegistry, make_directory: Any, slapd: SlapdServer
) -> None:
    directory = make_directory()
    slapd.stop()
    check = build(registry, list="recipients")
    assert accepted(rcpt(check, "listed@example.test", directory))
    assert accepted(rcpt(check, "x@catchall.test", directory))


def test_the_file_is_reloaded(registry: ListRegistry, make_directory: Any, tmp_path: Path) -> None:
    check = build(registry, list="recipients")
    directory = make_directory()
    assert not accepted(rcpt(check, "late@example.test", directory))
    path = tmp_path / "recipients.txt"
    path.write_text(path.read_text() + "late@example.test\n")
    os.utime(path, (1, 1))  # a different mtime even within the same clock tick
    assert accepted(rcpt(check, "late@example.test", directory))


def test_the_file_alone(registry: ListRegistry) -> None:
    check = build(registry, list="recipients", ldap=False)
    assert accepted(rcpt(check, "listed@example.test", None))
    outcome = rcpt(check, "ann@example.test", None)
    assert reply_of(outcome).code == 550
    assert outcome.decisions[-1].reason == "unknown recipient (not in list recipients)"
    # a list and ldap = true, but the server has no directory: the file decides too
    outcome = rcpt(build(registry, list="recipients"), "ann@example.test", None)
    assert reply_of(outcome).code == 550


def test_ldap_alone(registry: ListRegistry, make_directory: Any) -> None:
    check = build(registry)
    directory = make_directory()
    assert accepted(rcpt(check, "ann@example.test", directory))
    outcome = rcpt(check, "listed@example.test", directory)
    assert outcome.decisions[-1].reason == "unknown recipient (not in LDAP)"
    # no list and no directory: a misconfiguration defers, it never refuses everyone
    outcome = rcpt(check, "ann@example.test", None)
    assert outcome.verdict is not None and outcome.verdict.reply == TEMPFAIL_REPLY


def test_build_errors(registry: ListRegistry) -> None:
    with pytest.raises(ValueError, match="needs 'list' or 'ldap = true'"):
        build(registry, ldap=False)
    with pytest.raises(ValueError, match="no list named"):
        build(registry, list="missing")
    with pytest.raises(ValueError, match="unknown option"):
        build(registry, list="recipients", lsit="x")
    assert build(registry).stages == frozenset({Stage.RCPT})


def test_control_characters_stay_out_of_the_reply(registry: ListRegistry) -> None:
    outcome = rcpt(build(registry, list="recipients", ldap=False), "a\r\nb@example.test", None)
    assert "\r" not in str(reply_of(outcome).text)
