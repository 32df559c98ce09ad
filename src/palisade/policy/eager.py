"""Awaiting checks' lookups without leaving the event loop when nothing has to wait.

Owns: :class:`Resume` (the rest of an already started coroutine) and :func:`gather_eager`
(``asyncio.gather(..., return_exceptions=True)`` for coroutines, each run to its first wait
at once).

Why: ``asyncio.gather`` wraps every coroutine in a Task, and a Task only starts at the loop's
next turn; the caller resumes a turn after the last one ends. On the warm path every lookup of a
check is answered from the DNS cache without waiting, yet a gather of two of them (the HELO
check's A and AAAA) costs the session two turns of its worker's loop, and a turn of a worker
serving many clients on a busy machine means waiting behind every other client's ready
callbacks: measured with bench/run_generators.py, the EHLO step of a perimeter transaction took
5.8 ms against 2.7 ms for MAIL (2026-12-02). Here a coroutine that finishes in its first step
costs no Task and no turn; only those that really wait are handed to ``asyncio.gather``.
Must not touch: anything but the coroutines handed in.
"""

from __future__ import annotations

import asyncio
import typing
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


class Resume(typing.Generic[T]):
    """Awaits the rest of a coroutine that has already been started and is suspended on
    ``pending`` (what its first ``send`` yielded): the same hand-over ``await`` does, one step
    late."""

    __slots__ = ("_coro", "_pending")

    def __init__(self, coro: Coroutine[Any, Any, T], pending: object) -> None:
        self._coro = coro
        self._pending = pending

    def __await__(self) -> Generator[Any, Any, T]:
        coro, pending = self._coro, self._pending
        self._pending = None
        try:
            while True:
                try:
                    sent = yield pending
                except GeneratorExit:
                    raise
                except BaseException as exc:  # cancellation (a deadline) and the like
                    pending = coro.throw(exc)
                else:
                    pending = coro.send(sent)
        except StopIteration as stop:
            return typing.cast(T, stop.value)
        finally:
            coro.close()  # a no-op once finished; ends it if this awaiter was dropped


async def _resumed(coro: Coroutine[Any, Any, T], pending: object) -> T:
    return await Resume(coro, pending)


async def gather_eager(*coros: Coroutine[Any, Any, T]) -> list[T | BaseException]:
    """``asyncio.gather(*coros, return_exceptions=True)``: outcomes (results or exceptions) in
    the same order, except that each coroutine runs to its first wait right here, so one that
    finishes without waiting costs no Task, and a single one that waits is awaited in place."""
    results: list[T | BaseException] = [typing.cast(T, None)] * len(coros)
    waiting: list[tuple[int, Coroutine[Any, Any, T], object]] = []
    for index, coro in enumerate(coros):
        try:
            pending = coro.send(None)
        except StopIteration as stop:
            results[index] = typing.cast(T, stop.value)
        except Exception as exc:
            results[index] = exc
        else:
            waiting.append((index, coro, pending))
    if len(waiting) == 1:
        index, coro, pending = waiting[0]
        try:
            results[index] = await Resume(coro, pending)
        except Exception as exc:
            results[index] = exc
    elif waiting:
        outcomes = await asyncio.gather(
            *(_resumed(coro, pending) for _, coro, pending in waiting), return_exceptions=True
        )
        for (index, _, _), outcome in zip(waiting, outcomes, strict=True):
            results[index] = outcome
    return results
