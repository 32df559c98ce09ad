"""The log parser of ``palisade stats`` on lines a hostile client shapes, lines that do not
parse, and the rule attribution by ``log_message`` template (pure: lines in, counts out)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from palisade.cli.stats import since_stamp
from palisade.obs.log import escape_field
from palisade.obs.stats import RuleText, StatsCollector, log_files
from tests.conftest import palisade

T = "2026-12-02 10:00:00"
RULES = [
    RuleText("zen", "connect", "dnsbl", "DENY - listed at $zone ($codes)"),
    RuleText("zen-any", "connect", "dnsbl", "$reason"),
    RuleText("bad helo", "helo", "helo", "DENY - HELO [$helo]"),
    RuleText("greylist", "mail", "sender", "DEFER - greylisted $sender"),
    RuleText("spam kill level", "data", "spam_score", "spam score $spam_score >= 16 ($spam_rules)"),
    RuleText("twin", "rcpt", "recipient", "same text"),
    RuleText("twin too", "rcpt", "recipient", "same text"),
]


def collect(*lines: str, **options: object) -> StatsCollector:
    collector = StatsCollector(RULES, **options)  # type: ignore[arg-type]
    for line in lines:
        collector.feed(line + "\n")
    return collector


def test_a_sender_shaped_like_fields_cannot_move_the_client_address() -> None:
    sender = escape_field('"a H=(x) [192.0.2.66]:1 P=esmtps X=TLS1.3:x:1 S=1"@x.test')
    line = f"{T} 1xVYHw-0000fT-00 <= {sender} H=(h) [192.0.2.1]:5 P=esmtp S=10 spam=2.5 T=<a@b>"
    stats = collect(line).stats
    assert (stats.accepted, stats.tls_messages, stats.malformed) == (1, 0, 0)
    assert stats.spam_scores == [2.5]
    refusal = (
        f"{T} H=(h) [192.0.2.1]:5 F=<{sender}> rejected RCPT <{escape_field('x> rejected')}>: "
        "relay attempt refused: not a local domain"
    )
    stats = collect(refusal).stats
    assert stats.refused_ips == {"192.0.2.1": 1}
    assert stats.refused_by_rule == {"relay control": 1}
    assert stats.refused_sender_domains == {"x.test": 1}


def test_lines_that_do_not_parse_are_counted_and_skipped() -> None:
    stats = collect(
        "no time stamp",
        f"{T} 1xVYHw-0000fT-00 <= s@x.org P=esmtp S=1 T=<a@b>",  # no H=
        f"{T} H=(x) [not-an-ip]:5 rejected RCPT <a@b>: x",
        f"{T} Connection from [192.0.2.1] refused: too many connections",  # no port
        f"{T} ab authenticator failed for nobody: 535",
        "\x00\xff" * 50,
        f"{T} palisade daemon started",  # not malformed: nothing to count
        f"{T} 1xVYHw-0000fT-00 <= s@x.org H=[192.0.2.1]:5 P=esmtp S=1 spam=nan? T=<a@b>",
    ).stats
    assert stats.malformed == 7
    assert stats.lines == 8
    assert (stats.accepted, stats.refused) == (0, 0)


def test_templates_most_literal_text_wins_and_same_text_goes_to_the_first() -> None:
    stats = collect(
        f'{T} H=[192.0.2.1]:5 rejected connection in "connect" ACL: DENY - listed at '
        "bl.test (127.0.0.2)",
        f'{T} H=[192.0.2.2]:5 rejected connection in "connect" ACL: 192.0.2.2 is listed at '
        "other.test (127.0.0.4)",
        f"{T} H=(h) [192.0.2.3]:5 F=<a@b> rejected RCPT <c@d>: same text",
        f"{T} H=(\\x5bx\\x5d) [192.0.2.4]:5 rejected EHLO or HELO \\x5bx\\x5d: DENY - HELO "
        "\\x5b\\x5bx\\x5d\\x5d",
        f"{T} H=(h) [192.0.2.5]:5 F=<g@b> temporarily rejected MAIL <g@b>: DEFER - greylisted g@b",
    ).stats
    assert stats.refused_by_rule == {"zen": 1, "zen-any": 1, "twin": 1, "bad helo": 1}
    assert stats.deferred_by_rule == {"greylist": 1}
    assert stats.dnsbl == {"bl.test": {"refused": 1}, "other.test": {"refused": 1}}
    assert stats.refused_helos["\\x5bx\\x5d"] == 1


def test_a_failed_lookup_is_named_by_the_rule_line_before_it_and_cut_texts_by_their_start() -> None:
    long_rules = ",".join(f"RULE_{n}" for n in range(80))
    text = escape_field(f"spam score 1000.0 >= 16 ({long_rules})", 400)
    stats = collect(
        f'{T} H=[192.0.2.1]:5 connect rule "zen": temporary failure: SERVFAIL',
        f'{T} H=[192.0.2.1]:5 temporarily rejected connection in "connect" ACL: DEFER - dnsbl '
        "lookup failed: SERVFAIL",
        f'{T} H=[192.0.2.9]:5 temporarily rejected connection in "connect" ACL: DEFER - dnsbl '
        "lookup failed: SERVFAIL",
        f"{T} H=(h) [192.0.2.2]:5 F=<a@b> rejected after DATA: {text}",
        f"{T} H=(h) [192.0.2.4]:5 F=<a@b> rejected after DATA: spam score 20.0 \\x3e= 12 (X)",
        f"{T} H=(h) [192.0.2.4]:5 F=<a@b> rejected after DATA: virus found: Eicar-Test",
        f"{T} H=(h) [192.0.2.3]:5 F=<a@b> would deny: DENY - listed at bl.test (127.0.0.2)",
        f"{T} H=(h) [192.0.2.3]:5 Warning: DENY - listed at bl.test (127.0.0.2)",
    ).stats
    assert text.endswith("...")
    assert stats.deferred_by_rule == {"zen": 1, "(lookup failure)": 1}
    assert stats.rule_errors == {"zen": 1}
    # the scanners' lines: with the kill level of an older config, and no clamd configured
    assert stats.refused_by_rule == {"spam kill level": 2, "clamd": 1}
    assert stats.spam_scores == [1000.0, 20.0] and stats.spam_killed == 2
    assert stats.viruses == {"Eicar-Test": 1}
    assert stats.observed_by_rule == {"zen": 1} and stats.warned_by_rule == {"zen": 1}
    assert stats.dnsbl == {"bl.test": {"observed": 1, "warned": 1}}


def test_histogram_bins_scores_far_out_into_its_end_bins() -> None:
    lines = [
        f"{T} 1xVYHw-0000fT-0{n} <= s@x.org H=[192.0.2.1]:5 P=esmtp S=1 spam={score} T=<a@b>"
        for n, score in enumerate(("-40.0", "0.5", "4.9", "5.0", "30.0"))
    ]
    stats = collect(*lines, tag_level=5.0, kill_level=16.0).stats
    assert stats.spam_tagged == 2
    histogram = stats.histogram()
    assert histogram[0] == [-10, 1] and histogram[-1] == [26, 1]
    assert {low: n for low, n in histogram}[5] == 1 and sum(n for _, n in histogram) == 5


def test_since_is_compared_with_the_stamp_and_rotated_files_come_oldest_first(
    tmp_path: Path,
) -> None:
    stats = collect(
        "2026-12-01 09:59:59 1xVYHw-0000fT-00 <= s@x.org H=[192.0.2.1]:5 P=esmtp S=1 T=<a@b>",
        "2026-12-01 10:00:00 1xVYHw-0000fT-01 <= s@x.org H=[192.0.2.1]:5 P=esmtp S=1 T=<a@b>",
        since="2026-12-01 10:00:00",
    ).stats
    assert (stats.accepted, stats.lines, stats.first) == (1, 1, "2026-12-01 10:00:00")
    for name in ("mainlog", "mainlog.1", "mainlog.2.gz", "mainlog.10.gz", "mainlog.jsonl"):
        (tmp_path / name).write_text("")
    names = [p.name for p in log_files(tmp_path)]
    assert names == ["mainlog.10.gz", "mainlog.2.gz", "mainlog.1", "mainlog"]


def test_since_syntax() -> None:
    now = time.mktime((2026, 12, 2, 12, 0, 0, 0, 0, -1))
    assert since_stamp("7d", now) == "2026-11-25 12:00:00"
    assert since_stamp("90m", now) == "2026-12-02 10:30:00"
    assert since_stamp("2026-12-01", now) == "2026-12-01 00:00:00"
    assert since_stamp("2026-12-01 08:30", now) == "2026-12-01 08:30:00"
    assert since_stamp("all", now) is None
    with pytest.raises(ValueError, match="--since"):
        since_stamp("yesterday", now)


def test_bad_usage_is_one_line(tmp_path: Path) -> None:
    result = palisade("stats", "--since", "soon", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "palisade: --since: expected 30m, 12h, 7d, 2w, YYYY-MM-DD or all, got 'soon'"
    ]
    result = palisade("stats", "--log-dir", str(tmp_path / "none"), cwd=tmp_path)
    assert (result.returncode, result.stderr) == (1, f"palisade: no mainlog in {tmp_path}/none\n")


def test_the_gateway_never_loads_matplotlib() -> None:
    """matplotlib is only for the page: importing the server, the CLI and the page module
    itself leaves it unloaded (it is imported inside render_page)."""
    code = (
        "import sys, palisade.server.app, palisade.cli.main, palisade.cli.stats, "
        "palisade.obs.statspage; print('matplotlib' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr
