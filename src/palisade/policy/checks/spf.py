"""``spf``: Sender Policy Framework (RFC 7208) on the MAIL FROM identity, and on HELO.

Owns: turning a transaction's facts into one SPF evaluation per identity (``spf_outcome``:
MAIL FROM, or for the null sender the HELO identity ``postmaster@<helo>``; ``spf_helo_outcome``:
the HELO identity whatever the sender), memoised per transaction with ``memo`` so that every
rule, and the session's ``Received-SPF`` header (``received_spf_header``, RFC 7208 section 9.1),
see the same result; and the ``spf`` check, matched when that result is one the rule lists
(option ``result``, default ``["fail"]``; option ``helo = true`` checks the HELO identity
instead of MAIL FROM). Values: ``$spf_result``, ``$spf_domain``, ``$spf_explanation``.

Why a library: record selection, the macro language, ``include``/``redirect``, CIDR matching and
the processing limits (10 DNS-querying terms, 2 void lookups, 10 MX / PTR names) are where SPF
implementations go wrong; pyspf implements them and passes the RFC 7208 test suite, which our
tests run through this module. Only the glue is ours: pyspf's DNS goes through the ``Resolver``
port, never through its own resolver. pyspf is synchronous and, for given DNS answers,
deterministic: it runs on the event loop itself, fed from the answers fetched so far, and a run
that asks a question not answered yet stops there (``_NeedAnswer``); the question goes to the
resolver (whose cache answers a repeated question at once) and pyspf runs again from the start
(``_replay``). A typical record costs one or two runs of ~0.1 ms and no thread hop at all.
pyspf asks through the module function ``spf.DNSLookup``; this module replaces that function
once by a dispatcher that uses the lookup of the query running in the current thread (a
thread-local, set by our ``spf.query`` subclass around each lookup), so concurrent evaluations
with different resolvers never mix, and any other user of pyspf in the
process keeps its own DNS. The whole evaluation is bounded by ``TIME_LIMIT`` seconds of DNS
waiting (RFC 7208 4.6.4); a lookup that fails or times out is ``temperror``, an SPF result like
the others, which a rule matches only when it lists it (no ``CheckError``). Rules using this
check want a ``timeout`` above ``TIME_LIMIT``: the engine's default of 5 s may end a slow
evaluation first (the evaluation itself goes on, and later rules get its result). One pyspf
deviation is corrected here: a DNS error while evaluating ``ptr`` makes it not match instead of
ending the evaluation (RFC 7208 5.5, see ``_Query``).

Must not touch: the reply, logs, globals other than the one pyspf hook described above.
Trust: the sender, the HELO name and every DNS answer (records, explanation texts) are attacker
text. They are only placed in DNS questions and handed to pyspf; what comes back is cleaned with
``safe_text`` before it reaches ``reason`` or values, and is quoted (RFC 5322 quoted-string or
comment, control characters removed) before it reaches the ``Received-SPF`` header.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import spf as pyspf

from palisade.policy.checks.dnsnames import safe_text, unmapped
from palisade.policy.checks.options import Options
from palisade.policy.rules import (
    Check,
    CheckFactory,
    CheckResult,
    Facts,
    ListLookup,
    Ports,
    Stage,
    memo,
)
from palisade.ports import DnsAnswer, DnsTempError, Resolver

__all__ = [
    "FACTORIES",
    "RESULTS",
    "TIME_LIMIT",
    "SpfCheck",
    "SpfOutcome",
    "received_spf_header",
    "spf_helo_outcome",
    "spf_outcome",
]

RESULTS = frozenset({"pass", "fail", "softfail", "neutral", "none", "permerror", "temperror"})
TIME_LIMIT = 20.0  # seconds of DNS waiting per evaluation (RFC 7208 4.6.4: "at least 20")
_ASKED_TYPES = frozenset({"A", "AAAA", "MX", "PTR", "TXT", "SPF", "CNAME"})


@dataclass(frozen=True, slots=True)
class SpfOutcome:
    """One SPF evaluation. Every text field may hold attacker text (see the module docstring).

    ``result``: one of ``RESULTS``; ``identity``: ``"mailfrom"`` or ``"helo"``; ``domain``: the
    domain checked (the sender's, or the HELO name); ``mailbox``: the identity as a mailbox
    (``postmaster@`` stands in for a missing local part); ``explanation``: pyspf's text (for
    ``fail`` the domain's own ``exp=`` text when it has one, for errors the problem);
    ``client_ip``, ``helo`` and ``sender`` (the MAIL FROM, ``""`` for the null sender, None
    before MAIL) are the inputs; ``mechanism`` is the matching term, when one matched.
    """

    result: str
    identity: str
    domain: str
    mailbox: str
    explanation: str
    client_ip: str
    helo: str | None
    sender: str | None
    mechanism: str | None = None


# ---------------------------------------------------------------------------- evaluation


async def spf_outcome(facts: Facts, ports: Ports) -> SpfOutcome:
    """SPF for MAIL FROM; for the null sender, for the HELO identity (RFC 7208 2.4).

    Without a HELO name the null sender's result is ``none`` (nothing to check); so is a check
    before MAIL (no sender yet). Computed once per transaction (``memo`` key ``"spf"``).
    """
    return await memo(facts, "spf", lambda: _evaluate(facts, ports, helo_identity=False))


async def spf_helo_outcome(facts: Facts, ports: Ports) -> SpfOutcome:
    """SPF for the HELO identity (RFC 7208 2.3), whatever the sender; ``none`` without HELO.

    For the null sender this is the same evaluation as ``spf_outcome``.
    """
    if facts.sender == "":
        return await spf_outcome(facts, ports)
    return await memo(facts, "spf.helo", lambda: _evaluate(facts, ports, helo_identity=True))


async def _evaluate(facts: Facts, ports: Ports, *, helo_identity: bool) -> SpfOutcome:
    client_ip = str(unmapped(facts.client_ip))
    helo = facts.helo.strip() if facts.helo else None
    sender = facts.sender
    if helo_identity or sender == "":
        if not helo:
            return SpfOutcome("none", "helo", "", "", "no HELO name", client_ip, None, sender)
        checked, identity = "", "helo"  # pyspf checks postmaster@<helo> for an empty sender
    else:
        if sender is None:
            return SpfOutcome("none", "mailfrom", "", "", "no sender", client_ip, helo, sender)
        checked, identity = sender, "mailfrom"
    receiver = min(facts.our_names) if facts.our_names else "unknown"  # the %{r} macro
    args = {"i": client_ip, "s": checked, "h": helo or "", "receiver": receiver}
    try:
        async with asyncio.timeout(TIME_LIMIT):
            result, explanation, domain, mailbox, mechanism = await _replay(ports.resolver, args)
    except TimeoutError:
        query = _Query(_Replay().lookup, querytime=TIME_LIMIT, **args)
        result, explanation = "temperror", f"no DNS answer within {TIME_LIMIT:g}s"
        domain, mailbox, mechanism = str(query.o), f"{query.l}@{query.o}", None
    return SpfOutcome(
        result, identity, domain, mailbox, explanation, client_ip, helo, sender, mechanism
    )


class _NeedAnswer(BaseException):
    """Raised through pyspf when it asks a question not answered yet (BaseException, so that
    pyspf's ``except Exception`` handlers let it pass; its bare ``except:`` around the
    explanation lookup may swallow it, which ``_Replay.missing`` notices)."""


class _Replay:
    """Answers pyspf's DNS questions from what was fetched before this run of it."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], DnsAnswer | DnsTempError] = {}
        self.missing: list[tuple[str, str]] = []

    def lookup(self, name: str, qtype: str, timeout: float | None) -> list[tuple[Any, Any]]:
        """pyspf's ``DNSLookup`` contract: ``[((name, qtype), value), ...]`` as pyspf's
        dnspython driver returns it: TXT/SPF as a tuple of byte strings, A/AAAA as the address
        text, MX as ``(preference, exchange)``, PTR/CNAME as the name. NXDOMAIN and NODATA are
        an empty list (pyspf counts both as void lookups); a temporary failure is
        ``spf.TempError``."""
        if qtype not in _ASKED_TYPES:
            raise pyspf.TempError(f"DNS type {qtype} not supported")
        key = (str(name), qtype)
        answer = self.answers.get(key)
        if answer is None:
            self.missing.append(key)
            raise _NeedAnswer
        if isinstance(answer, DnsTempError):
            raise pyspf.TempError(f"DNS {answer.reason}")
        return [(key, value) for value in _pyspf_values(qtype, answer)]


MAX_RUNS = 64  # pyspf's own limits end an evaluation long before (10 terms, 10 MX/PTR names)
MAX_PREFETCH = 24  # include/redirect records fetched ahead of pyspf's questions, at most


async def _replay(
    resolver: Resolver, args: Mapping[str, str]
) -> tuple[str, str, str, str, str | None]:
    """Runs pyspf on the event loop, again and again, each time with the answers it asked for.

    pyspf is synchronous and deterministic for given DNS answers: a run stops at the first
    question not answered yet; the question goes to the resolver (its cache answers repeat
    questions at once) and pyspf runs again from the start. A typical record costs one or two
    runs of ~0.1 ms and no thread at all.
    """
    replay = _Replay()
    remembered = _ASKED_BEFORE.get(_checked_domain(args))
    if remembered:  # what pyspf asked for this domain last time: usually all it will ask now
        replay.missing.extend(remembered)
    for run in range(MAX_RUNS):
        if run or not remembered:
            replay.missing.clear()
            try:
                outcome = _run_query(replay, args)
            except _NeedAnswer:
                outcome = None
            if not replay.missing:
                assert outcome is not None
                _remember(args, replay)
                return outcome
        wanted = list(dict.fromkeys(replay.missing))
        while wanted:  # what pyspf asked for, and the includes those records will make it ask
            answers = await asyncio.gather(
                *(resolver.query(name, qtype) for name, qtype in wanted), return_exceptions=True
            )
            followups: list[tuple[str, str]] = []
            for key, answer in zip(wanted, answers, strict=True):
                if isinstance(answer, DnsAnswer):
                    replay.answers[key] = answer
                    if key[1] == "TXT":
                        followups.extend(_included(answer))
                elif isinstance(answer, DnsTempError):
                    replay.answers[key] = answer
                else:
                    raise answer
            wanted = [k for k in dict.fromkeys(followups) if k not in replay.answers]
            if len(replay.answers) >= MAX_PREFETCH:  # a chain of includes pyspf would cut off
                wanted = []
    return "temperror", "too many DNS questions", "", "", None


_ASKED_BEFORE: dict[str, tuple[tuple[str, str], ...]] = {}  # domain -> questions, LRU-ish
_ASKED_LIMIT = 4096


def _checked_domain(args: Mapping[str, str]) -> str:
    """The domain an evaluation is about: the sender's, or the HELO name for the null sender."""
    return args["s"].rpartition("@")[2].lower() or args["h"].lower()


def _remember(args: Mapping[str, str], replay: _Replay) -> None:
    """Keeps the questions of a finished evaluation for the next one of the same domain."""
    domain = _checked_domain(args)
    if not domain:
        return
    _ASKED_BEFORE.pop(domain, None)
    if len(_ASKED_BEFORE) >= _ASKED_LIMIT:
        del _ASKED_BEFORE[next(iter(_ASKED_BEFORE))]  # the least recently finished
    _ASKED_BEFORE[domain] = tuple(list(replay.answers)[:MAX_PREFETCH])


_INCLUDE = re.compile(r"(?:^|\s)(?:[+?~-]?include:|redirect=)([A-Za-z0-9._-]+)(?=\s|$)", re.I)


def _included(answer: DnsAnswer) -> list[tuple[str, str]]:
    """The TXT questions an SPF record's macro-free ``include:`` and ``redirect=`` terms will
    raise: fetched together with the record (concurrently), instead of one pyspf run each.
    A guess that misses costs one more run, never a wrong result: pyspf still decides."""
    found: list[tuple[str, str]] = []
    for record in answer.records:
        if record[:7].lower() == "v=spf1 " and len(found) < 10:
            found.extend((target, "TXT") for target in _INCLUDE.findall(record))
    return found[:10]


def _run_query(replay: _Replay, args: Mapping[str, str]) -> tuple[str, str, str, str, str | None]:
    """(result, explanation, domain, mailbox, mechanism) of one pyspf run."""
    query = _Query(replay.lookup, querytime=TIME_LIMIT, **args)
    domain, mailbox = str(query.o), f"{query.l}@{query.o}"
    try:
        result, _code, explanation = query.check()
    except Exception as exc:  # a pyspf failure on hostile input must not end the session
        problem = f"SPF evaluation failed ({type(exc).__name__})"
        return "temperror", problem, domain, mailbox, None
    if result not in RESULTS:  # "ambiguous" exists only in pyspf's harsh mode, unused here
        return "temperror", f"unexpected SPF result {result!r}", domain, mailbox, None
    mechanism = query.mechanism if isinstance(query.mechanism, str) else None
    return str(result), str(explanation), domain, mailbox, mechanism


def _pyspf_values(qtype: str, answer: DnsAnswer) -> list[Any]:
    values: list[Any] = []
    for record in answer.records:
        if qtype in ("TXT", "SPF"):
            # the port joined the character-strings and decoded them as latin-1: this gives the
            # original bytes back, and pyspf refuses non-ASCII SPF records itself (permerror)
            values.append((record.encode("latin-1", "replace"),))
        elif qtype == "MX":
            preference, _, exchange = record.partition(" ")
            try:
                values.append((int(preference), exchange))
            except ValueError:
                continue  # not what the port renders; ignore rather than guess
        else:
            values.append(record)
    return values


# ---------------------------------------------------------------------------- the pyspf hook

_current = threading.local()  # .lookup: the lookup of the query this thread is evaluating
_LookupFn = Callable[[str, str, float | None], list[tuple[Any, Any]]]


class _Query(pyspf.query):  # type: ignore[misc]  # pyspf ships no type information
    """``spf.query`` whose DNS questions go to ``lookup`` (see ``_dispatch``).

    ``dns`` is pyspf's per-query lookup method (its cache, CNAME chasing and void-lookup limit);
    it calls the module function ``spf.DNSLookup`` for what is not cached, so the lookup to use
    is put where that function finds it for the duration of the call.
    """

    def __init__(self, lookup: _LookupFn, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)
        self._palisade_lookup = lookup
        self._ptr_depth = 0

    def dns(self, name: Any, qtype: str, cnames: Any = None, ignore_void: bool = False) -> Any:
        previous = getattr(_current, "lookup", None)
        _current.lookup = self._palisade_lookup
        try:
            return super().dns(name, qtype, cnames=cnames, ignore_void=ignore_void)
        except pyspf.TempError:
            # RFC 7208 5.5: a DNS error on the PTR lookup makes "ptr" not match, and one on the
            # A/AAAA lookup of a PTR name skips that name. pyspf lets these end the evaluation
            # as temperror; an error is not a void lookup either, so none is counted.
            if self._ptr_depth and qtype in ("PTR", "A", "AAAA"):
                return []
            raise
        finally:
            _current.lookup = previous

    def validated_ptrs(self) -> Any:
        """The client's validated PTR names (the "ptr" mechanism and the %{p} macro)."""
        self._ptr_depth += 1
        try:
            return super().validated_ptrs()
        finally:
            self._ptr_depth -= 1


def _dispatch(name: str, qtype: str, *args: Any, **kwargs: Any) -> Any:
    """Replaces ``spf.DNSLookup``: our query's lookup in this thread, else pyspf's own."""
    lookup = getattr(_current, "lookup", None)
    if lookup is None:
        return _PYSPF_LOOKUP(name, qtype, *args, **kwargs)
    timeout = args[1] if len(args) > 1 else kwargs.get("timeout")
    return lookup(name, qtype, timeout)


if getattr(pyspf.DNSLookup, "__module__", None) != __name__:  # once, even if reloaded
    _PYSPF_LOOKUP = pyspf.DNSLookup
    pyspf.DNSLookup = _dispatch
else:  # pragma: no cover - module reloaded: keep the original pyspf function
    _PYSPF_LOOKUP = pyspf.DNSLookup.__globals__["_PYSPF_LOOKUP"]


# ---------------------------------------------------------------------------- Received-SPF

_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_FIELD_LIMIT = 255  # characters of one attacker-supplied text kept in the header
_FOLD_AT = 78
_COMMENTS = {
    "pass": "domain of {who} designates {ip} as permitted sender",
    "fail": "domain of {who} does not designate {ip} as permitted sender",
    "softfail": "transitioning domain of {who} does not designate {ip} as permitted sender",
    "neutral": "{ip} is neither permitted nor denied by domain of {who}",
    "none": "domain of {who} does not designate permitted sender hosts",
    "permerror": "permanent error in processing the SPF record of {who}",
    "temperror": "temporary error in processing the SPF record of {who}",
}


def _clean(text: str) -> str:
    """Control characters (CR, LF, NUL, NEL, line separators...) become spaces; capped."""
    text = _UNSAFE.sub(" ", text)
    if len(text) > _FIELD_LIMIT:
        text = text[: _FIELD_LIMIT - 3] + "..."
    return text


def _value(text: str) -> str:
    """A key-value value: the dot-atom as is, anything else as an RFC 5322 quoted-string."""
    text = _clean(text)
    if _DOT_ATOM.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment_text(text: str) -> str:
    """Text inside an RFC 5322 comment: ``(``, ``)`` and ``\\`` become quoted-pairs."""
    cleaned = _clean(text)
    return cleaned.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def received_spf_header(outcome: SpfOutcome, receiver_hostname: str) -> str:
    """The ``Received-SPF`` header field (RFC 7208 section 9.1) for ``outcome``.

    Returned without the final CRLF, folded with CRLF TAB between its parts when a line would
    pass 78 characters (a part is a word of the comment or one key-value pair; none is longer
    than about 520, so no line passes RFC 5322's 998).
    Every remote text is cleaned of control characters and cut at 255 characters, then quoted.
    """
    result = outcome.result if outcome.result in RESULTS else "temperror"
    who = outcome.mailbox or outcome.domain or "unknown"
    template = _COMMENTS[result]
    receiver = _comment_text(receiver_hostname)
    comment = template.format(who=_comment_text(who), ip=_comment_text(outcome.client_ip))
    # a comment may be folded at any of its blanks (RFC 5322 3.2.2), so it goes word by word
    parts = [f"Received-SPF: {result}", *f"({receiver}: {comment})".split()]
    pairs: list[tuple[str, str]] = [("client-ip", outcome.client_ip)]
    if outcome.sender:
        pairs.append(("envelope-from", outcome.sender))
    if outcome.helo:
        pairs.append(("helo", outcome.helo))
    if result in ("permerror", "temperror") and outcome.explanation:
        pairs.append(("problem", outcome.explanation))
    if outcome.mechanism:
        pairs.append(("mechanism", outcome.mechanism))
    pairs.append(("receiver", receiver_hostname))
    pairs.append(("identity", outcome.identity if outcome.identity == "helo" else "mailfrom"))
    parts.extend(f"{key}={_value(value)};" for key, value in pairs)
    return _fold(parts)


def _fold(parts: list[str]) -> str:
    lines = [parts[0]]
    for part in parts[1:]:
        if len(lines[-1]) + 1 + len(part) > _FOLD_AT:
            lines.append("\t" + part)
        else:
            lines[-1] += " " + part
    return "\r\n".join(lines)


# ---------------------------------------------------------------------------- the check


class SpfCheck:
    name: ClassVar[str] = "spf"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.MAIL, Stage.RCPT, Stage.DATA})
    uses_dns: ClassVar[bool] = True

    def __init__(self, results: frozenset[str], helo: bool) -> None:
        self.results = results
        self.helo = helo

    async def evaluate(self, facts: Facts, ports: Ports) -> CheckResult:
        if self.helo:
            outcome = await spf_helo_outcome(facts, ports)
        else:
            outcome = await spf_outcome(facts, ports)
        domain = safe_text(outcome.domain)
        explanation = safe_text(outcome.explanation)
        values = {
            "spf_result": outcome.result,
            "spf_domain": domain,
            "spf_explanation": explanation,
        }
        reason = f"SPF {outcome.result} for {outcome.identity} {domain or '(none)'}"
        reason += f" from {outcome.client_ip}"
        if explanation and outcome.result not in ("pass", "neutral", "none"):
            reason += f": {explanation}"
        return CheckResult(outcome.result in self.results, reason, values)


def build_spf(options: Mapping[str, Any], lists: ListLookup) -> Check:
    opts = Options(options, "spf")
    wanted = [r.strip().lower() for r in opts.texts("result", ["fail"])]
    helo = opts.flag("helo", False)
    opts.done()
    if not wanted:
        raise ValueError("option 'result': list at least one SPF result")
    unknown = sorted(set(wanted) - RESULTS)
    if unknown:
        raise ValueError(
            f"option 'result': unknown SPF result(s) {', '.join(unknown)}; "
            f"expected {', '.join(sorted(RESULTS))}"
        )
    return SpfCheck(frozenset(wanted), helo)


FACTORIES: dict[str, CheckFactory] = {"spf": build_spf}
