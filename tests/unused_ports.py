"""Stand-ins for the ports a test's checks never use (``Ports`` needs all three): each method
fails the test, so a check that does reach for the port is caught, not silently served.

Owns nothing of the product; trusts nothing (every call is an error by design).
"""

from __future__ import annotations

from palisade.ports import (
    Block,
    BlockPolicy,
    DnsAnswer,
    Incident,
    IncidentEvent,
    IncidentOutcome,
)


class NoResolver:
    """The Resolver port: any lookup is a test failure."""

    async def query(self, name: str, rdtype: str) -> DnsAnswer:
        raise AssertionError(f"unexpected DNS query {name} {rdtype}")

    async def ptr(self, ip: str) -> DnsAnswer:
        raise AssertionError(f"unexpected PTR query {ip}")


class NoState:
    """The StateStore port: any use is a test failure."""

    async def get_incident(self, ip: str) -> Incident | None:
        raise AssertionError("unexpected state store use")

    async def add_incident(self, ip: str, count: int = 1, now: float | None = None) -> Incident:
        raise AssertionError("unexpected state store use")

    async def remove_incident(self, ip: str) -> bool:
        raise AssertionError("unexpected state store use")

    async def list_incidents(self) -> list[Incident]:
        raise AssertionError("unexpected state store use")

    async def record_incident(
        self,
        ip: str,
        weight: int,
        rule: str,
        now: float,
        policy: BlockPolicy,
        may_block: bool = True,
    ) -> IncidentOutcome:
        raise AssertionError("unexpected state store use")

    async def active_blocks(self, now: float) -> list[Block]:
        raise AssertionError("unexpected state store use")

    async def incident_events(self, ip: str, since: float) -> list[IncidentEvent]:
        raise AssertionError("unexpected state store use")

    async def unblock(self, ip: str) -> bool:
        raise AssertionError("unexpected state store use")

    async def rate_hit(self, key: str, window: float, now: float) -> int:
        raise AssertionError("unexpected state store use")

    async def pass_until(self, key: str, now: float) -> float | None:
        raise AssertionError("unexpected state store use")

    async def remember_pass(self, key: str, until: float, now: float) -> None:
        raise AssertionError("unexpected state store use")


class NoClock:
    """The Clock port: any reading is a test failure."""

    def now(self) -> float:
        raise AssertionError("unexpected clock reading")

    def monotonic(self) -> float:
        raise AssertionError("unexpected clock reading")
