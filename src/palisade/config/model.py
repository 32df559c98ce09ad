"""The typed, frozen configuration: what the operator's TOML file may say, with defaults.

Owns: the names, types and defaults of every setting. Knows nothing of files or parsing (see
``loader``). Every section is a frozen dataclass so a loaded config can be shared between tasks and
swapped atomically on reload.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def duration(default: float, minimum: float = 0.0) -> float:
    """Marks a duration field: seconds, as a number or as ``"5m"``, ``"4h"``, ``"5d"``."""
    return field(default=default, metadata={"kind": "duration", "min": minimum})


def positive(default: int, minimum: int = 1) -> int:
    """Marks an integer field with a lower bound."""
    return field(default=default, metadata={"min": minimum})


def choice(default: str, *others: str) -> str:
    """Marks a string field that must be one of a few words."""
    return field(default=default, metadata={"choices": (default, *others)})


# syslog(3)'s facility names other than ``mail`` (the default), in the order of their codes.
SYSLOG_FACILITIES = (
    "user", "daemon", "auth", "authpriv", "local0", "local1", "local2", "local3", "local4",
    "local5", "local6", "local7",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The listener: who we say we are, where we listen, how many clients we hold."""

    hostname: str = "mx.example.test"
    listen: tuple[str, ...] = ("127.0.0.1:2525",)
    workers: int = positive(1)
    greeting_delay: float = duration(0.0)
    pregreet_pass_ttl: float = duration(86400.0)  # 0: every connection waits greeting_delay
    max_connections: int = positive(2000)
    max_connections_per_ip: int = positive(20)
    # The service account every process drops to once the listeners are bound (README,
    # "Running unprivileged"): a user name that must exist (kept as the name, for initgroups),
    # and a group name or gid (resolved to the gid; default: the user's primary group).
    user: str | None = field(default=None, metadata={"kind": "user"})
    group: int | None = field(default=None, metadata={"kind": "group"})
    pid_file: Path | None = None  # the parent writes its pid there (logrotate without systemd)
    # ``palisade status`` asks the running daemon here (a Unix socket, 0600; server.control).
    control_socket: Path = Path("var/run/control.sock")


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """RFC 5321 limits and the timers that stop slow or abusive clients."""

    max_message_size: int = positive(26_214_400, 1024)
    max_recipients: int = positive(100)
    max_errors: int = positive(10)
    max_command_line: int = positive(512, 512)
    max_text_line: int = positive(1000, 1000)
    command_timeout: float = duration(300.0, 1.0)
    data_timeout: float = duration(600.0, 1.0)
    min_data_rate: int = positive(512, 0)
    min_data_rate_grace: float = duration(30.0)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Server certificate chain (leaf first) and key; STARTTLS is offered only when both are set."""

    certificate: Path | None = None
    private_key: Path | None = None


@dataclass(frozen=True, slots=True)
class DomainsConfig:
    """Which recipient domains we accept: local ones go to Maildir, relay ones to the next hop."""

    local: tuple[str, ...] = ()
    relay: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RelayControlConfig:
    """Clients allowed to send to any domain (trusted networks). Empty by default: no open relay."""

    relay_from_hosts: tuple[Network, ...] = ()


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    """How accepted mail leaves: next hop for relay domains, retry schedule, expiry."""

    next_hop: str | None = None
    require_tls: bool = False
    tls_ca_file: Path | None = None
    retry_initial: float = duration(300.0, 1.0)
    retry_max_interval: float = duration(3600.0, 1.0)
    max_age: float = duration(5 * 86400.0, 1.0)
    concurrency: int = positive(20)
    timeout: float = duration(120.0, 1.0)


TLS_LEVELS = ("opportunistic", "require", "verify")


@dataclass(frozen=True, slots=True)
class OutboundConfig:
    """Mail routed OUTBOUND (authenticated submissions, relay_from_hosts mail to other domains,
    bounces): ``delivery`` "next_hop" sends it through ``[delivery] next_hop`` (the smarthost),
    "mx" to each recipient domain's MX hosts (README "Outbound: delivery").

    ``tls``: the level for every destination (opportunistic, require, verify); ``domains``: a
    level per recipient domain (``[outbound.domains]``, wins over DANE and MTA-STS);
    ``on_tls_failure``: "fail" (a DSN at once saying why) or "defer" (retry) when a destination
    cannot give the TLS its level demands; ``tls_ca_file``: extra trust anchors for verify
    (empty: the system's); ``concurrency_per_destination``: deliveries in flight per recipient
    domain; ``port``: the MX hosts' port, 25: another value is for tests and labs only.

    ``mta_sts``: look up the domains' MTA-STS policies (RFC 8461; cached in ``mta-sts.json``
    beside ``[paths] state``); ``mta_sts_port``: the policy hosts' HTTPS port, 443: another
    value is for tests and labs only. ``dane``: use DNSSEC-authenticated TLSA records of the MX
    hosts (RFC 7672; needs a validating resolver, see ``[dns] trust_ad``). ``tls_reports``: the
    directory of the TLS-RPT result files (``YYYY-MM-DD.jsonl``), empty: none kept."""

    delivery: str = choice("next_hop", "mx")
    tls: str = choice(*TLS_LEVELS)
    on_tls_failure: str = choice("fail", "defer")
    tls_ca_file: Path | None = field(default=None, metadata={"empty": None})
    concurrency_per_destination: int = positive(4)
    port: int = positive(25)
    mta_sts: bool = True
    mta_sts_port: int = positive(443)
    dane: bool = True
    tls_reports: Path | None = field(default=Path("var/tlsrpt"), metadata={"empty": None})
    domains: tuple[tuple[str, str], ...] = field(default=(), metadata={"kind": "domain_levels"})

    def level_for(self, domain: str) -> str | None:
        """The ``[outbound.domains]`` level of ``domain`` (case-insensitive), or None."""
        domain = domain.lower().rstrip(".")
        for name, level in self.domains:
            if name == domain:
                return level
        return None


@dataclass(frozen=True, slots=True)
class PathsConfig:
    """Where state lives. Relative paths are relative to the working directory at start-up.

    ``group``: a group name or gid (resolved to the gid when loaded) that may read the Maildir
    tree: with it, the mailbox directories the gateway creates are 0750 and its files 0640, both
    of that group, for a delivery agent (Dovecot's ``mail`` group); without it 0700 and 0600.
    The spool, the state database and the logs never take it.
    """

    spool: Path = Path("var/spool")
    mail: Path = Path("var/mail")
    log: Path = Path("var/log")
    state: Path = Path("var/state.sqlite")
    group: int | None = field(default=None, metadata={"kind": "group"})


@dataclass(frozen=True, slots=True)
class StateConfig:
    """Where incidents, blocks, rate counters and pregreet passes are kept (README "Several MX
    hosts").

    ``backend = "sqlite"``: the ``[paths] state`` file, for one host. ``"redis"``: a Redis (or
    Valkey) server shared by every MX host: ``url`` (``redis://host:port/db`` or ``rediss://``
    for TLS, verified against ``ca_file`` or the system's CAs; never a password in it), the
    password in ``password_file`` (its first line; never logged), ``username`` for a Redis ACL
    user; or Sentinel: ``sentinels`` (``host:port`` each) and the master's name ``service``
    (the url's scheme, db, TLS settings then apply to the master). ``prefix`` namespaces every
    key (several gateways on one Redis). ``timeout`` bounds every command (a hung Redis costs a
    session at most that), ``connect_timeout`` a connection; while Redis is unreachable each
    host counts on its own ``[paths] state`` file and asks Redis again every ``retry_interval``.
    """

    backend: str = choice("sqlite", "redis")
    url: str = "redis://127.0.0.1:6379/0"
    username: str = ""
    password_file: Path | None = None
    ca_file: Path | None = None
    sentinels: tuple[str, ...] = ()
    service: str = ""
    prefix: str = "palisade:"
    timeout: float = duration(0.5, 0.01)
    connect_timeout: float = duration(1.0, 0.01)
    retry_interval: float = duration(2.0, 0.1)
    max_connections: int = positive(64)


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """The resolver the checks use. DNSBLs refuse public resolvers: point it at a local one."""

    nameservers: tuple[str, ...] = ()  # "127.0.0.1:53"; empty: /etc/resolv.conf
    timeout: float = duration(2.0, 0.1)
    retries: int = positive(1, 0)
    cache_max_ttl: int = positive(3600, 0)
    dnsbl_probe_interval: float = duration(300.0, 0.0)  # 0: never probe (RFC 5782 section 5)
    # Believe the resolver's AD bit (DNSSEC-validated) for DANE: "auto" only when every
    # nameserver is on loopback (a validating unbound there); "yes" any; "no" never.
    trust_ad: str = choice("auto", "yes", "no")


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """How rules are applied."""

    delay_reject: bool = False  # connect/HELO/MAIL denials answered at RCPT (smtpd_delay_reject)
    check_timeout: float = duration(5.0, 0.1)  # default deadline of one check


@dataclass(frozen=True, slots=True)
class ListSpec:
    """A named operator list: a file reloaded on change, or entries written in the config."""

    name: str
    kind: str  # ip, domain, address, regex
    file: Path | None = None
    entries: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """A rule as written: the fixed keys, and the check's own options (validated by the check)."""

    stage: str
    index: int  # position among the stage's [[rules.<stage>]] tables, from 0
    check: str
    verb: str
    name: str = ""
    message: str = ""
    log_message: str = ""
    observe: bool = False
    on_error: str | None = None  # None: the check's default (defer; skip for dnsbl and dbl)
    timeout: float | None = None
    negate: bool = False
    code: int | None = None
    enhanced: str | None = None
    recipient_domains: tuple[str, ...] = ()
    incident: int = 0  # incidents recorded for the client when the rule refuses (deny, drop)
    options: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True, slots=True)
class LdapConfig:
    """The directory asked when a recipient is not in the static recipients list.

    ``servers`` empty: LDAP is off. Several servers are tried in order (failover). The bind
    password (or the file holding it) is a secret: it never appears in a log or a message.
    """

    servers: tuple[str, ...] = ()  # "ldap://dc1.example.com", "ldaps://dc2.example.com:636"
    bind_dn: str = ""  # empty: anonymous bind
    bind_password: str = ""
    bind_password_file: Path | None = None
    base_dn: str = ""
    filter: str = "(mail=%s)"  # %s: the recipient address, escaped per RFC 4515
    attributes: tuple[str, ...] = ("mail",)  # what `palisade recipients sync` exports
    start_tls: bool = False
    ca_file: Path | None = None  # trust anchors for ldaps:// and StartTLS (default: system)
    timeout: float = duration(5.0, 0.1)
    positive_ttl: float = duration(3600.0)
    negative_ttl: float = duration(300.0)


@dataclass(frozen=True, slots=True)
class SpamdConfig:
    """SpamAssassin's spamd. ``address`` empty: no spam scanning (logged once at start)."""

    address: str = ""  # "127.0.0.1:783" or a Unix socket path "/run/spamd.sock"
    user: str = ""  # spamc -u: whose preferences spamd applies
    timeout: float = duration(30.0, 0.1)
    max_size: int = positive(512_000, 1024)  # larger messages are not scanned (spamc -s)
    tag_level: float = 4.5  # at or above: X-Spam-Flag, X-Spam-Score, X-Spam-Status
    kill_level: float = 16.0  # at or above: 550 at the end of DATA
    on_failure: str = choice("accept", "defer")  # accept: X-Spam-Status: unchecked


@dataclass(frozen=True, slots=True)
class RspamdConfig:
    """rspamd's HTTP /checkv2, as an alternative to spamd (same headers and verbs). The levels
    default to rspamd's own stock thresholds (actions.conf: "add header" 6, "reject" 15), not
    SpamAssassin's: rspamd reports a forced action such as GTUBE's with that action's threshold
    as the score (15.0), which a kill level of 16 would let through."""

    url: str = ""  # "http://127.0.0.1:11333"; empty: off
    password: str = ""  # the controller password, if rspamd asks for one (a secret)
    timeout: float = duration(30.0, 0.1)
    max_size: int = positive(512_000, 1024)
    tag_level: float = 6.0  # rspamd's "add header"
    kill_level: float = 15.0  # rspamd's "reject"
    on_failure: str = choice("accept", "defer")


@dataclass(frozen=True, slots=True)
class ClamdConfig:
    """ClamAV's clamd (INSTREAM). ``address`` empty: no virus scanning."""

    address: str = ""  # "127.0.0.1:3310" or "/run/clamav/clamd.ctl"
    timeout: float = duration(60.0, 0.1)
    max_size: int = positive(26_214_400, 1024)  # must not exceed clamd's StreamMaxLength
    on_failure: str = choice("defer", "accept")


@dataclass(frozen=True, slots=True)
class AuthenticationConfig:
    """SPF, DKIM and DMARC on inbound mail, reported in one Authentication-Results header."""

    enabled: bool = False
    authserv_id: str = ""  # empty: server.hostname
    spf: bool = True
    dkim: bool = True
    dmarc: bool = True
    received_spf: bool = True  # also add a Received-SPF header (RFC 7208 9.1)


@dataclass(frozen=True, slots=True)
class DkimKey:
    """One signing key: the d= domain, the selector its public key is published under, and
    the PEM file (relative: under ``[dkim] keys_dir``); the algorithm is the key's own (RSA or
    Ed25519)."""

    domain: str
    selector: str
    file: Path


@dataclass(frozen=True, slots=True)
class DkimConfig:
    """DKIM signing of outbound mail (from ``relay_from_hosts``): the keys per From domain.

    A domain with an RSA and an Ed25519 key gets both signatures (RFC 8463); each key needs its
    own selector (a selector publishes one key)."""

    keys_dir: Path = Path("/etc/palisade/keys")
    keys: tuple[DkimKey, ...] = ()

    def key_path(self, key: DkimKey) -> Path:
        """Where ``key``'s file is: its ``file`` as given when absolute, else under keys_dir."""
        return key.file if key.file.is_absolute() else self.keys_dir / key.file


@dataclass(frozen=True, slots=True)
class DmarcConfig:
    """Our own DMARC aggregate reports (RFC 7489 section 7.2; README "DMARC reports").

    ``reports``: keep every DMARC evaluation of inbound mail (under ``state``/records) for
    ``palisade dmarc send-reports``, run daily (contrib/palisade-reports.timer), which sends
    them to each domain's rua. ``org_name`` and ``from_address`` say who reports (default: the
    server's hostname and ``postmaster@`` it); the report is DKIM-signed when a ``[dkim]`` key
    covers the from address's domain. ``max_report_size``: a report mail larger than this is
    not sent (and a rua's ``!size`` may lower it). The same org_name and from_address sign our
    TLS reports (``palisade tlsrpt send-reports``)."""

    reports: bool = False
    org_name: str = ""
    from_address: str = ""
    state: Path = Path("var/dmarc")
    max_report_size: int = positive(10 * 1024 * 1024, 1024)

    def reporter(self, hostname: str) -> tuple[str, str]:
        """(org_name, from address) with their defaults filled in."""
        return self.org_name or hostname, self.from_address or f"postmaster@{hostname}"


@dataclass(frozen=True, slots=True)
class IncidentsConfig:
    """Incidents and blocks (README "Incidents and blocks").

    An incident counts while younger than ``window``; a client (IPv6: its /64) whose weighted
    count within the window reaches ``block_at`` is blocked for ``block_for``; each later block
    of the same client lasts ``block_growth`` times the previous one, at most ``block_max``.
    Rules give their own weight (``incident = N``); the weights below are for what is not a
    rule (0: not counted). ``unknown_recipients`` counts once per connection that had
    ``unknown_recipients_burst`` recipients refused by a ``recipient`` check.
    ``protect_loopback``: 127.0.0.0/8 and ::1 are never blocked (with relay_from_hosts and the
    connect whitelists, always protected).
    """

    window: float = duration(7 * 86400.0, 1.0)
    block_at: int = positive(10)
    block_for: float = duration(86400.0, 1.0)
    block_growth: float = 2.0
    block_max: float = duration(30 * 86400.0, 1.0)
    protect_loopback: bool = True
    pregreet: int = positive(3, 0)  # spoke before the banner (greeting_delay)
    protocol_violation: int = positive(2, 0)  # pipelining sync error, too many errors
    smuggling: int = positive(5, 0)  # bare LF / bare CR / NUL in DATA (SMTP smuggling)
    unknown_recipients: int = positive(2, 0)  # a burst of unknown recipients in a connection
    unknown_recipients_burst: int = positive(5)
    auth_failure: int = positive(1, 0)  # a failed AUTH (AUTH comes with issue 14)


@dataclass(frozen=True, slots=True)
class SubmissionConfig:
    """Submission of mail by our own users (RFC 6409): listeners, SMTP AUTH, sender rules, rates.

    ``listen`` takes STARTTLS listeners (587: AUTH only after STARTTLS), ``listen_tls`` implicit
    TLS ones (465, RFC 8314); both need ``[tls]``. The perimeter's connect and HELO rules do not
    apply there; a client must authenticate before MAIL. ``auth`` picks the back end: the
    Argon2id ``password_file`` (``palisade passwd``) or Dovecot's auth socket (``dovecot_socket``:
    a Unix socket path or host:port). Failed attempts cost a delay that doubles per failure of
    the client address (``failure_delay`` up to ``failure_delay_max``); the connection is closed
    (421) after ``max_auth_failures``. ``senders``: the file mapping each user to the addresses it
    may send as (``user address @domain ...``); without it a user may send only as its own name
    when that is an address. ``max_messages`` and ``max_recipients`` (0: no limit) count per user
    over ``rate_window``.
    """

    listen: tuple[str, ...] = ()  # "0.0.0.0:587"
    listen_tls: tuple[str, ...] = ()  # "0.0.0.0:465"
    auth: str = choice("file", "dovecot")
    password_file: Path = Path("/etc/palisade/passwd")
    dovecot_socket: str = "/run/dovecot/auth-client"
    auth_timeout: float = duration(10.0, 0.1)
    max_auth_failures: int = positive(3)
    failure_delay: float = duration(1.0)
    failure_delay_max: float = duration(30.0)
    senders: Path | None = None
    max_messages: int = positive(200, 0)
    max_recipients: int = positive(1000, 0)
    rate_window: float = duration(3600.0, 1.0)
    spam_scan: bool = False  # score our own users' mail with spamd/rspamd (virus scan always)

    @property
    def enabled(self) -> bool:
        """Whether any submission listener is configured."""
        return bool(self.listen or self.listen_tls)


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Log options: JSON lines beside the exim-shaped text, echo to standard output, and every
    line also to syslog (``syslog_facility``, ident ``palisade``) through ``syslog_socket``."""

    json: bool = False
    echo: bool = False
    syslog: bool = False
    syslog_facility: str = choice("mail", *SYSLOG_FACILITIES)
    syslog_socket: Path = Path("/dev/log")


@dataclass(frozen=True, slots=True)
class FirewallConfig:
    """``palisade firewall``: which kernel firewall the active blocks are copied into.

    ``nftables``: the table ``inet <table>`` (sets blocked4, blocked6 and a drop rule for new
    TCP connections to ``ports``), synced every ``interval``; ``none``: blocks stay in the state
    store only (the ``history`` check still refuses them, in the SMTP conversation)."""

    backend: str = choice("nftables", "none")
    ports: tuple[int, ...] = (25, 465, 587)  # add 143, 993 (IMAP), 110, 995 for Dovecot
    table: str = "palisade"
    interval: float = duration(5.0, 0.5)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The Prometheus endpoint (README "Prometheus metrics"): off while ``listen`` is empty;
    else ``host:port`` where the parent (or the single process) serves ``/metrics`` and nothing
    else. ``dir``: where each process keeps its counters (prometheus-client's multiprocess
    files; default ``metrics`` under ``[paths] spool``), emptied at every start."""

    listen: str = ""
    dir: Path | None = None

    def directory(self, spool: Path) -> Path:
        return self.dir if self.dir is not None else spool / "metrics"


@dataclass(frozen=True, slots=True)
class RecordConfig:
    """Policy facts (README "Trying a policy change"): with ``facts`` set, one JSON line per
    inbound (port 25) connection goes there: every answer its checks got (DNS, rate counts,
    incident history, recipient lookups, SPF/DKIM/DMARC, scanner scores) and the decision, for
    ``palisade replay``. No message body, no secret. The file is rotated as the logs are
    (renamed and noticed, or SIGUSR1). Reloadable: a new path takes effect for new
    connections."""

    facts: Path | None = None


@dataclass(frozen=True, slots=True)
class ScanPatternSpec:
    """One ``[[scan.patterns]]`` entry: a regex with a named group ``ip``, searched in each
    whole line; the rule name the store records and the weight of one match (0: an exception,
    the line counts nothing)."""

    rule: str
    regex: str
    weight: int = 1


@dataclass(frozen=True, slots=True)
class ScanConfig:
    """``palisade scan``: other programs' logs read for incidents (README "Reading other
    programs' logs"). ``state``: the offsets file (default ``scan-offsets.json`` beside
    ``[paths] state``). ``weights``: built-in rule name -> weight (0 turns it off)."""

    files: tuple[Path, ...] = ()
    state: Path | None = None
    interval: float = duration(10.0, 0.1)
    formats: tuple[str, ...] = ("dovecot", "postfix", "exim")
    max_line: int = positive(8192, 256)
    weights: tuple[tuple[str, int], ...] = field(default=(), metadata={"kind": "weights"})
    patterns: tuple[ScanPatternSpec, ...] = field(default=(), metadata={"kind": "patterns"})

    def offsets_path(self, state: Path) -> Path:
        """Where the offsets are kept, given ``[paths] state``."""
        return self.state if self.state is not None else state.parent / "scan-offsets.json"


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration; ``source`` names the file it came from (for messages)."""

    server: ServerConfig = ServerConfig()
    limits: LimitsConfig = LimitsConfig()
    tls: TlsConfig = TlsConfig()
    domains: DomainsConfig = DomainsConfig()
    relay: RelayControlConfig = RelayControlConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    outbound: OutboundConfig = OutboundConfig()
    paths: PathsConfig = PathsConfig()
    state: StateConfig = StateConfig()
    log: LogConfig = LogConfig()
    dns: DnsConfig = DnsConfig()
    policy: PolicyConfig = PolicyConfig()
    ldap: LdapConfig = LdapConfig()
    spamd: SpamdConfig = SpamdConfig()
    rspamd: RspamdConfig = RspamdConfig()
    clamd: ClamdConfig = ClamdConfig()
    authentication: AuthenticationConfig = AuthenticationConfig()
    dkim: DkimConfig = DkimConfig()
    dmarc: DmarcConfig = DmarcConfig()
    incidents: IncidentsConfig = IncidentsConfig()
    firewall: FirewallConfig = FirewallConfig()
    scan: ScanConfig = ScanConfig()
    metrics: MetricsConfig = MetricsConfig()
    record: RecordConfig = RecordConfig()
    submission: SubmissionConfig = SubmissionConfig()
    lists: tuple[ListSpec, ...] = ()
    rules: tuple[RuleSpec, ...] = ()
    source: str = "<defaults>"

    @property
    def spam_scanner(self) -> SpamdConfig | RspamdConfig | None:
        """The configured spam scanner's section (the loader refuses both at once), or None."""
        if self.spamd.address:
            return self.spamd
        if self.rspamd.url:
            return self.rspamd
        return None


# Settings a running gateway cannot change: they shape the processes, sockets and files made at
# start-up. A reload names each one that changed in the panic log (the old value stays in force
# until the next restart) and applies the rest; ``config check`` marks them.
RESTART_KEYS: tuple[str, ...] = (
    "server.listen",
    "submission.listen",
    "submission.listen_tls",
    "server.workers",
    "server.user",
    "server.group",
    "server.control_socket",
    "paths.spool",
    "paths.log",
    "log.json",
    "log.echo",
    "log.syslog",
    "log.syslog_facility",
    "log.syslog_socket",
    "server.pid_file",
    "delivery.concurrency",
    "dns.dnsbl_probe_interval",
    "metrics.listen",
    "metrics.dir",
)


def keep_running(running: Config, new: Config) -> Config:
    """``new`` with the :data:`RESTART_KEYS` values of ``running``: what a reload puts in force
    (the rest of ``new``), so every part sees the values the processes really run with."""
    sections: dict[str, Any] = {}
    for key in RESTART_KEYS:
        section, name = key.split(".")
        current = sections.get(section, getattr(new, section))
        sections[section] = replace(current, **{name: getattr(getattr(running, section), name)})
    return replace(new, **sections)


def restart_needed(old: Config, new: Config) -> list[str]:
    """The keys of :data:`RESTART_KEYS` whose value differs between ``old`` and ``new``."""
    changed = []
    for key in RESTART_KEYS:
        section, name = key.split(".")
        if getattr(getattr(old, section), name) != getattr(getattr(new, section), name):
            changed.append(key)
    return changed
