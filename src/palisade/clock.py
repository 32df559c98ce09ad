"""The real clock: the one implementation of :class:`palisade.ports.Clock` the gateway runs on.

Owns: reading the system's wall clock and monotonic clock. Nothing else; it imports only the
standard library, so that every layer (adapters, policy tests, the composition root) can share
this one clock. Tests substitute their own settable clock at the port.
"""

from __future__ import annotations

import time


class SystemClock:
    """``time.time`` and ``time.monotonic`` behind the ``Clock`` port."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK = SystemClock()  # stateless: one instance serves every part of a process
