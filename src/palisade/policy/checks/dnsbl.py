"""``dnsbl``: the client address in DNS blocklists (zen, Spamcop, Barracuda, Spamhaus DQS).

Owns: the zone tables of a rule (zone, listing codes, IPv6 support, weight, TXT), the query name
of a client in a zone (IPv4 reversed octets, IPv6 reversed nibbles, IPv4-mapped as IPv4), the
meaning of an answer (listing / not a listing / error), the Spamhaus DQS rewriting
(``zen.spamhaus.org`` -> ``KEY.zen.dq.spamhaus.net``) and the weighted threshold across zones.
The zone machinery (``Zone``, ``parse_zone``, ``lookup``) is shared with ``dbl``.
Must not touch: the reply, logs, globals. It notes ``dnsbl.listed`` (public zone names) and
``dnsbl.errors`` (texts) in ``facts.results``.

Trust: answers are network input. Only addresses in 127.0.0.0/8 can be listings, and only those
in the zone's ``codes``; 127.255.255.0/24 (Spamhaus: .252 typo or bad DQS key, .254 public
resolver, .255 excessive queries), an address outside 127.0.0.0/8 (a resolver rewriting
NXDOMAIN) or anything unparsable is an *error*, never a listing: it is recorded in
``dnsbl.errors`` and, unless another zone lists the client, raises ``CheckError`` (naming the
failing zones) so the rule's ``on_error`` decides. A timeout or SERVFAIL raises ``CheckError``
the same way. A rule that does not set ``on_error`` skips (the default of this check and of
``dbl`` only): an error code or a silent zone means "not listed", as Postfix and exim treat
it; the session logs every such lookup and reports each failing zone to the panic log at most
once per probe interval. TXT text is cleaned of control characters and cut
before it reaches ``$txt``, the reason or the header.

Secrets: a DQS key is part of the query name. It never appears in a ``CheckResult`` (reason,
values, header), in ``facts.results`` or in a ``CheckError``: zones are always shown by their
public name (``zen.spamhaus.org``) and every resolver error text is scrubbed of the key and of
the query zone before it is used.

Result for a match: ``reason`` ``192.0.2.1 is listed at zen.spamhaus.org (127.0.0.11,
127.0.0.4: text)``; values ``$zone`` (first listing zone, in rule order), ``$codes`` (its
answers, comma separated), ``$txt`` (its TXT text or empty), ``$zones`` (every listing zone);
``header`` is the whole header line, ``X-Warning: 192.0.2.1 is listed at zen.spamhaus.org
(127.0.0.11, 127.0.0.4: text)``, further listing zones appended after a comma.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from palisade.policy import keys
from palisade.policy.checks.dnsnames import (
    header_text,
    is_hostname,
    normalise_name,
    reverse_labels,
    safe_text,
    unmapped,
)
from palisade.policy.checks.options import Options
from palisade.policy.rules import (
    NO_MATCH,
    Check,
    CheckError,
    CheckFactory,
    CheckResult,
    Facts,
    ListLookup,
    OnError,
    Ports,
    Stage,
)
from palisade.ports import DnsTempError

CodeRange = tuple[int, int]

_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
_ERROR_RANGE = ipaddress.IPv4Network("127.255.255.0/24")
DEFAULT_CODES: tuple[CodeRange, ...] = ((int(_LOOPBACK[0]), int(_ERROR_RANGE[0]) - 1),)
SPAMHAUS_ERRORS = {
    "127.255.255.252": "Spamhaus: typo in the zone name or bad DQS key",
    "127.255.255.254": "Spamhaus: query via a public/open resolver",
    "127.255.255.255": "Spamhaus: excessive number of queries",
}
_DQS_KEY = re.compile(r"^[A-Za-z0-9]{8,64}$")
_SPAMHAUS_PUBLIC = re.compile(r"^([a-z0-9-]+)\.spamhaus\.org$")
_SPAMHAUS_DQS = re.compile(r"^([a-z0-9-]+)\.dq\.spamhaus\.net$")
_ZONE_KEYS = frozenset({"zone", "codes", "ipv6", "weight", "txt"})


@dataclass(frozen=True)
class Zone:
    """One blocklist zone of a rule. ``shown`` is the public name used in every text;
    ``query`` the zone actually asked (it may hold a DQS key: never show it)."""

    shown: str
    query: str = field(repr=False)
    codes: tuple[CodeRange, ...] = DEFAULT_CODES
    errors: tuple[CodeRange, ...] = ()  # extra codes that mean "error" (DBL 127.0.1.255)
    ipv6: bool = True
    weight: float = 1.0
    txt: bool = False
    secrets: tuple[str, ...] = field(default=(), repr=False)

    def scrub(self, text: str) -> str:
        """``text`` (a resolver error) without the query zone or the key in it."""
        if self.query != self.shown:
            text = re.sub(re.escape(self.query), self.shown, text, flags=re.IGNORECASE)
        for secret in self.secrets:
            text = re.sub(re.escape(secret), "<redacted>", text, flags=re.IGNORECASE)
        return safe_text(text)


@dataclass
class ZoneOutcome:
    """What one zone said about one name."""

    zone: Zone
    listed: list[str] = field(default_factory=list)  # listing answers, as received
    errors: list[str] = field(default_factory=list)  # error texts (already scrubbed)
    failure: str | None = None  # temporary DNS failure (already scrubbed)
    txt: str = ""
    elapsed: float = 0.0  # seconds the zone took to answer (its A query; for the metrics)


# -------------------------------------------------------------------------- options


def parse_codes(value: Any, option: str) -> tuple[CodeRange, ...]:
    """``["127.0.0.2-127.0.0.11", "127.0.0.20", "127.0.1.0/24"]`` -> integer ranges."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"option {option!r}: expected a list of addresses or ranges")
    ranges: list[CodeRange] = []
    for text in value:
        try:
            if "/" in text:
                net = ipaddress.IPv4Network(text.strip(), strict=False)
                low, high = int(net[0]), int(net[-1])
            elif "-" in text:
                first, _, last = text.partition("-")
                low = int(ipaddress.IPv4Address(first.strip()))
                high = int(ipaddress.IPv4Address(last.strip()))
            else:
                low = high = int(ipaddress.IPv4Address(text.strip()))
        except ValueError:
            raise ValueError(f"option {option!r}: bad code or range {text!r}") from None
        if low > high:
            raise ValueError(f"option {option!r}: range {text!r} runs backwards")
        ranges.append((low, high))
    return tuple(ranges)


def dqs_key_option(opts: Options) -> str | None:
    """The ``dqs_key`` option, checked without ever echoing it in an error."""
    key = opts.raw("dqs_key", None)
    if key is None:
        return None
    if not isinstance(key, str) or not _DQS_KEY.match(key):
        raise ValueError("option 'dqs_key': expected 8 to 64 letters and digits (value not shown)")
    return key


def zone_names(zone: str, dqs_key: str | None, option: str) -> tuple[str, str]:
    """(shown, query) for a zone as written by the operator."""
    name = normalise_name(zone)
    if not is_hostname(name):
        raise ValueError(f"option {option!r}: {zone!r} is not a zone name")
    if dqs_key is None:
        return name, name
    public = _SPAMHAUS_PUBLIC.match(name)
    dqs = _SPAMHAUS_DQS.match(name)
    base = public.group(1) if public else dqs.group(1) if dqs else None
    if base is None:
        return name, name
    return f"{base}.spamhaus.org", f"{dqs_key.lower()}.{base}.dq.spamhaus.net"


def parse_zone(
    spec: Any,
    dqs_key: str | None,
    option: str,
    *,
    default_codes: tuple[CodeRange, ...] = DEFAULT_CODES,
    errors: tuple[CodeRange, ...] = (),
) -> Zone:
    """A zone from a string (``"bl.example"``: defaults) or a table ``{zone, codes, ipv6,
    weight, txt}``."""
    if isinstance(spec, str):
        spec = {"zone": spec}
    if not isinstance(spec, Mapping):
        raise ValueError(f"option {option!r}: expected a zone name or a table, got {spec!r}")
    unknown = sorted(set(spec) - _ZONE_KEYS)
    if unknown:
        raise ValueError(f"option {option!r}: unknown key(s) in a zone table: {', '.join(unknown)}")
    zone = spec.get("zone")
    if not isinstance(zone, str):
        raise ValueError(f"option {option!r}: each zone table needs 'zone' (a string)")
    shown, query = zone_names(zone, dqs_key, option)
    codes = parse_codes(spec["codes"], f"{option}.codes") if "codes" in spec else default_codes
    ipv6 = spec.get("ipv6", True)
    txt = spec.get("txt", False)
    weight = spec.get("weight", 1)
    for key, value in (("ipv6", ipv6), ("txt", txt)):
        if not isinstance(value, bool):
            raise ValueError(f"option '{option}.{key}': expected true or false, got {value!r}")
    if isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0:
        raise ValueError(f"option '{option}.weight': expected a positive number, got {weight!r}")
    secrets = (dqs_key,) if dqs_key is not None else ()
    return Zone(shown, query, codes, errors, ipv6, float(weight), txt, secrets)


# -------------------------------------------------------------------------- lookups


def _in(ranges: Sequence[CodeRange], value: int) -> bool:
    return any(low <= value <= high for low, high in ranges)


@functools.lru_cache(maxsize=1024)
def _answer(record: str) -> tuple[str, str, int] | None:
    """What an A record says before any zone's codes: ("error", text without the zone, 0) or
    ("code", the address as text, the address as a number); None when unparsable. Memoised:
    a list answers with a handful of codes."""
    try:
        addr = ipaddress.ip_address(record.strip())
    except ValueError:
        return None
    if not isinstance(addr, ipaddress.IPv4Address) or addr not in _LOOPBACK:
        return (
            "error",
            f"answer {addr} is outside 127.0.0.0/8 (a resolver or zone rewriting answers)",
            0,
        )
    text = str(addr)
    if addr in _ERROR_RANGE:
        meaning = SPAMHAUS_ERRORS.get(text, "DNSBL error code")
        return "error", f"answer {text} ({meaning})", 0
    return "code", text, int(addr)


def classify(record: str, zone: Zone) -> tuple[str, str]:
    """("listed" | "ignored" | "error", operator text) for one A record of ``zone``."""
    answer = _answer(record)
    if answer is None:
        return "error", f"{zone.shown}: unparsable answer {safe_text(record, 60)!r}"
    kind, text, value = answer
    if kind == "error":
        return "error", f"{zone.shown}: {text}"
    if _in(zone.errors, value):
        return "error", f"{zone.shown}: answer {text} (error code of this list)"
    if _in(zone.codes, value):
        return "listed", text
    return "ignored", text


async def lookup(ports: Ports, labels: str, zone: Zone) -> ZoneOutcome:
    """Asks ``zone`` about ``labels`` (reversed address or domain); never raises DnsTempError:
    a failure is recorded, scrubbed of secrets, in the outcome."""
    outcome = ZoneOutcome(zone)
    name = f"{labels}.{zone.query}"
    started = time.monotonic()
    try:
        answer = await ports.resolver.query(name, "A")
    except DnsTempError as exc:
        outcome.elapsed = time.monotonic() - started
        outcome.failure = f"{zone.shown}: lookup failed: {zone.scrub(exc.reason)}"
        return outcome
    outcome.elapsed = time.monotonic() - started
    for record in answer.records:
        kind, text = classify(record, zone)
        if kind == "listed":
            outcome.listed.append(text)
        elif kind == "error":
            outcome.errors.append(text)
    if outcome.listed and zone.txt:
        try:
            txt = await ports.resolver.query(name, "TXT")
        except DnsTempError:
            txt = None  # the text is decoration; the listing stands without it
        if txt is not None:
            outcome.txt = zone.scrub("; ".join(txt.records))
    return outcome


def describe(outcome: ZoneOutcome) -> str:
    """``zen.spamhaus.org (127.0.0.11, 127.0.0.4: text)``."""
    detail = ", ".join(outcome.listed)
    if outcome.txt:
        detail += f": {outcome.txt}"
    return f"{outcome.zone.shown} ({detail})"


def trouble(outcomes: Sequence[ZoneOutcome]) -> list[str]:
    """Every error and failure text of ``outcomes``."""
    texts: list[str] = []
    for outcome in outcomes:
        texts.extend(outcome.errors)
        if outcome.failure is not None:
            texts.append(outcome.failure)
    return texts


def zone_trouble(outcomes: Sequence[ZoneOutcome]) -> dict[str, str]:
    """Public zone name -> its error and failure texts, for the zones that had any."""
    found: dict[str, str] = {}
    for outcome in outcomes:
        texts = trouble([outcome])
        if texts:
            shown = outcome.zone.shown
            found[shown] = "; ".join(filter(None, (found.get(shown), *texts)))
    return found


# -------------------------------------------------------------------------- the check


class DnsblCheck:
    name: ClassVar[str] = "dnsbl"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.CONNECT, Stage.RCPT})
    # A blocklist that cannot answer is "not listed", as Postfix and exim treat it: logged, and
    # reported once per zone per probe interval, but never a deferral of everybody's mail.
    default_on_error: ClassVar[OnError] = OnError.SKIP
    uses_dns: ClassVar[bool] = True

    def __init__(self, zones: Sequence[Zone], threshold: float) -> None:
        self.zones = tuple(zones)
        self.threshold = threshold
        # Public names of zones that failed the RFC 5782 health probe (the server's prober fills
        # it), each with when (epoch seconds) and why (no secret in it): they are not asked until
        # a probe passes again, so a dead or hostile zone can neither list everybody nor slow
        # every connection down.
        self.disabled: dict[str, tuple[float, str]] = {}

    @property
    def active_zones(self) -> tuple[str, ...]:
        return tuple(z.shown for z in self.zones if z.shown not in self.disabled)

    async def evaluate(self, facts: Facts, ports: Ports) -> CheckResult:
        ip = unmapped(facts.client_ip)
        zones = [
            z for z in self.zones if (ip.version == 4 or z.ipv6) and z.shown not in self.disabled
        ]
        if not zones:
            return NO_MATCH
        labels = reverse_labels(ip)
        if len(zones) == 1:  # the common case: no Task per zone
            outcomes = [await lookup(ports, labels, zones[0])]
        else:
            outcomes = list(await asyncio.gather(*(lookup(ports, labels, z) for z in zones)))
        listing = [o for o in outcomes if o.listed]
        problems = trouble(outcomes)
        if problems:
            errors = facts.results.setdefault(keys.DNSBL_ERRORS, [])
            if isinstance(errors, list):
                errors.extend(problems)
        facts.results[keys.DNSBL_LISTED] = [o.zone.shown for o in listing]
        timings = facts.results.setdefault(keys.DNSBL_TIMINGS, [])
        if isinstance(timings, list):
            timings.extend(
                (o.zone.shown, o.elapsed, o.failure is not None or bool(o.errors)) for o in outcomes
            )
        score = sum(o.zone.weight for o in listing)
        if listing and score >= self.threshold:
            first = listing[0]
            described = ", ".join(describe(o) for o in listing)
            shown_ip = facts.client_ip_text if ip is facts.client_ip else str(ip)
            text = f"{shown_ip} is listed at {described}"
            values = {
                "zone": first.zone.shown,
                "codes": ", ".join(first.listed),
                "txt": first.txt,
                "zones": ", ".join(o.zone.shown for o in listing),
            }
            return CheckResult(True, text, values, header_text(f"X-Warning: {text}"))
        if problems:
            raise CheckError("; ".join(problems), zone_trouble(outcomes))
        return NO_MATCH


def build(options: Mapping[str, Any], lists: ListLookup) -> Check:
    opts = Options(options, "dnsbl")
    dqs_key = dqs_key_option(opts)
    raw_zones = opts.raw("zones", None)
    if raw_zones is None:
        raise ValueError("check 'dnsbl' needs the option 'zones'")
    if isinstance(raw_zones, str | Mapping):
        raw_zones = [raw_zones]
    if not isinstance(raw_zones, list) or not raw_zones:
        raise ValueError("option 'zones': expected a list of zone tables")
    zones = [parse_zone(spec, dqs_key, "zones") for spec in raw_zones]
    threshold = float(opts.number("threshold", 1))
    if threshold <= 0:
        raise ValueError("option 'threshold': expected a positive number")
    opts.done()
    return DnsblCheck(zones, threshold)


FACTORIES: dict[str, CheckFactory] = {"dnsbl": build}
