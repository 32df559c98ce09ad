"""Loads and validates the TOML config; every mistake becomes one precise ``ConfigError``.

Owns: turning the operator's file into a frozen :class:`~palisade.config.model.Config`. An unknown
section or key, a wrong type, a bad value or a missing file is refused with the file name, the
key, the line (found by a search of the source text: ``tomllib`` does not report it) and what was
expected. Trust: the file is operator input, trusted in intent but not in form.
"""

from __future__ import annotations

import dataclasses
import grp
import ipaddress
import os
import pwd
import re
import ssl
import string
import tomllib
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

from palisade.config.model import (
    TLS_LEVELS,
    Config,
    ListSpec,
    RuleSpec,
    ScanConfig,
    ScanPatternSpec,
)

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
_NFT_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}\Z")  # [firewall] table

_SELECTOR_RE = re.compile(
    r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_][A-Za-z0-9_-]{0,62})*$"
)


class ConfigError(Exception):
    """A config the server must not start with; ``str()`` is the operator-facing message."""

    def __init__(self, source: str, key: str, problem: str, line: int | None = None) -> None:
        where = f"{source}:{line}" if line else source
        super().__init__(f"config error in {where}: {key}: {problem}")
        self.source, self.key, self.problem, self.line = source, key, problem, line


def default_config_text() -> str:
    """The bundled default config (loopback port, demo domain, Maildir under ./var)."""
    return resources.files("palisade.config").joinpath("default.toml").read_text()


# Where an installed Palisade keeps its config (``make install``); every command reads it when
# ``--config`` is not given and it exists. ``PALISADE_CONFIG`` names another file instead (the
# tests point it at a file that does not exist, so a developer's /etc never leaks into them).
SYSTEM_CONFIG = Path("/etc/palisade/palisade.toml")
BUNDLED_SOURCE = "<bundled default.toml>"


def system_config_path() -> Path:
    """``/etc/palisade/palisade.toml``, or the file ``PALISADE_CONFIG`` names."""
    return Path(os.environ.get("PALISADE_CONFIG") or SYSTEM_CONFIG)


def resolve_config_path(path: Path | None) -> Path | None:
    """The file a command reads: ``path`` (``--config``) if given, else the system config if it
    exists, else None (the bundled demo)."""
    if path is not None:
        return path
    system = system_config_path()
    return system if system.exists() else None


def load_config(path: Path | None = None) -> Config:
    """Reads ``path`` (or the bundled default) and returns a validated config."""
    if path is None:
        return parse_config(default_config_text(), BUNDLED_SOURCE)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), "(file)", "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), "(file)", f"cannot be read: {exc}") from None
    return parse_config(text, str(path))


def parse_config(text: str, source: str) -> Config:
    """Parses config text; ``source`` is used in error messages only."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = _line_from_decode_error(str(exc))
        raise ConfigError(source, "(syntax)", f"not valid TOML: {exc}", line) from None
    finder = _LineFinder(text)
    sections: dict[str, Any] = {}
    known = {f.name: f for f in dataclasses.fields(Config) if f.name != "source"}
    base = Path(source).parent if not source.startswith("<") else Path(".")
    if "lists" in data:
        sections["lists"] = _parse_lists(data.pop("lists"), base, source, finder)
    if "rules" in data:
        sections["rules"] = _parse_rules(data.pop("rules"), source, finder)
    if "scan" in data:
        sections["scan"] = _parse_scan(data.pop("scan"), base, source, finder)
    for name, table in data.items():
        if name not in known:
            raise ConfigError(
                source,
                f"[{name}]",
                f"unknown section (expected one of: {', '.join(known)})",
                finder.section(name),
            )
        if not isinstance(table, dict):
            raise ConfigError(source, name, "expected a [section] table", finder.key(None, name))
        section_type = typing.get_type_hints(Config)[name]
        sections[name] = _build_section(section_type, name, table, source, finder)
    config = Config(**sections, source=source)
    _check_cross_rules(config, source, finder)
    return config


def _build_section(
    section_type: type, name: str, table: dict[str, Any], source: str, finder: _LineFinder
) -> Any:
    hints = typing.get_type_hints(section_type)
    fields = {f.name: f for f in dataclasses.fields(section_type)}
    values: dict[str, Any] = {}
    for key, raw in table.items():
        if key not in fields:
            raise ConfigError(
                source,
                f"{name}.{key}",
                f"unknown key (expected one of: {', '.join(fields)})",
                finder.key(name, key),
            )
        meta = fields[key].metadata
        try:
            values[key] = _convert(raw, hints[key], meta)
        except ValueError as exc:
            line = finder.key(name, key) or finder.section(f"{name}.{key}")  # [outbound.domains]
            raise ConfigError(source, f"{name}.{key}", str(exc), line) from None
    return section_type(**values)


def _parse_scan(table: Any, base: Path, source: str, finder: _LineFinder) -> ScanConfig:
    """``[scan]``: the plain keys as any section; ``[scan.weights]`` (built-in rule -> weight)
    and ``[[scan.patterns]]`` (rule, regex with a group ``ip``, weight) checked here, each
    pattern compiled so that a bad one is refused at load with its number and rule."""
    from palisade.feedback.logscan import BUILTIN_RULES, FAMILIES, PatternError, compile_pattern

    if not isinstance(table, dict):
        raise ConfigError(source, "scan", "expected a [scan] table", finder.key(None, "scan"))
    plain = {k: v for k, v in table.items() if k not in ("weights", "patterns")}
    scan: ScanConfig = _build_section(ScanConfig, "scan", plain, source, finder)
    for name in scan.formats:
        if name not in FAMILIES:
            raise ConfigError(
                source,
                "scan.formats",
                f"unknown format {name!r} (expected: {', '.join(FAMILIES)})",
                finder.key("scan", "formats"),
            )
    weights: list[tuple[str, int]] = []
    raw_weights = table.get("weights", {})
    line = finder.section("scan.weights") or finder.key("scan", "weights")
    if not isinstance(raw_weights, dict):
        raise ConfigError(source, "scan.weights", "expected a table of rule = weight", line)
    for name, weight in raw_weights.items():
        if name not in BUILTIN_RULES:
            raise ConfigError(
                source,
                f"scan.weights.{name}",
                f"unknown built-in rule (expected one of: {', '.join(BUILTIN_RULES)})",
                finder.key("scan.weights", name) or line,
            )
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 1000:
            raise ConfigError(
                source,
                f"scan.weights.{name}",
                f"expected a whole number from 0 to 1000, got {weight!r}",
                finder.key("scan.weights", name) or line,
            )
        weights.append((name, weight))
    patterns: list[ScanPatternSpec] = []
    raw_patterns = table.get("patterns", [])
    if not isinstance(raw_patterns, list):
        raise ConfigError(
            source,
            "scan.patterns",
            "expected [[scan.patterns]] tables",
            finder.key("scan", "patterns"),
        )
    for index, entry in enumerate(raw_patterns):
        where = f"scan.patterns[{index + 1}]"
        at = finder.array_item("scan.patterns", index)
        if not isinstance(entry, dict):
            raise ConfigError(source, where, "expected a table", at)
        unknown = set(entry) - {"rule", "regex", "weight"}
        if unknown:
            raise ConfigError(
                source,
                where,
                f"unknown key(s) {', '.join(sorted(unknown))} (expected rule, regex, weight)",
                at,
            )
        rule, regex, weight = entry.get("rule"), entry.get("regex"), entry.get("weight", 1)
        if not isinstance(rule, str):
            raise ConfigError(source, f"{where}.rule", 'every pattern needs rule = "name"', at)
        if not isinstance(regex, str):
            raise ConfigError(
                source, f"{where}.regex", "every pattern needs regex = '...(?P<ip>...)...'", at
            )
        try:
            compile_pattern(rule, regex, weight)
        except PatternError as exc:
            key = exc.key
            raise ConfigError(
                source,
                f"{where}.{key}",
                f"(rule {rule!r}) {exc}",
                finder.key_in_item("scan.patterns", index, key) or at,
            ) from None
        patterns.append(ScanPatternSpec(rule, regex, weight))
    names = [p.rule for p in patterns]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(
                source,
                "scan.patterns",
                f"rule {name!r} is given to more than one pattern: each needs its own name",
                finder.section("scan"),
            )
    return dataclasses.replace(scan, weights=tuple(weights), patterns=tuple(patterns))


_LIST_KINDS = ("ip", "domain", "address", "regex")
STAGES = ("connect", "helo", "mail", "rcpt", "data")
VERBS = ("accept", "accept_all", "deny", "drop", "defer", "warn")
ON_ERROR = ("defer", "deny", "match", "skip")


def _parse_lists(table: Any, base: Path, source: str, finder: _LineFinder) -> tuple[ListSpec, ...]:
    """``[lists]``: ``name = { type = "ip", file = "lists/x" }`` or ``entries = [...]``.

    Relative list files are found next to the config file (operators keep them together).
    """
    if not isinstance(table, dict):
        raise ConfigError(source, "lists", "expected a [lists] table", finder.section("lists"))
    specs = []
    for name, spec in table.items():
        line = finder.key("lists", name) or finder.section(f"lists.{name}")

        def fail(problem: str, line: int | None = line, name: str = name) -> typing.NoReturn:
            raise ConfigError(source, f"lists.{name}", problem, line)

        if not isinstance(spec, dict):
            fail('expected a table like { type = "ip", file = "lists/name" }')
        unknown = set(spec) - {"type", "file", "entries"}
        if unknown:
            fail(f"unknown key(s) {', '.join(sorted(unknown))} (expected type, file, entries)")
        kind = spec.get("type")
        if kind not in _LIST_KINDS:
            fail(f"type: expected one of {', '.join(_LIST_KINDS)}, got {kind!r}")
        file, entries = spec.get("file"), spec.get("entries", [])
        if (file is None) == (not entries):
            fail("give either file or entries (not both, not neither)")
        if file is not None and not isinstance(file, str):
            fail(f"file: expected a path string, got {file!r}")
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            fail("entries: expected a list of strings")
        path = (
            None if file is None else (base / file if not Path(file).is_absolute() else Path(file))
        )
        specs.append(ListSpec(name, kind, path, tuple(entries)))
    return tuple(specs)


# The ``$name`` placeholders a rule's ``message`` and ``log_message`` may use: these for every
# rule (filled by the policy engine), plus the values of the rule's check (README, "The checks").
# A new check must be added here: tests/policy/test_rule_text_values.py compares it with REGISTRY.
COMMON_TEXT_VALUES = ("ip", "helo", "sender", "recipient", "reason")
CHECK_TEXT_VALUES: dict[str, tuple[str, ...]] = {
    "ip_list": (),
    "private_ip": (),
    "domain_list": (),
    "address_list": (),
    "regex": ("pattern",),
    "tls_required": (),
    "rdns": ("ptr",),
    "dnsbl": ("zone", "codes", "txt", "zones"),
    "dbl": ("domain", "field", "zone", "codes", "txt"),
    "helo": ("pattern", "condition"),
    "sender": ("domain", "pattern", "condition"),
    "local_sender": ("domain",),
    "history": ("count", "first_seen", "last_seen", "threshold", "until", "times"),
    "ratelimit": ("rate", "count", "limit", "window"),
    "recipient": ("domain",),
    "header_sender": ("condition", "addresses"),
    "spf": ("spf_result", "spf_domain", "spf_explanation"),
    "dkim": ("result", "domain", "selector"),
    "dmarc": ("result", "domain", "policy", "disposition"),
    "spam_score": ("spam_score", "spam_rules", "scanner"),
    "virus": ("virus",),
}


def unknown_text_values(check: str, text: str) -> list[str]:
    """The ``$name``/``${name}`` placeholders of ``text`` that a rule of ``check`` never fills
    (they would reach the client or the log as written). An unknown check gives none (the
    policy builder reports the check itself)."""
    known = CHECK_TEXT_VALUES.get(check)
    if known is None:
        return []
    unknown = []
    for match in string.Template.pattern.finditer(text):
        name = match.group("named") or match.group("braced")
        if name is not None and name not in known and name not in COMMON_TEXT_VALUES:
            unknown.append(name)
    return unknown


_RULE_KEYS = {
    "check", "verb", "name", "message", "log_message", "observe", "on_error", "timeout",
    "negate", "code", "enhanced", "recipient_domains", "incident",
}  # fmt: skip
# verbs whose refusal records the rule's ``incident`` weight (a defer is "try again": never)
INCIDENT_VERBS = ("deny", "drop")


def _parse_rules(table: Any, source: str, finder: _LineFinder) -> tuple[RuleSpec, ...]:
    """``[[rules.<stage>]]`` tables, in order; check options are kept for the check to validate."""
    if not isinstance(table, dict):
        raise ConfigError(source, "rules", "expected [[rules.<stage>]] tables", None)
    specs = []
    for stage, rules in table.items():
        if stage not in STAGES:
            raise ConfigError(
                source,
                f"rules.{stage}",
                f"unknown stage (expected one of: {', '.join(STAGES)})",
                finder.array_item(f"rules.{stage}", 0),
            )
        if not isinstance(rules, list):
            raise ConfigError(source, f"rules.{stage}", f"expected [[rules.{stage}]] tables")
        for index, rule in enumerate(rules):
            line = finder.array_item(f"rules.{stage}", index)
            where = f"rules.{stage}[{index + 1}]"

            def fail(
                key: str,
                problem: str,
                line: int | None = line,
                where: str = where,
                stage: str = stage,
                index: int = index,
            ) -> typing.NoReturn:
                at = finder.key_in_item(f"rules.{stage}", index, key) if key else line
                raise ConfigError(source, f"{where}.{key}" if key else where, problem, at or line)

            if not isinstance(rule, dict):
                fail("", "expected a table")
            for key in ("check", "verb"):
                if not isinstance(rule.get(key), str):
                    fail(key, f'every rule needs {key} = "..."')
            if rule["verb"] not in VERBS:
                fail("verb", f"expected one of {', '.join(VERBS)}, got {rule['verb']!r}")
            fixed = {k: v for k, v in rule.items() if k in _RULE_KEYS}
            for key in ("name", "message", "log_message", "enhanced"):
                if key in fixed and not isinstance(fixed[key], str):
                    fail(key, f"expected a string, got {fixed[key]!r}")
            for key in ("message", "log_message"):
                unknown = unknown_text_values(rule["check"], fixed.get(key, ""))
                if unknown:
                    names = ", ".join(f"${n}" for n in unknown)
                    usable = ", ".join(
                        f"${n}"
                        for n in (*COMMON_TEXT_VALUES, *CHECK_TEXT_VALUES.get(rule["check"], ()))
                    )
                    fail(
                        key,
                        f"unknown variable {names} for check {rule['check']!r} "
                        f"(known: {usable}; write $$ for a dollar sign)",
                    )
            for key in ("observe", "negate"):
                if key in fixed and not isinstance(fixed[key], bool):
                    fail(key, f"expected true or false, got {fixed[key]!r}")
            if "on_error" in fixed and fixed["on_error"] not in ON_ERROR:
                fail("on_error", f"expected one of {', '.join(ON_ERROR)}")
            timeout = fixed.get("timeout")
            if timeout is not None:
                try:
                    fixed["timeout"] = _duration(timeout)
                except ValueError as exc:
                    fail("timeout", str(exc))
            domains = fixed.get("recipient_domains")
            if domains is not None:
                if stage != "rcpt":
                    fail("recipient_domains", "only rcpt rules have a recipient to match")
                if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
                    fail("recipient_domains", "expected a list of domain names")
                fixed["recipient_domains"] = tuple(d.lower().rstrip(".") for d in domains)
            incident = fixed.get("incident")
            if incident is not None:
                if isinstance(incident, bool) or not isinstance(incident, int) or incident < 0:
                    fail("incident", f"expected a whole number of at least 0, got {incident!r}")
                if incident and rule["verb"] not in INCIDENT_VERBS:
                    fail(
                        "incident",
                        f"only a refusal counts as an incident (verb deny or drop), and this "
                        f"rule's verb is {rule['verb']!r}",
                    )
            code = fixed.get("code")
            if code is not None and (
                isinstance(code, bool) or not isinstance(code, int) or not 400 <= code < 600
            ):
                fail("code", f"expected an SMTP code from 400 to 599, got {code!r}")
            options = tuple((k, v) for k, v in rule.items() if k not in _RULE_KEYS)
            specs.append(RuleSpec(stage=stage, index=index, options=options, **fixed))
    return tuple(specs)


def _convert(raw: Any, hint: Any, meta: typing.Mapping[str, Any]) -> Any:
    """Converts one TOML value to the annotated type; ValueError names what was expected."""
    if meta.get("kind") == "duration":
        seconds = _duration(raw)
        if seconds < meta.get("min", 0):
            raise ValueError(f"expected a duration of at least {meta['min']} seconds")
        return seconds
    if "empty" in meta and raw == "":
        return meta["empty"]
    if meta.get("kind") == "domain_levels":
        return _domain_levels(raw)
    if meta.get("kind") == "group":
        return _group(raw)
    if meta.get("kind") == "user":
        return _user(raw)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union) and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return _convert(raw, inner, meta)
    if origin is tuple:
        if not isinstance(raw, list):
            raise ValueError(f"expected a list, got {_describe(raw)}")
        return tuple(_convert(item, args[0], {}) for item in raw)
    if hint is bool:
        if not isinstance(raw, bool):
            raise ValueError(f"expected true or false, got {_describe(raw)}")
        return raw
    if hint is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ValueError(f"expected a whole number, got {_describe(raw)}")
        if raw < meta.get("min", -(2**63)):
            raise ValueError(f"expected a number of at least {meta['min']}, got {raw}")
        return raw
    if hint is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ValueError(f"expected a number, got {_describe(raw)}")
        return float(raw)
    if hint is str:
        if not isinstance(raw, str):
            raise ValueError(f"expected a string, got {_describe(raw)}")
        choices = meta.get("choices")
        if choices and raw not in choices:
            raise ValueError(f"expected one of {', '.join(map(repr, choices))}, got {raw!r}")
        return raw
    if hint is Path:
        if not isinstance(raw, str) or not raw:
            raise ValueError(f"expected a file path string, got {_describe(raw)}")
        return Path(raw)
    if hint in (ipaddress.IPv4Network | ipaddress.IPv6Network,) or origin in (types.UnionType,):
        if not isinstance(raw, str):
            raise ValueError(f"expected an IP address or CIDR string, got {_describe(raw)}")
        try:
            return ipaddress.ip_network(raw, strict=False)
        except ValueError:
            raise ValueError(f"expected an IP address or CIDR, got {raw!r}") from None
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _convert_table(raw, hint)
    raise ValueError(f"unsupported setting type {hint!r}")  # a bug in model.py, not the file


def _convert_table(raw: Any, hint: type) -> Any:
    """An inline table (or an array-of-tables item) as the dataclass ``hint``: every key known,
    every field without a default given."""
    if not isinstance(raw, dict):
        raise ValueError(f"expected a table {{ ... }}, got {_describe(raw)}")
    fields = {f.name: f for f in dataclasses.fields(hint)}
    hints = typing.get_type_hints(hint)
    values: dict[str, Any] = {}
    for key, item in raw.items():
        if key not in fields:
            raise ValueError(f"unknown key {key!r} (expected one of: {', '.join(fields)})")
        try:
            values[key] = _convert(item, hints[key], fields[key].metadata)
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None
    missing = [
        name
        for name, f in fields.items()
        if name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"missing key(s): {', '.join(missing)}")
    return hint(**values)


def _domain_levels(raw: Any) -> tuple[tuple[str, str], ...]:
    """``[outbound.domains]``: domain -> TLS level, domains lowercased, each named once."""
    if not isinstance(raw, dict):
        raise ValueError(f'expected a table of "domain" = "level", got {_describe(raw)}')
    levels: dict[str, str] = {}
    for domain, level in raw.items():
        name = domain.lower().rstrip(".")
        if not _HOSTNAME_RE.match(name) or "." not in name:
            raise ValueError(f"expected domain names as keys, got {domain!r}")
        if level not in TLS_LEVELS:
            choices = ", ".join(map(repr, TLS_LEVELS))
            raise ValueError(f"{domain}: expected one of {choices}, got {_describe_value(level)}")
        if name in levels:
            raise ValueError(f"{domain}: given twice")
        levels[name] = level
    return tuple(levels.items())


def _describe_value(raw: Any) -> str:
    return repr(raw) if isinstance(raw, str) else _describe(raw)


def _group(raw: Any) -> int:
    """A group name or gid that must exist on this host: its gid."""
    if isinstance(raw, bool) or not isinstance(raw, int | str) or raw == "":
        raise ValueError(f'expected a group name or gid, like "mail" or 8, got {_describe(raw)}')
    try:
        if isinstance(raw, int) or raw.isdigit():
            return grp.getgrgid(int(raw)).gr_gid
        return grp.getgrnam(raw).gr_gid
    except (KeyError, OverflowError):
        raise ValueError(f"no such group on this host: {raw!r}") from None


def _user(raw: Any) -> str:
    """A user name that must exist on this host (kept as the name: initgroups wants it)."""
    if not isinstance(raw, str) or raw == "":
        raise ValueError(f'expected a user name, like "palisade", got {_describe(raw)}')
    try:
        pwd.getpwnam(raw)
    except KeyError:
        raise ValueError(
            f"no such user on this host: {raw!r} (make install creates the user palisade)"
        ) from None
    return raw


def _duration(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError(f'expected a duration like 30, "5m", "4h" or "5d", got {raw!r}')
    if isinstance(raw, int | float):
        return float(raw)
    if isinstance(raw, str):
        match = _DURATION_RE.match(raw)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2)]
    raise ValueError(f'expected a duration like 30, "5m", "4h" or "5d", got {raw!r}')


def _describe(raw: Any) -> str:
    return f"{type(raw).__name__} {raw!r}"


def parse_host_port(text: str, default_port: int = 25) -> tuple[str, int]:
    """``"127.0.0.1:2525"``, ``"[::1]:25"``, ``"mx.example"`` → (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"expected [address]:port, got {text!r}")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError(f"expected host:port, got {text!r}")
    port = default_port
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"expected a port from 1 to 65535 in {text!r}")
        port = int(port_text)
    return host, port


def _check_cross_rules(config: Config, source: str, finder: _LineFinder) -> None:
    def fail(section: str, key: str, problem: str) -> typing.NoReturn:
        raise ConfigError(source, f"{section}.{key}", problem, finder.key(section, key))

    if not _HOSTNAME_RE.match(config.server.hostname):
        fail("server", "hostname", f"expected a host name, got {config.server.hostname!r}")
    if not config.server.listen:
        fail("server", "listen", "expected at least one host:port")
    for entry in config.server.listen:
        try:
            parse_host_port(entry)
        except ValueError as exc:
            fail("server", "listen", str(exc))
    facts = config.record.facts
    if facts is not None and (facts.name in ("", ".", "..") or facts.is_dir()):
        fail("record", "facts", f"expected the path of a file, got the directory {str(facts)!r}")
    if config.metrics.listen:
        try:
            _, port = parse_host_port(config.metrics.listen, default_port=0)
        except ValueError as exc:
            fail("metrics", "listen", f'{exc} (or "" for no metrics endpoint)')
        if port == 0:
            fail("metrics", "listen", f"expected host:port, got {config.metrics.listen!r}")
        if config.metrics.listen in config.server.listen:
            fail("metrics", "listen", "the same address as [server] listen")
    submission = config.submission
    for key, default_port in (("listen", 587), ("listen_tls", 465)):
        for entry in getattr(submission, key):
            try:
                parse_host_port(entry, default_port)
            except ValueError as exc:
                fail("submission", key, str(exc))
    if submission.enabled and config.tls.certificate is None:
        fail("submission", "listen", "submission listeners need [tls] certificate and private_key")
    if not submission.dovecot_socket.startswith("/"):
        try:
            parse_host_port(submission.dovecot_socket, 0)
        except ValueError:
            fail(
                "submission",
                "dovecot_socket",
                f"expected a socket path or host:port, got {submission.dovecot_socket!r}",
            )
        if parse_host_port(submission.dovecot_socket, 0)[1] == 0:
            fail("submission", "dovecot_socket", "expected host:port with a port")
    if submission.failure_delay_max < submission.failure_delay:
        fail("submission", "failure_delay_max", "must not be shorter than failure_delay")
    for entry in config.dns.nameservers:
        try:
            host, _ = parse_host_port(entry, default_port=53)
            ipaddress.ip_address(host)
        except ValueError:
            fail("dns", "nameservers", f"expected IP addresses with optional :port, got {entry!r}")
    if config.delivery.next_hop is not None:
        try:
            parse_host_port(config.delivery.next_hop)
        except ValueError as exc:
            fail("delivery", "next_hop", str(exc))
    if not config.firewall.ports:
        fail("firewall", "ports", "expected at least one TCP port")
    for port in config.firewall.ports:
        if not 0 < port < 65536:
            fail("firewall", "ports", f"expected TCP port numbers (1-65535), got {port}")
    if not _NFT_NAME_RE.match(config.firewall.table):
        fail(
            "firewall",
            "table",
            "expected an nftables name (a letter, then letters, digits or _; at most 32),"
            f" got {config.firewall.table!r}",
        )
    for key in ("local", "relay"):
        for domain in getattr(config.domains, key):
            if not _HOSTNAME_RE.match(domain):
                fail("domains", key, f"expected domain names, got {domain!r}")
    for uri in config.ldap.servers:
        if not re.match(r"^ldaps?://[^/\s]+/?$", uri, re.IGNORECASE):
            fail(
                "ldap",
                "servers",
                f"expected ldap://host[:port] or ldaps://host[:port], got {uri!r}",
            )
    if config.ldap.servers:
        template = config.ldap.filter
        if "%s" not in template or not (template.startswith("(") and template.endswith(")")):
            fail(
                "ldap",
                "filter",
                f"expected an LDAP filter in parentheses with %s, got {template!r}",
            )
        if not config.ldap.base_dn:
            fail("ldap", "base_dn", 'expected the search base, e.g. "dc=example,dc=com"')
    if config.spamd.address and config.rspamd.url:
        fail("rspamd", "url", "spamd and rspamd are alternatives: configure only one of them")
    overlap = {d.lower() for d in config.domains.local} & {d.lower() for d in config.domains.relay}
    if overlap:
        fail("domains", "relay", f"domains both local and relay: {', '.join(sorted(overlap))}")
    if config.domains.relay and config.delivery.next_hop is None:
        fail("delivery", "next_hop", "relay domains are configured but no next_hop is set")
    tls = config.tls
    if (tls.certificate is None) != (tls.private_key is None):
        fail("tls", "certificate", "certificate and private_key must be given together")
    for key in ("certificate", "private_key"):
        path = getattr(tls, key)
        if path is not None and not path.is_file():
            fail("tls", key, f"no such file: {path}")
    if tls.certificate is not None and tls.private_key is not None:
        problem = certificate_key_problem(tls.certificate, tls.private_key)
        if problem:
            fail("tls", "certificate", problem)
    _check_state(config.state, fail)
    password_file = config.ldap.bind_password_file
    if password_file is not None:
        try:
            with open(password_file, "rb") as f:
                f.read(1)
        except OSError as exc:
            fail("ldap", "bind_password_file", f"cannot be read: {exc.strerror or exc}")
    for name in ("spamd", "rspamd"):
        scanner = getattr(config, name)
        if scanner.tag_level > scanner.kill_level:
            fail(
                name,
                "tag_level",
                f"tag_level {scanner.tag_level:g} is above kill_level {scanner.kill_level:g}: "
                "spam between them would be refused without ever being tagged",
            )
    if config.delivery.tls_ca_file is not None and not config.delivery.tls_ca_file.is_file():
        fail("delivery", "tls_ca_file", f"no such file: {config.delivery.tls_ca_file}")
    outbound = config.outbound
    if outbound.tls_ca_file is not None and not outbound.tls_ca_file.is_file():
        fail("outbound", "tls_ca_file", f"no such file: {outbound.tls_ca_file}")
    if not 0 < outbound.port < 65536:
        fail("outbound", "port", f"expected a TCP port number (1-65535), got {outbound.port}")
    if not 0 < outbound.mta_sts_port < 65536:
        fail(
            "outbound",
            "mta_sts_port",
            f"expected a TCP port number (1-65535), got {outbound.mta_sts_port}",
        )
    reports = outbound.tls_reports
    if reports is not None and reports.exists() and not reports.is_dir():
        fail("outbound", "tls_reports", f"not a directory: {reports}")
    if config.delivery.retry_max_interval < config.delivery.retry_initial:
        fail("delivery", "retry_max_interval", "must not be shorter than retry_initial")
    seen: set[tuple[str, str]] = set()
    for number, dkim_key in enumerate(config.dkim.keys, 1):
        if (
            not _HOSTNAME_RE.match(dkim_key.domain)
            or dkim_key.domain.endswith(".")
            or "." not in dkim_key.domain
        ):
            fail("dkim", "keys", f"key {number}: expected a domain name, got {dkim_key.domain!r}")
        if not _SELECTOR_RE.match(dkim_key.selector):
            fail(
                "dkim",
                "keys",
                f"key {number}: expected a selector (letters, digits, '-', '_', dots between "
                f"labels), got {dkim_key.selector!r}",
            )
        pair = (dkim_key.domain.lower(), dkim_key.selector.lower())
        if pair in seen:
            fail(
                "dkim",
                "keys",
                f"key {number}: selector {dkim_key.selector!r} of {dkim_key.domain} is given twice "
                "(a selector publishes one key: give each key its own)",
            )
        seen.add(pair)
    dmarc_config = config.dmarc
    if dmarc_config.from_address and not re.match(
        r"^[^@\s<>\"]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$", dmarc_config.from_address
    ):
        fail(
            "dmarc",
            "from_address",
            f"expected a mail address (local@domain), got {dmarc_config.from_address!r}",
        )
    if any(not c.isprintable() for c in dmarc_config.org_name) or len(dmarc_config.org_name) > 200:
        fail("dmarc", "org_name", "expected one line of at most 200 printable characters")
    incidents = config.incidents
    if incidents.block_growth < 1.0:
        fail(
            "incidents",
            "block_growth",
            f"expected a factor of at least 1 (1: every block as long), got "
            f"{incidents.block_growth:g}",
        )
    if incidents.block_max < incidents.block_for:
        fail("incidents", "block_max", "must not be shorter than block_for")


def certificate_key_problem(certificate: Path, private_key: Path) -> str | None:
    """Loads the chain and key as the listener will (OpenSSL); a sentence naming both files
    when they do not load or do not belong together, else None. An encrypted key is refused:
    the server cannot ask for its passphrase."""

    def no_passphrase() -> bytes:
        raise ValueError("the private key is encrypted: give an unencrypted key")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(certificate), str(private_key), password=no_passphrase)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in str(exc) or reason == "KEY_VALUES_MISMATCH":
            return (
                f"certificate {certificate} does not match [tls] private_key {private_key} "
                "(the first certificate of the chain must be the key's)"
            )
        return f"certificate {certificate} or private_key {private_key} cannot be loaded: {exc}"
    except (OSError, ValueError) as exc:
        return f"certificate {certificate} or private_key {private_key} cannot be loaded: {exc}"
    return None


# redis://[username@]host[:port][/db] (a password never: it goes in password_file)
_REDIS_URL_RE = re.compile(
    r"^(?P<scheme>rediss?)://(?:(?P<userinfo>[^@/\s]*)@)?"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^:/\s\[\]@]+)(?::(?P<port>\d+))?(?:/(?P<db>\d*))?/?\Z"
)


def _check_state(state: Any, fail: typing.Callable[[str, str, str], typing.NoReturn]) -> None:
    """``[state]``: the Redis settings, checked whatever the backend (a switch back to
    ``redis`` must not meet a broken value first at a reload)."""
    match = _REDIS_URL_RE.match(state.url)
    if match is None:
        fail(
            "state",
            "url",
            "expected redis://host[:port][/db] or rediss://host[:port][/db]"
            f" (the password goes in password_file), got {_url_shown(state.url)!r}",
        )
    if match.group("userinfo") is not None and ":" in match.group("userinfo"):
        fail(
            "state",
            "url",
            "a password in the url would be shown and logged: put it in password_file"
            " (and the user name in username)",
        )
    port = match.group("port")
    if port is not None and not 0 < int(port) < 65536:
        fail("state", "url", f"expected a port from 1 to 65535, got {port}")
    if state.ca_file is not None:
        if match.group("scheme") != "rediss":
            fail("state", "ca_file", "ca_file is for rediss:// (TLS); the url is redis://")
        if not state.ca_file.is_file():
            fail("state", "ca_file", f"no such file: {state.ca_file}")
    if state.password_file is not None:
        try:
            with open(state.password_file, "rb") as f:
                f.read(1)
        except OSError as exc:
            fail("state", "password_file", f"cannot be read: {exc.strerror or exc}")
    for entry in state.sentinels:
        try:
            parse_host_port(entry, default_port=26379)
        except ValueError as exc:
            fail("state", "sentinels", str(exc))
    if state.sentinels and not state.service:
        fail("state", "service", 'sentinels are set: name the master (e.g. "mymaster")')
    if state.service and not state.sentinels:
        fail("state", "sentinels", f"service {state.service!r} needs the sentinels' host:port")
    if not state.prefix or any(c.isspace() for c in state.prefix):
        fail("state", "prefix", f"expected a key prefix without spaces, got {state.prefix!r}")


def _url_shown(url: str) -> str:
    """``url`` with anything between ``://`` and ``@`` hidden (it may hold a password)."""
    head, sep, rest = url.partition("://")
    if sep and "@" in rest:
        return f"{head}://(hidden)@{rest.rpartition('@')[2]}"
    return url


def _line_from_decode_error(message: str) -> int | None:
    match = re.search(r"line (\d+)", message)
    return int(match.group(1)) if match else None


class _LineFinder:
    """Finds where a section or key is written, for error messages."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()

    def section(self, name: str) -> int | None:
        pattern = re.compile(rf"^\s*\[\s*{re.escape(name)}\s*\]")
        for number, line in enumerate(self.lines, 1):
            if pattern.match(line):
                return number
        return None

    def array_item(self, name: str, index: int) -> int | None:
        """The line of the ``index``-th ``[[name]]`` header."""
        pattern = re.compile(rf"^\s*\[\[\s*{re.escape(name)}\s*\]\]")
        seen = -1
        for number, line in enumerate(self.lines, 1):
            if pattern.match(line):
                seen += 1
                if seen == index:
                    return number
        return None

    def key_in_item(self, name: str, index: int, key: str) -> int | None:
        start = self.array_item(name, index)
        if start is None:
            return None
        pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
        for number, line in enumerate(self.lines[start:], start + 1):
            if re.match(r"^\s*\[", line):
                break
            if pattern.match(line):
                return number
        return start

    def key(self, section: str | None, key: str) -> int | None:
        start = self.section(section) if section else 0
        if section and start is None:
            return None
        pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
        for number, line in enumerate(self.lines[start or 0 :], (start or 0) + 1):
            if section and number > (start or 0) and re.match(r"^\s*\[", line):
                break
            if pattern.match(line):
                return number
        return None
