"""The StateStore contract, run against every backend: SQLite (a real file) and Redis (a real
redis-server started by the suite). The same assertions on both: weighted incidents in the
window, blocks with growth and cap and never extended, protected keys, IPv6 by /64, unblock and
remove, exact sliding-window rates, passes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from palisade.ports import Block, BlockPolicy, Incident, IncidentEvent, StateStore
from tests.state.conftest import SettableClock

T0 = 1_700_000_000.0
DAY = 86400.0
T = TypeVar("T")
POLICY = BlockPolicy(window=7 * DAY, block_at=10, block_for=DAY, growth=2.0, block_max=3 * DAY)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def record(
    store: Any,
    ip: str,
    weight: int,
    rule: str,
    now: float,
    policy: BlockPolicy = POLICY,
    *,
    may_block: bool = True,
) -> Any:
    return run(store.record_incident(ip, weight, rule, now, policy, may_block))


def test_implements_the_port(any_store: Any) -> None:
    assert isinstance(any_store, StateStore)


def test_weights_add_up_and_block_at_the_threshold(any_store: Any) -> None:
    out = record(any_store, "192.0.2.1", 3, "dnsbl", T0)
    assert (out.key, out.count, out.block, out.new_block) == ("192.0.2.1", 3, None, False)
    assert record(any_store, "192.0.2.1", 3, "dnsbl", T0 + 1).count == 6
    assert record(any_store, "192.0.2.1", 3, "no-ptr", T0 + 2).count == 9
    assert run(any_store.active_blocks(T0 + 2)) == []
    out = record(any_store, "192.0.2.1", 1, "pregreet", T0 + 3)
    assert out.count == 10 and out.new_block
    assert out.block == Block(
        "192.0.2.1", T0 + 3, T0 + 3 + DAY, 1, "dnsbl x6, no-ptr x3, pregreet x1"
    )
    assert run(any_store.active_blocks(T0 + 3)) == [out.block]
    assert run(any_store.active_blocks(T0 + 3 + DAY)) == []  # until is exclusive
    got = run(any_store.get_incident("192.0.2.1"))  # the store's clock: T0
    assert got is not None and got.block == out.block and got.count == 10


def test_an_active_block_is_kept_not_extended(any_store: Any) -> None:
    first = record(any_store, "192.0.2.1", 10, "dnsbl", T0)
    assert first.new_block
    again = record(any_store, "192.0.2.1", 5, "dnsbl", T0 + 3600)
    assert again.count == 15 and not again.new_block and again.block == first.block


def test_window_expiry(any_store: Any) -> None:
    record(any_store, "192.0.2.1", 4, "dnsbl", T0)
    record(any_store, "192.0.2.1", 4, "dnsbl", T0 + DAY)
    # the first one is exactly a window old: it has left the window
    out = record(any_store, "192.0.2.1", 1, "no-ptr", T0 + 7 * DAY)
    assert out.count == 5 and out.block is None
    events = run(any_store.incident_events("192.0.2.1", T0 + 7 * DAY - POLICY.window))
    assert events == [
        IncidentEvent("192.0.2.1", T0 + DAY, 4, "dnsbl"),
        IncidentEvent("192.0.2.1", T0 + 7 * DAY, 1, "no-ptr"),
    ]
    # and it was pruned, not merely skipped
    assert run(any_store.incident_events("192.0.2.1", 0)) == events


def test_old_methods_read_the_window(make_store: Callable[..., Any], clock: SettableClock) -> None:
    store = make_store(POLICY)
    record(store, "192.0.2.1", 2, "dnsbl", T0)
    record(store, "192.0.2.1", 3, "no-ptr", T0 + DAY)
    assert run(store.get_incident("192.0.2.1")) == Incident("192.0.2.1", 5, T0, T0 + DAY)
    clock.advance(7 * DAY)  # the first event leaves the window: nothing written since
    assert run(store.get_incident("192.0.2.1")) == Incident("192.0.2.1", 3, T0 + DAY, T0 + DAY)
    assert [(i.key, i.count) for i in run(store.list_incidents())] == [("192.0.2.1", 3)]
    clock.advance(DAY)
    assert run(store.get_incident("192.0.2.1")) is None
    assert run(store.list_incidents()) == []


def test_a_block_outlives_its_incidents(
    make_store: Callable[..., Any], clock: SettableClock
) -> None:
    policy = BlockPolicy(window=DAY, block_at=2, block_for=3 * DAY)
    store = make_store(policy)
    block = record(store, "192.0.2.1", 2, "dnsbl", T0, policy).block
    clock.advance(2 * DAY)
    assert run(store.get_incident("192.0.2.1")) == Incident("192.0.2.1", 0, T0, T0, block)
    assert [i.key for i in run(store.list_incidents())] == ["192.0.2.1"]


def test_repeat_offenders_grow_up_to_the_cap(any_store: Any) -> None:
    lengths = []
    at = T0
    for _ in range(4):
        out = record(any_store, "192.0.2.9", 10, "dnsbl", at)
        assert out.new_block
        lengths.append((out.block.times, out.block.until - out.block.since))
        at = out.block.until  # the next incident comes as the block ends
    assert lengths == [(1, DAY), (2, 2 * DAY), (3, 3 * DAY), (4, 3 * DAY)]


def test_a_block_ended_a_window_ago_is_forgotten(any_store: Any) -> None:
    first = record(any_store, "192.0.2.9", 10, "dnsbl", T0).block
    quiet = first.until + POLICY.window
    if hasattr(any_store, "sweep_incidents_sync"):  # SQLite forgets in sweeps, Redis by logic
        any_store.sweep_incidents_sync(quiet)
    again = record(any_store, "192.0.2.9", 10, "dnsbl", quiet + 1)
    assert again.block.times == 1


def test_protected_keys_are_never_blocked(any_store: Any) -> None:
    out = record(any_store, "127.0.0.1", 50, "dnsbl", T0, may_block=False)
    assert (out.count, out.block, out.new_block) == (50, None, False)
    assert run(any_store.active_blocks(T0)) == []
    # but a block that exists is reported even to an unblocking caller
    record(any_store, "192.0.2.1", 10, "dnsbl", T0)
    kept = record(any_store, "192.0.2.1", 1, "dnsbl", T0 + 1, may_block=False)
    assert kept.block is not None and not kept.new_block


def test_ipv6_by_64(any_store: Any) -> None:
    record(any_store, "2001:db8:1:2::1", 6, "dnsbl", T0)
    out = record(any_store, "2001:db8:1:2:ffff::9", 4, "no-ptr", T0 + 1)
    assert out.key == "2001:db8:1:2::/64" and out.new_block
    assert [b.key for b in run(any_store.active_blocks(T0 + 1))] == ["2001:db8:1:2::/64"]
    assert len(run(any_store.incident_events("2001:db8:1:2::/64", 0))) == 2


def test_unblock_and_remove(any_store: Any) -> None:
    record(any_store, "192.0.2.1", 10, "dnsbl", T0)
    assert run(any_store.unblock("192.0.2.1")) is True
    assert run(any_store.active_blocks(T0)) == []
    assert run(any_store.unblock("192.0.2.1")) is False
    # unblocking forgot the evidence too: the next incident does not block at once
    out = record(any_store, "192.0.2.1", 1, "dnsbl", T0 + 1)
    assert out.count == 1 and out.block is None
    record(any_store, "192.0.2.2", 10, "dnsbl", T0)
    assert run(any_store.remove_incident("192.0.2.2")) is True
    assert run(any_store.active_blocks(T0)) == []
    assert run(any_store.incident_events("192.0.2.2", 0)) == []
    assert run(any_store.remove_incident("192.0.2.2")) is False


def test_add_incident_is_a_manual_record_that_may_block(
    make_store: Callable[..., Any], clock: SettableClock
) -> None:
    store = make_store(POLICY)
    got = run(store.add_incident("192.0.2.1", 10))
    assert got.count == 10 and got.block is not None
    assert got.block.reason == "manual x10"
    assert run(store.incident_events("192.0.2.1", 0)) == [
        IncidentEvent("192.0.2.1", T0, 10, "manual")
    ]


def test_bad_arguments(any_store: Any) -> None:
    for weight in (0, -1, True):
        with pytest.raises(ValueError):
            record(any_store, "192.0.2.1", weight, "dnsbl", T0)
    with pytest.raises(ValueError):
        record(any_store, "192.0.2.1", 1, " ", T0)
    with pytest.raises(ValueError):
        record(any_store, "not-an-ip", 1, "dnsbl", T0)


def test_incident_add_get_remove(any_store: Any, clock: SettableClock) -> None:
    assert run(any_store.get_incident("192.0.2.1")) is None
    first = run(any_store.add_incident("192.0.2.1"))
    assert first == Incident("192.0.2.1", 1, clock.value, clock.value)
    clock.advance(60)
    second = run(any_store.add_incident("192.0.2.1", 4))
    assert second == Incident("192.0.2.1", 5, T0, T0 + 60)
    assert run(any_store.get_incident("192.0.2.1")) == second
    # an explicit time earlier than the first sighting moves first_seen back, not last_seen
    third = run(any_store.add_incident("192.0.2.1", 1, now=T0 - 100))
    assert third == Incident("192.0.2.1", 6, T0 - 100, T0 + 60)
    assert run(any_store.remove_incident("192.0.2.1")) is True
    assert run(any_store.get_incident("192.0.2.1")) is None
    assert run(any_store.remove_incident("192.0.2.1")) is False


def test_incident_count_must_be_positive(any_store: Any) -> None:
    for bad in (0, -1, True):
        with pytest.raises(ValueError):
            run(any_store.add_incident("192.0.2.1", bad))
    with pytest.raises(ValueError):
        run(any_store.add_incident("not-an-ip"))


def test_ipv6_grouped_by_64(any_store: Any) -> None:
    run(any_store.add_incident("2001:db8:1:2::1"))
    run(any_store.add_incident("2001:db8:1:2:dead:beef::7", 2))
    run(any_store.add_incident("2001:db8:1:3::1"))  # another /64
    got = run(any_store.get_incident("2001:db8:1:2:ffff:ffff:ffff:ffff"))
    assert got is not None and got.key == "2001:db8:1:2::/64" and got.count == 3
    other = run(any_store.get_incident("2001:db8:1:3::abcd"))
    assert other is not None and other.count == 1
    assert run(any_store.remove_incident("2001:db8:1:2::42")) is True
    assert run(any_store.get_incident("2001:db8:1:2::1")) is None


def test_ipv4_mapped_is_ipv4(any_store: Any) -> None:
    run(any_store.add_incident("::ffff:198.51.100.7", 2))
    got = run(any_store.get_incident("198.51.100.7"))
    assert got is not None and got.key == "198.51.100.7" and got.count == 2
    run(any_store.add_incident("198.51.100.7"))
    mapped = run(any_store.get_incident("::ffff:198.51.100.7"))
    assert mapped is not None and mapped.count == 3


def test_list_highest_count_first(any_store: Any, clock: SettableClock) -> None:
    assert run(any_store.list_incidents()) == []
    run(any_store.add_incident("192.0.2.1", 2))
    clock.advance(1)
    run(any_store.add_incident("192.0.2.2", 7))
    clock.advance(1)
    run(any_store.add_incident("2001:db8::1", 3))
    listed = run(any_store.list_incidents())
    assert [(i.key, i.count) for i in listed] == [
        ("192.0.2.2", 7),
        ("2001:db8::/64", 3),
        ("192.0.2.1", 2),
    ]


def test_rate_window_exact(any_store: Any, clock: SettableClock) -> None:
    window = 900.0
    counts = []
    for _ in range(11):
        counts.append(run(any_store.rate_hit("rate:ip:192.0.2.1", window, clock.now())))
        clock.advance(60)  # 11 hits at T0, T0+60, ... T0+600
    assert counts == list(range(1, 12))  # the 11th is 11: over a limit of 10
    # other keys are separate
    assert run(any_store.rate_hit("rate:ip:192.0.2.2", window, clock.now())) == 1


def test_rate_window_slides(any_store: Any) -> None:
    key, window = "k", 900.0
    for i in range(10):
        assert run(any_store.rate_hit(key, window, T0 + i)) == i + 1  # T0 .. T0+9
    # just before the first event is `window` old: all 10 still count, plus this one
    assert run(any_store.rate_hit(key, window, T0 + 899.5)) == 11
    # the event at T0 is exactly `window` old at T0+900: it has left; T0+1..9, 899.5, this
    assert run(any_store.rate_hit(key, window, T0 + 900)) == 11
    # much later: everything has slid out but this one
    assert run(any_store.rate_hit(key, window, T0 + 900 + 899.5 + 900)) == 1


def test_rate_window_allows_again_after_slide(any_store: Any) -> None:
    key, window = "k", 15 * 60.0
    results = [run(any_store.rate_hit(key, window, T0 + i * 10)) for i in range(11)]
    assert results[9] == 10 and results[10] == 11
    # 15 minutes after the burst: only the new hit counts
    assert run(any_store.rate_hit(key, window, T0 + 100 + window)) == 1


def test_rate_events_from_a_clock_ahead_still_count(any_store: Any) -> None:
    assert run(any_store.rate_hit("k", 60, T0 + 30)) == 1  # another process, clock 30 s ahead
    assert run(any_store.rate_hit("k", 60, T0)) == 2


def test_rate_window_must_be_positive(any_store: Any) -> None:
    for bad in (0, -5, float("nan")):
        with pytest.raises(ValueError):
            run(any_store.rate_hit("k", bad, T0))


def test_many_events_at_one_instant_count_one_by_one(any_store: Any) -> None:
    assert [run(any_store.rate_hit("k", 60, T0)) for _ in range(5)] == [1, 2, 3, 4, 5]
    assert run(any_store.rate_hit("k", 60, T0 + 60)) == 1  # all five left together


def test_pass_remembered_until_it_expires(any_store: Any, make_store: Callable[..., Any]) -> None:
    assert run(any_store.pass_until("pregreet:192.0.2.1", T0)) is None
    run(any_store.remember_pass("pregreet:192.0.2.1", T0 + 10, T0))
    assert run(any_store.pass_until("pregreet:192.0.2.1", T0 + 9.9)) == T0 + 10
    assert run(any_store.pass_until("pregreet:192.0.2.1", T0 + 10)) is None  # expired at its end
    assert run(any_store.pass_until("pregreet:192.0.2.2", T0)) is None  # per key
    run(any_store.remember_pass("pregreet:192.0.2.1", T0 + 50, T0 + 20))  # a new pass replaces it
    assert run(any_store.pass_until("pregreet:192.0.2.1", T0 + 30)) == T0 + 50
    # another process (another worker, another host) sees it: its own connection
    other = make_store()
    assert run(other.pass_until("pregreet:192.0.2.1", T0 + 30)) == T0 + 50


def test_a_batch_is_as_one_by_one(make_store: Callable[..., Any]) -> None:
    items = [
        ("192.0.2.1", 4, "dnsbl", T0, POLICY, True),
        ("192.0.2.1", 4, "dnsbl", T0 + 1, POLICY, True),
        ("127.0.0.1", 20, "dnsbl", T0 + 1, POLICY, False),
        ("192.0.2.1", 2, "no-ptr", T0 + 2, POLICY, True),
        ("192.0.2.1", 2, "no-ptr", T0 + 3, POLICY, True),
    ]
    batched = make_store()
    together = run(batched.record_incidents(items))
    assert [o.count for o in together] == [4, 8, 20, 10, 12]
    assert [o.new_block for o in together] == [False, False, False, True, False]
    assert together[3].block == Block("192.0.2.1", T0 + 2, T0 + 2 + DAY, 1, "dnsbl x8, no-ptr x2")


def test_a_bad_item_writes_nothing_of_its_batch(any_store: Any) -> None:
    with pytest.raises(ValueError):
        run(
            any_store.record_incidents(
                [
                    ("192.0.2.1", 1, "dnsbl", T0, POLICY, True),
                    ("bogus", 1, "dnsbl", T0, POLICY, True),
                ]
            )
        )
    assert run(any_store.incident_events("192.0.2.1", 0)) == []


def test_two_handles_share_one_state(make_store: Callable[..., Any]) -> None:
    """Two workers (or two hosts on Redis) see each other's counts, incidents and blocks."""
    one, two = make_store(POLICY), make_store(POLICY)
    assert [run(s.rate_hit("k", 900, T0 + i)) for i, s in enumerate([one, two, one, two])] == [
        1, 2, 3, 4,
    ]  # fmt: skip
    record(one, "192.0.2.7", 6, "dnsbl", T0)
    out = record(two, "192.0.2.7", 4, "no-ptr", T0 + 1)
    assert out.new_block and out.count == 10
    assert run(one.active_blocks(T0 + 2)) == [out.block]
