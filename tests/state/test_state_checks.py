"""The ``history`` and ``ratelimit`` checks with the real SQLite store (and the real engine)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from palisade.adapters.sqlite_state import SqliteStateStore
from palisade.policy.checks import history, ratelimit
from palisade.policy.engine import Rule, evaluate_stage
from palisade.policy.keys import HISTORY_COUNT, RATELIMIT_COUNT, RATELIMIT_RATE
from palisade.policy.rules import OnError, Ports, Stage
from palisade.policy.verdict import Verb
from tests.state.conftest import SettableClock, facts
from tests.unused_ports import NoResolver

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class NoLists:
    def get(self, name: str) -> Any:
        return None


def build_history(**options: Any) -> history.HistoryCheck:
    check = history.FACTORIES["history"](options, NoLists())
    assert isinstance(check, history.HistoryCheck)
    return check


def build_ratelimit(**options: Any) -> ratelimit.RateLimitCheck:
    check = ratelimit.FACTORIES["ratelimit"](options, NoLists())
    assert isinstance(check, ratelimit.RateLimitCheck)
    return check


# ------------------------------------------------------------------------------------ history


def test_history_without_threshold_refuses_only_blocks(
    store: SqliteStateStore, ports: Ports, clock: SettableClock
) -> None:
    """No threshold (the default): any count that did not make a block passes, so a client is
    let in again when its block ends, as by the firewall."""
    from palisade.ports import BlockPolicy

    check = build_history()
    assert check.threshold is None
    policy = BlockPolicy(block_at=10)
    run(store.record_incident("192.0.2.9", 50, "dnsbl", clock.value, policy, may_block=False))
    result = run(check.evaluate(facts("192.0.2.9"), ports))
    assert result.matched is False and result.values["count"] == "50"
    assert result.values["threshold"] == ""
    run(store.record_incident("192.0.2.10", 10, "dnsbl", clock.value, policy))
    assert run(check.evaluate(facts("192.0.2.10"), ports)).matched is True


def test_history_threshold_is_reached_at_count_equal(store: SqliteStateStore, ports: Ports) -> None:
    """Pinned: matched when count >= threshold (threshold 10: 9 passes, 10 matches)."""
    check = build_history(threshold=10)
    assert check.threshold == 10
    f = facts("192.0.2.1")
    assert run(check.evaluate(f, ports)).matched is False  # no record at all
    assert f.results[HISTORY_COUNT] == 0
    run(store.add_incident("192.0.2.1", 9))
    result = run(check.evaluate(f, ports))
    assert result.matched is False and result.values["count"] == "9"
    assert f.results[HISTORY_COUNT] == 9
    run(store.add_incident("192.0.2.1"))
    result = run(check.evaluate(f, ports))
    assert result.matched is True
    assert result.values["count"] == "10"
    run(store.add_incident("192.0.2.1"))
    assert run(check.evaluate(f, ports)).matched is True


def test_history_custom_threshold_and_values(
    store: SqliteStateStore, ports: Ports, clock: SettableClock
) -> None:
    import time

    check = build_history(threshold=3)
    run(store.add_incident("198.51.100.4", 2))
    clock.advance(3600)
    run(store.add_incident("198.51.100.4"))
    result = run(check.evaluate(facts("198.51.100.4"), ports))
    assert result.matched
    first = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(clock.value - 3600))
    last = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(clock.value))
    assert result.values == {
        "count": "3",
        "first_seen": first,
        "last_seen": last,
        "threshold": "3",
        "until": "",
        "times": "",
    }
    assert "198.51.100.4 has 3 incident(s)" in result.reason


def test_history_ipv6_by_64_and_mapped(store: SqliteStateStore, ports: Ports) -> None:
    check = build_history(threshold=2)
    run(store.add_incident("2001:db8:aa:bb::1"))
    run(store.add_incident("2001:db8:aa:bb:1234::9"))
    assert run(check.evaluate(facts("2001:db8:aa:bb::ffff"), ports)).matched
    assert not run(check.evaluate(facts("2001:db8:aa:bc::1"), ports)).matched
    run(store.add_incident("192.0.2.50", 2))
    assert run(check.evaluate(facts("::ffff:192.0.2.50"), ports)).matched


@pytest.mark.parametrize(
    "options", [{"threshold": 0}, {"threshold": 2.5}, {"threshold": "10"}, {"treshold": 10}]
)
def test_history_bad_options(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        build_history(**options)


def test_history_rule_denies_with_the_message(store: SqliteStateStore, ports: Ports) -> None:
    rule = Rule(
        name="history",
        stage=Stage.CONNECT,
        check=build_history(),
        verb=Verb.DENY,
        message="Blacklisted: Denied access - history of unwanted activity",
        log_message="history: $count incidents since $first_seen",
    )
    run(store.add_incident("203.0.113.5", 12))
    outcome = run(evaluate_stage(Stage.CONNECT, [rule], facts("203.0.113.5"), ports))
    assert outcome.verdict is not None and outcome.verdict.action is Verb.DENY
    assert outcome.verdict.reply is not None
    assert outcome.verdict.reply.code == 554
    assert "history of unwanted activity" in str(outcome.verdict.reply.text)
    assert outcome.verdict.log_message.startswith("history: 12 incidents since ")
    clean = run(evaluate_stage(Stage.CONNECT, [rule], facts("203.0.113.6"), ports))
    assert clean.verdict is None


def test_history_refuses_a_blocked_client_below_the_threshold(
    db_path: Path, clock: SettableClock
) -> None:
    """A block counts whatever the threshold; its end lets the client in again (its count,
    below the threshold, does not refuse it)."""
    import time

    from palisade.ports import BlockPolicy

    policy = BlockPolicy(window=7 * 86400, block_at=4, block_for=3600)
    with SqliteStateStore(db_path, clock=clock, policy=policy) as store:
        ports = Ports(resolver=NoResolver(), state=store, clock=clock)
        rule = Rule(
            name="history",
            stage=Stage.CONNECT,
            check=build_history(threshold=50),
            verb=Verb.DENY,
            message="Blocked until $until: $reason",
            log_message="history: blocked until $until (block $times): $reason, $count",
        )
        now = clock.value
        run(store.record_incident("192.0.2.77", 3, "dnsbl", now, policy))
        assert (
            run(evaluate_stage(Stage.CONNECT, [rule], facts("192.0.2.77"), ports)).verdict is None
        )
        run(store.record_incident("192.0.2.77", 1, "no-ptr", now, policy))
        outcome = run(evaluate_stage(Stage.CONNECT, [rule], facts("192.0.2.77"), ports))
        until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now + 3600))
        assert outcome.verdict is not None and outcome.verdict.reply is not None
        assert outcome.verdict.reply.text == f"Blocked until {until}: dnsbl x3, no-ptr x1"
        assert outcome.verdict.log_message == (
            f"history: blocked until {until} (block 1): dnsbl x3, no-ptr x1, 4"
        )
        clock.advance(3600)  # the block has ended
        assert (
            run(evaluate_stage(Stage.CONNECT, [rule], facts("192.0.2.77"), ports)).verdict is None
        )


# ------------------------------------------------------------------------------------ ratelimit


def test_ratelimit_eleventh_connection_in_15_minutes_is_matched(
    ports: Ports, clock: SettableClock
) -> None:
    check = build_ratelimit(limit=10, window="15m", log_rates=True)
    assert check.log_rates is True and check.window == 900.0
    f = facts("192.0.2.10")
    for i in range(1, 11):
        result = run(check.evaluate(f, ports))
        assert result.matched is False, i
        assert result.values["rate"] == f"{i}/900s"
        assert f.results[RATELIMIT_RATE] == f"{i}/900s"
        clock.advance(80)  # ten connections within 800 s
    result = run(check.evaluate(f, ports))
    assert result.matched is True
    assert result.values == {"rate": "11/900s", "count": "11", "limit": "10", "window": "900s"}
    assert f.results[RATELIMIT_RATE] == "11/900s"
    assert f.results[RATELIMIT_COUNT] == 11
    # another client is not affected
    assert run(check.evaluate(facts("192.0.2.11"), ports)).values["rate"] == "1/900s"


def test_ratelimit_allows_again_once_the_window_slid(ports: Ports, clock: SettableClock) -> None:
    check = build_ratelimit(limit=3, window=60)
    f = facts("192.0.2.20")
    assert [run(check.evaluate(f, ports)).matched for _ in range(4)] == [
        False,
        False,
        False,
        True,
    ]
    clock.advance(59.9)
    assert run(check.evaluate(f, ports)).matched is True  # 5 within the last minute
    clock.advance(0.1)  # the first four (at t) are exactly 60 s old: gone
    result = run(check.evaluate(f, ports))
    assert result.matched is False and result.values["count"] == "2"


def test_ratelimit_ipv6_by_64_and_mapped(ports: Ports) -> None:
    check = build_ratelimit(limit=2, window="1h")
    run(check.evaluate(facts("2001:db8:5:6::1"), ports))
    run(check.evaluate(facts("2001:db8:5:6::2"), ports))
    assert run(check.evaluate(facts("2001:db8:5:6:ffff::3"), ports)).matched
    assert not run(check.evaluate(facts("2001:db8:5:7::1"), ports)).matched
    run(check.evaluate(facts("192.0.2.30"), ports))
    run(check.evaluate(facts("::ffff:192.0.2.30"), ports))
    result = run(check.evaluate(facts("192.0.2.30"), ports))
    assert result.matched and result.values["count"] == "3"


def test_ratelimit_key_ip24(ports: Ports) -> None:
    check = build_ratelimit(limit=1, key="ip/24")
    assert not run(check.evaluate(facts("192.0.2.1"), ports)).matched
    assert run(check.evaluate(facts("192.0.2.200"), ports)).matched
    assert not run(check.evaluate(facts("192.0.3.1"), ports)).matched


def test_ratelimit_rules_count_separately_unless_they_share_a_counter(ports: Ports) -> None:
    a = build_ratelimit(limit=10, window="15m")
    b = build_ratelimit(limit=5, window="15m")
    f = facts("192.0.2.40")
    run(a.evaluate(f, ports))
    assert run(b.evaluate(f, ports)).values["count"] == "1"
    shared1 = build_ratelimit(limit=10, counter="conn")
    shared2 = build_ratelimit(limit=5, counter="conn")
    run(shared1.evaluate(f, ports))
    assert run(shared2.evaluate(f, ports)).values["count"] == "2"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (900, 900.0),
        (0.5, 0.5),
        ("900", 900.0),
        ("90s", 90.0),
        ("15m", 900.0),
        ("15M", 900.0),
        (" 2h ", 7200.0),
        ("1d", 86400.0),
        ("1.5h", 5400.0),
    ],
)
def test_window_syntax(text: Any, seconds: float) -> None:
    assert ratelimit.parse_window(text) == seconds


@pytest.mark.parametrize(
    "options",
    [
        {"window": "15"},  # fine: seconds (control case, see below)
        {"window": "15 minutes"},
        {"window": "0m"},
        {"window": -1},
        {"window": True},
        {"window": "1w"},
        {"limit": 0},
        {"limit": 2.5},
        {"key": "sender"},
        {"log_rates": "yes"},
        {"counter": "a b"},
        {"limt": 10},
    ],
)
def test_ratelimit_bad_options(options: dict[str, Any]) -> None:
    if options == {"window": "15"}:
        assert build_ratelimit(**options).window == 15.0
        return
    with pytest.raises(ValueError):
        build_ratelimit(**options)


def test_ratelimit_defaults() -> None:
    check = build_ratelimit()
    assert (check.limit, check.window, check.key, check.log_rates) == (10, 900.0, "ip", False)
    assert Stage.CONNECT in check.stages and Stage.RCPT in check.stages


def test_ratelimit_rule_defers_the_eleventh(ports: Ports) -> None:
    rule = Rule(
        name="conn_rate",
        stage=Stage.CONNECT,
        check=build_ratelimit(limit=10, window="15m", log_rates=True),
        verb=Verb.DEFER,
        message="Too many connections, slow down",
        log_message="connection rate $rate over $limit",
    )
    for _ in range(10):
        assert (
            run(evaluate_stage(Stage.CONNECT, [rule], facts("192.0.2.60"), ports)).verdict is None
        )
    outcome = run(evaluate_stage(Stage.CONNECT, [rule], facts("192.0.2.60"), ports))
    assert outcome.verdict is not None and outcome.verdict.action is Verb.DEFER
    assert outcome.verdict.reply is not None and outcome.verdict.reply.code == 421
    assert outcome.verdict.log_message == "connection rate 11/900s over 10"


def test_locked_store_turns_into_the_rules_on_error(db_path: Path, clock: SettableClock) -> None:
    store = SqliteStateStore(db_path, clock=clock, busy_timeout=0.1)
    ports = Ports(resolver=NoResolver(), state=store, clock=clock)
    defer_rule = Rule("conn_rate", Stage.CONNECT, build_ratelimit(), Verb.DENY)
    skip_rule = Rule(
        "conn_rate_skip",
        Stage.CONNECT,
        build_ratelimit(counter="x"),
        Verb.DENY,
        on_error=OnError.SKIP,
    )
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        outcome = run(evaluate_stage(Stage.CONNECT, [defer_rule], facts("192.0.2.70"), ports))
        assert outcome.verdict is not None and outcome.verdict.action is Verb.DEFER
        assert outcome.decisions[0].error is not None
        assert "locked" in outcome.decisions[0].error
        skipped = run(evaluate_stage(Stage.CONNECT, [skip_rule], facts("192.0.2.70"), ports))
        assert skipped.verdict is None
    finally:
        other.execute("ROLLBACK")
        other.close()
        store.close()
