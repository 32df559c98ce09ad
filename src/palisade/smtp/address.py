"""RFC 5321 path and parameter grammar: ``<@route:local@domain> KEY=value ...``.

Owns: the ``Address`` value and the parsers for the arguments of MAIL FROM and RCPT TO (the
Reverse-path / Forward-path, and the esmtp-param list that follows it). It knows nothing of the
session state or of policy.

Trust: the text is hostile client input, already free of CR, LF and NUL (the receive buffer
refuses those) but otherwise arbitrary; it was decoded as latin-1 so every byte is one character.
Anything outside the grammar is refused with an ``AddressError`` carrying a log reason: spaces,
control characters, 8-bit bytes (SMTPUTF8 is not offered), missing brackets or domain, bad
domain syntax, address literals that are not a valid IPv4 / IPv6 address, over-long parts.
Historic routing forms that the grammar allows -- source routes, ``%`` hacks, ``!`` paths,
quoted local parts containing ``@`` -- are parsed and reported (``Address.relay_tricks``), never
honoured: refusing them is the relay policy's job. The regular expressions are anchored and have
no nested unbounded repetition, so matching stays linear in the (capped) line length.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = [
    "MAX_DOMAIN",
    "MAX_LOCAL_PART",
    "Address",
    "AddressError",
    "ParamError",
    "parse_params",
    "parse_path",
]

MAX_LOCAL_PART = 64  # RFC 5321 §4.5.3.1.1
MAX_DOMAIN = 255  # RFC 5321 §4.5.3.1.2
MAX_LABEL = 63

_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_SUB_DOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = rf"{_SUB_DOMAIN}(?:\.{_SUB_DOMAIN})*"
_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]*\]"
_ADL = rf"@{_DOMAIN}(?:,@{_DOMAIN})*"

_PATH_RE = re.compile(rf"<(?:({_ADL}):)?({_DOT_STRING}|{_QUOTED})@({_DOMAIN}|{_LITERAL})>")
_POSTMASTER_RE = re.compile(r"<(postmaster)>", re.IGNORECASE)
_DOMAIN_RE = re.compile(_DOMAIN)
_QUOTED_PAIR_RE = re.compile(r"\\(.)")
_NEEDS_ESCAPE_RE = re.compile(r'(["\\])')
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_NON_ASCII_RE = re.compile(r"[^\x00-\x7f]")

_KEYWORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE_RE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")


class AddressError(ValueError):
    """The path is not acceptable; ``str(exc)`` is the log reason."""


class ParamError(ValueError):
    """A parameter list is malformed; ``str(exc)`` is the log reason."""


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox from MAIL FROM or RCPT TO.

    ``local_part`` is the local part without quotes (quoted-pairs resolved) and ``quoted`` says
    whether it was sent as a quoted string. ``domain`` is as sent, case kept; an address literal
    keeps its brackets (``[192.0.2.1]``); it is ``""`` only for the bare ``<postmaster>``.
    ``source_route`` lists the domains of an RFC 821 source route (``<@a,@b:u@c>`` -> a, b).
    """

    local_part: str
    domain: str
    quoted: bool = False
    source_route: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """``local@domain`` (the local part re-quoted if it was quoted; no source route)."""
        local = self.local_part
        if self.quoted:
            local = '"' + _NEEDS_ESCAPE_RE.sub(r"\\\1", local) + '"'
        return f"{local}@{self.domain}" if self.domain else local

    @property
    def is_literal(self) -> bool:
        """True when the domain is an address literal such as ``[192.0.2.1]``."""
        return self.domain.startswith("[")

    @property
    def relay_tricks(self) -> tuple[str, ...]:
        """The historic routing forms present: source_route, quoted_at, percent_hack, bang_path."""
        tricks = []
        if self.source_route:
            tricks.append("source_route")
        if "@" in self.local_part:
            tricks.append("quoted_at")
        if "%" in self.local_part:
            tricks.append("percent_hack")
        if "!" in self.local_part:
            tricks.append("bang_path")
        return tuple(tricks)

    def __str__(self) -> str:
        return self.text


def parse_path(
    text: str, *, allow_null: bool, allow_postmaster: bool
) -> tuple[Address | None, str]:
    """Parses the path at the start of ``text``; returns (address or None for ``<>``, rest).

    ``rest`` is what follows the closing bracket (the parameters, with their leading space).
    Raises ``AddressError`` with a log reason when the path is refused.
    """
    if not text:
        raise AddressError("missing address")
    if not text.startswith("<"):
        raise AddressError("address not enclosed in angle brackets")
    if text.startswith("<>"):
        if not allow_null:
            raise AddressError("null address not allowed here")
        return None, text[2:]
    match = _PATH_RE.match(text)
    if match is None:
        if allow_postmaster:
            pm = _POSTMASTER_RE.match(text)
            if pm is not None:
                return Address(pm.group(1), ""), text[pm.end() :]
        raise AddressError(_diagnose(text))
    route_text, local, domain = match.groups()
    quoted = local.startswith('"')
    if quoted:
        local = _QUOTED_PAIR_RE.sub(r"\1", local[1:-1])
    if len(match.group(2)) > MAX_LOCAL_PART:
        raise AddressError(f"local part longer than {MAX_LOCAL_PART} octets")
    _check_domain(domain)
    route: tuple[str, ...] = ()
    if route_text:
        route = tuple(hop[1:] for hop in route_text.split(","))
        for hop in route:
            _check_domain(hop)
    return Address(local, domain, quoted, route), text[match.end() :]


def _check_domain(domain: str) -> None:
    if len(domain) > MAX_DOMAIN:
        raise AddressError(f"domain longer than {MAX_DOMAIN} octets")
    if domain.startswith("["):
        _check_literal(domain[1:-1])
        return
    if any(len(label) > MAX_LABEL for label in domain.split(".")):
        raise AddressError(f"domain label longer than {MAX_LABEL} octets")


def _check_literal(content: str) -> None:
    if content[:5].lower() == "ipv6:":
        value = content[5:]
        try:
            if "%" in value:  # ipaddress accepts scope ids; RFC 5321 does not
                raise ValueError(value)
            ipaddress.IPv6Address(value)
        except ValueError:
            raise AddressError(f"invalid IPv6 address literal [{content}]") from None
        return
    if ":" in content:
        raise AddressError(f"unsupported address literal [{content}]")
    try:
        ipaddress.IPv4Address(content)
    except ValueError:
        raise AddressError(f"invalid IPv4 address literal [{content}]") from None


def _diagnose(text: str) -> str:
    """A log reason for a path the grammar refused (best effort, never raises)."""
    end = text.find(">")
    inner = text[1:end] if end >= 0 else text[1:]
    if end < 0:
        reason = "missing closing angle bracket"
    elif not inner:
        reason = "empty address"
    elif _NON_ASCII_RE.search(inner):
        reason = "8-bit characters in address"
    elif _CONTROL_RE.search(inner):
        reason = "control characters in address"
    elif " " in inner and '"' not in inner:
        reason = "unquoted space in address"
    elif "@" not in inner:
        reason = "address has no domain"
    else:
        domain = inner.rpartition("@")[2]
        if not domain:
            reason = "address has no domain"
        elif not domain.startswith("[") and not _DOMAIN_RE.fullmatch(domain):
            reason = "bad domain syntax"
        else:
            reason = "bad address syntax"
    return reason


def parse_params(text: str) -> tuple[tuple[str, str | None], ...]:
    """Parses `` KEY=value KEY2`` into ((KEY, value), (KEY2, None)); keywords upper-cased.

    Spaces around and between parameters are tolerated; duplicates and malformed keywords or
    values raise ``ParamError``.
    """
    if text and text[0] != " ":
        raise ParamError("garbage after the address")
    params: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    for item in text.split(" "):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not _KEYWORD_RE.fullmatch(key):
            raise ParamError(f"malformed parameter keyword {key[:40]!r}")
        if eq and not _VALUE_RE.fullmatch(value):
            raise ParamError(f"malformed value for parameter {key[:40]}")
        upper = key.upper()
        if upper in seen:
            raise ParamError(f"duplicate parameter {upper[:40]}")
        seen.add(upper)
        params.append((upper, value if eq else None))
    return tuple(params)
