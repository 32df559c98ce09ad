"""The Authentication-Results header (RFC 8601): building ours, recognising forged ones.

Owns: :func:`authenticate`, which computes the enabled authentication findings of a message
concurrently (SPF, DKIM, DMARC, iprev); :func:`iprev_outcome`, the "iprev" method (RFC 8601
section 3: the client address has a PTR name whose forward lookup gives the address back);
:func:`authentication_results`, ONE header field from whatever was computed; and
:func:`claims_authserv_id`, the predicate the session uses to drop inbound Authentication-Results
fields that claim our authserv-id (section 5).

Header format (one line; the session folds it)::

    Authentication-Results: mx.example.org; spf=pass smtp.mailfrom=user@example.com;
        dkim=pass header.d=example.com header.s=sel header.b=AbCdEfGh;
        dmarc=pass (p=reject dis=none) header.from=example.com;
        iprev=pass policy.iprev=192.0.2.1 (mail.example.com)

One ``dkim`` result per considered signature (``dkim=none`` for an unsigned message). A method
whose computation raised (a bug, never a DNS failure: those are results) is reported as
``temperror``. A method that was not computed is left out; with none at all there is no header.
Must not touch: the reply, logs, globals.
Trust: every property value came from the network (MAIL FROM, HELO, d=, s=, b=, From, PTR
names): a value is written bare only when it is an RFC 2045 token (or a plain
``local-part@domain`` for ``smtp.mailfrom``), else as a quoted-string with ``\\`` and ``"``
escaped; control characters (CR, LF, NUL...) are removed and non-ASCII characters become
``?`` first. Comments only hold our own words and cleaned names without parentheses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from palisade.policy import keys
from palisade.policy.checks.dkim import DKIM, DkimOutcome, dkim_outcome
from palisade.policy.checks.dmarc import DMARC, DmarcOutcome, dmarc_outcome
from palisade.policy.checks.dnsnames import IPAddress, normalise_name, safe_text, unmapped
from palisade.policy.checks.spf import SPF, spf_outcome
from palisade.policy.rules import Facts, Key, Ports, T, memo
from palisade.ports import DnsAnswer, DnsTempError

MAX_NAMES = 10  # PTR names forward-checked at most (as the rdns check)

_TSPECIALS = set('()<>@,;:\\"/[]?=')
_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_DOMAIN = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
_COMMENT_SAFE = re.compile(r"[^A-Za-z0-9 .,:=_+/@-]")


# --------------------------------------------------------------------------------------------
# iprev
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IprevOutcome:
    """``pass`` (a PTR name resolves back), ``fail`` (none does), ``permerror`` (no PTR),
    ``temperror`` (a lookup failed and nothing passed)."""

    result: str
    ip: str
    names: tuple[str, ...] = ()  # the verified names (pass), else the PTR names
    reason: str = ""


IPREV: Key[IprevOutcome] = Key("iprev")  # the per-transaction finding


async def iprev_outcome(facts: Facts, ports: Ports) -> IprevOutcome:
    """The iprev finding, memoised under ``facts.tx["iprev"]``; reuses (and fills in) the
    connection-wide ``rdns.names`` / ``rdns.verified_names`` of the ``rdns`` check."""
    return await memo(facts, IPREV, lambda: _iprev(facts, ports))


async def _iprev(facts: Facts, ports: Ports) -> IprevOutcome:
    ip = unmapped(facts.client_ip)
    text = str(ip)
    names = facts.results.get(keys.RDNS_NAMES)
    if not isinstance(names, tuple):
        try:
            answer = await ports.resolver.ptr(text)
        except DnsTempError as exc:
            return IprevOutcome("temperror", text, reason=safe_text(exc.reason, 100))
        names = tuple(dict.fromkeys(normalise_name(n) for n in answer.records if n.strip(".")))
        facts.results[keys.RDNS_NAMES] = names
    if not names:
        return IprevOutcome("permerror", text, reason="no PTR record")
    verified = facts.results.get(keys.RDNS_VERIFIED_NAMES)
    if isinstance(verified, tuple):
        if verified:
            return IprevOutcome("pass", text, verified)
        return IprevOutcome("fail", text, names, "PTR names do not resolve back")
    rdtype = "A" if ip.version == 4 else "AAAA"
    outcomes = await asyncio.gather(
        *(ports.resolver.query(n, rdtype) for n in names[:MAX_NAMES]), return_exceptions=True
    )
    found: list[str] = []
    failed = False
    for name, outcome in zip(names, outcomes, strict=False):
        if isinstance(outcome, DnsAnswer):
            if any(_same_ip(r, ip) for r in outcome.records):
                found.append(name)
        else:
            failed = True
    if found or not failed:
        facts.results[keys.RDNS_VERIFIED] = bool(found)
        facts.results[keys.RDNS_VERIFIED_NAMES] = tuple(found)
    if found:
        return IprevOutcome("pass", text, tuple(found))
    if failed:
        return IprevOutcome("temperror", text, names, "forward lookup failed")
    return IprevOutcome("fail", text, names, "PTR names do not resolve back")


def _same_ip(record: str, ip: IPAddress) -> bool:
    try:
        return unmapped(ipaddress.ip_address(record.strip())) == ip
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------
# Computing everything
# --------------------------------------------------------------------------------------------


async def authenticate(
    facts: Facts,
    ports: Ports,
    *,
    spf: bool = True,
    dkim: bool = True,
    dmarc: bool = True,
    iprev: bool = True,
) -> None:
    """Computes the enabled findings concurrently and waits for them; never raises.

    DKIM and DMARC need ``facts.message`` (they are skipped without it); DMARC computes SPF and
    DKIM itself when it needs them, whatever ``spf`` and ``dkim`` say. Results are memoised in
    ``facts.tx``; failures stay in the memoised futures (reported as ``temperror``).
    """
    work: list[Any] = []
    if spf:
        work.append(spf_outcome(facts, ports))
    if dkim and facts.message is not None:
        work.append(dkim_outcome(facts, ports))
    if dmarc and facts.message is not None:
        work.append(dmarc_outcome(facts, ports))
    if iprev:
        work.append(iprev_outcome(facts, ports))
    if work:
        await asyncio.gather(*work, return_exceptions=True)


# --------------------------------------------------------------------------------------------
# The header
# --------------------------------------------------------------------------------------------


def _state(facts: Facts, key: Key[T]) -> tuple[T | None, bool]:
    """(the finding or None, whether its computation failed); (None, False) if not started."""
    future = facts.tx.get(key)
    if future is None or not future.done():
        return None, False
    if future.cancelled() or future.exception() is not None:
        return None, True
    return future.result(), False


def authentication_results(authserv_id: str, facts: Facts) -> str | None:
    """``Authentication-Results: <authserv-id>; <resinfo>; ...`` as one line (no CRLF), or None
    when no method was computed."""
    parts: list[str] = []
    spf_state = _state(facts, SPF)
    spf, spf_failed = spf_state
    if spf is not None:
        parts.append(_spf_part(spf, facts))
    elif spf_failed:
        parts.append("spf=temperror")
    dkim_state = _state(facts, DKIM)
    dkim, dkim_failed = dkim_state
    if isinstance(dkim, DkimOutcome):
        parts.extend(_dkim_parts(dkim))
    elif dkim_failed:
        parts.append("dkim=temperror")
    dmarc_state = _state(facts, DMARC)
    dmarc, dmarc_failed = dmarc_state
    if isinstance(dmarc, DmarcOutcome):
        parts.append(_dmarc_part(dmarc))
    elif dmarc_failed:
        parts.append("dmarc=temperror")
    iprev_state = _state(facts, IPREV)
    iprev, iprev_failed = iprev_state
    if isinstance(iprev, IprevOutcome):
        parts.append(_iprev_part(iprev))
    elif iprev_failed:
        parts.append("iprev=temperror")
    elif (derived := _iprev_from_rdns(facts)) is not None:
        parts.append(_iprev_part(derived))
    if not parts:
        return None
    return f"Authentication-Results: {pvalue(authserv_id)}; " + "; ".join(parts)


def _word(value: object, allowed: tuple[str, ...]) -> str:
    text = str(value).lower()
    return text if text in allowed else "temperror"


_SPF_WORDS = ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror", "policy")


def _spf_part(spf: Any, facts: Facts) -> str:
    word = _word(getattr(spf, "result", "temperror"), _SPF_WORDS)
    identity = getattr(spf, "identity", "mailfrom")
    if identity == "helo":
        helo = facts.helo or getattr(spf, "domain", "") or ""
        return f"spf={word} smtp.helo={pvalue(helo)}" if helo else f"spf={word}"
    sender = getattr(spf, "mailbox", "") or facts.sender or getattr(spf, "domain", "") or ""
    return f"spf={word} smtp.mailfrom={mailbox_value(sender)}" if sender else f"spf={word}"


_DKIM_WORDS = ("pass", "fail", "neutral", "permerror", "temperror", "none", "policy")


def _dkim_parts(dkim: DkimOutcome) -> list[str]:
    if not dkim.signatures:
        return ["dkim=none"]
    parts = []
    for sig in dkim.signatures:
        text = f"dkim={_word(sig.result, _DKIM_WORDS)}"
        if sig.result != "pass" and sig.reason:
            text += f" ({comment(sig.reason)})"
        props = (("header.d", sig.domain), ("header.s", sig.selector), ("header.b", sig.b))
        text += "".join(f" {key}={pvalue(value)}" for key, value in props if value)
        parts.append(text)
    return parts


_DMARC_WORDS = ("pass", "fail", "none", "temperror", "permerror")


def _dmarc_part(dmarc: DmarcOutcome) -> str:
    text = f"dmarc={_word(dmarc.result, _DMARC_WORDS)}"
    if dmarc.policy:
        text += f" (p={dmarc.policy} dis={dmarc.disposition})"
    if dmarc.from_domain:
        text += f" header.from={pvalue(dmarc.from_domain)}"
    return text


def _iprev_part(iprev: IprevOutcome) -> str:
    text = f"iprev={_word(iprev.result, ('pass', 'fail', 'permerror', 'temperror'))}"
    text += f" policy.iprev={pvalue(iprev.ip)}"
    if iprev.result == "pass" and iprev.names:
        text += f" ({comment(iprev.names[0])})"
    return text


def _iprev_from_rdns(facts: Facts) -> IprevOutcome | None:
    """What the ``rdns`` check learnt, when iprev itself was not computed."""
    ip = str(unmapped(facts.client_ip))
    names = facts.results.get(keys.RDNS_NAMES)
    verified = facts.results.get(keys.RDNS_VERIFIED_NAMES)
    if names == ():
        return IprevOutcome("permerror", ip)
    if isinstance(verified, tuple):
        return IprevOutcome("pass" if verified else "fail", ip, verified)
    return None


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


def _ascii(text: str) -> str:
    """No control character, no non-ASCII character (``?``), blanks collapsed."""
    cleaned = safe_text(text, 255)
    return "".join(c if " " <= c < "\x7f" else "?" for c in cleaned)


def is_token(text: str) -> bool:
    """An RFC 2045 token: printable ASCII without space and tspecials."""
    return bool(text) and all("!" <= c <= "~" and c not in _TSPECIALS for c in text)


def quoted(text: str) -> str:
    """An RFC 5322 quoted-string of (already cleaned) ``text``."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def pvalue(text: str) -> str:
    """A property value (RFC 8601 ``pvalue``): a token as it is, anything else quoted."""
    cleaned = _ascii(text)
    return cleaned if is_token(cleaned) else quoted(cleaned)


def mailbox_value(address: str) -> str:
    """``smtp.mailfrom``: ``local-part@domain`` bare when both halves are plain, else quoted."""
    cleaned = _ascii(address)
    local, at, domain = cleaned.rpartition("@")
    if at and _ATOM.match(local) and _DOMAIN.match(domain):
        return cleaned
    if not at and _DOMAIN.match(cleaned):
        return cleaned
    return quoted(cleaned)


def comment(text: str) -> str:
    """Text fit for the inside of a comment: a few plain characters only, 80 at most."""
    return _COMMENT_SAFE.sub("", _ascii(text))[:80].strip()


# --------------------------------------------------------------------------------------------
# Forged headers
# --------------------------------------------------------------------------------------------


def claims_authserv_id(header_value: str, authserv_id: str) -> bool:
    """Whether an Authentication-Results value names ``authserv_id`` (case-insensitive).

    The authserv-id is the first item of the value after optional CFWS (blanks, folding,
    comments, nested comments with quoted-pairs); it is a token or a quoted-string, and may be
    followed by a version and more CFWS (RFC 8601 section 2.2). An unparsable value does not
    claim anything.
    """
    wanted = authserv_id.strip().lower()
    if not wanted:
        return False
    text = header_value
    i = _skip_cfws(text, 0)
    if i is None or i >= len(text):
        return False
    if text[i] == '"':
        value = _quoted_string(text, i)
        if value is None:
            return False
        found = value
    else:
        j = i
        while j < len(text) and text[j] not in ' \t\r\n;("':
            j += 1
        found = text[i:j]
    return found.strip().lower() == wanted


def _skip_cfws(text: str, i: int) -> int | None:
    """The index after blanks and comments from ``i``; None for an unterminated comment."""
    while i < len(text):
        c = text[i]
        if c in " \t\r\n":
            i += 1
        elif c == "(":
            depth = 0
            while i < len(text):
                c = text[i]
                if c == "\\":
                    i += 2
                    continue
                if c == "(":
                    depth += 1
                elif c == ")":
                    depth -= 1
                    if depth == 0:
                        break
                i += 1
            if i >= len(text):
                return None
            i += 1
        else:
            break
    return i


def _quoted_string(text: str, i: int) -> str | None:
    """The content of the quoted-string starting at ``text[i] == '"'`` (quoted-pairs undone)."""
    out: list[str] = []
    i += 1
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
            continue
        if c == '"':
            return "".join(out)
        out.append(c)
        i += 1
    return None
