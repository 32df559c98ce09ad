"""The firewall sync: the state store's active blocks, copied into the kernel firewall.

Owns: which keys the firewall gets (every block in force at ``now``, less the protected
addresses) and the log lines about it: one per key added or removed, one per rebuild, one per
protected or malformed key the store holds (once per key, not at every sync). The caller (``palisade
firewall``) decides when: :meth:`FirewallSync.start` rebuilds the firewall whole (at start and
after a reload), :meth:`FirewallSync.step` sends the difference (every ``[firewall] interval``).
Must not touch: the store's records (it only reads; lifting a block is ``palisade history
remove``), the gateway, any file. Imports ``palisade.ports`` and ``palisade.obs`` only.

Trust: the store is our own data, but its keys still pass the adapter's address validation
before they reach nft (a malformed key is skipped and named once). ``protected``
(``Protection.why``) answers for a key, with the source that protects it or None; an IPv6 key
is a /64 network and is protected when any protected address lies in it.
"""

from __future__ import annotations

from collections.abc import Callable

from palisade.obs.log import escape
from palisade.obs.log import timestamp as stamp
from palisade.ports import Block, Clock, Firewall, FirewallChange, StateStore

__all__ = ["FirewallSync"]


class FirewallSync:
    """Copies the active blocks of ``store`` into ``firewall``; ``log`` gets one line per event."""

    def __init__(
        self,
        store: StateStore,
        firewall: Firewall,
        *,
        protected: Callable[[str], str | None],
        log: Callable[[str], None],
        clock: Clock,
    ) -> None:
        self.store = store
        self.firewall = firewall
        self.protected = protected
        self.log = log
        self.clock = clock
        self._named: set[tuple[str, str]] = set()  # (what, key) already logged once
        self._blocks: dict[str, Block] = {}

    async def wanted(self, now: float) -> dict[str, float]:
        """key -> end of its block, for every block in force at ``now`` that may be applied."""
        wanted: dict[str, float] = {}
        blocks = await self.store.active_blocks(now)
        self._blocks = {block.key: block for block in blocks}
        for block in blocks:
            why = self.protected(block.key)
            if why is not None:
                self._once(
                    "protected",
                    block.key,
                    f"firewall: {escape(block.key, 64)} is protected ({escape(why)}): not"
                    f" blocked, although the state store has a block until {stamp(block.until)}",
                )
                continue
            wanted[block.key] = max(block.until, wanted.get(block.key, 0.0))
        return wanted

    def _once(self, what: str, key: str, line: str) -> None:
        if (what, key) not in self._named:
            self._named.add((what, key))
            self.log(line)

    def _report(self, change: FirewallChange) -> None:
        for key in change.invalid:
            self._once(
                "invalid",
                key,
                f"firewall: state store key {escape(key, 64)} is no IP address or IPv6 /64:"
                " ignored",
            )
        if change.error:
            self.log(f"firewall: update failed ({escape(change.error)}): table rebuilt")
        for key in () if change.rebuilt else change.added:  # a rebuild: one summary line
            block = self._blocks.get(key)
            why = f" until {stamp(block.until)} ({escape(block.reason)})" if block else ""
            self.log(f"firewall: blocked {key}{why}")
        for key in change.renewed:
            block = self._blocks.get(key)
            until = f" until {stamp(block.until)}" if block else ""
            self.log(f"firewall: block of {key} renewed{until}")
        for key in change.removed:
            self.log(f"firewall: unblocked {key}")
        if change.rebuilt:
            self.log(
                f"firewall: rebuilt, {change.v4 + change.v6} blocked"
                f" ({change.v4} IPv4, {change.v6} IPv6 /64)"
            )

    async def start(self) -> FirewallChange:
        """Rebuild the firewall whole from the store. Raises StateTempError, FirewallError."""
        now = self.clock.now()
        change = self.firewall.rebuild(await self.wanted(now), now)
        self._report(change)
        return change

    async def step(self) -> FirewallChange:
        """Send what changed since the last call. Raises StateTempError, FirewallError."""
        now = self.clock.now()
        change = self.firewall.sync(await self.wanted(now), now)
        self._report(change)
        return change
