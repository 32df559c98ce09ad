"""Queue ids: unique across every generator of a process (sessions and the runner's bounces)."""

from __future__ import annotations

from palisade.obs.queueid import QueueIdGenerator, is_queue_id


def test_two_generators_in_one_process_never_repeat_an_id() -> None:
    sessions, runner = QueueIdGenerator(), QueueIdGenerator()
    ids = [gen.new() for _ in range(500) for gen in (sessions, runner)]
    assert len(set(ids)) == len(ids)
    assert all(is_queue_id(i) for i in ids)


def test_shape_is_exim_like() -> None:
    assert is_queue_id("1vA2bC-0001Xy-7Q")
    assert not is_queue_id("../../etc/passwd") and not is_queue_id("1vA2bC-0001Xy-7Q\n")
