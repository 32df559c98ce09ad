"""gather_eager: asyncio.gather(..., return_exceptions=True) without a Task for what need not wait.

Real coroutines on a real event loop; "loop turns" are counted with a callback that re-arms
itself with ``call_soon`` (one run per turn of the loop).
"""

from __future__ import annotations

import asyncio

import pytest

from palisade.policy.eager import gather_eager


async def ready(value: int) -> int:
    return value


async def failing(message: str) -> int:
    raise LookupError(message)


async def waiting(value: int, delay: float = 0.0) -> int:
    await asyncio.sleep(delay)
    return value


async def turns_taken(coro_factory) -> tuple[object, int]:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    count = {"turns": 0, "stop": False}

    def tick() -> None:
        if not count["stop"]:
            count["turns"] += 1
            loop.call_soon(tick)

    loop.call_soon(tick)
    await asyncio.sleep(0)  # the ticker is running
    start = count["turns"]
    result = await coro_factory()
    count["stop"] = True
    return result, count["turns"] - start


def test_results_in_order_with_exceptions_in_place() -> None:
    async def main() -> list[object]:
        return await gather_eager(ready(1), failing("no"), waiting(3), waiting(4, 0.01))

    outcomes = asyncio.run(main())
    assert outcomes[0] == 1 and outcomes[2] == 3 and outcomes[3] == 4
    assert isinstance(outcomes[1], LookupError) and str(outcomes[1]) == "no"


def test_what_finishes_at_once_costs_no_turn_of_the_loop() -> None:
    async def main() -> tuple[tuple[object, int], tuple[object, int]]:
        eager = await turns_taken(lambda: gather_eager(ready(1), ready(2)))
        plain = await turns_taken(
            lambda: asyncio.gather(ready(1), ready(2), return_exceptions=True)
        )
        return eager, plain

    (eager_result, eager_turns), (plain_result, plain_turns) = asyncio.run(main())
    assert list(eager_result) == [1, 2] == list(plain_result)  # type: ignore[call-overload]
    assert eager_turns == 0
    assert plain_turns >= 1  # what gather_eager saves


def test_one_that_waits_is_awaited_in_place_and_several_together() -> None:
    async def main() -> tuple[object, float, object]:
        one = await gather_eager(ready(1), waiting(2))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        several = await gather_eager(waiting(1, 0.05), waiting(2, 0.05), waiting(3, 0.05))
        return one, loop.time() - t0, several

    one, elapsed, several = asyncio.run(main())
    assert one == [1, 2]
    assert several == [1, 2, 3]
    assert elapsed < 0.12  # at the same time, not one after the other


def test_cancelling_the_caller_cancels_what_waits() -> None:
    async def main() -> bool:
        started = asyncio.Event()
        cancelled = asyncio.Event()

        async def slow() -> int:
            started.set()
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return 1

        task = asyncio.ensure_future(gather_eager(ready(0), slow()))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return cancelled.is_set()

    assert asyncio.run(main())
