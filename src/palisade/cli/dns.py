"""``palisade dns records|check DOMAIN``: the DNS records a domain's outbound mail needs.

Owns: deriving the SPF, DKIM, DMARC, MTA-STS and TLS-RPT records the config implies for a
domain, printing them in zone-file syntax (``records``), and looking them up through the
configured resolver (``[dns] nameservers``, the project's DNS adapter) to say what is missing or
wrong (``check``: exit 0 when all is well, 1 when a problem was found).

What ``records`` derives:

* SPF ``v=spf1 mx a:<[server] hostname> ip4:/ip6:<the specific [server] listen addresses> ~all``:
  the domain's MX hosts and this server (by its name, and by the addresses it listens on when
  they are specific and public). ``~all`` (softfail), not ``-all``: while the records are new a
  forgotten sender (a web form, a forwarder) should still get through, and DMARC with the DKIM
  signature decides what happens to mail that fails; ``--strict`` prints ``-all`` for when the
  DMARC reports show every sender covered.
* DKIM: one record per ``[dkim] keys`` key of the domain, from the key file's public part.
* DMARC ``v=DMARC1; p=none; rua=mailto:dmarc-reports@DOMAIN`` (``--rua`` for another address):
  ``p=none`` to collect reports first.
* MTA-STS: the ``_mta-sts`` TXT with an id derived from the policy text (it changes exactly when
  the policy does) and the policy file for ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt``,
  ``mode: testing``, the MX names (``--mx``, default ``[server] hostname``).
* TLS-RPT ``v=TLSRPTv1; rua=mailto:tls-reports@DOMAIN`` (``--tls-rua``).

What ``check`` finds: SPF missing, more than one SPF record, an SPF record that does not give
``pass`` to this server's addresses (evaluated by the inbound SPF check, pyspf, against the live
records), more than 10 DNS-querying terms (RFC 7208 4.6.4, counted through include/redirect), a
DKIM record missing or not matching its key (per selector), DMARC missing or without ``rua``;
MTA-STS and TLS-RPT are reported when absent but are not counted as problems.
Trust: DNS answers are network input: they are parsed, compared and quoted, never executed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from palisade.adapters.dkim_signer import load_key, record_value, zone_record
from palisade.clock import SYSTEM_CLOCK
from palisade.config import Config, parse_host_port
from palisade.policy.checks import spf
from palisade.policy.rules import Facts, Ports
from palisade.ports import (
    Block,
    BlockPolicy,
    DnsTempError,
    Incident,
    IncidentEvent,
    IncidentOutcome,
    Resolver,
    SigningKeyError,
    StateTempError,
)

SPF_LOOKUP_LIMIT = 10  # RFC 7208 4.6.4
_SPF_RE = re.compile(r"^v=spf1(\s|$)", re.IGNORECASE)


def add_arguments(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "dns", help="the DNS records of outbound mail: print them, or check the published ones"
    )
    sub = parser.add_subparsers(dest="dns_command", required=True)
    records = sub.add_parser("records", help="print the records the config implies")
    check = sub.add_parser("check", help="look the records up and say what is wrong")
    for command in (records, check):
        command.add_argument("domain", metavar="DOMAIN")
        command.add_argument("--rua", help="DMARC report address (default dmarc-reports@DOMAIN)")
    records.add_argument("--tls-rua", help="TLS-RPT report address (default tls-reports@DOMAIN)")
    records.add_argument(
        "--mx", action="append", help="an MX name for the MTA-STS policy (default: hostname)"
    )
    records.add_argument("--strict", action="store_true", help="SPF with -all instead of ~all")
    records.add_argument("--no-testing", action="store_true", help="DKIM records without t=y")
    check.add_argument(
        "--ip",
        action="append",
        help="an address the domain's mail leaves from (default: the listen addresses and the "
        "hostname's A/AAAA records)",
    )
    return parser


def run(args: argparse.Namespace, config: Config) -> int:
    domain = args.domain.lower().rstrip(".")
    if args.dns_command == "records":
        return _records(args, config, domain)
    return asyncio.run(_check(args, config, domain))


# -- records ----------------------------------------------------------------------------------


def listen_addresses(config: Config) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The specific, global addresses of ``[server] listen`` (not 0.0.0.0, ::, loopback)."""
    found = []
    for entry in config.server.listen:
        host, _ = parse_host_port(entry)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            continue
        if ip.is_global and ip not in found:
            found.append(ip)
    return found


def spf_value(config: Config, *, strict: bool = False) -> str:
    terms = ["v=spf1", "mx", f"a:{config.server.hostname}"]
    for ip in listen_addresses(config):
        terms.append(f"ip{ip.version}:{ip}")
    terms.append("-all" if strict else "~all")
    return " ".join(terms)


def dmarc_value(domain: str, rua: str | None) -> str:
    return f"v=DMARC1; p=none; rua=mailto:{rua or f'dmarc-reports@{domain}'}"


def mta_sts_policy(mx_names: list[str]) -> str:
    lines = ["version: STSv1", "mode: testing", *(f"mx: {mx}" for mx in mx_names)]
    return "\r\n".join([*lines, "max_age: 86400"]) + "\r\n"  # RFC 8461 3.2: CRLF lines


def mta_sts_id(policy: str) -> str:
    return hashlib.sha256(policy.encode()).hexdigest()[:20]


def _domain_keys(config: Config, domain: str) -> list[tuple[str, Any]]:
    """(selector, the loaded key or the SigningKeyError) for each configured key of domain."""
    found: list[tuple[str, Any]] = []
    for key in config.dkim.keys:
        if key.domain.lower().rstrip(".") != domain:
            continue
        try:
            found.append((key.selector, load_key(domain, key.selector, config.dkim.key_path(key))))
        except SigningKeyError as exc:
            found.append((key.selector, exc))
    return found


def _records(args: argparse.Namespace, config: Config, domain: str) -> int:
    status = 0
    print(f"; SPF: the MX hosts and this server ({config.server.hostname}) may send for {domain}")
    print(zone_record(f"{domain}.", spf_value(config, strict=args.strict)))
    keys = _domain_keys(config, domain)
    if not keys:
        print(f"; DKIM: no [dkim] key for {domain} (palisade dkim keygen {domain} --selector S)")
    for selector, key in keys:
        if isinstance(key, SigningKeyError):
            print(f"; DKIM selector {selector}: key file {key.path} {key.reason}")
            status = 1
            continue
        print(f"; DKIM selector {selector} ({key.algorithm}, {key.path})")
        value = record_value(key.algorithm, key.public, testing=not args.no_testing)
        print(zone_record(f"{selector}._domainkey.{domain}.", value))
    print("; DMARC: p=none while the reports are read")
    print(zone_record(f"_dmarc.{domain}.", dmarc_value(domain, args.rua)))
    mx_names = args.mx or [config.server.hostname]
    policy = mta_sts_policy(mx_names)
    print(f"; MTA-STS: serve the policy below as https://mta-sts.{domain}/.well-known/mta-sts.txt")
    print(f"; (mta-sts.{domain} needs an address and a certificate for that name)")
    print(zone_record(f"_mta-sts.{domain}.", f"v=STSv1; id={mta_sts_id(policy)}"))
    for line in policy.splitlines():
        print(f";   {line}")
    print("; TLS-RPT")
    tls_rua = args.tls_rua or f"tls-reports@{domain}"
    print(zone_record(f"_smtp._tls.{domain}.", f"v=TLSRPTv1; rua=mailto:{tls_rua}"))
    return status


# -- check ------------------------------------------------------------------------------------


class _NoState:
    """The SPF evaluation needs no state store: a stand-in that refuses to be used."""

    async def get_incident(self, ip: str) -> Incident | None:
        raise StateTempError("no state store in dns check")

    async def add_incident(self, ip: str, count: int = 1, now: float | None = None) -> Incident:
        raise StateTempError("no state store in dns check")

    async def remove_incident(self, ip: str) -> bool:
        raise StateTempError("no state store in dns check")

    async def list_incidents(self) -> list[Incident]:
        raise StateTempError("no state store in dns check")

    async def rate_hit(self, key: str, window: float, now: float) -> int:
        raise StateTempError("no state store in dns check")

    async def pass_until(self, key: str, now: float) -> float | None:
        raise StateTempError("no state store in dns check")

    async def remember_pass(self, key: str, until: float, now: float) -> None:
        raise StateTempError("no state store in dns check")

    async def record_incident(
        self,
        ip: str,
        weight: int,
        rule: str,
        now: float,
        policy: BlockPolicy,
        may_block: bool = True,
    ) -> IncidentOutcome:
        raise StateTempError("no state store in dns check")

    async def active_blocks(self, now: float) -> list[Block]:
        raise StateTempError("no state store in dns check")

    async def incident_events(self, ip: str, since: float) -> list[IncidentEvent]:
        raise StateTempError("no state store in dns check")

    async def unblock(self, ip: str) -> bool:
        raise StateTempError("no state store in dns check")


@dataclass
class _Report:
    problems: int = 0

    def ok(self, text: str) -> None:
        print(f"ok: {text}")

    def note(self, text: str) -> None:
        print(f"note: {text}")

    def problem(self, text: str) -> None:
        self.problems += 1
        print(f"problem: {text}")


async def _txt(resolver: Resolver, name: str) -> list[str]:
    answer = await resolver.query(name, "TXT")
    return list(answer.records)


async def _check(args: argparse.Namespace, config: Config, domain: str) -> int:
    from palisade.server.generation import build_resolver

    resolver = build_resolver(config)
    report = _Report()
    try:
        await _check_spf(args, config, domain, resolver, report)
        await _check_dkim(config, domain, resolver, report)
        await _check_dmarc(domain, resolver, report)
        for name, prefix, what in (
            (f"_mta-sts.{domain}", "v=stsv1", "MTA-STS"),
            (f"_smtp._tls.{domain}", "v=tlsrptv1", "TLS-RPT"),
        ):
            found = [r for r in await _txt(resolver, name) if r.lower().startswith(prefix)]
            if found:
                report.ok(f"{what} record {name}: {found[0]}")
            else:
                report.note(f"no {what} record at {name} (palisade dns records {domain})")
    except DnsTempError as exc:
        report.problem(f"DNS lookup failed: {exc.reason}")
    if report.problems:
        print(f"{domain}: {report.problems} problem(s)")
        return 1
    print(f"{domain}: all good")
    return 0


async def _sending_addresses(
    args: argparse.Namespace, config: Config, resolver: Resolver
) -> list[str]:
    if args.ip:
        return [str(ipaddress.ip_address(ip)) for ip in args.ip]
    found = [str(ip) for ip in listen_addresses(config)]
    for rdtype in ("A", "AAAA"):
        answer = await resolver.query(config.server.hostname, rdtype)
        found += [r for r in answer.records if r not in found]
    return found


async def _check_spf(
    args: argparse.Namespace, config: Config, domain: str, resolver: Resolver, report: _Report
) -> None:
    records = [r for r in await _txt(resolver, domain) if _SPF_RE.match(r)]
    if not records:
        report.problem(f"no SPF record at {domain} (palisade dns records {domain})")
        return
    if len(records) > 1:
        report.problem(f"{len(records)} SPF records at {domain}: receivers treat that as an error")
        return
    report.ok(f"SPF record at {domain}: {records[0]}")
    lookups = await count_spf_lookups(resolver, domain)
    if lookups > SPF_LOOKUP_LIMIT:
        report.problem(
            f"the SPF record of {domain} needs {lookups} DNS lookups: more than "
            f"{SPF_LOOKUP_LIMIT} is an error at receivers (RFC 7208 4.6.4)"
        )
    addresses = await _sending_addresses(args, config, resolver)
    if not addresses:
        report.problem(
            f"no address to check SPF with: {config.server.hostname} has no A/AAAA record and "
            "[server] listen has no specific address (give one with --ip)"
        )
    ports = Ports(resolver=resolver, state=_NoState(), clock=SYSTEM_CLOCK)
    for ip in addresses:
        facts = Facts(
            client_ip=ipaddress.ip_address(ip),
            client_port=0,
            our_names=frozenset({config.server.hostname}),
            helo=config.server.hostname,
            sender=f"postmaster@{domain}",
        )
        outcome = await spf.spf_outcome(facts, ports)
        if outcome.result == "pass":
            report.ok(f"SPF gives pass to {ip}")
        else:
            report.problem(
                f"SPF of {domain} does not authorise this server's address {ip}: "
                f"{outcome.result} ({outcome.explanation})"
            )


async def count_spf_lookups(resolver: Resolver, domain: str, depth: int = 0) -> int:
    """The DNS-querying terms of ``domain``'s SPF record, through include and redirect (each
    include or redirect counts one, and so does every a, mx, ptr and exists)."""
    if depth > 2 * SPF_LOOKUP_LIMIT:  # an include loop: far over the limit anyway
        return SPF_LOOKUP_LIMIT + 1
    records = [r for r in await _txt(resolver, domain) if _SPF_RE.match(r)]
    if len(records) != 1:
        return 0
    count = 0
    for term in records[0].split()[1:]:
        name = term.lstrip("+-~?").lower()
        word = re.split(r"[:=/]", name, maxsplit=1)[0]
        argument = name[len(word) + 1 :]
        if word in ("a", "mx", "ptr", "exists"):
            count += 1
        elif word in ("include", "redirect") and argument:
            count += 1 + await count_spf_lookups(resolver, argument, depth + 1)
    return count


def _public_bytes(value: str) -> bytes | None:
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except ValueError:
        return None


async def _check_dkim(config: Config, domain: str, resolver: Resolver, report: _Report) -> None:
    keys = _domain_keys(config, domain)
    if not keys:
        report.note(f"no [dkim] key configured for {domain}: its mail is not signed")
    for selector, key in keys:
        name = f"{selector}._domainkey.{domain}"
        if isinstance(key, SigningKeyError):
            report.problem(f"DKIM selector {selector}: key file {key.path} {key.reason}")
            continue
        records = [r for r in await _txt(resolver, name) if "p=" in r]
        if not records:
            report.problem(f"no DKIM record at {name} (palisade dns records {domain})")
            continue
        if len(records) > 1:
            report.problem(f"{len(records)} DKIM records at {name}: publish one")
            continue
        tags = _tags(records[0])
        published = _public_bytes(tags.get("p", ""))
        if tags.get("k", "rsa").lower() != key.algorithm:
            report.problem(
                f"DKIM record at {name} says k={tags.get('k', 'rsa')}, the key is {key.algorithm}"
            )
        elif published is None or published != base64.b64decode(key.public):
            report.problem(f"DKIM record at {name} does not match the key in {key.path}")
        else:
            testing = " (t=y: testing)" if "y" in tags.get("t", "").split(":") else ""
            report.ok(f"DKIM record at {name} matches {key.path}{testing}")


def _tags(record: str) -> dict[str, str]:
    tags = {}
    for part in record.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags[name.strip().lower()] = value.strip()
    return tags


async def _check_dmarc(domain: str, resolver: Resolver, report: _Report) -> None:
    name = f"_dmarc.{domain}"
    records = [r for r in await _txt(resolver, name) if r.lower().startswith("v=dmarc1")]
    if not records:
        report.problem(f"no DMARC record at {name} (palisade dns records {domain})")
        return
    if len(records) > 1:
        report.problem(f"{len(records)} DMARC records at {name}: receivers ignore them all")
        return
    tags = _tags(records[0])
    if not tags.get("rua"):
        report.problem(f"the DMARC record at {name} has no rua=: nobody gets the reports")
    else:
        report.ok(f"DMARC record at {name}: {records[0]}")
