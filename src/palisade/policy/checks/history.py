"""``history``: the client has a history of unwanted activity, or is blocked.

Owns: reading the client's incident record through the ``StateStore`` port, the threshold test
and the block test. The record is written by the gateway itself (every refusal by a rule with
``incident = N``, and pregreet, protocol violations, smuggling attempts, unknown-recipient
bursts: ``[incidents]``), by ``palisade scan`` (other programs' logs) and by ``palisade history
add``; this check only reads it. IPv6 clients are looked up by their /64 and IPv4-mapped IPv6
clients as IPv4: the store does that grouping, not this check.

Matched when the client's key is **blocked** (an active block: the weighted count reached
``[incidents] block_at`` and the block has not expired; see README "Incidents and blocks"). So
the gateway refuses a blocked address even without a firewall in front of it, and lets it in
again when the block ends, as the firewall does. Optionally, with ``threshold`` (an integer of at
least 1; none by default), also when the weighted count of its incidents within ``[incidents]
window`` is **at least** ``threshold`` (``count >= threshold``, like fail2ban's ``maxretry``:
with threshold 10, a client with 9 incidents passes and one with 10 is matched), blocked or not:
such a client stays refused until its incidents leave the window, whatever its block.

Values for the rule's texts: ``$count`` (the weighted count within the window),
``$first_seen``, ``$last_seen`` (of the incidents within the window; local time,
``YYYY-MM-DD HH:MM:SS`` as exim stamps its logs), ``$threshold`` (empty without one); for a
blocked client also ``$until`` (when the block ends), ``$times`` (1 for a first block) and
``$reason`` (the rules that counted, ``dnsbl x6, no-ptr x4``; otherwise ``$reason`` is the
summary every check gives).
``$until`` and ``$times`` are empty when the client is not blocked. All are also set when the
check does not match but a record exists (check-host shows them).
``facts.results[keys.HISTORY_COUNT]`` holds the count (0 without a record). Suggested rule::

    [[rules.connect]]
    check = "history"
    verb = "deny"
    message = "Blacklisted: Denied access - history of unwanted activity"
    log_message = "history: $count incidents since $first_seen; blocked until $until: $reason"

Must not touch: the store's contents (read only), replies, logs, globals.
Trust: the record comes from our own database; the client address comes from the socket.
A store failure (``StateTempError``) propagates and becomes the rule's ``on_error``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, ClassVar

from palisade.policy import keys
from palisade.policy.checks.options import Options
from palisade.policy.rules import (
    NO_MATCH,
    Check,
    CheckFactory,
    CheckResult,
    Facts,
    ListLookup,
    Ports,
    Stage,
)

DEFAULT_THRESHOLD: int | None = None  # blocks only


def stamp(at: float) -> str:
    """exim's log time stamp in local time: ``2024-05-01 13:45:07``."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


class HistoryCheck:
    name: ClassVar[str] = "history"
    stages: ClassVar[frozenset[Stage]] = frozenset(Stage)

    def __init__(self, threshold: int | None = DEFAULT_THRESHOLD) -> None:
        if threshold is not None and threshold < 1:
            raise ValueError("option 'threshold': expected an integer of at least 1")
        self.threshold = threshold

    async def evaluate(self, facts: Facts, ports: Ports) -> CheckResult:
        incident = await ports.state.get_incident(facts.client_ip_text)
        if incident is None:
            facts.results[keys.HISTORY_COUNT] = 0
            return NO_MATCH
        facts.results[keys.HISTORY_COUNT] = incident.count
        block = incident.block
        values = {
            "count": str(incident.count),
            "first_seen": stamp(incident.first_seen),
            "last_seen": stamp(incident.last_seen),
            "threshold": "" if self.threshold is None else str(self.threshold),
            "until": "" if block is None else stamp(block.until),
            "times": "" if block is None else str(block.times),
        }
        if block is not None:
            values["reason"] = block.reason
            summary = (
                f"{incident.key} is blocked until {values['until']} (block {block.times}: "
                f"{block.reason}; {incident.count} incident(s) in the window)"
            )
            return CheckResult(True, summary, values)
        limit = "not blocked" if self.threshold is None else f"threshold {self.threshold}"
        summary = (
            f"{incident.key} has {incident.count} incident(s) since {values['first_seen']}"
            f" (last {values['last_seen']}, {limit})"
        )
        matched = self.threshold is not None and incident.count >= self.threshold
        return CheckResult(matched, summary, values)


def build(options: Mapping[str, Any], lists: ListLookup) -> Check:
    opts = Options(options, "history")
    threshold = opts.number("threshold", minimum=1) if "threshold" in options else None
    if isinstance(threshold, float):
        if not threshold.is_integer():
            raise ValueError(f"option 'threshold': expected an integer, got {threshold!r}")
        threshold = int(threshold)
    opts.done()
    return HistoryCheck(None if threshold is None else int(threshold))


FACTORIES: dict[str, CheckFactory] = {"history": build}
