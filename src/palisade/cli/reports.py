"""``palisade dmarc report|send-reports`` and ``palisade tlsrpt report|send-reports``.

Owns: the arguments and the output of the four commands; the work is ``palisade.reports``'.
``report`` reads files the operator names and needs no config; ``send-reports`` reads the
config (``[dmarc]``, the spool, the DKIM keys) and queues mail.
Exit status of ``report``: 0 every source was read (even when nothing matched ``--domain``);
1 at least one source was broken (each named on stderr with its reason; the others are still
summarised on stdout) or a path does not exist; 2 bad usage. ``send-reports``: 0 done (or
nothing to do), 1 a report could not be made or queued (named on stderr).
Trust: report contents are remote text: the parsers clean every value; names of sources (the
operator's paths, archive member names) are escaped here before they are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from palisade.adapters.dmarc_records import records_dir
from palisade.config import Config
from palisade.obs.log import escape
from palisade.ports import SigningKeyError
from palisade.reports import dmarc_aggregate, dmarc_send, tlsrpt, tlsrpt_send
from palisade.reports.mailout import Outbox
from palisade.reports.sources import Broken, documents

__all__ = ["add_arguments", "run_report", "run_send"]


def add_arguments(commands: Any) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The ``dmarc`` and ``tlsrpt`` commands; returns both parsers (main adds ``--config``)."""
    dmarc = commands.add_parser("dmarc", help="DMARC aggregate reports: read them, send ours")
    dmarc_commands = dmarc.add_subparsers(dest="reports_command", required=True)
    report = dmarc_commands.add_parser(
        "report",
        help="summarise DMARC aggregate (rua) reports per domain and source IP",
        description="Reads DMARC aggregate reports (XML, .xml.gz, .zip, report mails, a "
        "Maildir of them) and prints, per report domain, a table per source IP: count, SPF "
        "and DKIM as evaluated and as authenticated, the DMARC result, the disposition. Exit "
        "status 0: all read; 1: some source was broken (named on stderr, the rest summarised).",
    )
    _report_arguments(report)
    send = dmarc_commands.add_parser(
        "send-reports",
        help="send our aggregate reports for a finished day ([dmarc] reports = true)",
        description="Aggregates the DMARC evaluations recorded on a finished UTC day (default: "
        "yesterday) per domain into RFC 7489 aggregate reports and queues them, DKIM-signed "
        "when a key covers the from address, to each domain's rua addresses. A day is sent "
        "once.",
    )
    _send_arguments(send)
    tls = commands.add_parser("tlsrpt", help="SMTP TLS reports (RFC 8460): read them, send ours")
    tls_commands = tls.add_subparsers(dest="reports_command", required=True)
    tls_report = tls_commands.add_parser(
        "report",
        help="summarise SMTP TLS reports per policy domain",
        description="Reads RFC 8460 TLS reports (.json, .json.gz, report mails, a Maildir) "
        "and prints per policy domain the policy type, successful and failed sessions and the "
        "failure details. Exit status as for dmarc report.",
    )
    _report_arguments(tls_report)
    tls_send = tls_commands.add_parser(
        "send-reports",
        help="send our TLS reports for a finished day to each domain's _smtp._tls rua",
        description="Aggregates the TLS results of outbound deliveries recorded on a finished "
        "UTC day ([outbound] tls_reports) per policy domain into RFC 8460 reports and queues "
        "them to the rua mailto: addresses of _smtp._tls.<domain>. A day is sent once.",
    )
    _send_arguments(tls_send)
    return dmarc, tls


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", type=Path, metavar="FILE|DIR")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--domain", help="only this domain (and its subdomains)")


def _send_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--day", help="the UTC day to report, YYYY-MM-DD (default: yesterday)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be sent (destinations, sizes, the XML or JSON) and queue nothing",
    )
    parser.add_argument(
        "--force", action="store_true", help="send a day again even if it is marked as sent"
    )


def run_report(
    kind: str,
    paths: list[Path],
    *,
    as_json: bool = False,
    domain: str | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``palisade dmarc report`` (``kind`` "dmarc") or ``tlsrpt report`` ("tlsrpt")."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    command = f"palisade {kind} report"
    status = 0
    for path in paths:
        if not path.exists():
            err.write(f"{command}: no such file or directory: {escape(str(path))}\n")
            status = 1
    broken: list[dict[str, str]] = []
    dmarc_reports: list[dmarc_aggregate.AggregateReport] = []
    tls_reports: list[tlsrpt.TlsReport] = []
    for item in documents(p for p in paths if p.exists()):
        if isinstance(item, Broken):
            broken.append({"source": item.name, "reason": item.reason})
            continue
        try:
            if kind == "dmarc":
                dmarc_reports.append(dmarc_aggregate.parse_report(item.data))
            else:
                tls_reports.append(tlsrpt.parse_report(item.data))
        except dmarc_aggregate.ReportError as exc:
            broken.append({"source": item.name, "reason": str(exc)})
    for entry in broken:
        err.write(f"{command}: {escape(entry['source'])}: broken: {escape(entry['reason'])}\n")
    if broken:
        status = 1
    if kind == "dmarc":
        summaries = dmarc_aggregate.summarise(dmarc_reports, domain)
        if as_json:
            out.write(json.dumps(dmarc_aggregate.as_json(summaries, broken), indent=2) + "\n")
        else:
            out.write(dmarc_aggregate.render_table(summaries))
            count = len(dmarc_reports)
            out.write(f"{count} report(s) read, {len(broken)} broken\n")
    else:
        tls_summaries = tlsrpt.summarise(tls_reports, domain)
        if as_json:
            out.write(json.dumps(tlsrpt.as_json(tls_summaries, broken), indent=2) + "\n")
        else:
            out.write(tlsrpt.render_table(tls_summaries))
            out.write(f"{len(tls_reports)} report(s) read, {len(broken)} broken\n")
    return status


def _day(text: str | None, now: float) -> str:
    """The day to report: ``text`` checked (a finished UTC day), or yesterday."""
    today = time.strftime("%Y-%m-%d", time.gmtime(now))
    if text is None:
        return time.strftime("%Y-%m-%d", time.gmtime(now - 86400))
    try:
        time.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise ValueError(f"--day: expected YYYY-MM-DD, got {text!r}") from None
    if text >= today:
        raise ValueError(f"--day {text}: the day is not over yet (UTC); reports cover whole days")
    return text


def run_send(args: argparse.Namespace, config: Config, *, now: float | None = None) -> int:
    """``palisade dmarc send-reports`` / ``palisade tlsrpt send-reports``."""
    command = f"palisade {args.command} send-reports"
    try:
        day = _day(args.day, time.time() if now is None else now)
    except ValueError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return 2
    from palisade.server.generation import build_resolver, build_signer
    from palisade.spool import Spool

    org_name, from_address = config.dmarc.reporter(config.server.hostname)
    spool = None
    outbox = None
    if not args.dry_run:
        try:
            spool = Spool(config.paths.spool)
        except OSError as exc:
            print(
                f"{command}: cannot open [paths] spool {config.paths.spool}: {exc.strerror or exc}",
                file=sys.stderr,
            )
            return 1
        outbox = Outbox(
            spool,
            helo=config.server.hostname,
            signer=build_signer(config),
            local_domains=config.domains.local,
            relay_domains=config.domains.relay,
        )
    show = (lambda text: print(text)) if args.dry_run else None
    try:
        if args.command == "dmarc":
            if not config.dmarc.reports:
                print(
                    f"{command}: note: [dmarc] reports is off: nothing new is recorded",
                    file=sys.stderr,
                )
            sent = asyncio.run(
                dmarc_send.send_day(
                    day,
                    state=config.dmarc.state,
                    records=records_dir(config.dmarc.state),
                    resolver=build_resolver(config),
                    outbox=outbox,
                    org_name=org_name,
                    from_address=from_address,
                    max_size=config.dmarc.max_report_size,
                    force=args.force,
                    show=show,
                )
            )
            state = config.dmarc.state
        else:
            results = tls_reports_dir(config)
            if results is None:
                print(f"{command}: [outbound] tls_reports is empty: no TLS results are kept")
                return 0
            sent = asyncio.run(
                tlsrpt_send.send_day(
                    day,
                    state=config.dmarc.state / "tlsrpt",
                    results=results,
                    resolver=build_resolver(config),
                    outbox=outbox,
                    org_name=org_name,
                    from_address=from_address,
                    max_size=config.dmarc.max_report_size,
                    force=args.force,
                    show=show,
                )
            )
            state = config.dmarc.state / "tlsrpt"
        if not args.dry_run and sent.queued:
            done = {} if args.force else dmarc_send.read_sent(state, day)
            dmarc_send.write_sent(state, day, {**done, **sent.queued})
    except (OSError, SigningKeyError) as exc:
        print(f"{command}: {escape(str(exc))}", file=sys.stderr)
        return 1
    finally:
        if spool is not None:
            spool.close()
    for line in sent.lines:
        print(f"{day} {escape(line, 2000)}")
    if not sent.lines:
        print(f"{day}: nothing to report")
    return 1 if sent.failures else 0


def tls_reports_dir(config: Config) -> Path | None:
    """``[outbound] tls_reports`` (the TLS results the MX delivery records; None: none are
    kept), or its default ``var/tlsrpt`` when this build has no ``[outbound]`` section."""
    outbound = getattr(config, "outbound", None)
    if outbound is None:
        return Path("var/tlsrpt")
    value = getattr(outbound, "tls_reports", None)
    return Path(value) if value else None
