"""Log lines of other programs (Dovecot, Postfix, exim, the operator's patterns) -> incidents.

Owns: the built-in line formats, their rule names and default weights (:data:`BUILTIN_RULES`),
the syslog prefixes it understands, the operator's ``[[scan.patterns]]`` once compiled
(:class:`Pattern`, :func:`compile_pattern`), and :class:`LineParser`: one line in, zero or one
:class:`Hit` (address, rule, weight, time) out. Pure: no files, no clock (the caller passes
``now``), no store. The follower (:mod:`palisade.feedback.follow`) reads the files.

Trust: none. A log line carries text the remote client chose (user names, HELO names, sender
addresses, commands). So:

* lines longer than ``max_line`` characters are not parsed at all (a client cannot push the real
  address out of a bounded window, nor make a regex work on megabytes);
* every built-in format is matched *anchored* at the start of the program's message, after the
  syslog prefix and program tag have been split off, and takes the client address from the
  field the server itself writes before any client text (Postfix ``from name[ip]``, exim
  ``H=name (helo) [ip]``), or for Dovecot the last ``rip=`` of the line (the user name, the only
  client text, comes before it). A line from another program, or a client string that imitates
  a reject line inside an accepted line, does not match;
* exim's ``(helo)`` is trusted to hold no ``)``: exim refuses such HELO names unless
  ``helo_accept_junk_hosts`` is set; the exim lines whose client-chosen text comes *before* the
  address (``SMTP protocol error in "..." H=``, ``rejected "CMD" H=``) are not counted for that
  reason;
* every address is parsed by :mod:`ipaddress` (IPv4-mapped IPv6 becomes IPv4; the store keys
  IPv6 by its /64); a token that is not an address gives no hit;
* the built-in regexes have no nested or overlapping unbounded repetition (every repeat is
  bounded or followed by a literal its class excludes), so matching is linear in the (bounded)
  line length. The operator's patterns are checked for nested repetition when loaded
  (:func:`compile_pattern`), the common catastrophic-backtracking shape.
"""

from __future__ import annotations

import calendar
import ipaddress
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BUILTIN_RULES",
    "DEFAULT_MAX_LINE",
    "Hit",
    "LineParser",
    "Pattern",
    "PatternError",
    "compile_pattern",
    "parse_address",
]

DEFAULT_MAX_LINE = 8192  # characters; longer lines are skipped
MAX_ATTEMPTS = 100  # a Dovecot line's "N attempts" counts at most this many times


@dataclass(frozen=True, slots=True)
class BuiltinRule:
    """A built-in line format: its rule name (as the store records it), format family, default
    weight (0: off unless the operator gives it a weight) and what it matches."""

    name: str
    family: str  # dovecot, postfix, exim
    weight: int
    matches: str


BUILTIN_RULES: dict[str, BuiltinRule] = {
    r.name: r
    for r in (
        BuiltinRule(
            "dovecot-auth", "dovecot", 1,
            "imap/pop3/submission/managesieve-login: Disconnected or Aborted login "
            "(auth failed, N attempts): the weight counts once per attempt (at most "
            f"{MAX_ATTEMPTS})",
        ),
        BuiltinRule(
            "dovecot-no-auth", "dovecot", 0,
            "Disconnected (no auth attempts): idle clients, TLS probes, monitoring",
        ),
        BuiltinRule(
            "dovecot-plaintext", "dovecot", 0,
            "Aborted login (tried to use disabled plaintext auth): a misconfigured client",
        ),
        BuiltinRule(
            "postfix-reject", "postfix", 1,
            "NOQUEUE: reject: RCPT|MAIL|EHLO|... from name[ip]: 5xx (and milter-reject)",
        ),
        BuiltinRule(
            "postfix-reject-temp", "postfix", 0,
            "the same with a 4xx code (greylisting, DNS trouble: not counted by default)",
        ),
        BuiltinRule(
            "postfix-sasl", "postfix", 1,
            "warning: name[ip]: SASL LOGIN|PLAIN|... authentication failed",
        ),
        BuiltinRule(
            "postfix-lost-auth", "postfix", 0,
            "lost connection after AUTH from name[ip] (usually right after a SASL failure, "
            "which already counted)",
        ),
        BuiltinRule(
            "postfix-pipelining", "postfix", 1,
            "improper command pipelining after CMD from name[ip]",
        ),
        BuiltinRule(
            "postfix-pregreet", "postfix", 1, "postscreen: PREGREET N after S from [ip]:port"
        ),
        BuiltinRule(
            "postfix-errors", "postfix", 1, "too many errors after CMD from name[ip]"
        ),
        BuiltinRule(
            "postfix-no-fcrdns", "postfix", 0,
            "warning: hostname NAME does not resolve to address IP (many legitimate "
            "submission clients: not counted by default)",
        ),
        BuiltinRule(
            "exim-auth", "exim", 1,
            "NAME authenticator failed for name (helo) [ip]: 535 Incorrect authentication data",
        ),
        BuiltinRule(
            "exim-reject", "exim", 1,
            "H=name (helo) [ip] ... rejected RCPT|MAIL|connection|EHLO|HELO|after DATA ...",
        ),
        BuiltinRule(
            "exim-sync", "exim", 1,
            "SMTP protocol synchronization error (input sent without waiting for greeting): "
            "rejected connection from H=[ip]",
        ),
        BuiltinRule(
            "exim-dropped", "exim", 1,
            "SMTP call from name (helo) [ip] dropped: too many ...",
        ),
    )
}  # fmt: skip

FAMILIES = ("dovecot", "postfix", "exim")


@dataclass(frozen=True, slots=True)
class Hit:
    """One incident found in a line: the client address (normalised by :mod:`ipaddress`), the
    rule, its weight (at least 1) and the line's time stamp (None when the line has none)."""

    ip: str
    rule: str
    weight: int
    at: float | None


class PatternError(ValueError):
    """An operator pattern that cannot be used; ``str()`` says why, ``key`` which of its keys
    (rule, regex, weight) is wrong."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key


@dataclass(frozen=True, slots=True)
class Pattern:
    """An operator pattern: searched in the whole line; group ``ip`` is the address."""

    rule: str
    regex: re.Pattern[str]
    weight: int


def compile_pattern(rule: str, regex: str, weight: int) -> Pattern:
    """Compile one ``[[scan.patterns]]`` entry; :class:`PatternError` names the problem (the
    config loader adds the file and key)."""
    if not rule or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", rule):
        raise PatternError(
            "rule",
            f"rule must be a name of letters, digits, '-', '_' or '.' (at most 64), got {rule!r}",
        )
    if rule in BUILTIN_RULES:
        raise PatternError("rule", f"rule {rule!r} is a built-in rule's name: choose another")
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 1000:
        raise PatternError(
            "weight", f"weight must be a whole number from 0 to 1000, got {weight!r}"
        )
    try:
        compiled = re.compile(regex)
    except re.error as exc:
        raise PatternError("regex", f"not a valid regular expression: {exc}") from None
    if "ip" not in compiled.groupindex:
        raise PatternError("regex", "the regex needs a named group (?P<ip>...) for the address")
    nested = _nested_repeat(regex)
    if nested:
        raise PatternError(
            "regex",
            f"nested repetition {nested!r} can take exponential time on a hostile line "
            "(catastrophic backtracking): repeat a bounded or possessive group instead",
        )
    return Pattern(rule, compiled, weight)


def _nested_repeat(regex: str) -> str | None:
    """The first repeated group that itself contains an unbounded repeat (``(a+)+``,
    ``(\\w+\\s?)*``), or None. Possessive repeats and atomic groups do not backtrack and are
    allowed. Uses the standard library's own regex parser."""
    try:
        from re import _parser as sre  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - a Python without it: skip the check
        return None
    from re import _constants as c  # type: ignore[attr-defined]

    unbounded = c.MAXREPEAT

    def has_unbounded(items: Any) -> bool:
        for op, arg in items:
            if op in (c.MAX_REPEAT, c.MIN_REPEAT):
                if arg[1] == unbounded or has_unbounded(arg[2]):
                    return True
            elif op is c.SUBPATTERN:
                if has_unbounded(arg[3]):
                    return True
            elif op is c.BRANCH and any(has_unbounded(b) for b in arg[1]):
                return True
        return False

    def walk(items: Any) -> bool:
        for op, arg in items:
            if op in (c.MAX_REPEAT, c.MIN_REPEAT):
                if arg[1] > 1 and has_unbounded(arg[2]):
                    return True
                if walk(arg[2]):
                    return True
            elif op is c.SUBPATTERN:
                if walk(arg[3]):
                    return True
            elif op is c.BRANCH:
                if any(walk(b) for b in arg[1]):
                    return True
            elif op in (c.ASSERT, c.ASSERT_NOT) and walk(arg[1]):
                return True
        return False

    try:
        parsed = sre.parse(regex)
    except Exception:  # compiled fine above; be safe
        return None
    return regex if walk(parsed) else None


def parse_address(token: str) -> str | None:
    """``token`` as a normalised address string, or None. IPv4-mapped IPv6 is IPv4; a trailing
    ``:`` (``... address 2001:db8::1: Name or service not known``) is tolerated."""
    for text in (token, token[:-1] if token.endswith(":") else None):
        if not text:
            continue
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(address)
    return None


# --- syslog prefixes -------------------------------------------------------------------------

_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
)}  # fmt: skip
# RFC 5424 as written to a file (rsyslog RSYSLOG_SyslogProtocol23Format): <PRI>1 TS HOST APP
# PROCID MSGID SD MSG. SD is "-" or [..][..] (values may hold escaped "]": bounded, no nesting).
_RFC5424 = re.compile(
    r"<\d{1,3}>\d{1,2} (?P<ts>\S{10,40}) (?P<host>\S{1,255}) (?P<app>\S{1,48}) \S{1,128} "
    r"\S{1,32} (?:-|(?:\[(?:[^\]\\]|\\.){0,2048}\]){1,16}) ?\ufeff?"
)
# ISO 8601 / RFC 3339 (rsyslog's RSYSLOG_FileFormat, the default of Debian 13; journalctl -o
# short-iso) and exim's "YYYY-MM-DD HH:MM:SS[.ffffff][ +zzzz]".
_ISO = re.compile(
    r"(?:<\d{1,3}>)?(?P<date>\d{4}-\d\d-\d\d)[T ](?P<time>\d\d:\d\d:\d\d)(?:[.,]\d{1,9})?"
    r"(?P<tz>Z| ?[+-]\d\d:?\d\d)? "
)
# RFC 3164 (rsyslog's traditional format, Debian 12; Dovecot's own log_path; Postfix's
# maillog_file): "Mmm dd HH:MM:SS ", the day padded with a space or a zero.
_BSD = re.compile(
    r"(?:<\d{1,3}>)?(?P<mon>[A-Z][a-z]{2}) {1,2}(?P<day>\d{1,2}) (?P<time>\d\d:\d\d:\d\d) "
)
# After the time stamp: "[host ]tag[pid]: " or Dovecot's own "imap-login: ".
_TAG = re.compile(r"(?:[^\s:]{1,255} )?(?P<tag>[A-Za-z][\w./-]{0,63})(?:\[\d{1,10}\])?: ")
# exim's main log has no tag: "[pid] " and a message id may follow the time stamp.
_EXIM_PREFIX = re.compile(
    r"(?:\[\d{1,10}\] )?(?:[0-9A-Za-z]{6}-[0-9A-Za-z]{6,11}-[0-9A-Za-z]{2,4} )?"
)


# (program: the lower-case tag, "" when the line has none; the message; the time stamp's parts,
# converted only for hits)
_Split = tuple[str, str, tuple[str, ...] | None]


def _split(line: str) -> _Split:
    stamp: tuple[str, ...] | None = None
    rest = line
    if line.startswith("<"):
        m5424 = _RFC5424.match(line)
        if m5424:
            app = m5424["app"].lower()
            iso = _ISO.match(m5424["ts"] + " ")
            stamp = ("iso", iso["date"], iso["time"], iso["tz"] or "") if iso else None
            return ("" if app == "-" else app, line[m5424.end() :], stamp)
    m = _ISO.match(line)
    if m:
        stamp = ("iso", m["date"], m["time"], (m["tz"] or "").strip())
        rest = line[m.end() :]
    else:
        b = _BSD.match(line)
        if b:
            stamp = ("bsd", b["mon"], b["day"], b["time"])
            rest = line[b.end() :]
    tag = _TAG.match(rest)
    if tag:
        return (tag["tag"].lower(), rest[tag.end() :], stamp)
    exim = _EXIM_PREFIX.match(rest)
    return ("", rest[exim.end() :] if exim else rest, stamp)


def _epoch(stamp: tuple[str, ...] | None, now: float) -> float | None:
    """The time of a split time stamp, or None when it makes no sense. Stamps without a zone
    are local time; RFC 3164 has no year: the one that puts it nearest before ``now`` (a line
    up to a day in the future is this year's: clocks differ a little)."""
    if stamp is None:
        return None
    try:
        if stamp[0] == "iso":
            _, date, clock, tz = stamp
            parts = [int(x) for x in (*date.split("-"), *clock.split(":"))]
            fields = (*parts, 0, 0, -1)
            if tz:
                seconds = calendar.timegm(fields)
                if tz != "Z":
                    sign = 1 if tz[0] == "+" else -1
                    digits = tz[1:].replace(":", "")
                    seconds -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
                return float(seconds)
            return time.mktime(fields)  # type: ignore[arg-type]
        _, mon, day, clock = stamp
        hour, minute, second = (int(x) for x in clock.split(":"))
        year = time.localtime(now).tm_year
        for candidate in (year, year - 1):
            at = time.mktime((candidate, _MONTHS[mon], int(day), hour, minute, second, 0, 0, -1))
            if at <= now + 86400:
                return at
        return None
    except (KeyError, ValueError, OverflowError, IndexError):
        return None


# --- the built-in formats ----------------------------------------------------------------------

_IP = r"(?P<ip>[0-9A-Fa-f:.]{2,45})"
_PORT = r"(?::\d{1,5})?"
# Postfix's client: "name[ip]" (name "unknown" when it has none), postscreen "[ip]:port".
_PF_CLIENT = rf"[^\s\[\]]{{0,255}}\[{_IP}\]{_PORT}"
_POSTFIX: tuple[tuple[str, str, re.Pattern[str]], ...] = (
    (
        "reject: ",
        "",  # both rules: postfix-reject (5xx) and postfix-reject-temp (4xx)
        re.compile(
            rf"(?:NOQUEUE|[0-9A-Za-z]{{5,32}}): (?:milter-)?reject: [A-Z-]{{2,16}} from "
            rf"{_PF_CLIENT}: (?P<code>[45])\d\d "
        ),
    ),
    (
        "SASL",
        "postfix-sasl",
        re.compile(rf"warning: {_PF_CLIENT}: SASL [\w-]{{1,32}} authentication failed"),
    ),
    (
        "lost connection after AUTH",
        "postfix-lost-auth",
        re.compile(rf"lost connection after AUTH from {_PF_CLIENT}"),
    ),
    (
        "improper command pipelining",
        "postfix-pipelining",
        re.compile(rf"improper command pipelining after [A-Za-z-]{{1,16}} from {_PF_CLIENT}"),
    ),
    (
        "PREGREET",
        "postfix-pregreet",
        re.compile(rf"PREGREET \d{{1,9}} after [\d.]{{1,16}} from \[{_IP}\]{_PORT}"),
    ),
    (
        "too many errors",
        "postfix-errors",
        re.compile(rf"too many errors after [A-Za-z-]{{1,16}} from {_PF_CLIENT}"),
    ),
    (
        "does not resolve",
        "postfix-no-fcrdns",
        re.compile(
            rf"warning: hostname [^\s\[\]]{{1,255}} does not resolve to address {_IP}(?:$|[: ])"
        ),
    ),
)

# exim's client: "name (helo) [ip]:port", each of name and (helo) optional.
_EXIM_HOST = rf"(?:[^\s()\[\]]{{1,255}} )?(?:\([^()]{{0,255}}\) )?\[{_IP}\]{_PORT}"
_EXIM_AUTH = re.compile(
    rf"[\w-]{{1,64}} authenticator failed for {_EXIM_HOST}(?: I=\[[0-9A-Fa-f:.]{{2,45}}\]"
    rf"{_PORT})?: 535 "
)
_EXIM_H = re.compile(rf"H={_EXIM_HOST}(?= )")
_EXIM_REJECTED = re.compile(r" rejected (?:RCPT|MAIL|connection|EHLO|HELO|after|by|VRFY|EXPN)\b")
_EXIM_SYNC = re.compile(
    r"SMTP protocol synchronization error \(input sent without waiting for greeting\): "
    rf"rejected connection from H={_EXIM_HOST}(?= |$)"
)
_EXIM_DROPPED = re.compile(
    rf"SMTP call from {_EXIM_HOST}(?: I=\[[0-9A-Fa-f:.]{{2,45}}\]{_PORT})? dropped: too many "
)

# Dovecot's login processes: one line when a client that tried goes away. What precedes the
# first ": user=<", ": method=" or ": rip=" (the reason: "Disconnected: Connection closed:
# read(...) failed (auth failed, 2 attempts in 5 secs)") is the server's own text.
_DOVECOT = re.compile(
    r"\((?:auth failed, (?P<n>\d{1,9}) attempts?|(?P<none>no auth attempts)|"
    r"(?P<plain>tried to use (?:disabled|disallowed) plaintext auth))"
)
_DOVECOT_FIELDS = (": user=<", ": method=", ": rip=")
_DOVECOT_LOGIN = re.compile(r"(?:[a-z0-9]{1,24}-login: )?(?:Info: )?")


# A word every built-in format's line contains (a cheap test before any regex).
_KEYWORDS = (
    "auth failed", "auth attempts", "plaintext auth", "reject", "SASL", "AUTH from",
    "pipelining", "PREGREET", "too many", "does not resolve", "authenticator failed",
)  # fmt: skip
_ANY_KEYWORD = re.compile("|".join(re.escape(word) for word in _KEYWORDS))


class LineParser:
    """One log line -> at most one :class:`Hit`.

    ``weights``: built-in rule name -> weight (missing names take their default; 0 turns a rule
    off). ``patterns``: the operator's, tried first in order; the first that matches decides
    (a pattern of weight 0 is an exception: the line counts nothing). ``max_line``: longer lines
    are skipped. ``families``: the built-in formats in use (default all).
    """

    def __init__(
        self,
        weights: Mapping[str, int] | None = None,
        patterns: Sequence[Pattern] = (),
        *,
        max_line: int = DEFAULT_MAX_LINE,
        families: Iterable[str] = FAMILIES,
    ) -> None:
        unknown = set(weights or {}) - set(BUILTIN_RULES)
        if unknown:
            raise ValueError(f"unknown built-in rule(s): {', '.join(sorted(unknown))}")
        self.weights = {name: rule.weight for name, rule in BUILTIN_RULES.items()}
        self.weights.update(weights or {})
        self.patterns = tuple(patterns)
        self.max_line = max_line
        self.families = frozenset(families)
        self._by_program: dict[str, Callable[[str], tuple[str, str, int] | None] | None] = {}

    def parse(self, line: str, now: float) -> Hit | None:
        """The hit of ``line`` (without its line break), or None. ``now`` places RFC 3164 time
        stamps (which have no year) in the right year."""
        if len(line) > self.max_line:
            return None
        for pattern in self.patterns:
            m = pattern.regex.search(line)
            if m is None:
                continue
            ip = parse_address(m["ip"] or "")
            if ip is None or pattern.weight == 0:
                return None
            return Hit(ip, pattern.rule, pattern.weight, _epoch(_split(line)[2], now))
        if _ANY_KEYWORD.search(line) is None:
            return None  # most lines of a mail log: no built-in format can match
        program, message, stamp = _split(line)
        family = self._family(program)
        if family is None:
            return None
        found = family(message)
        if found is None:
            return None
        token, rule, times = found
        weight = self.weights[rule] * times
        if weight <= 0:
            return None
        ip = parse_address(token)
        if ip is None:
            return None
        return Hit(ip, rule, weight, _epoch(stamp, now))

    def _family(self, program: str) -> Callable[[str], tuple[str, str, int] | None] | None:
        try:
            return self._by_program[program]
        except KeyError:
            pass
        if program.startswith("postfix"):
            family = "postfix"
        elif program == "dovecot" or program.endswith("-login"):
            family = "dovecot"
        elif program.startswith("exim") or program == "":
            family = "exim"
        else:
            family = ""
        parser = (
            {
                "dovecot": _dovecot,
                "postfix": _postfix,
                "exim": _exim,
            }.get(family)
            if family in self.families
            else None
        )
        if len(self._by_program) < 4096:  # programs are few; never let a log grow this cache
            self._by_program[program] = parser
        return parser


def _dovecot(message: str) -> tuple[str, str, int] | None:
    message = message[_DOVECOT_LOGIN.match(message).end() :]  # type: ignore[union-attr]
    ends = [e for e in (message.find(f, 0, 400) for f in _DOVECOT_FIELDS) if e > 0]
    if not ends:
        return None
    m = _DOVECOT.search(message, 0, min(ends))
    if m is None:
        return None
    at = message.rfind("rip=")
    if message[at - 1] != " ":
        return None
    token = message[at + 4 : at + 4 + 46].split(",", 1)[0].split(" ", 1)[0]
    if m["n"] is not None:
        return token, "dovecot-auth", max(1, min(int(m["n"]), MAX_ATTEMPTS))
    if m["none"] is not None:
        return token, "dovecot-no-auth", 1
    return token, "dovecot-plaintext", 1


def _postfix(message: str) -> tuple[str, str, int] | None:
    head = message[:80]
    for needle, rule, regex in _POSTFIX:
        if needle not in head:
            continue
        m = regex.match(message)
        if m is None:
            continue
        if not rule:
            rule = "postfix-reject" if m["code"] == "5" else "postfix-reject-temp"
        return m["ip"], rule, 1
    return None


def _exim(message: str) -> tuple[str, str, int] | None:
    if message.startswith("H="):
        m = _EXIM_H.match(message)
        if m is not None and _EXIM_REJECTED.search(message, m.end()):
            return m["ip"], "exim-reject", 1
        return None
    if message.startswith("SMTP "):
        m = _EXIM_SYNC.match(message) or _EXIM_DROPPED.match(message)
        if m is None:
            return None
        return m["ip"], "exim-sync" if message[5] == "p" else "exim-dropped", 1
    if " authenticator failed for " in message[:90]:
        m = _EXIM_AUTH.match(message)
        if m is not None:
            return m["ip"], "exim-auth", 1
    return None
