"""``dmarc``: DMARC evaluation of the message (RFC 7489), on top of SPF and DKIM.

Owns: finding the header From domain, DMARC policy discovery (``_dmarc.<from domain>``, then
``_dmarc.<organisational domain>``), identifier alignment, the ``pct`` sample, and the
per-transaction finding :class:`DmarcOutcome` (memoised under ``facts.tx["dmarc"]``); the check
``dmarc``; the helper :func:`aligned` that the ``domain_list`` whitelist uses.

Steps:

1. The From header (RFC 7489 section 6.6.1): no From field gives ``none`` (DMARC is not
   applied); several From fields, a From with several addresses or none, or an address without
   a usable domain give ``permerror``.
2. Policy discovery (section 6.6.3): TXT records of ``_dmarc.<from domain>`` that start with
   ``v=DMARC1`` (exactly that value, the first tag); if there is none there, the same at the
   organisational domain. Several DMARC records at one name, or none at either: ``none``. A
   temporary DNS failure: ``temperror``.
3. The record: ``p`` (none, quarantine, reject) is required; a record whose ``p`` (or ``sp``)
   is missing or invalid is treated as ``p=none`` when it has a ``rua`` tag (step 6 of 6.6.3),
   and gives ``permerror`` otherwise (reported, never enforced). ``sp`` applies when the record
   came from the organisational domain and the From domain is below it (``p`` when absent).
   ``adkim`` / ``aspf`` (r, s; default r) and ``pct`` (0-100, default 100) fall back to their
   defaults when invalid; unknown tags are ignored.
4. Alignment (section 3.1): relaxed means the two domains have the same organisational domain,
   strict means they are equal. The organisational domain is the public suffix list's
   "private suffix" (``publicsuffixlist``, its bundled list, no network): the public suffix plus
   one label; a domain that is itself a public suffix is its own organisational domain. DKIM is
   aligned when a signature that passed has an aligned ``d=``; SPF when SPF passed for the MAIL
   FROM domain and it is aligned; for the null sender the HELO identity counts (section 4.1).
5. Result: ``pass`` when SPF or DKIM is aligned; otherwise ``temperror`` when an aligned
   identifier could not be checked (SPF temperror, a DKIM signature of an aligned domain with a
   temperror), so that a DNS outage is not taken for a failure; else ``fail``.
6. Disposition: for ``fail`` the policy applied (``p`` or ``sp``); when ``pct`` is below 100 a
   random draw (``rng``, see :func:`dmarc_outcome`) decides whether the message is in the sample;
   a message outside it gets the next lower disposition (reject -> quarantine -> none, section
   6.6.4). Every other result has disposition ``none``.

The check ``dmarc`` (stage DATA) matches when the result is one of the option ``result``
(default ``["fail"]``) and, when the option ``policy`` is given, the disposition is one of those
(e.g. ``policy = ["reject"]``: deny only what the domain owner asks to reject). A ``temperror``
result that is not listed raises ``CheckError`` (the rule's ``on_error`` decides).
Values: ``$result``, ``$domain`` (header From domain), ``$policy``, ``$disposition``.
Must not touch: the reply, logs, globals.
Trust: the From header and the DMARC records are attacker-controlled text: only parsed, compared
and placed in DNS questions after a host-name check; cleaned before they reach ``reason``.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from email.utils import getaddresses
from typing import Any, ClassVar, Protocol

from publicsuffixlist import PublicSuffixList

from palisade.policy.checks.dkim import DKIM, dkim_outcome
from palisade.policy.checks.dnsnames import is_hostname, normalise_name, safe_text
from palisade.policy.checks.options import Options
from palisade.policy.checks.spf import SPF, spf_outcome
from palisade.policy.rules import (
    NO_MATCH,
    Check,
    CheckError,
    CheckFactory,
    CheckResult,
    Facts,
    Key,
    ListLookup,
    Ports,
    Stage,
    known,
    memo,
)
from palisade.ports import DmarcEvaluation, DnsTempError

RESULTS = ("pass", "fail", "none", "temperror", "permerror")
POLICIES = ("none", "quarantine", "reject")
METHODS = ("spf", "dkim", "any")
_LOWER = {"reject": "quarantine", "quarantine": "none", "none": "none"}


@dataclass(frozen=True, slots=True)
class DmarcOutcome:
    """The DMARC verdict on the message.

    ``policy`` is the requested policy that applies (``p``, or ``sp`` for a subdomain; "" when
    no record was used), ``sampled`` whether the message fell in the ``pct`` sample (True at
    pct=100), ``disposition`` what the domain owner asks the receiver to do with it.
    """

    result: str
    from_domain: str = ""
    policy: str = ""
    record_domain: str = ""  # where the record was found
    pct: int = 100
    sampled: bool = True
    disposition: str = "none"
    spf_aligned: bool = False
    dkim_aligned: bool = False
    reason: str = ""
    record: DmarcRecord | None = None  # the record applied (aggregate reports publish it)


DMARC: Key[DmarcOutcome] = Key("dmarc")  # the per-transaction finding


class SpfLike(Protocol):
    """What DMARC reads of the SPF finding (``palisade.policy.checks.spf.SpfOutcome``; tests
    may memoise a stand-in)."""

    @property
    def result(self) -> str: ...

    @property
    def identity(self) -> str: ...

    @property
    def domain(self) -> str: ...


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    p: str
    sp: str
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100
    # as published, for aggregate reports only: it decides nothing, so records compare without it
    rua: tuple[str, ...] = field(default=(), compare=False)


@functools.cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


def organisational_domain(domain: str) -> str:
    """The registrable domain of ``domain`` by the public suffix list (itself if it is a public
    suffix or unknown to the list)."""
    name = normalise_name(domain)
    found = _psl().privatesuffix(name)
    return str(found) if found else name


def is_aligned(a: str, b: str, mode: str) -> bool:
    """Identifier alignment: ``s`` strict (equal names), else relaxed (same org domain)."""
    a, b = normalise_name(a), normalise_name(b)
    if not a or not b:
        return False
    if a == b:
        return True
    return mode != "s" and organisational_domain(a) == organisational_domain(b)


def from_domain(values: list[str]) -> tuple[str, str | None]:
    """(result, domain) from the values of the From header fields: ("ok", domain), or
    ("none"/"permerror", None) with RFC 7489 6.6.1's treatment; the reason is in the result."""
    if not values:
        return "none", None
    if len(values) > 1:
        return "permerror", None
    addresses = [addr for _, addr in getaddresses(values) if addr]
    if len(addresses) != 1:
        return "permerror", None
    domain = normalise_name(addresses[0].rpartition("@")[2].strip("<> \t"))
    if "@" not in addresses[0] or not domain:
        return "permerror", None
    if domain not in values[0].lower():  # the parser mended something ("exa mple.com")
        return "permerror", None
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return "permerror", None
    if not is_hostname(domain):
        return "permerror", None
    return "ok", domain


def parse_record(text: str) -> DmarcRecord | str | None:
    """A DMARC record; None when ``text`` is not one (does not start with ``v=DMARC1``); a
    reason string when it is one but unusable (invalid ``p``/``sp`` and no ``rua``)."""
    tags: dict[str, str] = {}
    for index, part in enumerate(text.split(";")):
        key, sep, value = part.partition("=")
        key, value = key.strip().lower(), value.strip()
        if index == 0:
            if key != "v" or not sep or value != "DMARC1":
                return None
            continue
        if sep and key and key not in tags:
            tags[key] = value
    p, sp = tags.get("p", "").lower(), tags.get("sp", "").lower()
    if p not in POLICIES or (sp and sp not in POLICIES):
        if not tags.get("rua", "").strip():
            return "record has no valid p= (or sp=) and no rua="
        p, sp = "none", ""
    pct_text = tags.get("pct", "100")
    pct = int(pct_text) if pct_text.isdigit() and int(pct_text) <= 100 else 100
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    return DmarcRecord(
        p=p,
        sp=sp or p,
        adkim=adkim if adkim in ("r", "s") else "r",
        aspf=aspf if aspf in ("r", "s") else "r",
        pct=pct,
        rua=tuple(u.strip() for u in tags.get("rua", "").split(",") if u.strip())[:8],
    )


async def dmarc_outcome(
    facts: Facts, ports: Ports, *, rng: random.Random | None = None
) -> DmarcOutcome:
    """The DMARC verdict of the message, computed once per transaction.

    ``rng`` draws the ``pct`` sample (only the first caller's is used); by default it is seeded
    from the message (Message-ID, From, client address), so a retried message draws the same.
    Before the message is known the outcome is ``none`` and not kept. Never raises for DNS or
    message trouble: those become results.
    """
    if facts.message is None:
        return DmarcOutcome("none", reason="no message yet")
    return await memo(facts, DMARC, lambda: _compute(facts, ports, rng))


async def _compute(facts: Facts, ports: Ports, rng: random.Random | None) -> DmarcOutcome:
    message = facts.message
    assert message is not None
    status, domain = from_domain(message.get_all("From"))
    if domain is None:
        reason = "no From header" if status == "none" else "no single From address with a domain"
        return DmarcOutcome(status, reason=reason)
    try:
        found = await _discover(ports, domain)
    except DnsTempError as exc:
        return DmarcOutcome(
            "temperror", domain, reason=f"DMARC record lookup: {safe_text(exc.reason, 100)}"
        )
    if isinstance(found, str):
        word = "permerror" if found.startswith("record") else "none"
        return DmarcOutcome(word, domain, reason=found)
    record, record_domain = found
    policy = record.p if record_domain == domain else record.sp
    spf = await _spf(facts, ports)
    dkim = await dkim_outcome(facts, ports)
    spf_ok = _spf_aligned(facts, spf, domain, record.aspf)
    dkim_ok = any(
        s.result == "pass" and is_aligned(s.domain, domain, record.adkim) for s in dkim.signatures
    )
    base = DmarcOutcome(
        "fail",
        from_domain=domain,
        policy=policy,
        record_domain=record_domain,
        pct=record.pct,
        spf_aligned=spf_ok,
        dkim_aligned=dkim_ok,
        record=record,
    )
    if spf_ok or dkim_ok:
        via = " and ".join(w for w, ok in (("SPF", spf_ok), ("DKIM", dkim_ok)) if ok)
        return replace(base, result="pass", reason=f"aligned {via}")
    spf_temp = (
        spf is not None
        and spf.result == "temperror"
        and is_aligned(spf.domain or "", domain, record.aspf)
    )
    dkim_temp = any(
        s.result == "temperror" and is_aligned(s.domain, domain, record.adkim)
        for s in dkim.signatures
    )
    if spf_temp or dkim_temp:
        return replace(
            base, result="temperror", reason="an aligned identifier could not be checked"
        )
    sampled = record.pct >= 100 or _draw(rng, facts) < record.pct
    return replace(
        base,
        sampled=sampled,
        disposition=policy if sampled else _LOWER[policy],
        reason="neither SPF nor DKIM aligned",
    )


async def _discover(ports: Ports, domain: str) -> tuple[DmarcRecord, str] | str:
    """(record, where found), or a reason for not applying DMARC (starts with "record" when
    the record is unusable: permerror; otherwise none). Raises DnsTempError."""
    org = organisational_domain(domain)
    for name in dict.fromkeys((domain, org)):
        answer = await ports.resolver.query(f"_dmarc.{name}", "TXT")
        found = [r for r in answer.records if r.lstrip().startswith(("v=", "V="))]
        parsed = [(r, p) for r in found if (p := parse_record(r)) is not None]
        if len(parsed) > 1:
            return f"several DMARC records at _dmarc.{name}"
        if parsed:
            record = parsed[0][1]
            if isinstance(record, str):
                return record
            return record, name
    return "no DMARC record"


async def _spf(facts: Facts, ports: Ports) -> SpfLike | None:
    """The SPF finding, computed if need be; None when its computation failed."""
    try:
        outcome: SpfLike = await spf_outcome(facts, ports)
    except Exception:
        return None
    return outcome


def _spf_aligned(facts: Facts, spf: SpfLike | None, domain: str, mode: str) -> bool:
    if spf is None or spf.result != "pass":
        return False
    if spf.identity != "mailfrom" and not (spf.identity == "helo" and facts.sender == ""):
        return False
    return is_aligned(spf.domain or "", domain, mode)


def _draw(rng: random.Random | None, facts: Facts) -> int:
    if rng is None:
        message = facts.message
        assert message is not None
        seed = "|".join(
            [*message.get_all("Message-ID"), *message.get_all("From"), str(facts.client_ip)]
        )
        rng = random.Random(seed)
    return rng.randrange(100)


async def aligned(facts: Facts, ports: Ports, method: str, domain: str | None = None) -> bool:
    """The header From domain is authenticated by ``method`` (``spf``, ``dkim`` or ``any``)
    under DMARC identifier alignment (the record's adkim/aspf; relaxed without a record), and,
    when ``domain`` is given, it belongs to the same organisational domain as ``domain``.

    Used by the sender-domain whitelist: a listed domain only counts when the mail really comes
    from it. False before the message is known.
    """
    if facts.message is None:
        return False
    outcome = await dmarc_outcome(facts, ports)
    from_name = outcome.from_domain
    if not from_name:  # no From, or no usable one
        return False
    if domain is not None and not is_aligned(domain, from_name, "r"):
        return False
    if outcome.result in ("pass", "fail", "temperror"):  # a record decided the alignment modes
        return _method_ok(method, outcome.spf_aligned, outcome.dkim_aligned)
    spf = await _spf(facts, ports)
    dkim = await dkim_outcome(facts, ports)
    spf_ok = _spf_aligned(facts, spf, from_name, "r")
    dkim_ok = any(
        s.result == "pass" and is_aligned(s.domain, from_name, "r") for s in dkim.signatures
    )
    return _method_ok(method, spf_ok, dkim_ok)


def _method_ok(method: str, spf_ok: bool, dkim_ok: bool) -> bool:
    if method == "spf":
        return spf_ok
    if method == "dkim":
        return dkim_ok
    return spf_ok or dkim_ok


def evaluation(facts: Facts, disposition: str, now: float) -> DmarcEvaluation | None:
    """What an aggregate report keeps of this message's DMARC evaluation, with the
    ``disposition`` the gateway applied; None when no DMARC record was applied (no report goes
    to anyone then) or DMARC was not evaluated. Reads only findings already computed."""
    outcome = known(facts, DMARC)
    if outcome is None or outcome.record is None or outcome.result not in ("pass", "fail"):
        return None
    spf = known(facts, SPF)
    dkim = known(facts, DKIM)
    sender = facts.sender or ""
    record = outcome.record
    return DmarcEvaluation(
        time=now,
        source_ip=facts.client_ip_text,
        header_from=outcome.from_domain,
        envelope_from=sender.rpartition("@")[2].lower() if "@" in sender else "",
        result=outcome.result,
        spf_aligned=outcome.spf_aligned,
        dkim_aligned=outcome.dkim_aligned,
        spf_domain=safe_text(spf.domain, 255) if spf is not None else "",
        spf_result=spf.result if spf is not None else "none",
        spf_scope="helo" if spf is not None and spf.identity == "helo" else "mfrom",
        dkim=tuple(
            (s.domain, safe_text(s.selector, 64), s.result)
            for s in (dkim.signatures if dkim is not None else ())
        )[:8],
        policy_domain=outcome.record_domain,
        p=record.p,
        sp=record.sp,
        adkim=record.adkim,
        aspf=record.aspf,
        pct=record.pct,
        requested=outcome.disposition,
        disposition=disposition,
        sampled=outcome.sampled,
        rua=tuple(safe_text(u, 255) for u in record.rua),
    )


class DmarcCheck:
    name: ClassVar[str] = "dmarc"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.DATA})
    uses_dns: ClassVar[bool] = True

    def __init__(self, results: frozenset[str], policies: frozenset[str] | None) -> None:
        self.results = results
        self.policies = policies

    async def evaluate(self, facts: Facts, ports: Ports) -> CheckResult:
        if facts.message is None:
            return NO_MATCH
        outcome = await dmarc_outcome(facts, ports)
        domain = safe_text(outcome.from_domain)
        if outcome.result not in self.results:
            if outcome.result == "temperror":
                raise CheckError(f"DMARC for {domain or 'the message'}: {outcome.reason}")
            return NO_MATCH
        if self.policies is not None and outcome.disposition not in self.policies:
            return NO_MATCH
        values = {
            "result": outcome.result,
            "domain": domain,
            "policy": outcome.policy,
            "disposition": outcome.disposition,
        }
        detail = (
            f" (p={outcome.policy} disposition={outcome.disposition})" if outcome.policy else ""
        )
        why = f": {outcome.reason}" if outcome.reason else ""
        return CheckResult(True, f"DMARC {outcome.result} for {domain or '?'}{detail}{why}", values)


def build(options: Mapping[str, Any], lists: ListLookup) -> Check:
    opts = Options(options, "dmarc")
    results = _choice(opts.texts("result", ["fail"]), RESULTS, "result")
    policies = None
    if "policy" in options:
        policies = frozenset(_choice(opts.texts("policy"), POLICIES, "policy"))
    opts.done()
    return DmarcCheck(frozenset(results), policies)


def _choice(values: list[str], allowed: tuple[str, ...], key: str) -> list[str]:
    if not values:
        raise ValueError(f"option {key!r}: needs at least one value")
    for value in values:
        if value not in allowed:
            raise ValueError(
                f"option {key!r}: expected some of {', '.join(allowed)}, got {value!r}"
            )
    return values


FACTORIES: dict[str, CheckFactory] = {"dmarc": build}
