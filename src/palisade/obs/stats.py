"""Statistics over the gateway's own log lines: what ``palisade stats`` counts.

Owns: the reading of ``mainlog`` in every shape :mod:`palisade.obs.log` and its callers write it
(arrival ``<=`` lines with ``X=`` and ``spam=``, refusals ``H=... [temporarily ]rejected ...:
text``, ``Warning:`` and observe-mode ``would ...:`` lines, protocol and connection-limit
refusals, TLS errors, delivery ``=>``/``==``/``**`` lines, exim's ``authenticator failed``), the
rotated files beside it (``mainlog.1``, ``mainlog.2.gz``, ``mainlog-20261201.gz``), and the
aggregation into one :class:`Stats` record (its :meth:`Stats.as_json` keys are stable).
Pure: no config, no clock of its own (the caller passes the ``since`` cutoff), no output.

Which rule refused: a refusal line holds the rule's ``log_message`` as filled in, not the rule's
name, so each line's text is matched against the configured rules' ``log_message`` templates
(:class:`RuleText`, from the config the caller loaded): placeholders match any text, the
template with the most literal text wins. The refusals the gateway makes itself (relay control,
protocol errors, connection limits, message format, the scanner rules) have fixed names. A rule
whose lookup failed is named by the ``rule "NAME": temporary failure`` line just before its
refusal. Give rules distinct ``log_message`` texts: two rules with the same text are counted as
the first of them.

Trust: none. Every line is client-influenced (HELO names, addresses, Message-IDs are escaped by
the writer but still chosen by the client): fields are found by the structure the writer
guarantees (the only ``[`` of a line is the client's address; ``<...>`` fields hold no ``<`` or
``>``), a line that does not parse is counted in ``malformed`` and skipped, never raised on, and
every string kept here is output text for the caller to escape (HTML, terminal).
"""

from __future__ import annotations

import contextlib
import gzip
import re
import string
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from palisade.obs.log import escape_field

# Stage names as the refusal line tells them (after delay_reject, the stage that refused).
STAGES = ("connect", "helo", "mail", "rcpt", "data", "protocol")

_STAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")
_QID = re.compile(r"[0-9A-Za-z]{6}-[0-9A-Za-z]{6}-[0-9A-Za-z]{2} ")
# exim's H= field as Palisade writes it: "(helo) " only after HELO/EHLO; the HELO is escaped (no
# brackets), so the first "[" of the field is the client's address.
_HOST = re.compile(r"H=(?:\((?P<helo>[^\[\]]*)\) )?\[(?P<ip>[0-9A-Fa-f:.]{2,45})\]:(?P<port>\d+)")
_AFTER_HOST = re.compile(
    r"(?: F=<(?P<sender>[^<>]*)>)?(?: T=(?P<rcpts>(?:<[^<>]*>,?)+))? (?P<rest>.*)\Z", re.S
)
_REFUSAL = re.compile(
    r"(?P<temp>temporarily )?rejected (?:"
    r'(?P<connect>connection in "connect" ACL)|EHLO or HELO (?P<helo>\S*)|'
    r"MAIL <(?P<mail>[^<>]*)>|RCPT <(?P<rcpt>[^<>]*)>|(?P<data>after DATA)): (?P<text>.*)\Z",
    re.S,
)
_ARRIVAL = re.compile(
    r" P=(?P<proto>\S+)(?: X=(?P<tls>\S+))? S=\d+"
    r"(?: spam=(?P<spam>-?\d+(?:\.\d+)?|unchecked|skipped)(?= |\Z)| (?!spam=)|\Z)"
)
_RULE_ERROR = re.compile(r'(?P<stage>\w+) rule "(?P<rule>[^"]*)"(?P<how>: temporary failure|)')
_LOOKUP_FAILED = re.compile(r"(?:DEFER|DENY|DROP) - \S+ lookup failed")
_AUTH = re.compile(
    r"(?P<mech>[\w-]{1,64}) authenticator failed for (?:H=)?(?:[^\s()\[\]]{1,255} )?"
    r"(?:\([^\[\]]{0,300}\) )?\[(?P<ip>[0-9A-Fa-f:.]{2,45})\]"
)
_BRACKET_IP = re.compile(r"\[(?P<ip>[0-9A-Fa-f:.]{2,45})\]:\d+")
_LISTED_AT = re.compile(r"is listed at (?P<zone>[A-Za-z0-9_.-]+) \(")
# The implied kill rule's text; the writer escapes its ">" (escape_field).
_SPAM_KILL = re.compile(r"spam score (?P<score>-?\d+(?:\.\d+)?) (?:>|\\x3e)= (?P<level>\S+) \(")
_VIRUS = re.compile(r"virus found: (?P<virus>.*)\Z", re.S)
_ROTATED = re.compile(r"(?:\.(?P<n>\d+)|-(?P<date>\d{8,10}))(?P<gz>\.gz)?\Z")

# The refusals the gateway makes without a configured rule: (stage, rule, temporary).
RELAY = "relay control"
MESSAGE_FORMAT = "message format"
UNKNOWN = "(unattributed)"
LOOKUP_FAILURE = "(lookup failure)"


@dataclass(frozen=True)
class RuleText:
    """What the stats need of one configured rule: its name, stage, check and ``log_message``
    template as the engine fills it (``"{name}: $reason"`` when the rule has none)."""

    name: str
    stage: str
    check: str
    template: str
    verb: str = "deny"


class _Template:
    """One rule's ``log_message`` as a regex over the escaped, filled-in text."""

    def __init__(self, order: int, rule: RuleText) -> None:
        self.order = order
        self.rule = rule
        pattern: list[str] = []
        self.groups: dict[str, str] = {}  # regex group -> placeholder name
        literal_len = 0
        prefix: str | None = None
        for part in _parse_template(rule.template):
            if isinstance(part, str):
                escaped = escape_field(part, 1 << 20)
                literal_len += len(escaped)
                pattern.append(re.escape(escaped))
                if prefix is None:
                    prefix = escaped
            else:
                group = f"g{len(self.groups)}"
                self.groups[group] = part[0]
                pattern.append(f"(?P<{group}>.*?)")
                if prefix is None:
                    prefix = ""
        self.prefix = prefix or ""
        self.literal = literal_len
        self.regex = re.compile("".join(pattern) + r"\Z", re.S)

    def match(self, text: str) -> dict[str, str] | None:
        if not text.startswith(self.prefix):
            return None
        found = self.regex.match(text)
        if found is None:
            if text.endswith("...") and len(text) >= 400 and self.prefix:
                return {}  # the writer cut a long text: its literal start names the rule
            return None
        return {self.groups[g]: v for g, v in found.groupdict().items() if v is not None}


def _parse_template(template: str) -> list[str | tuple[str]]:
    """Literal strings and (placeholder name,) items, as ``string.Template`` reads it."""
    parts: list[str | tuple[str]] = []
    done = 0
    for match in string.Template.pattern.finditer(template):
        if match.start() > done:
            parts.append(template[done : match.start()])
        done = match.end()
        named = match.group("named") or match.group("braced")
        if named is not None:
            parts.append((named,))
        elif match.group("escaped") is not None:
            parts.append("$")
        else:
            parts.append(match.group())
    if done < len(template):
        parts.append(template[done:])
    merged: list[str | tuple[str]] = []
    for part in parts:
        if isinstance(part, str) and merged and isinstance(merged[-1], str):
            merged[-1] = merged[-1] + part
        else:
            merged.append(part)
    return merged


@dataclass
class Stats:
    """Everything counted; the caller renders it (text, JSON, HTML)."""

    since: str | None = None  # local time of the cutoff, "YYYY-MM-DD HH:MM:SS"
    by: str = "hour"
    files: list[str] = field(default_factory=list)
    first: str | None = None
    last: str | None = None
    lines: int = 0
    malformed: int = 0
    accepted: int = 0
    bounces: int = 0  # our own delivery status notifications (<= <> ... P=local)
    refused: int = 0
    deferred: int = 0
    refused_by_stage: Counter[str] = field(default_factory=Counter)
    deferred_by_stage: Counter[str] = field(default_factory=Counter)
    refused_by_rule: Counter[str] = field(default_factory=Counter)
    deferred_by_rule: Counter[str] = field(default_factory=Counter)
    warned_by_rule: Counter[str] = field(default_factory=Counter)
    observed_by_rule: Counter[str] = field(default_factory=Counter)
    rule_errors: Counter[str] = field(default_factory=Counter)
    refused_ips: Counter[str] = field(default_factory=Counter)
    refused_sender_domains: Counter[str] = field(default_factory=Counter)
    refused_helos: Counter[str] = field(default_factory=Counter)
    dnsbl: dict[str, Counter[str]] = field(default_factory=dict)  # zone -> action -> n
    spam_scores: list[float] = field(default_factory=list)  # accepted and killed messages
    spam_killed: int = 0
    spam_tagged: int = 0
    spam_unchecked: int = 0
    spam_skipped: int = 0
    tag_level: float | None = None
    kill_level: float | None = None
    viruses: Counter[str] = field(default_factory=Counter)
    tls_messages: int = 0
    tls_versions: Counter[str] = field(default_factory=Counter)
    tls_errors: int = 0
    auth_failures: int = 0
    auth_failures_by_mechanism: Counter[str] = field(default_factory=Counter)
    auth_failure_ips: Counter[str] = field(default_factory=Counter)
    delivered: int = 0
    delivery_deferred: int = 0
    delivery_failed: int = 0
    timeline: dict[str, Counter[str]] = field(default_factory=dict)  # bucket -> rule -> n

    @property
    def tls_share(self) -> float | None:
        return self.tls_messages / self.accepted if self.accepted else None

    def as_json(self, top: int = 10) -> dict[str, Any]:
        """The numbers as plain JSON types; the keys are an interface (README, "palisade
        stats")."""

        def top_of(counter: Counter[str]) -> list[list[Any]]:
            return [[key, n] for key, n in _ranked(counter)[:top]]

        return {
            "period": {
                "since": self.since,
                "first": self.first,
                "last": self.last,
                "by": self.by,
            },
            "files": list(self.files),
            "lines": self.lines,
            "malformed": self.malformed,
            "accepted": self.accepted,
            "refused": self.refused,
            "deferred": self.deferred,
            "bounces": self.bounces,
            "refused_by_stage": _plain(self.refused_by_stage),
            "deferred_by_stage": _plain(self.deferred_by_stage),
            "refused_by_rule": _plain(self.refused_by_rule),
            "deferred_by_rule": _plain(self.deferred_by_rule),
            "warned_by_rule": _plain(self.warned_by_rule),
            "observed_by_rule": _plain(self.observed_by_rule),
            "rule_errors": _plain(self.rule_errors),
            "top_refused_ips": top_of(self.refused_ips),
            "top_refused_sender_domains": top_of(self.refused_sender_domains),
            "top_refused_helos": top_of(self.refused_helos),
            "dnsbl": {zone: _plain(actions) for zone, actions in sorted(self.dnsbl.items())},
            "spam": {
                "scanned": len(self.spam_scores),
                "tagged": self.spam_tagged,
                "killed": self.spam_killed,
                "unchecked": self.spam_unchecked,
                "skipped": self.spam_skipped,
                "tag_level": self.tag_level,
                "kill_level": self.kill_level,
                "histogram": self.histogram(),  # the last bin holds every higher score
            },
            "viruses": _plain(self.viruses),
            "tls": {
                "messages": self.tls_messages,
                "share": None if self.tls_share is None else round(self.tls_share, 4),
                "versions": _plain(self.tls_versions),
                "errors": self.tls_errors,
            },
            "auth_failures": {
                "total": self.auth_failures,
                "by_mechanism": _plain(self.auth_failures_by_mechanism),
                "top_ips": top_of(self.auth_failure_ips),
            },
            "delivery": {
                "delivered": self.delivered,
                "deferred": self.delivery_deferred,
                "failed": self.delivery_failed,
            },
            "timeline": {bucket: _plain(rules) for bucket, rules in sorted(self.timeline.items())},
        }

    def histogram_range(self) -> tuple[int, int] | None:
        """The first and last whole-point bin: from the lowest score (at least -10) to the
        highest (at most 10 above the kill or tag level, or 30); scores outside are counted in
        the end bins (GTUBE scores 1000)."""
        if not self.spam_scores:
            return None
        levels = [level for level in (self.kill_level, self.tag_level) if level is not None]
        ceiling = int(_floor(max(levels))) + 10 if levels else 30
        low = max(-10, int(_floor(min(self.spam_scores))))
        high = min(ceiling, int(_floor(max(self.spam_scores))))
        return min(low, high), high

    def histogram(self) -> list[list[int]]:
        """Whole-point bins ``[low, count]`` (a score s is in bin floor(s)); the first and
        last bins also hold the scores beyond them (:meth:`histogram_range`)."""
        bounds = self.histogram_range()
        if bounds is None:
            return []
        low, high = bounds
        bins = Counter(min(high, max(low, int(_floor(score)))) for score in self.spam_scores)
        return [[b, bins.get(b, 0)] for b in range(low, high + 1)]


def _floor(value: float) -> float:
    whole = int(value)
    return whole - 1 if value < whole else whole


def _ranked(counter: Counter[str]) -> list[tuple[str, int]]:
    return sorted(counter.items(), key=lambda item: (-item[1], item[0]))


def _plain(counter: Counter[str]) -> dict[str, int]:
    return dict(_ranked(counter))


class StatsCollector:
    """Feed it lines (:meth:`feed`) or files (:meth:`read`); :attr:`stats` holds the counts.

    ``since``: lines stamped before this local time text (``YYYY-MM-DD HH:MM:SS``) are left out
    (compared as text: the stamp sorts as it reads). ``rules``: the configured rules, in the
    order the config gives them. ``tag_level``/``kill_level``: the spam scanner's.
    """

    def __init__(
        self,
        rules: Sequence[RuleText] = (),
        *,
        since: str | None = None,
        by: str = "hour",
        tag_level: float | None = None,
        kill_level: float | None = None,
    ) -> None:
        if by not in ("hour", "day"):
            raise ValueError(f"by: expected hour or day, got {by!r}")
        self.stats = Stats(since=since, by=by, tag_level=tag_level, kill_level=kill_level)
        self._since = since
        self._bucket = 13 if by == "hour" else 10
        self._templates = [_Template(i, rule) for i, rule in enumerate(rules)]
        self._escaped_names = {escape_field(rule.name): rule.name for rule in rules}
        self._pending: dict[str, str] = {}  # "ip:port" -> rule whose lookup failed just now

    # -- files -------------------------------------------------------------------------------
    def read(self, path: Path) -> None:
        """Every line of ``path`` (gzip'd when its name ends in ``.gz``)."""
        self.stats.files.append(str(path))
        for line in read_lines(path):
            self.feed(line)

    # -- lines -------------------------------------------------------------------------------
    def feed(self, line: str) -> None:
        line = line.rstrip("\n")
        if not line:
            return
        if _STAMP.match(line) is None:
            self.stats.lines += 1
            self.stats.malformed += 1
            return
        stamp = line[:19]
        if self._since is not None and stamp < self._since:
            return
        stats = self.stats
        stats.lines += 1
        if stats.first is None or stamp < stats.first:
            stats.first = stamp
        if stats.last is None or stamp > stats.last:
            stats.last = stamp
        rest = line[20:]
        try:
            ok = self._line(stamp, rest)
        except (ValueError, IndexError):
            ok = False
        if not ok:
            stats.malformed += 1

    def _line(self, stamp: str, rest: str) -> bool:
        """Counts one line; False: a line of a known kind that does not parse."""
        if _QID.match(rest):
            return self._queue_line(rest[17:])
        if rest.startswith("H="):
            return self._host_line(stamp, rest)
        if rest.startswith("SMTP "):
            return self._protocol_line(stamp, rest)
        if rest.startswith("Connection from ["):
            found = _BRACKET_IP.match(rest, len("Connection from "))
            if found is None or " refused: too many connections" not in rest:
                return False
            rule = "connections per IP" if "from that IP" in rest else "connections"
            self._refusal(stamp, "connect", rule, found["ip"], temporary=True)
            return True
        if rest.startswith("TLS error on connection from "):
            self.stats.tls_errors += 1
            return True
        if " authenticator failed for " in rest[:100]:
            found = _AUTH.match(rest)
            if found is None:
                return False
            self.stats.auth_failures += 1
            self.stats.auth_failures_by_mechanism[found["mech"]] += 1
            self.stats.auth_failure_ips[found["ip"]] += 1
            return True
        return True  # a daemon line (start, reload, probes): nothing to count

    def _queue_line(self, rest: str) -> bool:
        stats = self.stats
        if rest.startswith("<= "):
            if rest.startswith("<= <> R="):
                stats.bounces += 1
                return True
            host = _find_host(rest)
            if host is None:
                return False
            found = _ARRIVAL.match(rest, host.end())
            if found is None:
                return False
            stats.accepted += 1
            if found["tls"]:
                stats.tls_messages += 1
                stats.tls_versions[found["tls"].split(":", 1)[0]] += 1
            spam = found["spam"]
            if spam == "unchecked":
                stats.spam_unchecked += 1
            elif spam == "skipped":
                stats.spam_skipped += 1
            elif spam is not None:
                score = float(spam)
                stats.spam_scores.append(score)
                if stats.tag_level is not None and score >= stats.tag_level:
                    stats.spam_tagged += 1
            return True
        if rest.startswith("=> "):
            stats.delivered += 1
        elif rest.startswith("== "):
            stats.delivery_deferred += 1
        elif rest.startswith("** "):
            stats.delivery_failed += 1
        return True

    def _host_line(self, stamp: str, rest: str) -> bool:
        host = _HOST.match(rest)
        if host is None:
            return False
        after = _AFTER_HOST.match(rest, host.end())
        if after is None:
            return False
        text = after["rest"]
        key = f"{host['ip']}:{host['port']}"
        if text.startswith("Warning: "):
            self._matched(self.stats.warned_by_rule, text[9:], "", "warned")
            return True
        if text.startswith("would "):
            verb_text = text.split(": ", 1)
            if len(verb_text) == 2:
                self._matched(self.stats.observed_by_rule, verb_text[1], "", "observed")
            return True
        failure = _RULE_ERROR.match(text)
        if failure is not None:
            rule = self._escaped_names.get(failure["rule"], failure["rule"])
            self.stats.rule_errors[rule] += 1
            if failure["how"]:  # the refusal line comes next
                if len(self._pending) > 10_000:
                    self._pending.clear()
                self._pending[key] = rule
            return True
        refusal = _REFUSAL.match(text)
        if refusal is None:
            return True  # rate, pregreet, timeouts, disconnections, DKIM notes
        if refusal["connect"]:
            stage = "connect"
        elif refusal["helo"] is not None:
            stage = "helo"
        elif refusal["mail"] is not None:
            stage = "mail"
        elif refusal["rcpt"] is not None:
            stage = "rcpt"
        else:
            stage = "data"
        sender = after["sender"]
        if sender is None and refusal["mail"] is not None:
            sender = refusal["mail"]
        message = refusal["text"]
        temporary = refusal["temp"] is not None
        if after["rcpts"] is not None and stage == "data":
            rule = MESSAGE_FORMAT  # the message broke SMTP's rules: no rule saw it
        elif message.startswith(("relay attempt refused", "relay refused", "relay not permitted")):
            rule = RELAY
        elif _LOOKUP_FAILED.match(message):
            rule = self._pending.pop(key, LOOKUP_FAILURE)
        elif message.startswith("DKIM key for "):
            rule = "dkim signing"
        else:
            action = "deferred" if temporary else "refused"
            rule = self._matched(None, message, stage, action)
        self._pending.pop(key, None)
        self._refusal(
            stamp,
            stage,
            rule,
            host["ip"],
            temporary=temporary,
            sender=sender,
            helo=host["helo"],
        )
        return True

    def _protocol_line(self, stamp: str, rest: str) -> bool:
        host = _HOST.search(rest)
        if host is None:
            return False
        if rest.startswith("SMTP protocol synchronization error (input sent without waiting"):
            rule, temporary = "pregreet", False
        elif rest.startswith("SMTP protocol synchronization error"):
            rule, temporary = "pipelining", False
        elif rest.startswith('SMTP protocol error in "AUTH '):
            rule, temporary = "AUTH not advertised", False
        elif rest.startswith("SMTP protocol error in "):
            rule, temporary = "protocol error", False
        elif rest.startswith("SMTP call from ") and " dropped: too many " in rest:
            rule, temporary = "too many errors", True
        else:
            return True
        self._refusal(stamp, "protocol", rule, host["ip"], temporary=temporary, helo=host["helo"])
        return True

    def _matched(self, counter: Counter[str] | None, text: str, stage: str, action: str) -> str:
        """The rule whose template fits ``text`` (counted in ``counter``), and what its
        values say: DNSBL zones, spam scores, virus names."""
        best: tuple[int, int, int] | None = None
        chosen: _Template | None = None
        values: dict[str, str] = {}
        for template in self._templates:
            found = template.match(text)
            if found is None:
                continue
            rank = (template.literal, template.rule.stage == stage, -template.order)
            if best is None or rank > best:
                best, chosen, values = rank, template, found
        stats = self.stats
        builtin = self._builtin(text, action) if chosen is None or not chosen.literal else None
        if builtin is not None:  # the scanners' texts beat a template of placeholders only
            rule = builtin
        elif chosen is None:
            rule = UNKNOWN
        else:
            rule = chosen.rule.name
            check = chosen.rule.check
            if check in ("dnsbl", "dbl"):
                self._dnsbl(values, text, action)
            elif check == "spam_score" and action == "refused":
                score = values.get("spam_score")
                self._killed(score if score is not None else _kill_score(text))
            elif check == "virus" and action == "refused":
                name = values.get("virus") or _virus_name(text)
                if name:
                    stats.viruses[name] += 1
        if counter is not None:
            counter[rule] += 1
        return rule

    def _builtin(self, text: str, action: str) -> str | None:
        """The scanners' implied rules, whatever kill level the log was written with (counted
        here), or None."""
        if action == "refused":
            score = _kill_score(text)
            if score is not None:
                self._killed(score)
                return "spam kill level"
            name = _virus_name(text)
            if name:
                self.stats.viruses[name] += 1
                return "clamd"
        return None

    def _killed(self, score: str | None) -> None:
        self.stats.spam_killed += 1
        if score is not None:
            with contextlib.suppress(ValueError):
                self.stats.spam_scores.append(float(score))

    def _dnsbl(self, values: dict[str, str], text: str, action: str) -> None:
        zones: list[str] = []
        if values.get("zones"):
            zones = [z.strip() for z in values["zones"].split(",") if z.strip()]
        elif values.get("zone"):
            zones = [values["zone"]]
        else:
            found = _LISTED_AT.search(text)
            if found is not None:
                zones = [found["zone"]]
        for zone in zones or ["(zone not logged)"]:
            self.stats.dnsbl.setdefault(zone, Counter())[action] += 1

    def _refusal(
        self,
        stamp: str,
        stage: str,
        rule: str,
        ip: str,
        *,
        temporary: bool,
        sender: str | None = None,
        helo: str | None = None,
    ) -> None:
        stats = self.stats
        if temporary:
            stats.deferred += 1
            stats.deferred_by_stage[stage] += 1
            stats.deferred_by_rule[rule] += 1
            return
        stats.refused += 1
        stats.refused_by_stage[stage] += 1
        stats.refused_by_rule[rule] += 1
        stats.refused_ips[ip] += 1
        if sender is not None:
            domain = sender.rpartition("@")[2].lower() if "@" in sender else "<>"
            stats.refused_sender_domains[domain or "<>"] += 1
        if helo is not None:
            stats.refused_helos[helo] += 1
        bucket = stamp[: self._bucket] + (":00" if self._bucket == 13 else "")
        stats.timeline.setdefault(bucket, Counter())[rule] += 1


def _find_host(rest: str) -> re.Match[str] | None:
    """The arrival line's H= field: the first `` H=`` from which the field parses (the sender
    before it is escaped, so it holds no bracket and cannot fake the address)."""
    start = 0
    while True:
        at = rest.find(" H=", start)
        if at < 0:
            return None
        found = _HOST.match(rest, at + 1)
        if found is not None:
            return found
        start = at + 1


def _kill_score(text: str) -> str | None:
    found = _SPAM_KILL.match(text)
    return found["score"] if found is not None else None


def _virus_name(text: str) -> str | None:
    found = _VIRUS.match(text)
    return found["virus"] if found is not None else None


# -- files --------------------------------------------------------------------------------------


def read_lines(path: Path) -> Iterator[str]:
    """The lines of a log file, gzip'd or not; undecodable bytes become U+FFFD (the line then
    parses or is counted as malformed, never raises)."""
    if path.name.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as text:
            yield from text
    else:
        with path.open(encoding="utf-8", errors="replace") as text:
            yield from text


def log_files(
    directory: Path, name: str = "mainlog", since_epoch: float | None = None
) -> list[Path]:
    """``name`` and its rotated copies in ``directory``, oldest first: ``name.N[.gz]`` (higher
    N older) and ``name-DATE[.gz]`` (logrotate's ``dateext``). A rotated file last written
    before ``since_epoch`` holds only older lines and is left out."""
    rotated: list[tuple[tuple[int, int], Path]] = []
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return []
    for path in entries:
        if not path.name.startswith(name) or not path.is_file():
            continue
        suffix = path.name[len(name) :]
        if suffix == "":
            continue
        found = _ROTATED.match(suffix)
        if found is None:
            continue
        if since_epoch is not None and path.stat().st_mtime < since_epoch:
            continue
        if found["n"] is not None:
            rotated.append(((0, -int(found["n"])), path))
        else:
            rotated.append(((-1, int(found["date"])), path))
    files = [path for _, path in sorted(rotated)]
    current = directory / name
    if current.is_file():
        files.append(current)
    return files


def collect(
    paths: Iterable[Path],
    rules: Sequence[RuleText] = (),
    **options: Any,
) -> Stats:
    """Counts every line of ``paths`` (in order); options as :class:`StatsCollector`."""
    collector = StatsCollector(rules, **options)
    for path in paths:
        collector.read(path)
    return collector.stats
