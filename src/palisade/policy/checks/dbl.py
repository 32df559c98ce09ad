"""``dbl``: the sender domain and/or the HELO name in a domain blocklist (Spamhaus DBL).

Owns: choosing the names to look up (``field``/``fields``: ``sender_domain``, ``helo``;
IP literals, bare addresses and names that are not valid domains are skipped, duplicates asked
once) and their meaning in the zone. The zone machinery -- codes, error answers, DQS rewriting
(``dbl.spamhaus.org`` -> ``KEY.dbl.dq.spamhaus.net``), secret scrubbing -- is ``dnsbl``'s.
Must not touch: the reply, logs, globals. It notes ``dbl.listed`` (names) and ``dbl.errors``
(texts) in ``facts.results``.

Trust: the names come from the client (HELO, MAIL FROM) and are only checked for syntax and
placed under the zone; answers are network input classified as in ``dnsbl``: DBL codes
127.0.1.2-127.0.1.254 are listings (the default ``codes``), 127.0.1.255 ("IP queries are not
supported"), 127.255.255.0/24 and anything outside 127.0.0.0/8 are errors: recorded, and when
no name is listed, ``CheckError`` so the rule's ``on_error`` decides (``skip`` unless the
rule sets it, as for ``dnsbl``). A DQS key never reaches
any text this check produces.

Result for a match: ``reason`` ``example.com is listed at dbl.spamhaus.org (127.0.1.2: text)``;
values ``$domain``, ``$field``, ``$zone`` (public name), ``$codes``, ``$txt``; ``header`` the
whole line ``X-Warning: example.com is listed at dbl.spamhaus.org (127.0.1.2: text)``.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Mapping
from typing import Any, ClassVar

from palisade.policy.checks.dnsbl import (
    Zone,
    describe,
    dqs_key_option,
    lookup,
    parse_codes,
    trouble,
    zone_names,
    zone_trouble,
)
from palisade.policy.checks.dnsnames import (
    address_literal,
    header_text,
    is_hostname,
    is_ip_text,
    normalise_name,
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

FIELDS = ("sender_domain", "helo")
DEFAULT_ZONE = "dbl.spamhaus.org"
_DBL_CODES = ((int(ipaddress.IPv4Address("127.0.1.2")), int(ipaddress.IPv4Address("127.0.1.254"))),)
_NOT_FOR_IPS = int(ipaddress.IPv4Address("127.0.1.255"))  # "IP queries are not supported"
_DBL_ERRORS = ((_NOT_FOR_IPS, _NOT_FOR_IPS),)


def candidate(value: str | None) -> str | None:
    """The domain to look up for a HELO or sender domain, or None to skip it."""
    if not value:
        return None
    if address_literal(value) is not None or is_ip_text(value):
        return None
    name = normalise_name(value)
    return name if is_hostname(name) else None


class DblCheck:
    name: ClassVar[str] = "dbl"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.HELO, Stage.MAIL, Stage.RCPT})
    default_on_error: ClassVar[OnError] = OnError.SKIP  # as dnsbl: a failure is "not listed"
    uses_dns: ClassVar[bool] = True

    def __init__(self, zone: Zone, fields: tuple[str, ...]) -> None:
        self.zone = zone
        self.fields = fields

    @property
    def active_zones(self) -> tuple[str, ...]:
        return (self.zone.shown,)

    async def evaluate(self, facts: Facts, ports: Ports) -> CheckResult:
        names: dict[str, str] = {}  # domain -> the field it came from (first one)
        for field in self.fields:
            domain = candidate(getattr(facts, field))
            if domain is not None:
                names.setdefault(domain, field)
        if not names:
            return NO_MATCH
        outcomes = await asyncio.gather(*(lookup(ports, n, self.zone) for n in names))
        problems = trouble(outcomes)
        if problems:
            errors = facts.results.setdefault("dbl.errors", [])
            if isinstance(errors, list):
                errors.extend(problems)
        listed = [(n, o) for n, o in zip(names, outcomes, strict=True) if o.listed]
        facts.results["dbl.listed"] = [n for n, _ in listed]
        if listed:
            domain, outcome = listed[0]
            text = f"{domain} is listed at {describe(outcome)}"
            values = {
                "domain": domain,
                "field": names[domain],
                "zone": self.zone.shown,
                "codes": ", ".join(outcome.listed),
                "txt": outcome.txt,
            }
            return CheckResult(True, text, values, header_text(f"X-Warning: {text}"))
        if problems:
            raise CheckError("; ".join(problems), zone_trouble(outcomes))
        return NO_MATCH


def build(options: Mapping[str, Any], lists: ListLookup) -> Check:
    opts = Options(options, "dbl")
    dqs_key = dqs_key_option(opts)
    if "field" in options and "fields" in options:
        raise ValueError("option 'fields': give either 'field' or 'fields', not both")
    if "field" in options:
        fields = [opts.text("field")]
        option = "field"
    else:
        fields = opts.texts("fields", ["sender_domain"])
        option = "fields"
    if not fields:
        raise ValueError(f"option {option!r}: expected at least one of {', '.join(FIELDS)}")
    for field in fields:
        if field not in FIELDS:
            raise ValueError(
                f"option {option!r}: expected one of {', '.join(FIELDS)}, got {field!r}"
            )
    shown, query = zone_names(opts.text("zone", DEFAULT_ZONE), dqs_key, "zone")
    codes = parse_codes(opts.raw("codes"), "codes") if "codes" in options else _DBL_CODES
    txt = opts.flag("txt", False)
    opts.done()
    secrets = (dqs_key,) if dqs_key is not None else ()
    zone = Zone(shown, query, codes, _DBL_ERRORS, True, 1.0, txt, secrets)
    return DblCheck(zone, tuple(dict.fromkeys(fields)))


FACTORIES: dict[str, CheckFactory] = {"dbl": build}
