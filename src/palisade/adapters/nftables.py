"""nftables: the table Palisade owns in the kernel firewall, and the batches that change it.

Owns: one table, ``table inet palisade`` (the name is configurable), and everything in it: the
timeout sets ``blocked4`` (``ipv4_addr``, one element per address) and ``blocked6``
(``ipv6_addr`` with ``flags interval, timeout``: one element per /64 network, the incident key
of an IPv6 client), and the chain ``input`` (``type filter hook input priority -5; policy
accept``) with one rule per family that drops new TCP connections (``ct state new``) to the
configured ports from an address in a set. Established connections are left alone, so a
transaction in flight when its client is blocked finishes. Dropped, not rejected: the client's
SYN goes unanswered and a bot waits for its own time-out.
Must not touch: any other table (the operator's ruleset, fail2ban's, nftfw's), the state store,
the policy, the log files; which addresses are blocked is the caller's decision (the
``palisade firewall`` daemon, :mod:`palisade.feedback.firewall`).

How it talks to the kernel: ``nft -j -f -``, one process per batch, the batch in libnftables'
JSON schema on standard input; one batch is one kernel transaction (all or nothing). The Python
binding (Debian's ``python3-nftables``) is installed for the system interpreter only: Palisade
runs in its own virtual environment without system site packages, where ``import nftables``
fails, and the binding is a thin ctypes wrapper around the same library the ``nft`` program
uses, so one ``nft`` process per sync (every few seconds, and only when something changed)
costs nothing that matters and needs no second interpreter. Reading the sets back uses ``nft -j
list table``. ``nft`` is looked up on ``PATH`` and in ``/usr/sbin``.

Rebuild and sync. :meth:`NftablesFirewall.rebuild` replaces the whole table in one transaction
(``add table; delete table; add table ...`` then every set, the chain, the rules and every
element with its remaining time-out): no moment without the rules, and nothing left of an older
layout (other ports, another set type). :meth:`NftablesFirewall.sync` reads the sets back and
sends only the difference: new keys are added, keys no longer wanted are deleted, and a key whose
remaining time differs from the kernel's by more than ``slack`` seconds (a block that was
lengthened or shortened) is deleted and added again. A batch that fails (an element expired
between the listing and the delete, the table removed by hand) is followed by a rebuild.

Trust: the keys come from our own state store but are validated here with :mod:`ipaddress`
before they reach nft (an IPv4 address, an IPv6 address or network, which becomes its /64); a
key that is neither raises ``ValueError`` from :func:`element_key`, and :meth:`sync` and
:meth:`rebuild` skip such keys and return them in ``FirewallChange.invalid``. Values are handed to
nft as JSON strings and numbers, never spliced into nft's text syntax; the table name is
checked against nft's identifier syntax at construction. nft's output is parsed as JSON and only
the fields named here are read.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import math
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from palisade.ports import FirewallChange, FirewallError

__all__ = [
    "DEFAULT_PORTS",
    "NftError",
    "NftablesFirewall",
    "element_key",
]

DEFAULT_PORTS = (25, 465, 587)
SET4 = "blocked4"
SET6 = "blocked6"
CHAIN = "input"
PRIORITY = -5  # before the usual "filter" (0) chains: a blocked client meets nothing else
# A kernel time-out is kept well below what any kernel accepts; a block longer than a year
# is re-added by a later sync when the kernel's copy runs low.
MAX_TIMEOUT = 365 * 86400
_TABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}\Z")
_FAMILY = "inet"


class NftError(FirewallError):
    """nft refused a batch or could not run; ``reason`` is its first error line."""


# Parsing addresses is most of a sync's cost with many blocks (ipaddress is slow; measured:
# 20,000 keys took 1.4 s a sync, 0.3 s with these caches, most of it nft listing the sets):
# the same keys come back every sync.
_CACHED = 1 << 17


@functools.lru_cache(maxsize=_CACHED)
def element_key(key: str) -> tuple[str, str]:
    """``(set name, canonical key)`` for an incident key: ``("blocked4", "192.0.2.1")`` or
    ``("blocked6", "2001:db8:1:2::/64")``. An IPv6 address or a longer prefix becomes its /64,
    an IPv4-mapped IPv6 address its IPv4 address. ``ValueError`` for anything else (an IPv4
    network other than a /32, a network wider than /64, text that is no address)."""
    text = key.strip()
    if "/" in text:
        network = ipaddress.ip_network(text, strict=False)
        if isinstance(network, ipaddress.IPv4Network):
            if network.prefixlen != 32:
                raise ValueError(f"an IPv4 network is not blocked whole: {key!r}")
            return SET4, str(network.network_address)
        if network.prefixlen < 64:
            raise ValueError(f"an IPv6 network wider than /64 is not blocked: {key!r}")
        return SET6, str(ipaddress.IPv6Network((network.network_address, 64), strict=False))
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return SET4, str(address.ipv4_mapped)
        return SET6, str(ipaddress.IPv6Network((address, 64), strict=False))
    return SET4, str(address)


def _nft_value(set_name: str, key: str) -> Any:
    if set_name == SET4:
        return key
    network = ipaddress.IPv6Network(key)
    return {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}


def _key_of(set_name: str, value: Any) -> str | None:
    """The canonical key of an element nft listed, or None when it is none of ours."""
    try:
        if set_name == SET4 and isinstance(value, str):
            return _listed(value, None)
        if set_name == SET6 and isinstance(value, dict) and isinstance(value.get("prefix"), dict):
            prefix = value["prefix"]
            return _listed(str(prefix["addr"]), int(prefix["len"]))
        if set_name == SET6 and isinstance(value, str):  # a single address, not ours
            return _listed(value, 128)
    except (ValueError, KeyError, TypeError):
        return None
    return None


@functools.lru_cache(maxsize=_CACHED)
def _listed(address: str, prefix: int | None) -> str:
    """An element's canonical key: an IPv4 address (``prefix`` None) or an IPv6 network."""
    if prefix is None:
        return str(ipaddress.IPv4Address(address))
    return str(ipaddress.IPv6Network((address, prefix)))


def find_nft() -> str:
    """The ``nft`` program: on PATH, else /usr/sbin/nft (root's PATH under cron lacks sbin)."""
    return shutil.which("nft") or "/usr/sbin/nft"


@dataclass
class NftablesFirewall:
    """The table ``inet <table>`` in the kernel of the network namespace this process runs in.

    ``wanted`` arguments map incident keys to the time their block ends (epoch seconds); the
    element time-out is what remains at ``now`` (rounded up). Synchronous: one ``nft`` process
    per batch, waited for with a time-out of ``timeout`` seconds.
    """

    table: str = "palisade"
    ports: tuple[int, ...] = DEFAULT_PORTS
    nft: str = field(default_factory=find_nft)
    timeout: float = 30.0
    slack: float = 10.0

    def __post_init__(self) -> None:
        if not _TABLE_NAME.match(self.table):
            raise ValueError(f"not an nftables table name: {self.table!r}")
        if not self.ports or any(
            isinstance(p, bool) or not isinstance(p, int) or not 0 < p < 65536 for p in self.ports
        ):
            raise ValueError(f"ports must be TCP port numbers: {self.ports!r}")
        self.ports = tuple(sorted(set(self.ports)))

    # ---- talking to nft --------------------------------------------------------------------

    def _run(self, args: list[str], stdin: str | None = None) -> str:
        try:
            proc = subprocess.run(
                [self.nft, *args],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=self.timeout,
                env={
                    "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                    "LC_ALL": "C",
                },
            )
        except FileNotFoundError:
            raise NftError(f"{self.nft}: not found (Debian package nftables)") from None
        except PermissionError as exc:
            raise NftError(f"{self.nft}: {exc.strerror}") from None
        except subprocess.TimeoutExpired:
            raise NftError(f"{self.nft} did not answer within {self.timeout:g}s") from None
        if proc.returncode != 0:
            lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
            errors = [line for line in lines if "Error" in line] or lines or ["(no message)"]
            raise NftError(f"nft exited {proc.returncode}: {errors[0][:300]}")
        return proc.stdout

    def _json(self, args: list[str]) -> dict[str, Any]:
        text = self._run(args)
        try:
            out = json.loads(text or "{}")
        except ValueError:
            raise NftError(f"nft {' '.join(args)} printed no JSON: {text[:100]!r}") from None
        if not isinstance(out, dict) or not isinstance(out.get("nftables", []), list):
            raise NftError(f"nft {' '.join(args)}: unexpected JSON")
        return out

    def _batch(self, commands: list[dict[str, Any]]) -> None:
        if commands:
            self._run(["-j", "-f", "-"], json.dumps({"nftables": commands}))

    def _ref(self) -> dict[str, str]:
        return {"family": _FAMILY, "table": self.table}

    def _elements(self, set_name: str, elems: list[Any]) -> dict[str, Any]:
        return {"element": {**self._ref(), "name": set_name, "elem": elems}}

    def _rule(self, family: str, set_name: str) -> dict[str, Any]:
        ports: Any = self.ports[0] if len(self.ports) == 1 else {"set": list(self.ports)}
        return {
            "rule": {
                **self._ref(),
                "chain": CHAIN,
                "comment": "palisade: blocked clients",
                "expr": [
                    {
                        "match": {
                            "op": "==",
                            "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                            "right": ports,
                        }
                    },
                    {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}},
                    {
                        "match": {
                            "op": "==",
                            "left": {"payload": {"protocol": family, "field": "saddr"}},
                            "right": f"@{set_name}",
                        }
                    },
                    {"counter": None},
                    {"drop": None},
                ],
            }
        }

    # ---- what the kernel has ---------------------------------------------------------------

    def exists(self) -> bool:
        """Whether the table is there (``nft list tables``)."""
        out = self._json(["-j", "list", "tables", _FAMILY])
        return any(
            isinstance(item, dict)
            and isinstance(item.get("table"), dict)
            and item["table"].get("name") == self.table
            for item in out.get("nftables", ())
        )

    def elements(self) -> dict[str, float] | None:
        """Every key in the two sets and the seconds its element has left; None when the table
        (or one of its sets) is missing."""
        if not self.exists():
            return None
        out = self._json(["-j", "list", "table", _FAMILY, self.table])
        found: dict[str, float] = {}
        sets_seen = set()
        for item in out.get("nftables", ()):
            nft_set = item.get("set") if isinstance(item, dict) else None
            if not isinstance(nft_set, dict) or nft_set.get("name") not in (SET4, SET6):
                continue
            name = nft_set["name"]
            sets_seen.add(name)
            for elem in nft_set.get("elem", ()):
                inner = elem.get("elem") if isinstance(elem, dict) and "elem" in elem else None
                value = inner.get("val") if isinstance(inner, dict) else elem
                expires = inner.get("expires", 0) if isinstance(inner, dict) else 0
                key = _key_of(name, value)
                if key is not None:
                    found[key] = float(expires) if isinstance(expires, int | float) else 0.0
        if sets_seen != {SET4, SET6}:
            return None
        return found

    # ---- changing it -----------------------------------------------------------------------

    def _wanted(
        self, wanted: Mapping[str, float], now: float
    ) -> tuple[dict[str, tuple[str, int]], list[str]]:
        """key -> (set, whole seconds left) for the blocks still running, and the invalid keys."""
        out: dict[str, tuple[str, int]] = {}
        invalid = []
        for raw, until in wanted.items():
            try:
                set_name, key = element_key(raw)
            except ValueError:
                invalid.append(raw)
                continue
            left = min(math.ceil(until - now), MAX_TIMEOUT)
            if left > 0 and left > out.get(key, (set_name, 0))[1]:
                out[key] = (set_name, left)
        return out, invalid

    def _add(self, items: Iterable[tuple[str, str, int]]) -> list[dict[str, Any]]:
        per_set: dict[str, list[Any]] = {}
        for set_name, key, left in items:
            per_set.setdefault(set_name, []).append(
                {"elem": {"val": _nft_value(set_name, key), "timeout": left}}
            )
        return [{"add": self._elements(name, elems)} for name, elems in sorted(per_set.items())]

    def _delete(self, keys: Iterable[str]) -> list[dict[str, Any]]:
        per_set: dict[str, list[Any]] = {}
        for key in keys:
            set_name = SET6 if ":" in key else SET4
            per_set.setdefault(set_name, []).append(_nft_value(set_name, key))
        return [{"delete": self._elements(name, elems)} for name, elems in sorted(per_set.items())]

    def rebuild(self, wanted: Mapping[str, float], now: float) -> FirewallChange:
        """Replace the table whole with one that holds exactly ``wanted``: one transaction."""
        elements, invalid = self._wanted(wanted, now)
        table = {"table": {"family": _FAMILY, "name": self.table}}
        commands: list[dict[str, Any]] = [
            {"add": table},
            {"delete": table},
            {"add": table},
            {
                "add": {
                    "set": {
                        **self._ref(),
                        "name": SET4,
                        "type": "ipv4_addr",
                        "flags": ["timeout"],
                        "comment": "palisade: blocked IPv4 clients",
                    }
                }
            },
            {
                "add": {
                    "set": {
                        **self._ref(),
                        "name": SET6,
                        "type": "ipv6_addr",
                        "flags": ["interval", "timeout"],
                        "comment": "palisade: blocked IPv6 /64 networks",
                    }
                }
            },
            {
                "add": {
                    "chain": {
                        **self._ref(),
                        "name": CHAIN,
                        "type": "filter",
                        "hook": "input",
                        "prio": PRIORITY,
                        "policy": "accept",
                    }
                }
            },
            {"add": self._rule("ip", SET4)},
            {"add": self._rule("ip6", SET6)},
        ]
        commands += self._add((s, k, left) for k, (s, left) in sorted(elements.items()))
        self._batch(commands)
        return FirewallChange(
            rebuilt=True,
            added=tuple(sorted(elements)),
            invalid=tuple(invalid),
            v4=sum(1 for s, _ in elements.values() if s == SET4),
            v6=sum(1 for s, _ in elements.values() if s == SET6),
        )

    def sync(self, wanted: Mapping[str, float], now: float) -> FirewallChange:
        """Bring the sets to ``wanted`` with the smallest batch; rebuild when the table is not
        there (or not whole) or the batch fails."""
        current = self.elements()
        if current is None:
            return self.rebuild(wanted, now)
        elements, invalid = self._wanted(wanted, now)
        added = sorted(k for k in elements if k not in current)
        # An element about to run out on its own is left to do so: deleting it could race
        # with the kernel's expiry and fail the batch.
        removed = sorted(k for k, left in current.items() if k not in elements and left > 1)
        renewed = sorted(
            k
            for k, (_, left) in elements.items()
            if k in current and abs(current[k] - left) > self.slack
        )
        commands = self._delete([*removed, *renewed])
        commands += self._add(
            (elements[k][0], k, elements[k][1]) for k in sorted({*added, *renewed})
        )
        v4 = sum(1 for s, _ in elements.values() if s == SET4)
        try:
            self._batch(commands)
        except NftError as exc:
            result = self.rebuild(wanted, now)
            return FirewallChange(
                rebuilt=True,
                added=result.added,
                invalid=result.invalid,
                v4=result.v4,
                v6=result.v6,
                error=exc.reason,
            )
        return FirewallChange(
            rebuilt=False,
            added=tuple(added),
            removed=tuple(removed),
            renewed=tuple(renewed),
            invalid=tuple(invalid),
            v4=v4,
            v6=len(elements) - v4,
        )

    def remove(self) -> bool:
        """Delete the table (every block and the rules); False when it was not there."""
        if not self.exists():
            return False
        self._batch([{"delete": {"table": {"family": _FAMILY, "name": self.table}}}])
        return True
