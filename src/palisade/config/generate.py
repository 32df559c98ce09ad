"""The answers of ``palisade init`` and the config they make: the seeds' Install.sh as data.

Owns: the questions (:data:`QUESTIONS`: key, prompt, type, default, validation, and when each
is asked), turning typed text or an answers file's values into checked answers
(:func:`parse_text`, :func:`resolve`), and the pure function :func:`generate`: answers in, the
commented ``palisade.toml`` text and its list files out, with only the chosen features. The
rules it writes are those of ``examples/perimeter.toml`` and the README, with their texts.
Must not touch: the file system beyond checking that files the answers name exist (the TLS pair,
the LDAP password file), the network, the server. ``palisade.cli.init`` asks, writes and runs
the self-check.
Trust: answers are operator input, trusted in intent but not in form: every value is checked
here, and a wrong one is an :class:`AnswersError` naming the key and what was expected. A
Spamhaus DQS key is a secret: it goes into the config and the answers file only, never into a
message.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from palisade.config.loader import certificate_key_problem, parse_host_port
from palisade.policy.checks.dnsnames import is_hostname

Kind = Literal["text", "bool", "int", "float", "list", "choice"]
Answers = dict[str, Any]

# The standard places of an installed gateway (ISSUE13: Debian paths).
CONFIG_PATH = Path("/etc/palisade/palisade.toml")
SPOOL_DIR = "/var/spool/palisade"
STATE_FILE = "/var/lib/palisade/state.sqlite"
LOG_DIR = "/var/log/palisade"
CONTROL_SOCKET = "/run/palisade/control.sock"
MAIL_DIR = "/var/mail/palisade"
LDAP_PASSWORD_FILE = "/etc/palisade/keys/ldap.pw"

# DNSBL zones the README documents, with their listing codes (zones not named here are
# written as plain names: every code of 127.0.0.0/8 but the error range counts).
KNOWN_ZONES: dict[str, dict[str, Any]] = {
    "zen.spamhaus.org": {"zone": "zen.spamhaus.org", "codes": ["127.0.0.2-127.0.0.11"]},
    "bl.spamcop.net": {"zone": "bl.spamcop.net", "codes": ["127.0.0.2"], "ipv6": False},
    "b.barracudacentral.org": {"zone": "b.barracudacentral.org", "codes": ["127.0.0.2"]},
}
_DQS_KEY = re.compile(r"^[A-Za-z0-9]{8,64}$")
_DURATION = re.compile(r"^\s*\d+(?:\.\d+)?\s*[smhdw]?\s*$")
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_LDAP_URI = re.compile(r"^ldaps?://[^/\s]+/?$", re.IGNORECASE)
_ADDRESS = re.compile(r"^(?:[^@\s]+)?@[^@\s]+$")


class AnswersError(Exception):
    """An answer that cannot be used; ``str()`` names the key and what was expected."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


@dataclass(frozen=True, slots=True)
class Environment:
    """What the defaults depend on besides earlier answers: this machine's name and, for tests
    and staging, a directory under which the standard absolute paths are placed."""

    fqdn: str = "mx.example.org"
    paths_root: Path | None = None

    def path(self, standard: str) -> str:
        if self.paths_root is None:
            return standard
        return str(self.paths_root / standard.lstrip("/"))


Default = Callable[[Answers, Environment], Any]
Validator = Callable[[Any, Answers], str | None]  # the problem, or None


def _always(answers: Answers) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class Question:
    """One answer: its key (in the answers file), the question asked, its type and default,
    a check of its value, and when it is asked (a feature's details only when it is on)."""

    key: str
    prompt: str
    kind: Kind
    default: Default
    validate: Validator | None = None
    asked: Callable[[Answers], bool] = _always
    choices: tuple[str, ...] = ()
    help: str = ""  # one line printed before the question
    follows: str = ""  # the answer its default derives from (a new one: last time's is stale)


# -- validators ----------------------------------------------------------------------------


def _hostname(value: str, answers: Answers) -> str | None:
    if not is_hostname(value):
        return f"expected a fully qualified host name like mx.example.org, got {value!r}"
    return None


def _domains(value: list[str], answers: Answers) -> str | None:
    if not value:
        return "expected at least one domain"
    for domain in value:
        if not is_hostname(domain):
            return f"expected domain names like example.org, got {domain!r}"
    return None


def _optional_domains(value: list[str], answers: Answers) -> str | None:
    for domain in value:
        if not is_hostname(domain.removeprefix(".")):
            return f"expected domain names (.example.org for its subdomains), got {domain!r}"
    return None


def _host_port(text: str) -> str | None:
    try:
        host, _ = parse_host_port(text)
    except ValueError as exc:
        return str(exc)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not is_hostname(host, need_dot=False):
            return f"expected a host name or IP address and a port, got {text!r}"
    return None


def _listen(value: list[str], answers: Answers) -> str | None:
    if not value:
        return "expected at least one address:port to listen on"
    for entry in value:
        problem = _host_port(entry)
        if problem:
            return problem
    return None


def _next_hop(value: str, answers: Answers) -> str | None:
    return _host_port(value) if value else None


def _networks(value: list[str], answers: Answers) -> str | None:
    for entry in value:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            return f"expected IP addresses or networks like 192.0.2.0/24, got {entry!r}"
    return None


def _nameservers(value: list[str], answers: Answers) -> str | None:
    for entry in value:
        try:
            host, _ = parse_host_port(entry, default_port=53)
            ipaddress.ip_address(host)
        except ValueError:
            return f"expected IP addresses with an optional :port, got {entry!r}"
    return None


def _absolute(value: str, answers: Answers) -> str | None:
    if not Path(value).is_absolute():
        return f"expected an absolute path, got {value!r}"
    return None


def _existing_file(value: str, answers: Answers) -> str | None:
    if not value:
        return None
    if not Path(value).is_file():
        return f"no such file: {value}"
    return None


def _private_key(value: str, answers: Answers) -> str | None:
    if not value:
        return "expected the private key file of the certificate"
    problem = _existing_file(value, answers)
    if problem:
        return problem
    return certificate_key_problem(Path(answers["tls_certificate"]), Path(value))


def _user(value: str, answers: Answers) -> str | None:
    if value and not _USER.match(value):
        return f"expected a user name like palisade, got {value!r}"
    return None


def _at_least_one(value: int, answers: Answers) -> str | None:
    return None if value >= 1 else f"expected a number of at least 1, got {value}"


def _duration(value: str, answers: Answers) -> str | None:
    if not _DURATION.match(value):
        return f'expected a duration like "15m", "1h" or 900, got {value!r}'
    return None


def _zones(value: list[str], answers: Answers) -> str | None:
    if not value:
        return "expected at least one blocklist zone"
    for zone in value:
        if not is_hostname(zone):
            return f"expected zone names like zen.spamhaus.org, got {zone!r}"
    return None


def _dqs_key(value: str, answers: Answers) -> str | None:
    if value and not _DQS_KEY.match(value):
        return "expected 8 to 64 letters and digits (value not shown)"
    return None


def _addresses(value: list[str], answers: Answers) -> str | None:
    for entry in value:
        if not _ADDRESS.match(entry):
            return f"expected addresses like postmaster@example.org or @example.org, got {entry!r}"
    return None


def _ldap_servers(value: list[str], answers: Answers) -> str | None:
    if not value:
        return "expected at least one ldap://host or ldaps://host URI"
    for uri in value:
        if not _LDAP_URI.match(uri):
            return f"expected ldap://host[:port] or ldaps://host[:port], got {uri!r}"
    return None


def _not_empty(value: str, answers: Answers) -> str | None:
    return None if value.strip() else "expected a value"


def _ldap_filter(value: str, answers: Answers) -> str | None:
    if "%s" not in value or not (value.startswith("(") and value.endswith(")")):
        return f"expected an LDAP filter in parentheses with %s, got {value!r}"
    return None


def _password_file(value: str, answers: Answers) -> str | None:
    if answers.get("ldap_bind_dn") and not value:
        return "expected the file holding the bind password (a bind DN is set)"
    return _existing_file(value, answers)


def _kill_level(value: float, answers: Answers) -> str | None:
    tag = answers.get("spam_tag_level")
    if isinstance(tag, float) and tag > value:
        return f"expected a kill level at or above the tag level {tag:g}"
    return None


# -- defaults ------------------------------------------------------------------------------


def _const(value: Any) -> Default:
    return lambda answers, env: value


def _domain_of(hostname: str) -> str:
    labels = hostname.rstrip(".").split(".")
    return ".".join(labels[1:]) if len(labels) > 2 else ".".join(labels)


def _default_hostname(answers: Answers, env: Environment) -> str:
    return env.fqdn if is_hostname(env.fqdn) else "mx.example.org"


def _default_recipients(answers: Answers, env: Environment) -> list[str]:
    return [f"{box}@{d}" for d in answers.get("domains", []) for box in ("postmaster", "abuse")]


def _default_base_dn(answers: Answers, env: Environment) -> str:
    domains = answers.get("domains") or ["example.org"]
    return ",".join(f"dc={label}" for label in domains[0].split("."))


def _default_filter(answers: Answers, env: Environment) -> str:
    return "(proxyAddresses=smtp:%s)" if answers.get("recipients") == "ad" else "(mail=%s)"


def _default_spam_address(answers: Answers, env: Environment) -> str:
    if answers.get("spam_scanner") == "rspamd":
        return "http://127.0.0.1:11333"
    return "127.0.0.1:783"


def _default_tag(answers: Answers, env: Environment) -> float:
    return 6.0 if answers.get("spam_scanner") == "rspamd" else 4.5


def _default_kill(answers: Answers, env: Environment) -> float:
    return 15.0 if answers.get("spam_scanner") == "rspamd" else 16.0


def _on(key: str) -> Callable[[Answers], bool]:
    return lambda answers: bool(answers.get(key))


def _scanning(answers: Answers) -> bool:
    return bool(answers.get("spam_scanner", "none") != "none")


def _ldap(answers: Answers) -> bool:
    return answers.get("recipients") in ("ldap", "ad")


QUESTIONS: tuple[Question, ...] = (
    Question("hostname", "Host name this gateway greets with", "text", _default_hostname,
             _hostname, help="Its PTR record should name it, and senders see it in every reply."),
    Question("domains", "Mail domains received here", "list",
             lambda a, e: [_domain_of(a["hostname"])], _domains),
    Question("next_hop", "Internal mail server to hand mail to, host:port "
             "(none: Maildir on this machine)", "text", _const(""), _next_hop),
    Question("mail_dir", "Maildir root (one folder per local part)", "text",
             lambda a, e: e.path(MAIL_DIR), _absolute, asked=lambda a: not a.get("next_hop")),
    Question("relay_from_hosts", "Your own networks that may send out through this gateway",
             "list", _const([]), _networks),
    Question("listen", "Addresses to listen on", "list", _const(["0.0.0.0:25"]), _listen,
             asked=lambda a: False),
    Question("user", "User the gateway runs as after binding port 25", "text",
             _const("palisade"), _user, asked=lambda a: False),
    Question("spool_dir", "Spool directory", "text", lambda a, e: e.path(SPOOL_DIR), _absolute,
             asked=lambda a: False),
    Question("state_file", "State database", "text", lambda a, e: e.path(STATE_FILE), _absolute,
             asked=lambda a: False),
    Question("log_dir", "Log directory", "text", lambda a, e: e.path(LOG_DIR), _absolute,
             asked=lambda a: False),
    Question("control_socket", "Control socket of palisade status", "text",
             lambda a, e: e.path(CONTROL_SOCKET), _absolute, asked=lambda a: False),
    Question("nameservers", "DNS resolvers, IP[:port] (none: /etc/resolv.conf; DNSBLs want "
             "your own, e.g. unbound on 127.0.0.1)", "list", _const([]), _nameservers),
    Question("tls_certificate", "TLS certificate chain file, leaf first (none: no STARTTLS)",
             "text", _const(""), _existing_file),
    Question("tls_private_key", "TLS private key file", "text", _const(""), _private_key,
             asked=_on("tls_certificate")),
    Question("tls_required", "Require STARTTLS from every sender (observe: only log who "
             "does not use it)", "choice", _const("observe"), asked=_on("tls_certificate"),
             choices=("observe", "on", "off")),
    Question("whitelist", "Whitelist: trusted hosts (a list file) skip every check, "
             "private and loopback ranges the connect checks", "bool", _const(True)),
    Question("whitelist_hosts", "Trusted hosts and networks to start the list with", "list",
             _const([]), _networks, asked=_on("whitelist")),
    Question("sender_whitelist", "Sender whitelist: sender domains (a list file) that skip "
             "sender verification and the header check", "bool", _const(True)),
    Question("sender_whitelist_domains", "Sender domains to start the list with", "list",
             _const([]), _optional_domains, asked=_on("sender_whitelist")),
    Question("history", "Refuse clients with a history of unwanted activity "
             "(the incident database)", "bool", _const(True)),
    Question("ratelimit", "Limit connections per client IP", "bool", _const(True)),
    Question("ratelimit_connections", "Connections allowed per window", "int", _const(10),
             _at_least_one, asked=_on("ratelimit")),
    Question("ratelimit_window", "Window", "text", _const("15m"), _duration,
             asked=_on("ratelimit")),
    Question("ptr_required", "Refuse clients without a PTR record", "bool", _const(True)),
    Question("generic_rdns", "Refuse end-user hosts by their generic PTR name "
             "(observe: log only, for a week first)", "choice", _const("observe"),
             choices=("observe", "on", "off")),
    Question("dnsbl", "Refuse clients listed in DNS blocklists", "bool", _const(True)),
    Question("dnsbl_zones", "Blocklist zones", "list",
             _const(list(KNOWN_ZONES)), _zones, asked=_on("dnsbl")),
    Question("dbl", "Refuse sender domains on the Spamhaus DBL", "bool", _const(True)),
    Question("dqs_key", "Spamhaus DQS key (none: the public zones)", "text", _const(""),
             _dqs_key, asked=lambda a: bool(a.get("dnsbl") or a.get("dbl"))),
    Question("helo_rules", "Refuse botnet HELO names (ylmf-pc)", "bool", _const(True)),
    Question("sender_rules", "Refuse botnet sender names (Anastasia..@)", "bool", _const(True)),
    Question("sender_verify", "Refuse sender domains that cannot receive mail "
             "(no MX or A, null MX)", "bool", _const(True)),
    Question("header_sender", "Refuse messages without a verifiable sender in their headers",
             "bool", _const(True)),
    Question("recipients", "Valid recipients (refuse unknown ones at RCPT): none, a file, "
             "LDAP, or Active Directory (LDAP with proxyAddresses)", "choice", _const("none"),
             choices=("none", "file", "ldap", "ad")),
    Question("recipient_addresses", "Addresses for the recipients file (@domain: all of it)",
             "list", _default_recipients, _addresses,
             asked=lambda a: a.get("recipients", "none") != "none", follows="domains"),
    Question("ldap_servers", "LDAP servers, tried in order", "list",
             lambda a, e: [f"ldaps://dc1.{a['domains'][0]}"] if a.get("domains") else [],
             _ldap_servers, asked=_ldap, follows="domains"),
    Question("ldap_base_dn", "LDAP search base", "text", _default_base_dn, _not_empty,
             asked=_ldap, follows="domains"),
    Question("ldap_filter", "LDAP filter (%s: the address)", "text", _default_filter,
             _ldap_filter, asked=_ldap, follows="recipients"),
    Question("ldap_bind_dn", "LDAP bind DN (none: anonymous bind)", "text", _const(""),
             asked=_ldap),
    Question("ldap_bind_password_file", "File holding the bind password", "text",
             lambda a, e: LDAP_PASSWORD_FILE if a.get("ldap_bind_dn") else "", _password_file,
             asked=lambda a: _ldap(a) and bool(a.get("ldap_bind_dn"))),
    Question("authentication", "Check SPF, DKIM and DMARC (refuse DMARC reject, mark SPF "
             "fail)", "bool", _const(True)),
    Question("spam_scanner", "Spam scanner", "choice", _const("none"),
             choices=("none", "spamd", "rspamd")),
    Question("spam_address", "Scanner address (spamd: host:port or socket; rspamd: URL)",
             "text", _default_spam_address, _not_empty,
             asked=_scanning, follows="spam_scanner"),
    Question("spam_tag_level", "Score at which messages are tagged (X-Spam-Flag)", "float",
             _default_tag, asked=_scanning, follows="spam_scanner"),
    Question("spam_kill_level", "Score at which messages are refused", "float", _default_kill,
             _kill_level, asked=_scanning, follows="spam_scanner"),
    Question("clamd", "Scan for viruses with ClamAV (clamd)", "bool", _const(False)),
    Question("clamd_address", "clamd socket or host:port", "text",
             _const("/run/clamav/clamd.ctl"), _not_empty, asked=_on("clamd")),
)  # fmt: skip
BY_KEY: dict[str, Question] = {q.key: q for q in QUESTIONS}
_NONE_WORDS = ("none", "-")
_YES = ("y", "yes", "true", "on", "1")
_NO = ("n", "no", "false", "off", "0")


# -- values ----------------------------------------------------------------------------------


def parse_text(question: Question, text: str) -> Any:
    """What an operator typed for ``question`` (not empty: that takes the default), as a value;
    ValueError with the reason."""
    text = text.strip()
    if question.kind == "bool":
        if text.lower() in _YES:
            return True
        if text.lower() in _NO:
            return False
        raise ValueError(f"expected yes or no, got {text!r}")
    if question.kind == "list":
        if text.lower() in _NONE_WORDS:
            return []
        return [item for item in re.split(r"[,\s]+", text) if item]
    if question.kind == "text":
        return "" if text.lower() in _NONE_WORDS else text
    return check_type(question, text if question.kind == "choice" else _number(question, text))


def _number(question: Question, text: str) -> int | float:
    try:
        return int(text) if question.kind == "int" else float(text)
    except ValueError:
        kind = "a whole number" if question.kind == "int" else "a number"
        raise ValueError(f"expected {kind}, got {text!r}") from None


def check_type(question: Question, value: Any) -> Any:
    """An answers-file value of the question's type (ints are floats where a number is
    asked); ValueError naming what was expected."""
    kind = question.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a whole number, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)
    if kind == "list":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"expected a list of strings, got {value!r}")
        return [v.strip() for v in value]
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    if kind == "choice" and value not in question.choices:
        raise ValueError(f"expected one of {', '.join(question.choices)}, got {value!r}")
    return value


def check_answer(question: Question, value: Any, answers: Answers) -> Any:
    """``value`` typed and validated against the answers before it; ValueError with why."""
    value = check_type(question, value)
    if question.validate is not None:
        problem = question.validate(value, answers)
        if problem:
            raise ValueError(problem)
    return value


def default_for(question: Question, answers: Answers, env: Environment) -> Any:
    return question.default(answers, env)


def resolve(given: Mapping[str, Any], env: Environment) -> Answers:
    """Every answer, in question order: ``given`` where it has one, else the default.
    Unknown keys are an error naming them; a value is validated when its question applies
    (a feature's details only while the feature is on), type-checked always."""
    unknown = sorted(set(given) - set(BY_KEY))
    if unknown:
        raise AnswersError(
            ", ".join(unknown), f"unknown answer key(s) (known: {', '.join(BY_KEY)})"
        )
    answers: Answers = {}
    for question in QUESTIONS:
        value = given[question.key] if question.key in given else question.default(answers, env)
        try:
            if question.asked(answers):
                answers[question.key] = check_answer(question, value, answers)
            else:
                answers[question.key] = check_type(question, value)
        except ValueError as exc:
            raise AnswersError(question.key, str(exc)) from None
    return answers


def answers_toml(answers: Answers) -> str:
    """The answers as an answers file (every key, in question order, each under its
    question), which :func:`resolve` reads back to the same answers."""
    lines = [
        "# Answers of `palisade init` (run it with --answers THIS-FILE to make the same config).",
        "# Keys not given take their defaults; the config generated from them is beside this.",
        "",
    ]
    for question in QUESTIONS:
        lines.append(f"# {question.prompt}")
        if question.choices:
            lines.append(f"# ({' | '.join(question.choices)})")
        lines.append(f"{question.key} = {toml_value(answers[question.key])}")
    return "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):  # JSON's escapes are TOML's; DEL must be escaped
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {value!r}")


# -- the config ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Generated:
    """A config and its list files (paths relative to the config's directory)."""

    config: str
    lists: dict[str, str] = field(default_factory=dict)
    features: tuple[str, ...] = ()


@dataclass
class _Rule:
    stage: str
    comment: str
    keys: list[tuple[str, Any, str]]  # key, value, trailing comment


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def blank(self) -> None:
        if self.lines and self.lines[-1] != "":
            self.lines.append("")

    def comment(self, *texts: str) -> None:
        self.lines.extend(f"# {t}" if t else "#" for t in texts)

    def section(self, name: str, *comments: str) -> None:
        self.blank()
        self.comment(*comments)
        self.lines.append(f"[{name}]")

    def key(self, key: str, value: Any, note: str = "") -> None:
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            if note:
                self.comment(f"{key}: {note}")
            self.lines.append(f"{key} = [")
            self.lines.extend(f"  {toml_value(item)}," for item in value)
            self.lines.append("]")
            return
        line = f"{key} = {toml_value(value)}"
        self.lines.append(f"{line:<32} # {note}" if note else line)

    def text(self) -> str:
        return "\n".join(self.lines).strip("\n") + "\n"


_HEADER = (
    "Palisade configuration written by `palisade init` from the answers in {answers}.",
    "Only the features chosen there are in it; run `palisade init` again to choose others",
    "(it writes palisade.toml.new and shows the difference), or edit this file and check it:",
    "    palisade config check --config {config}",
    "Rules run in the order written, per stage; the first decisive one wins (exim ACL",
    "semantics). verb: accept (ends the stage), accept_all (skips every later check of the",
    "connection), deny (5xx), drop (5xx and close), defer (4xx), warn (log and X-Warning header).",
    "message: what the client sees; log_message: what the log says.",
    "on_error: what a temporary failure (DNS timeout, SERVFAIL) does: defer (the default), skip",
    "(the default of dnsbl and dbl), deny, match. Never deny on a DNS rule: a dead resolver",
    "would bounce everybody's mail. observe = true: log 'would deny ...' without acting.",
)


def generate(
    answers: Answers,
    *,
    config_path: Path = CONFIG_PATH,
    answers_path: Path = CONFIG_PATH.parent / "init-answers.toml",
) -> Generated:
    """The config text and list files for ``answers`` (as :func:`resolve` returns them).
    ``config_path`` and ``answers_path`` are only named in the header comment."""
    a = answers
    features: list[str] = []
    out = _Writer()
    out.comment(*(line.format(answers=answers_path, config=config_path) for line in _HEADER))
    relay = bool(a["next_hop"])

    out.section("server")
    out.key("hostname", a["hostname"], "greeting, Received headers, EHLO reply")
    out.key("listen", a["listen"])
    out.key("workers", 2, "processes sharing the port")
    out.key("max_connections_per_ip", 20, "421 4.7.0 over it")
    if a["user"]:
        out.comment(
            "Started as root, every process drops to this user (and its group) after binding",
            "the port and before reading a byte from a client.",
        )
        out.key("user", a["user"])
    out.key("control_socket", a["control_socket"], "palisade status asks the daemon here")

    out.section("domains")
    if relay:
        out.key("local", [], "none: every domain goes to the next hop")
        out.key("relay", a["domains"], "delivered to [delivery] next_hop")
    else:
        out.key("local", a["domains"], "delivered to Maildir under [paths] mail")
        out.key("relay", [])

    out.section(
        "relay",
        "Never an open relay: only these networks may send to any domain (via the next hop).",
    )
    out.key("relay_from_hosts", a["relay_from_hosts"])
    if a["relay_from_hosts"]:
        features.append("relay_from_hosts")

    if relay:
        features.append("next_hop")
        out.section(
            "delivery",
            "The internal server for the relay domains (and the smarthost for relay_from_hosts).",
            "Retries: 5m, doubling up to 1h, for 5 days; then the sender gets a DSN.",
        )
        out.key("next_hop", a["next_hop"])
        out.key("require_tls", False, "true: never send to the next hop in cleartext")
    else:
        features.append("maildir")

    out.section("paths", "Owned by the gateway's user; `palisade install-system` creates them.")
    out.key("spool", a["spool_dir"])
    out.key("mail", a["mail_dir"], "Maildir root" if not relay else "unused without local domains")
    out.key("log", a["log_dir"], "mainlog, rejectlog, paniclog")
    out.key("state", a["state_file"], "rate limits, incidents, caches")

    out.section("log")
    out.key("json", False, "true: also main.jsonl, one JSON object per event")

    out.section(
        "dns",
        "DNSBLs refuse queries from public resolvers: run a local resolver (unbound) and use it.",
    )
    if a["nameservers"]:
        out.key("nameservers", a["nameservers"])
    else:
        out.comment('nameservers = ["127.0.0.1:53"]   # not set: the resolvers of /etc/resolv.conf')
    out.key("timeout", "2s")
    out.key("dnsbl_probe_interval", "5m", "RFC 5782 health probe of every DNSBL zone")

    tls = bool(a["tls_certificate"])
    if tls:
        features.append("tls")
        out.section(
            "tls",
            "STARTTLS with this chain (leaf first, then intermediates) and its unencrypted key;",
            "`palisade tls check` and `config check` show the chain's order and expiry.",
        )
        out.key("certificate", a["tls_certificate"])
        out.key("private_key", a["tls_private_key"])

    lists: dict[str, str] = {}
    list_specs: list[tuple[str, str, str]] = []
    if a["whitelist"]:
        list_specs.append(("whitelist_connect_hosts", "ip", "IPs and networks, v4 and v6"))
        lists["lists/whitelist_connect_hosts"] = _list_file(
            "IPs and networks that skip every check (one per line, # comments), e.g.",
            "192.0.2.10 or 198.51.100.0/24. Re-read when it changes.",
            entries=a["whitelist_hosts"],
        )
    if a["sender_whitelist"]:
        list_specs.append(("sender_local_deny_exceptions", "domain", ".example.org = subdomains"))
        lists["lists/sender_local_deny_exceptions"] = _list_file(
            "Sender domains that skip sender verification and the header sender check",
            "(.example.org = any subdomain). Re-read when it changes.",
            entries=a["sender_whitelist_domains"],
        )
    recipients = a["recipients"]
    if recipients != "none":
        list_specs.append(("recipients", "address", "valid recipients; @domain = all of it"))
        lines = ["Valid recipients, one per line; @domain accepts the whole domain."]
        if recipients in ("ldap", "ad"):
            lines.append("Asked before LDAP; `palisade recipients sync` rewrites it from LDAP.")
        lists["lists/recipients"] = _list_file(*lines, entries=a["recipient_addresses"])
    if list_specs:
        out.section("lists", "Plain files next to this config, one entry per line.")
        for name, kind, note in list_specs:
            out.key(name, {"type": kind, "file": f"lists/{name}"}, note)

    if recipients in ("ldap", "ad"):
        features.append("ldap_ad" if recipients == "ad" else "ldap")
        out.section(
            "ldap",
            "Recipients not in lists/recipients are looked up here; LDAP down: 451 (retry later).",
            *(
                ("Active Directory: any smtp: proxy address of a user or group is a recipient.",)
                if recipients == "ad"
                else ()
            ),
        )
        out.key("servers", a["ldap_servers"], "tried in order (failover)")
        out.key("base_dn", a["ldap_base_dn"])
        out.key("filter", a["ldap_filter"], "%s: the address, RFC 4515-escaped")
        out.key("attributes", ["proxyAddresses"] if recipients == "ad" else ["mail"])
        if a["ldap_bind_dn"]:
            out.key("bind_dn", a["ldap_bind_dn"])
            out.key("bind_password_file", a["ldap_bind_password_file"], "a secret: never logged")
        else:
            out.comment("bind_dn is not set: anonymous bind")
        out.key("timeout", "5s")
        out.key("positive_ttl", "1h", '"exists" is remembered this long')
        out.key("negative_ttl", "5m", '"does not exist" this long; outages never')

    if a["authentication"]:
        features.append("authentication")
        out.section("authentication", "SPF, DKIM, DMARC and iprev; one Authentication-Results.")
        out.key("enabled", True)

    scanner = a["spam_scanner"]
    if scanner != "none":
        features.append(scanner)
        out.section(
            scanner,
            f"Tag at {a['spam_tag_level']:g} (X-Spam-* headers), refuse at "
            f"{a['spam_kill_level']:g} (550 after the final dot); down: accept, 'unchecked'.",
            *(
                ("rspamd scores on its own scale: keep kill_level at or below its reject.",)
                if scanner == "rspamd"
                else ()
            ),
        )
        out.key("address" if scanner == "spamd" else "url", a["spam_address"])
        out.key("tag_level", a["spam_tag_level"])
        out.key("kill_level", a["spam_kill_level"])
        out.key("on_failure", "accept", '"defer": 451 while the scanner is down')
    if a["clamd"]:
        features.append("clamd")
        out.section("clamd", "ClamAV: a virus is refused with 550; clamd down: 451 (defer).")
        out.key("address", a["clamd_address"])
        out.key("on_failure", "defer")

    rules = _rules(a, tls, features)
    stage_titles = {"connect": "connect", "helo": "HELO", "mail": "MAIL", "rcpt": "RCPT"}
    stage_titles["data"] = "DATA"
    current = ""
    for rule in rules:
        if rule.stage != current:
            current = rule.stage
            out.blank()
            out.comment(f"{'-' * 80} {stage_titles[current]}")
            if current == "data" and (a["clamd"] or scanner != "none"):
                out.comment("The clamd virus rule runs before these, the spam kill level after.")
        out.blank()
        out.comment(*rule.comment.split("\n"))
        out.lines.append(f"[[rules.{rule.stage}]]")
        for key, value, note in rule.keys:
            out.key(key, value, note)
    return Generated(out.text(), lists, tuple(features))


def _list_file(*comments: str, entries: Sequence[str]) -> str:
    return "".join(f"# {c}\n" for c in comments) + "".join(f"{e}\n" for e in entries)


def _dnsbl_zones(a: Answers) -> list[Any]:
    zones = list(dict.fromkeys(z.lower().rstrip(".") for z in a["dnsbl_zones"]))
    if a["dqs_key"] and not any(z.endswith(".spamhaus.org") for z in zones):
        zones.insert(0, "zen.spamhaus.org")  # a DQS key is for Spamhaus' zones
    return [KNOWN_ZONES.get(z, z) for z in zones]


# The incident weights of examples/perimeter.toml's rules, by rule name: a refusal by one of
# them adds that many incidents to the client's record (README "Incidents and blocks").
INCIDENT_WEIGHTS: dict[str, int] = {
    "reverse DNS": 2,
    "DNS blocklists": 3,
    "botnet HELO names": 5,
    "botnet senders": 5,
    "sender verification": 1,
}


def _rules(a: Answers, tls: bool, features: list[str]) -> list[_Rule]:
    rules: list[_Rule] = []

    def rule(stage: str, feature: str, comment: str, *keys: tuple[str, Any, str]) -> None:
        if feature not in features:
            features.append(feature)
        listed = list(keys)
        weight = INCIDENT_WEIGHTS.get(str(listed[0][1]))  # the rule's name comes first
        if weight is not None:  # after the verb, as in examples/perimeter.toml
            at = next(i for i, key in enumerate(listed) if key[0] == "verb") + 1
            listed.insert(at, k("incident", weight, "incidents per refusal ([incidents])"))
        rules.append(_Rule(stage, comment, listed))

    def k(key: str, value: Any, note: str = "") -> tuple[str, Any, str]:
        return (key, value, note)

    if a["whitelist"]:
        rule(
            "connect",
            "whitelist",
            "Trusted hosts (lists/whitelist_connect_hosts) skip every check.",
            k("name", "whitelist_connect_hosts"),
            k("check", "ip_list"),
            k("list", "whitelist_connect_hosts"),
            k("verb", "accept_all"),
            k("log_message", "ACCEPT - whitelisted host"),
        )
        rule(
            "connect",
            "whitelist",
            "Loopback and private ranges skip the connect checks (not the later ones).",
            k("name", "private and loopback ranges"),
            k("check", "private_ip"),
            k("verb", "accept"),
        )
    if a["history"]:
        rule(
            "connect",
            "history",
            "Blocked clients (incidents reaching [incidents] block_at) are refused until the\n"
            "block ends; palisade history list|show|remove says who and why.",
            k("name", "history"),
            k("check", "history"),
            k("verb", "deny"),
            k("message", "Blacklisted: Denied access - history of unwanted activity"),
            k(
                "log_message",
                "DENY - history of unwanted activity ($count incidents; blocked until $until:"
                " $reason)",
            ),
        )
    if a["ratelimit"]:
        rule(
            "connect",
            "ratelimit",
            "Connections per client IP (IPv6 per /64), counted in the state database.\n"
            "Tune: limit and window; log_rates logs every client's current rate.",
            k("name", "connection rate"),
            k("check", "ratelimit"),
            k("limit", a["ratelimit_connections"]),
            k("window", a["ratelimit_window"]),
            k("log_rates", True),
            k("verb", "defer"),
            k("message", "Too many connections, slow down"),
            k("log_message", "DEFER - rate limit exceeded ($rate)"),
        )
    if a["ptr_required"]:
        rule(
            "connect",
            "ptr_required",
            "No PTR name for the client IP: refused. A resolver failure defers (421), never\n"
            "denies: with on_error = deny a dead resolver would refuse everybody.",
            k("name", "reverse DNS"),
            k("check", "rdns"),
            k("verb", "deny"),
            k("message", "Reverse DNS lookup failed"),
            k("log_message", "DENY - Reverse DNS check failed"),
        )
    if a["dnsbl"]:
        keys = [k("name", "DNS blocklists"), k("check", "dnsbl"), k("zones", _dnsbl_zones(a))]
        if a["dqs_key"]:
            keys.append(
                k("dqs_key", a["dqs_key"], "asked as KEY.zen.dq.spamhaus.net; never logged")
            )
        keys += [
            k("verb", "deny"),
            k("message", "$ip is listed at $zone"),
            k("log_message", "DENY - listed at $zone ($codes)"),
        ]
        rule(
            "connect",
            "dnsbl",
            "DNS blocklists. A zone that times out or answers an error code (127.255.255.x)\n"
            "counts as not listed (on_error skip); each such lookup is in the main log.\n"
            'Tune: zones; verb = "warn" to only mark listed clients.',
            *keys,
        )
    if a["generic_rdns"] != "off":
        keys = [
            k("name", "generic reverse DNS"),
            k("check", "rdns"),
            k("generic", True, "a PTR name like 192-0-2-1.dsl.example.net"),
            k("verb", "deny"),
        ]
        if a["generic_rdns"] == "observe":
            keys.append(k("observe", True, "log only: read the log for a week, then delete"))
        keys += [
            k("message", "Generic reverse DNS: please send through your provider's mail server"),
            k("log_message", "DENY - generic reverse DNS: $reason"),
        ]
        rule(
            "connect",
            "generic_rdns",
            "End-user hosts (dsl, dyn, pool, an address in the name) send little but botnet\n"
            "spam. Whitelist any real sender among them before refusing.",
            *keys,
        )
    if a["helo_rules"]:
        rule(
            "helo",
            "helo_rules",
            "Botnet HELO names. Tune: patterns (regexes).",
            k("name", "botnet HELO names"),
            k("check", "helo"),
            k("patterns", ["^ylmf-pc$"]),
            k("verb", "deny"),
            k("message", "Access denied"),
            k("log_message", "DENY - HELO $helo"),
        )
    if a["relay_from_hosts"]:
        rule(
            "mail",
            "relay_from_hosts",
            "Your own networks sending as your domains skip the checks that follow.",
            k("name", "local senders from trusted hosts"),
            k("check", "local_sender"),
            k("verb", "accept_all"),
        )
    if a["sender_rules"]:
        rule(
            "mail",
            "sender_rules",
            "Botnet sender names. Tune: patterns (regexes).",
            k("name", "botnet senders"),
            k("check", "sender"),
            k("patterns", ["^Anastasia.{2,5}@"]),
            k("verb", "deny"),
            k("message", "Access denied"),
            k("log_message", "DENY - botnet sender pattern"),
        )
    if a["sender_whitelist"]:
        rule(
            "mail",
            "sender_whitelist",
            "Sender domains in lists/sender_local_deny_exceptions skip the MAIL checks below.",
            k("name", "sender domain exceptions"),
            k("check", "domain_list"),
            k("list", "sender_local_deny_exceptions"),
            k("field", "sender_domain"),
            k("verb", "accept"),
        )
    if a["sender_verify"]:
        rule(
            "mail",
            "sender_verify",
            "The sender domain must be able to receive mail (MX or A/AAAA, no null MX).",
            k("name", "sender verification"),
            k("check", "sender"),
            k("verify", True),
            k("verb", "deny"),
            k("message", "Sender domain does not accept mail"),
            k("log_message", "DENY - sender verification failed: $reason"),
        )
    if a["dbl"]:
        keys = [k("name", "Spamhaus DBL"), k("check", "dbl"), k("fields", ["sender_domain"])]
        if a["dqs_key"]:
            keys.append(k("dqs_key", a["dqs_key"], "asked as KEY.dbl.dq.spamhaus.net"))
        keys += [
            k("verb", "deny"),
            k("message", "$domain is listed at $zone"),
            k("log_message", "DENY - $domain listed at $zone ($codes)"),
        ]
        rule(
            "mail",
            "dbl",
            "The sender domain on Spamhaus' domain blocklist; an unreadable zone is skipped.",
            *keys,
        )
    if tls and a["tls_required"] != "off":
        keys = [k("name", "TLS required"), k("check", "tls_required"), k("verb", "deny")]
        if a["tls_required"] == "observe":
            keys.append(k("observe", True, "log only: delete this line to refuse cleartext"))
        keys += [
            k("message", "Encryption required: use STARTTLS"),
            k("log_message", "DENY - TLS required"),
        ]
        rule(
            "rcpt",
            "tls_required",
            "Senders that do not use STARTTLS. Most MTAs do; some old ones never will.",
            *keys,
        )
    if a["recipients"] != "none":
        source = "lists/recipients" + (", then LDAP" if a["recipients"] != "file" else "")
        keys = [k("name", "valid recipients"), k("check", "recipient"), k("list", "recipients")]
        keys += [k("verb", "deny"), k("code", 550), k("enhanced", "5.1.1")]
        if a["recipients"] != "file":
            keys.append(k("timeout", "8s", "above [ldap] timeout: LDAP down gives 451 4.4.3"))
        keys += [
            k("message", "<$recipient>: Recipient address rejected: User unknown"),
            k("log_message", "DENY - unknown recipient: $reason"),
        ]
        rule(
            "rcpt",
            f"recipients_{a['recipients']}",
            f"Unknown recipients are refused at RCPT ({source}): no backscatter.\n"
            "Keep postmaster@ and abuse@ in the file.",
            *keys,
        )
    if a["header_sender"]:
        keys = [k("name", "header sender"), k("check", "header_sender")]
        if a["sender_whitelist"]:
            keys.append(k("except_sender_domains", "sender_local_deny_exceptions"))
        keys += [
            k("verb", "deny"),
            k("message", "No valid sender in the message headers"),
            k("log_message", "DENY - header sender: $reason"),
        ]
        rule(
            "data",
            "header_sender",
            "A verifiable address in Sender:, Reply-To: or From: (exactly one From:).",
            *keys,
        )
    if a["authentication"]:
        rule(
            "data",
            "authentication",
            "The sender domain's DMARC policy says reject.",
            k("name", "DMARC reject"),
            k("check", "dmarc"),
            k("policy", ["reject"]),
            k("verb", "deny"),
            k("message", "Rejected by the DMARC policy of $domain"),
            k("log_message", "DENY - DMARC $result for $domain ($disposition)"),
        )
        rule(
            "data",
            "authentication",
            "Many forwarders break SPF: mark the message, let the spam score decide.",
            k("name", "SPF fail"),
            k("check", "spf"),
            k("result", "fail"),
            k("verb", "warn"),
            k("log_message", "WARN - SPF $spf_result for $spf_domain"),
        )
    order = {"connect": 0, "helo": 1, "mail": 2, "rcpt": 3, "data": 4}
    return sorted(rules, key=lambda r: order[r.stage])  # stable: the order above per stage
