"""``ratelimit``: the client made more than ``limit`` evaluations of this rule within ``window``.

Owns: the options (``limit``, ``window``, ``key``, ``counter``, ``log_rates``), the duration syntax
of ``window``, the counter key sent to the store, and the rate values. Counting itself (an exact
sliding window shared by every worker process) is the ``StateStore``'s job (``rate_hit``).

Semantics (pinned by tests/state): every evaluation records one event for the client and then
reads how many events fell within the last ``window`` seconds, this one included; the check is
matched when that count **exceeds** ``limit`` (``count > limit``): with ``limit = 10`` and
``window = "15m"`` the 10th connection in 15 minutes passes and the 11th is matched (deferred,
with ``verb = "defer"``). Refused attempts count too, so a client that keeps hammering stays
limited until it slows down. Time is ``ports.clock.now()`` (wall clock: the counters live in a
file shared between processes and restarts, which no monotonic clock is).

Options:

* ``limit``: an integer >= 1, default 10.
* ``window``: seconds as a number, or a string with a unit: ``"90s"``, ``"15m"``, ``"2h"``,
  ``"1d"`` (a bare number string is seconds; decimals allowed); must be > 0. Default 15 minutes.
* ``key``: ``"ip"`` (default; an IPv4 address, IPv4-mapped IPv6 as IPv4, other IPv6 by /64) or
  ``"ip/24"`` (IPv4 by /24, IPv6 by /48).
* ``counter``: the name of the event stream, default ``"<limit>/<window>s"``. Rules with the same
  counter and key share events (each evaluation adds one), so two rules that should count
  separately need different counters; a warn rule and a defer rule on the same traffic should
  share one only if each event should count twice.
* ``log_rates``: true to have the session log the current rate of every client, matched or not
  (stored on the check as the attribute ``log_rates``; the session reads it).

Values: ``$rate`` (``"11/900s"``), ``$count``, ``$limit``, ``$window`` (``"900s"``), always, matched
or not; the rate also goes to ``facts.results["ratelimit.rate"]`` (and the number to
``facts.results["ratelimit.count"]``) for the session's log line.

Must not touch: replies, logs, globals; it writes only through ``ports.state.rate_hit``.
Trust: the client address comes from the socket; the options from the operator's config, checked
when the rule is built (``ValueError`` naming the option). A store failure (``StateTempError``)
propagates and becomes the rule's ``on_error``.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from palisade.policy import keys
from palisade.policy.checks.options import Options
from palisade.policy.rules import (
    Check,
    CheckFactory,
    CheckResult,
    Facts,
    IPAddress,
    ListLookup,
    Ports,
    Stage,
)

DEFAULT_LIMIT = 10
DEFAULT_WINDOW = 15 * 60.0
KEYS = ("ip", "ip/24")
_KEY_MEMO = 10_000  # client addresses whose store key is remembered per rule
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)\s*", re.IGNORECASE)


def parse_window(value: object) -> float:
    """Seconds from a number or a ``"15m"``-style string; ``ValueError`` for anything else."""
    seconds: float
    if isinstance(value, bool):
        raise ValueError(f"option 'window': expected a duration, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if match is None:
            raise ValueError(
                f"option 'window': expected seconds or a number with s, m, h or d, got {value!r}"
            )
        seconds = float(match.group(1)) * _UNITS[match.group(2).lower()]
    else:
        raise ValueError(f"option 'window': expected a duration, got {value!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"option 'window': must be more than 0 seconds, got {value!r}")
    return seconds


def client_key(ip: IPAddress, key: str = "ip") -> str:
    """The client part of the counter key: the address (IPv6 by /64) or its /24 (IPv6 /48)."""
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped
        if mapped is not None:
            ip = mapped
    if isinstance(ip, ipaddress.IPv4Address):
        if key == "ip":
            return str(ip)
        return str(ipaddress.IPv4Network((ip, 24), strict=False))
    bare = ipaddress.IPv6Address(int(ip))  # drops any %zone
    prefix = 64 if key == "ip" else 48
    return str(ipaddress.IPv6Network((bare, prefix), strict=False))


def _seconds(window: float) -> str:
    return f"{window:g}s"


class RateLimitCheck:
    name: ClassVar[str] = "ratelimit"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.CONNECT, Stage.MAIL, Stage.RCPT})

    def __init__(
        self,
        limit: int = DEFAULT_LIMIT,
        window: float = DEFAULT_WINDOW,
        key: str = "ip",
        counter: str | None = None,
        log_rates: bool = False,
    ) -> None:
        if limit < 1:
            raise ValueError("option 'limit': expected an integer of at least 1")
        if not window > 0:
            raise ValueError("option 'window': must be more than 0 seconds")
        if key not in KEYS:
            raise ValueError(f"option 'key': expected one of {', '.join(KEYS)}, got {key!r}")
        self.limit = limit
        self.window = window
        self.key = key
        self.counter = counter if counter is not None else f"{limit}/{_seconds(window)}"
        self.log_rates = log_rates
        self._window_text = _seconds(window)
        self._limit_text = str(limit)
        self._keys: dict[IPAddress, str] = {}  # store keys of recent clients, computed once

    def store_key(self, ip: IPAddress) -> str:
        """The key given to ``StateStore.rate_hit``."""
        key = self._keys.get(ip)
        if key is None:
            if len(self._keys) >= _KEY_MEMO:
                self._keys.clear()
            key = self._keys[ip] = f"rate:{self.counter}:{self.key}:{client_key(ip, self.key)}"
        return key

    async def evaluate(self, facts: Facts, ports: Ports) -> CheckResult:
        count = await ports.state.rate_hit(
            self.store_key(facts.client_ip), self.window, ports.clock.now()
        )
        window = self._window_text
        rate = f"{count}/{window}"
        facts.results[keys.RATELIMIT_RATE] = rate
        facts.results[keys.RATELIMIT_COUNT] = count
        values = {"rate": rate, "count": str(count), "limit": self._limit_text, "window": window}
        matched = count > self.limit
        verdict = "over" if matched else "within"
        reason = f"rate {rate} {verdict} limit {self.limit}/{window}"
        return CheckResult(matched, reason, values)


def build(options: Mapping[str, Any], lists: ListLookup) -> Check:
    opts = Options(options, "ratelimit")
    limit = opts.number("limit", DEFAULT_LIMIT, minimum=1)
    if isinstance(limit, float):
        if not limit.is_integer():
            raise ValueError(f"option 'limit': expected an integer, got {limit!r}")
        limit = int(limit)
    window = parse_window(opts.raw("window", DEFAULT_WINDOW))
    key = opts.text("key", "ip")
    if key not in KEYS:
        raise ValueError(f"option 'key': expected one of {', '.join(KEYS)}, got {key!r}")
    counter = opts.text("counter", None)
    if counter is not None and (not counter or any(c.isspace() for c in counter)):
        raise ValueError(f"option 'counter': expected a name without spaces, got {counter!r}")
    log_rates = opts.flag("log_rates", False)
    opts.done()
    return RateLimitCheck(int(limit), window, str(key), counter, log_rates)


FACTORIES: dict[str, CheckFactory] = {"ratelimit": build}
