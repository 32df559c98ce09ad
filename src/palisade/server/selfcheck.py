"""The start-up self-check: what ``config check`` reports and what ``serve`` verifies before it
binds a socket.

Owns: the checks of the *environment* a valid config meets (the file itself is checked by
``config.loader`` and ``config.policy``): every ``[paths]`` entry can be created and written by this
user (a file is really created there, so a read-only file system or an immutable directory fails
even for root), so can the control socket (``[server] control_socket``), the LDAP CA file is
readable, the resolver answers, every DNSBL zone passes its RFC 5782 probe, and the certificate
checks of :mod:`palisade.tlscheck`. Each result is a
:class:`Finding`; an ``error`` stops ``serve`` (exit 1) and makes ``config check`` exit 1; a
``warning`` is printed (and logged by ``serve``) and the gateway starts anyway: a dead resolver or a
refusing DNSBL is usually a transient or external problem, and the rules' ``on_error`` and the
periodic zone probes already handle it.

Trust: the config is already validated. DNS answers are network input and reach the findings
only through ``probe_dnsbl_zone``'s classification; a Spamhaus DQS key never appears in a
finding (zones are named by their public name).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import stat
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from palisade.config import Config, parse_host_port
from palisade.config.policy import permanent_on_error_warnings
from palisade.policy.policy import Policy
from palisade.tlscheck import check_certificate_files

Level = Literal["ok", "warning", "error"]


@dataclass(frozen=True, slots=True)
class Finding:
    """One result: ``where`` names the config section or key, ``message`` is a whole sentence
    that names it too (it is printed alone)."""

    level: Level
    where: str
    message: str

    def line(self) -> str:
        return f"{self.level}: {self.message}"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def run_selfcheck(
    config: Config, policy: Policy | None = None, *, dns: bool = True
) -> list[Finding]:
    """Every check, in a fixed order. Nothing is created: a missing directory is checked by
    writing a nameless temporary file in its nearest existing parent (``serve`` then makes the
    directories itself, with their modes and ``[paths] group``). ``dns``: also
    ask the resolver (one query, for the server's hostname) and probe the DNSBL zones (two
    queries per zone, all zones at once)."""
    findings = _path_findings(config)
    findings += _file_findings(config, policy)
    findings += [  # a DNS rule that would bounce everybody's mail while the resolver is down
        Finding("warning", "rules", text) for text in permanent_on_error_warnings(config, policy)
    ]
    findings += _tls_findings(config)
    findings += _dkim_findings(config)
    findings += _submission_findings(config)
    findings += _dmarc_findings(config)
    findings += _outbound_tls_findings(config)
    if dns:
        findings += _state_findings(config)
        findings += asyncio.run(_dns_findings(config, policy))
    return findings


def has_errors(findings: list[Finding]) -> bool:
    return any(f.level == "error" for f in findings)


def check_before_serving(config: Config, policy: Policy) -> int | None:
    """``serve``'s use: runs the self-check creating the directories, prints warnings and
    errors on stderr, logs warnings to mainlog and paniclog; returns 1 on an error (the
    gateway must not start) or None."""
    findings = run_selfcheck(config, policy)
    for finding in findings:
        if finding.level != "ok":
            print(f"palisade: {finding.line()}", file=sys.stderr)
    if has_errors(findings):
        print("palisade: not starting: the self-check found errors", file=sys.stderr)
        return 1
    warnings = [f for f in findings if f.level == "warning"]
    if warnings:
        from palisade.obs.log import FileEventLog

        log = FileEventLog(config.paths.log, json_lines=config.log.json)
        try:
            for finding in warnings:
                log.panic(f"start-up self-check: {finding.message}")
        finally:
            log.close()
    return None


# -- paths -----------------------------------------------------------------------------------


def _path_findings(config: Config) -> list[Finding]:
    paths = config.paths
    findings = []
    for key in ("spool", "mail", "log"):
        path: Path = getattr(paths, key)
        problem = _directory_problem(f"[paths] {key}", path)
        findings.append(
            Finding("error", f"paths.{key}", problem)
            if problem
            else Finding("ok", f"paths.{key}", f"[paths] {key} {path} {_writable(path)}")
        )
    state = paths.state
    problem = _directory_problem("[paths] state", state.parent, shown=state)
    if problem is None and state.exists():
        if not state.is_file():
            problem = f"[paths] state {state} is not a regular file"
        else:
            try:
                with open(state, "r+b"):
                    pass
            except OSError as exc:
                problem = f"cannot write [paths] state {state}: {exc.strerror or exc}"
    findings.append(
        Finding("error", "paths.state", problem)
        if problem
        else Finding("ok", "paths.state", f"[paths] state {state} {_writable(state)}")
    )
    facts = config.record.facts
    if facts is not None:
        problem = _directory_problem("[record] facts", facts.parent, shown=facts)
        findings.append(
            Finding("error", "record.facts", problem)
            if problem
            else Finding("ok", "record.facts", f"[record] facts {facts} {_writable(facts)}")
        )
    control = config.server.control_socket
    problem = control_socket_problem(control)
    findings.append(
        Finding("error", "server.control_socket", problem)
        if problem
        else Finding(
            "ok", "server.control_socket", f"[server] control_socket {control} can be created"
        )
    )
    return findings


def control_socket_problem(path: Path) -> str | None:
    """Why the control socket cannot be made at ``path`` (a Unix socket's path is at most 107
    bytes; its directory must be writable; a file there that is not a socket is never
    replaced), or None. A socket there is fine: a stale one is replaced at start, and
    ``serve`` refuses to start if a daemon answers on it."""
    from palisade.server.control import UNIX_PATH_MAX

    size = len(os.fsencode(path))
    if size > UNIX_PATH_MAX:
        return (
            f"[server] control_socket {path} is too long for a Unix socket ({size} bytes, "
            f"at most {UNIX_PATH_MAX}): choose a shorter path"
        )
    if os.path.lexists(path) and not stat.S_ISSOCK(os.lstat(path).st_mode):
        return (
            f"[server] control_socket {path} exists and is not a socket: remove it or choose "
            "another path"
        )
    return _directory_problem("[server] control_socket", path.parent, shown=path)


def state_problem(state: Path, reason: str | None = None) -> str:
    """Why ``[paths] state`` cannot be opened, in one sentence: the path's own problem if it has
    one (a file where a directory should be), else ``reason`` (the store's error)."""
    return _directory_problem("[paths] state", state.parent, shown=state) or (
        reason or f"cannot open [paths] state {state}"
    )


def _writable(path: Path) -> str:
    return "is writable" if path.exists() else "can be created"


def _directory_problem(what: str, path: Path, *, shown: Path | None = None) -> str | None:
    """None if files can be created in ``path`` (or, while it is missing, where mkdir makes it)."""
    shown = path if shown is None else shown
    target = path
    while not os.path.lexists(target):  # the nearest existing parent is where mkdir would work
        if target.parent == target:
            break
        target = target.parent
    if not target.is_dir():
        reason = os.strerror(errno.ENOTDIR)
        if target == shown:
            return f"{what} {shown} is not a directory"
        return f"cannot create {what} {shown}: {reason} ({target} is not a directory)"
    try:  # a real write: permission bits do not stop root, a read-only mount does
        with tempfile.TemporaryFile(dir=target):
            pass
    except OSError as exc:
        verb = "write in" if target == shown else "create"
        return f"cannot {verb} {what} {shown}: {exc.strerror or exc}"
    return None


# -- the shared state store ------------------------------------------------------------------


def _state_findings(config: Config) -> list[Finding]:
    """``[state] backend = "redis"``: one PING with the configured credentials. Refused
    credentials are an error (``serve`` does not start: every host would run on its own file
    for ever); an unreachable Redis is a warning (the gateway starts and counts per host until
    it answers). The password never appears: the messages name the url or the service."""
    if config.state.backend != "redis":
        return []
    from palisade.adapters.redis_state import RedisStateStore, StateAuthError
    from palisade.config import ConfigError
    from palisade.ports import StateTempError
    from palisade.server.generation import redis_settings

    try:
        settings = redis_settings(config)
    except ConfigError as exc:
        return [Finding("error", "state.password_file", str(exc))]
    store = RedisStateStore(settings)

    async def ping() -> None:
        try:
            await store.ping()
        finally:
            await store.aclose()

    try:
        asyncio.run(ping())
    except StateAuthError as exc:
        return [Finding("error", "state.password_file", f"[state] {exc.reason}")]
    except StateTempError as exc:
        return [
            Finding(
                "warning",
                "state.url",
                f"[state] {exc.reason}: the gateway starts and counts on [paths] state "
                f"{config.paths.state} until Redis answers",
            )
        ]
    return [Finding("ok", "state.url", f"[state] {settings.where} answers")]


# -- files -----------------------------------------------------------------------------------


def _file_findings(config: Config, policy: Policy | None) -> list[Finding]:
    findings = []
    ca_file = config.ldap.ca_file
    if config.ldap.servers and ca_file is not None:
        try:
            with open(ca_file, "rb") as f:
                f.read(1)
            findings.append(Finding("ok", "ldap.ca_file", f"[ldap] ca_file {ca_file} is readable"))
        except OSError as exc:
            findings.append(
                Finding(
                    "error",
                    "ldap.ca_file",
                    f"cannot read [ldap] ca_file {ca_file}: {exc.strerror or exc}",
                )
            )
    if config.ldap.bind_password_file is not None:  # unreadable: a ConfigError at load
        findings.append(
            Finding(
                "ok",
                "ldap.bind_password_file",
                f"[ldap] bind_password_file {config.ldap.bind_password_file} is readable",
            )
        )
    if policy is not None:  # an unreadable list is a ConfigError in build_policy
        for name, handle in policy.lists.handles.items():
            where = f"file {handle.path}" if handle.path else "inline"
            findings.append(
                Finding(
                    "ok", f"lists.{name}", f"[lists] {name}: {entries(len(handle.value))} ({where})"
                )
            )
    return findings


def _dkim_findings(config: Config) -> list[Finding]:
    """Each ``[dkim]`` key read as the signer reads it. An unusable key is a warning, not an
    error: inbound mail is unaffected, and the domain's outbound mail is deferred (451) until
    the key is mended and the config reloaded."""
    from palisade.adapters.dkim_signer import load_key
    from palisade.ports import SigningKeyError

    findings = []
    for key in config.dkim.keys:
        path = config.dkim.key_path(key)
        what = f"[dkim] key {key.selector} of {key.domain}"
        try:
            loaded = load_key(key.domain, key.selector, path)
        except SigningKeyError as exc:
            findings.append(
                Finding(
                    "warning",
                    "dkim.keys",
                    f"{what}: key file {exc.path} {exc.reason}; mail from {key.domain} is "
                    "deferred (451) until it can be used",
                )
            )
            continue
        kind = f"RSA {loaded.bits}" if loaded.algorithm == "rsa" else "Ed25519"
        findings.append(Finding("ok", "dkim.keys", f"{what}: {kind} key {path} is usable"))
    return findings


def _dmarc_findings(config: Config) -> list[Finding]:
    """``[dmarc] reports``: warnings only (the reports are a courtesy; mail is unaffected): no
    DMARC evaluation to record, a records directory that cannot be written, no DKIM key for the
    from address (the reports would go unsigned)."""
    dmarc = config.dmarc
    if not dmarc.reports:
        return []
    findings = []
    auth = config.authentication
    if not (auth.enabled and auth.dmarc):
        findings.append(
            Finding(
                "warning",
                "dmarc.reports",
                "[dmarc] reports is on but [authentication] does not check DMARC "
                "(enabled and dmarc): nothing will be recorded",
            )
        )
    records = dmarc.state / "records"
    problem = _directory_problem("[dmarc] state", records)
    findings.append(
        Finding("warning", "dmarc.state", f"{problem}: DMARC evaluations will not be kept")
        if problem
        else Finding("ok", "dmarc.state", f"[dmarc] state {dmarc.state} {_writable(records)}")
    )
    _, sender = dmarc.reporter(config.server.hostname)
    domain = sender.rpartition("@")[2].lower()
    covered = any(
        domain == k.domain.lower() or domain.endswith("." + k.domain.lower())
        for k in config.dkim.keys
    )
    if not covered:
        findings.append(
            Finding(
                "warning",
                "dmarc.from_address",
                f"no [dkim] key covers {domain} (the reports' from address {sender}): "
                "reports will be sent unsigned",
            )
        )
    return findings


def _submission_findings(config: Config) -> list[Finding]:
    """``[submission]``: the password file (a warning when unreadable: logins get 454 until it
    is back) and the senders map (an error: the server does not start on a broken one)."""
    from palisade.adapters.password_file import read_entries
    from palisade.policy.senders import parse_senders

    sub = config.submission
    if not sub.enabled:
        return []
    findings = []
    if sub.auth == "file":
        try:
            users, bad = read_entries(sub.password_file)
        except OSError as exc:
            findings.append(
                Finding(
                    "warning",
                    "submission.password_file",
                    f"[submission] password_file {sub.password_file} cannot be read: "
                    f"{exc.strerror or exc}; every AUTH gets 454 until it can "
                    "(palisade passwd add USER makes it)",
                )
            )
        else:
            skipped = f" ({len(bad)} malformed line(s) skipped)" if bad else ""
            findings.append(
                Finding(
                    "warning" if bad else "ok",
                    "submission.password_file",
                    f"[submission] password_file {sub.password_file}: {entries(len(users))} (users)"
                    f"{skipped}",
                )
            )
    if sub.senders is not None:
        try:
            parse_senders(sub.senders.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            findings.append(
                Finding(
                    "error", "submission.senders", f"[submission] senders {sub.senders}: {reason}"
                )
            )
        else:
            findings.append(
                Finding("ok", "submission.senders", f"[submission] senders {sub.senders} is valid")
            )
    return findings


def _outbound_tls_findings(config: Config) -> list[Finding]:
    """MX delivery's TLS-RPT directory and DANE's resolver requirement. Warnings only: without
    them delivery works, but results are lost, or DANE never applies."""
    outbound = config.outbound
    if outbound.delivery != "mx":
        return []
    findings = []
    reports = outbound.tls_reports
    if reports is not None:
        problem = _directory_problem("[outbound] tls_reports", reports)
        findings.append(
            Finding("warning", "outbound.tls_reports", problem + ": TLS-RPT results are lost")
            if problem
            else Finding(
                "ok",
                "outbound.tls_reports",
                f"[outbound] tls_reports {reports} {_writable(reports)}",
            )
        )
    if outbound.dane:
        servers = [parse_host_port(n, default_port=53)[0] for n in config.dns.nameservers]
        loopback = bool(servers) and all(ipaddress.ip_address(h).is_loopback for h in servers)
        trust = config.dns.trust_ad
        if trust == "no" or (trust == "auto" and servers and not loopback):
            why = (
                '[dns] trust_ad = "no"'
                if trust == "no"
                else '[dns] nameservers are not all on loopback (trust_ad = "auto")'
            )
            findings.append(
                Finding(
                    "warning",
                    "outbound.dane",
                    f"[outbound] dane is on but the resolver's AD bit is not believed ({why}):"
                    " DANE never applies. Use a validating resolver on loopback (unbound)",
                )
            )
    return findings


def entries(count: int) -> str:
    return "1 entry" if count == 1 else f"{count} entries"


def _tls_findings(config: Config) -> list[Finding]:
    cert, key = config.tls.certificate, config.tls.private_key
    if cert is None or key is None:
        return [Finding("ok", "tls", "[tls] no certificate: STARTTLS is not offered")]
    # A key that does not match is already a ConfigError at load (config.loader); this adds the
    # chain order, the expiry and the host name (warnings only: see tlscheck.analyse_chain).
    return [
        Finding(level, "tls.certificate", f"[tls] {message}")
        for level, message in check_certificate_files(
            cert, key, config.server.hostname, serving=True
        )
    ]


# -- DNS -------------------------------------------------------------------------------------


async def _dns_findings(config: Config, policy: Policy | None) -> list[Finding]:
    from palisade.adapters.dns import DnsResolver
    from palisade.policy.checks.dnsbl_probe import probe_dnsbl_zone
    from palisade.ports import DnsTempError
    from palisade.server.generation import secrets_of
    from palisade.server.probes import dnsbl_checks

    dns = config.dns
    shown = ", ".join(dns.nameservers) if dns.nameservers else "of /etc/resolv.conf"
    where = "dns.nameservers"
    try:
        resolver = DnsResolver(
            [parse_host_port(n, default_port=53) for n in dns.nameservers] or None,
            timeout=dns.timeout,
            retries=0,
            redact=secrets_of(config),
        )
        await resolver.query(config.server.hostname, "A")  # any answer will do, NXDOMAIN too
    except (DnsTempError, ValueError, OSError) as exc:
        reason = exc.reason if isinstance(exc, DnsTempError) else str(exc)
        findings = [
            Finding(
                "warning",
                where,
                f"[dns] the resolver {shown} did not answer a query for "
                f"{config.server.hostname} A ({reason}): "
                "DNS-based rules will fail and their on_error applies until it answers "
                "(a warning, not an error: DNS outages are usually transient)",
            )
        ]
        if policy is not None and any(True for _ in dnsbl_checks(policy)):
            findings.append(
                Finding("warning", "rules", "DNSBL zones not probed: the resolver did not answer")
            )
        return findings
    findings = [Finding("ok", where, f"[dns] the resolver {shown} answers")]
    if policy is None:
        return findings
    zones = {zone.shown: zone for check in dnsbl_checks(policy) for zone in check.zones}
    results = await asyncio.gather(  # at once: a dead zone costs one timeout, not one each
        *(probe_dnsbl_zone(resolver, z.query, display_zone=z.shown) for z in zones.values())
    )
    for zone, (healthy, reason) in zip(zones.values(), results, strict=True):
        reason = zone.scrub(reason)
        if healthy:
            findings.append(
                Finding("ok", "rules", f"DNSBL zone {zone.shown} passes the RFC 5782 probe")
            )
            continue
        text = f"DNSBL zone {zone.shown} fails the RFC 5782 probe: {reason}"  # 127.255.255.x:
        # the reason says "your resolver is refused by this list" (adapters.dnsbl_probe)
        findings.append(
            Finding("warning", "rules", text + "; the zone is not used until a probe passes")
        )
    return findings
