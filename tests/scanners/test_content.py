"""The ``spam_score`` and ``virus`` checks, the memoised reports and ``spam_headers``, with the
real spamd and clamd behind the real adapters and a real ``MessageFacts`` over a file."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from palisade.adapters.clamd import ClamdScanner
from palisade.adapters.spamd import SpamdScanner
from palisade.policy.checks import REGISTRY, content
from palisade.policy.engine import Rule, evaluate_stage
from palisade.policy.rules import Check, CheckError, Facts, OnError, Ports, Stage, known
from palisade.policy.verdict import Verb
from palisade.ports import SpamReport
from tests.conftest import free_port
from tests.scanners.clamd import EICAR, REPORTED, ClamdProcess
from tests.scanners.conftest import (
    GTUBE,
    HAM_BODY,
    SilentServer,
    make_facts,
    make_ports,
    message_bytes,
    run,
    write_message,
)
from tests.scanners.spamd import SpamdProcess


class NoLists:
    def get(self, name: str) -> Any:
        return None


def build(name: str, **options: Any) -> Check:
    return REGISTRY[name](options, NoLists())


def evaluate(check: Check, facts: Facts, ports: Ports) -> Any:
    return run(check.evaluate(facts, ports))


# ------------------------------------------------------------------------------ spam_score


def test_registered_and_options() -> None:
    assert REGISTRY["spam_score"] is content.build_spam_score
    assert REGISTRY["virus"] is content.build_virus
    with pytest.raises(ValueError, match="'min'"):
        build("spam_score")
    with pytest.raises(ValueError, match="unknown option"):
        build("spam_score", min=5, max=9)
    with pytest.raises(ValueError, match="unknown option"):
        build("virus", level=1)


def test_spam_score_gtube_kill_level(spamd: SpamdProcess, tmp_path: Path) -> None:
    source = write_message(tmp_path, message_bytes(HAM_BODY + GTUBE + "\n"))
    facts = make_facts(source)
    ports = make_ports(spam=SpamdScanner(spamd.address))
    kill, tag = build("spam_score", min=16), build("spam_score", min=4.5)

    async def both() -> list[Any]:  # concurrent askers share one scan
        return list(await asyncio.gather(kill.evaluate(facts, ports), tag.evaluate(facts, ports)))

    for result in run(both()):
        assert result.matched
        assert float(result.values["spam_score"]) >= 16
        assert "GTUBE" in result.values["spam_rules"].split(",")
        assert result.values["scanner"] == "spamd"
    assert source.opened == 1
    report = known(facts, content.SPAM)
    assert isinstance(report, SpamReport) and report.score >= 16


def test_spam_score_ham_does_not_match(spamd: SpamdProcess, tmp_path: Path) -> None:
    facts = make_facts(write_message(tmp_path, message_bytes(HAM_BODY)))
    result = evaluate(build("spam_score", min=4.5), facts, make_ports(SpamdScanner(spamd.address)))
    assert not result.matched
    report = known(facts, content.SPAM)
    assert report is not None and report.score < 4.5


def test_too_big_is_not_scanned(tmp_path: Path) -> None:
    """Over ``max_size``: no connection at all (the address refuses), no report, no match."""
    source = write_message(tmp_path, message_bytes("x" * 2000))
    facts = make_facts(source)
    ports = make_ports(SpamdScanner(f"127.0.0.1:{free_port()}", max_size=1024))
    assert not evaluate(build("spam_score", min=0), facts, ports).matched
    assert run(content.spam_report(facts, ports)) is None
    assert source.opened == 0


def test_no_scanner_or_no_message(tmp_path: Path) -> None:
    facts = make_facts(write_message(tmp_path, b"Subject: x\r\n\r\nx"))
    assert run(content.spam_report(facts, make_ports())) is None
    assert run(content.virus_report(facts, make_ports())) is None
    facts.message = None
    ports = make_ports(SpamdScanner("127.0.0.1:1"), ClamdScanner("127.0.0.1:1"))
    assert not evaluate(build("spam_score", min=1), facts, ports).matched
    assert not evaluate(build("virus"), facts, ports).matched


def test_spamd_down_is_a_check_error_remembered(tmp_path: Path) -> None:
    source = write_message(tmp_path, message_bytes(HAM_BODY))
    facts = make_facts(source)
    port = free_port()
    ports = make_ports(SpamdScanner(f"127.0.0.1:{port}"))
    with pytest.raises(CheckError) as info:
        evaluate(build("spam_score", min=16), facts, ports)
    assert str(info.value) == f"spamd: spamd 127.0.0.1:{port}: Connection refused"
    with pytest.raises(CheckError):  # the same answer for the session's X-Spam headers
        run(content.spam_report(facts, ports))
    assert source.opened == 0  # refused before the spool file was opened
    assert facts.tx[content.SPAM].done() and known(facts, content.SPAM) is None


def test_engine_kill_level_and_failure(spamd: SpamdProcess, tmp_path: Path) -> None:
    """Through the engine: GTUBE meets ``deny if spam_score min = 16`` (550); a hung spamd
    (SIGSTOP) is a deferral (451 4.4.3), within the scanner's timeout."""
    rule = Rule(
        name="kill",
        stage=Stage.DATA,
        check=build("spam_score", min=16),
        verb=Verb.DENY,
        message="Spam score $spam_score too high",
        log_message="spam $spam_score: $spam_rules",
    )
    facts = make_facts(write_message(tmp_path, message_bytes(GTUBE + "\n")))
    ports = make_ports(SpamdScanner(spamd.address, timeout=20))
    outcome = run(evaluate_stage(Stage.DATA, [rule], facts, ports))
    assert outcome.verdict is not None and outcome.verdict.action is Verb.DENY
    assert outcome.verdict.reply is not None and outcome.verdict.reply.code == 550
    assert "GTUBE" in outcome.verdict.log_message

    facts = make_facts(write_message(tmp_path, message_bytes(HAM_BODY), "ham.eml"))
    ports = make_ports(SpamdScanner(spamd.address, timeout=0.4))
    with spamd.paused():
        outcome = run(evaluate_stage(Stage.DATA, [rule], facts, ports))
    assert outcome.verdict is not None and outcome.verdict.action is Verb.DEFER
    assert outcome.verdict.reply is not None and outcome.verdict.reply.code == 451
    assert outcome.decisions[0].error == f"spamd: spamd {spamd.address}: no answer within 0.4s"


def test_silent_spamd_with_on_error_skip(silent: SilentServer, tmp_path: Path) -> None:
    rule = Rule(
        name="kill",
        stage=Stage.DATA,
        check=build("spam_score", min=16),
        verb=Verb.DENY,
        on_error=OnError.SKIP,
    )
    facts = make_facts(write_message(tmp_path, message_bytes(HAM_BODY)))
    ports = make_ports(SpamdScanner(silent.address, timeout=0.3))
    outcome = run(evaluate_stage(Stage.DATA, [rule], facts, ports))
    assert outcome.verdict is None
    assert outcome.decisions[0].error is not None and "no answer" in outcome.decisions[0].error


# ------------------------------------------------------------------------------------ virus


def test_virus_found_and_clean(clamd: ClamdProcess, tmp_path: Path) -> None:
    check = build("virus")
    ports = make_ports(virus=ClamdScanner(clamd.address))
    facts = make_facts(write_message(tmp_path, message_bytes(EICAR.decode() + "\n")))
    result = evaluate(check, facts, ports)
    assert result.matched and result.values == {"virus": REPORTED}
    assert result.reason == f"virus found: {REPORTED}"
    report = known(facts, content.VIRUS)
    assert report is not None and report.signature == REPORTED
    clean = make_facts(write_message(tmp_path, message_bytes(HAM_BODY), "clean.eml"))
    assert not evaluate(check, clean, ports).matched


def test_virus_engine_deny_and_clamd_down(clamd: ClamdProcess, tmp_path: Path) -> None:
    rule = Rule(
        name="virus",
        stage=Stage.DATA,
        check=build("virus"),
        verb=Verb.DENY,
        message="Virus found: $virus",
        log_message="virus $virus",
    )
    facts = make_facts(write_message(tmp_path, message_bytes(EICAR.decode() + "\n")))
    outcome = run(
        evaluate_stage(Stage.DATA, [rule], facts, make_ports(None, ClamdScanner(clamd.address)))
    )
    assert outcome.verdict is not None and outcome.verdict.reply is not None
    assert outcome.verdict.reply.code == 550
    assert outcome.verdict.log_message == f"virus {REPORTED}"

    down = make_ports(virus=ClamdScanner(f"127.0.0.1:{free_port()}"))
    facts = make_facts(write_message(tmp_path, message_bytes(HAM_BODY), "ham.eml"))
    outcome = run(evaluate_stage(Stage.DATA, [rule], facts, down))
    assert outcome.verdict is not None and outcome.verdict.action is Verb.DEFER
    with pytest.raises(CheckError, match="Connection refused"):
        run(content.virus_report(facts, down))


def test_virus_over_max_size_is_not_scanned(tmp_path: Path) -> None:
    source = write_message(tmp_path, message_bytes("y" * 3000))
    ports = make_ports(virus=ClamdScanner(f"127.0.0.1:{free_port()}", max_size=1024))
    assert not evaluate(build("virus"), make_facts(source), ports).matched
    assert source.opened == 0


class OddVirusScanner:
    """A VirusScanner whose signature carries control characters (``$virus`` must be safe)."""

    name = "odd"
    max_size = 1 << 20

    async def scan(self, message: Any) -> Any:
        from palisade.ports import VirusReport

        return VirusReport("Evil\r\n250 OK\x00 sig")


def test_virus_value_is_made_safe(tmp_path: Path) -> None:
    facts = make_facts(write_message(tmp_path, b"Subject: x\r\n\r\nx"))
    result = evaluate(build("virus"), facts, make_ports(virus=OddVirusScanner()))
    assert result.values["virus"] == "Evil 250 OK sig"


# ------------------------------------------------------------------------------ spam_headers


def test_spam_headers_spam() -> None:
    report = SpamReport(1001.26, ("GTUBE", "MISSING_DATE"), "spamd")
    assert content.spam_headers(report, 4.5, failed=False, hostname="gw.example.net") == [
        "X-Spam-Checker-Version: Palisade (spamd) on gw.example.net",
        "X-Spam-Flag: YES",
        "X-Spam-Score: 1001.3",
        "X-Spam-Status: Yes, score=1001.3 required=4.5 tests=GTUBE,MISSING_DATE",
    ]


def test_spam_headers_ham_and_edges() -> None:
    ham = SpamReport(-0.04, (), "rspamd")
    assert content.spam_headers(ham, 4.5, failed=False, hostname="gw") == [
        "X-Spam-Checker-Version: Palisade (rspamd) on gw",
        "X-Spam-Score: 0.0",
        "X-Spam-Status: No, score=0.0 required=4.5 tests=none",
    ]
    at_tag = SpamReport(4.5, ("A",))
    assert "X-Spam-Flag: YES" in content.spam_headers(at_tag, 4.5, failed=False, hostname="gw")
    assert content.spam_headers(None, 4.5, failed=False, hostname="gw") == []
    assert content.spam_headers(None, 4.5, failed=True, hostname="gw") == [
        "X-Spam-Checker-Version: Palisade on gw",
        "X-Spam-Status: unchecked (scanner unavailable)",
    ]
    evil = SpamReport(5.0, ("OK_RULE", "BAD\r\nX-Spam-Flag: NO", "A B"), "spamd")
    status = content.spam_headers(evil, 4.5, failed=False, hostname="gw")[-1]
    assert status.endswith("tests=OK_RULE")


def test_spam_headers_fold_long_rule_lists() -> None:
    rules = tuple(f"RULE_NUMBER_{i}_WITH_A_LONG_NAME" for i in range(20))
    status = content.spam_headers(SpamReport(20.0, rules), 4.5, failed=False, hostname="gw")[-1]
    lines = status.split("\r\n")
    assert len(lines) > 3
    assert all(len(line) <= 76 for line in lines)
    assert all(line.startswith("\t") for line in lines[1:])
    assert "\n" not in status.replace("\r\n", "")
    unfolded = status.replace("\r\n", "")  # RFC 5322 unfolding; the TABs stay
    assert re.sub(",\t", ",", unfolded).replace(
        "\t", " "
    ) == "X-Spam-Status: Yes, score=20.0 required=4.5 tests=" + ",".join(rules)


def test_spam_headers_with_real_reports(spamd: SpamdProcess, tmp_path: Path) -> None:
    scanner = SpamdScanner(spamd.address)
    spam = run(scanner.scan(write_message(tmp_path, message_bytes(GTUBE), "s.eml")))
    ham = run(scanner.scan(write_message(tmp_path, message_bytes(HAM_BODY), "h.eml")))
    spam_lines = content.spam_headers(spam, 4.5, failed=False, hostname="gw")
    assert spam_lines[1] == "X-Spam-Flag: YES"
    assert spam_lines[-1].startswith("X-Spam-Status: Yes, score=10")
    assert "GTUBE" in spam_lines[-1]
    ham_lines = content.spam_headers(ham, 4.5, failed=False, hostname="gw")
    assert not any(line.startswith("X-Spam-Flag") for line in ham_lines)
    assert ham_lines[-1].startswith("X-Spam-Status: No, score=")
