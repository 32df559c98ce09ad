"""``palisade stats``: counts over the main log (and its rotated copies) as a text table, JSON,
or a self-contained HTML page with plots.

Owns: the command's arguments, the ``--since`` syntax, which files are read (``mainlog`` and its
rotations in ``[paths] log``, or the files named), the rules handed to the parser (from the
config: their ``log_message`` templates and the spam scanner's tag and kill levels) and the
text table. Counting is :mod:`palisade.obs.stats`; the page is :mod:`palisade.obs.statspage`
(matplotlib, imported only for ``--html``).

Only ``mainlog`` is read: every refusal is in it as well as in ``rejectlog`` (a subset), so
reading both would count refusals twice. Exit status: 0; 1 a log file or the page cannot be
read or written; 2 bad usage or a config that does not build (one line on stderr).
Trust: log text is client text: the table shows control characters as ``\\xNN`` (none reaches
the terminal), the page escapes it for HTML.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

from palisade.config import Config, ConfigError
from palisade.config.policy import build_policy
from palisade.obs.stats import RuleText, Stats, StatsCollector, log_files
from palisade.policy.rules import Stage

# Control characters (C0, DEL, C1) shown as \xNN: the log writer escaped the client's text
# already (backslashes too, so they are left as they are); a line from elsewhere may not be.
_CONTROLS = {i: f"\\x{i:02x}" for i in (*range(32), *range(127, 160))}
_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DATE = re.compile(r"\d{4}-\d\d-\d\d(?:[ T]\d\d:\d\d(?::\d\d)?)?\Z")


def add_arguments(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "stats", help="statistics over the main log: refusals, spam scores, TLS, AUTH"
    )
    parser.add_argument(
        "--since",
        default="7d",
        help="how far back: 30m, 12h, 7d, 2w, a local date 'YYYY-MM-DD[ HH:MM[:SS]]', "
        "or 'all' (default 7d)",
    )
    parser.add_argument("--by", choices=("hour", "day"), default="hour", help="timeline step")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.add_argument("--html", type=Path, metavar="FILE", help="write a self-contained page")
    parser.add_argument("--top", type=int, default=10, metavar="N", help="top lists (default 10)")
    parser.add_argument(
        "--log-dir", type=Path, help="the log directory (default: the config's [paths] log)"
    )
    parser.add_argument(
        "files", nargs="*", type=Path, metavar="FILE", help="log files instead (.gz read too)"
    )
    return parser


def since_stamp(text: str, now: float) -> str | None:
    """``--since`` as the local-time stamp a log line starts with; None for ``all``.
    ValueError (with the reason) when it is neither a duration nor a date."""
    text = text.strip()
    if text == "all":
        return None
    found = re.fullmatch(r"(\d+)([mhdw])", text)
    if found is not None:
        cutoff = now - int(found[1]) * _UNITS[found[2]]
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(cutoff))
    if _DATE.match(text):
        stamp = text.replace("T", " ")
        return stamp + " 00:00:00"[len(stamp) - 10 :] if len(stamp) < 19 else stamp
    raise ValueError(f"--since: expected 30m, 12h, 7d, 2w, YYYY-MM-DD or all, got {text!r}")


def rules_of(config: Config) -> list[RuleText]:
    """Every rule the config makes (the implied scanner rules too), stage by stage."""
    policy = build_policy(config)
    rules = []
    for stage in Stage:
        for rule in policy.for_stage(stage):
            rules.append(
                RuleText(
                    name=rule.name,
                    stage=stage.value,
                    check=rule.check.name,
                    template=rule.log_message or f"{rule.name}: $reason",
                    verb=rule.verb.value,
                )
            )
    return rules


def run(args: argparse.Namespace, config: Config) -> int:
    if args.top < 1:
        print("palisade: --top: expected at least 1", file=sys.stderr)
        return 2
    try:
        since = since_stamp(args.since, time.time())
    except ValueError as exc:
        print(f"palisade: {exc}", file=sys.stderr)
        return 2
    try:
        rules = rules_of(config)
    except ConfigError as exc:
        print(f"palisade: {exc}", file=sys.stderr)
        return 2
    scanner = config.spam_scanner
    collector = StatsCollector(
        rules,
        since=since,
        by=args.by,
        tag_level=scanner.tag_level if scanner is not None else None,
        kill_level=scanner.kill_level if scanner is not None else None,
    )
    if args.files:
        paths = list(args.files)
    else:
        directory = args.log_dir or config.paths.log
        since_epoch = time.mktime(time.strptime(since, "%Y-%m-%d %H:%M:%S")) if since else None
        paths = log_files(directory, "mainlog", since_epoch)
        if not paths:
            print(f"palisade: no mainlog in {directory}", file=sys.stderr)
            return 1
    for path in paths:
        try:
            collector.read(path)
        except (OSError, EOFError) as exc:  # EOFError: a .gz file cut short
            print(f"palisade: cannot read {path}: {exc}", file=sys.stderr)
            return 1
    stats = collector.stats
    if args.html is not None:
        from palisade.obs.statspage import render_page

        try:
            args.html.write_text(render_page(stats, top=args.top), encoding="utf-8")
        except OSError as exc:
            print(f"palisade: cannot write {args.html}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        if not args.json:
            return 0
    if args.json:
        json.dump(stats.as_json(args.top), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print_table(stats, sys.stdout, args.top)
    return 0


def print_table(stats: Stats, out: TextIO, top: int = 10) -> None:
    """The numbers as aligned text, section by section."""
    data = stats.as_json(top)
    period = data["period"]
    write = out.write
    write(
        f"Palisade statistics since {period['since'] or 'the start of the logs'}"
        f" (lines {period['first'] or '-'} .. {period['last'] or '-'})\n"
    )
    rows = [
        ("accepted", stats.accepted),
        ("refused", stats.refused),
        ("deferred", stats.deferred),
        ("tagged as spam", stats.spam_tagged),
        ("killed as spam", stats.spam_killed),
        ("bounces sent", stats.bounces),
        ("delivered", stats.delivered),
        ("delivery deferrals", stats.delivery_deferred),
        ("delivery failures", stats.delivery_failed),
        ("AUTH failures", stats.auth_failures),
        ("TLS errors", stats.tls_errors),
        ("malformed lines", stats.malformed),
    ]
    _section(write, "Summary", [(name, str(n)) for name, n in rows])
    share = stats.tls_share
    tls = f"{stats.tls_messages} of {stats.accepted} ({share:.1%})" if share is not None else "-"
    _section(write, "TLS", [("accepted over TLS", tls), *_pairs(stats.tls_versions)])
    _section(write, "Refused by stage", _pairs(stats.refused_by_stage))
    _section(write, "Refused by rule", _pairs(stats.refused_by_rule))
    _section(write, "Deferred by rule", _pairs(stats.deferred_by_rule))
    _section(write, "Warnings by rule", _pairs(stats.warned_by_rule))
    _section(write, "Observe mode (would refuse) by rule", _pairs(stats.observed_by_rule))
    _section(write, "Rule lookup failures", _pairs(stats.rule_errors))
    _section(write, "Top refused client addresses", _pairs(stats.refused_ips, top))
    _section(write, "Top refused sender domains", _pairs(stats.refused_sender_domains, top))
    _section(write, "Top refused HELO names", _pairs(stats.refused_helos, top))
    zones = [
        (zone, ", ".join(f"{action} {n}" for action, n in sorted(actions.items())))
        for zone, actions in sorted(stats.dnsbl.items())
    ]
    _section(write, "DNSBL hits by zone", zones)
    _section(write, "Spam scores", spam_rows(stats))
    _section(write, "Viruses", _pairs(stats.viruses))
    _section(write, "AUTH failures by mechanism", _pairs(stats.auth_failures_by_mechanism))


def spam_rows(stats: Stats) -> list[tuple[str, str]]:
    """The score histogram as rows ``[low, low+1)  count  bar``, tag and kill levels marked."""
    histogram = stats.histogram()
    if not histogram:
        return []
    peak = max(n for _, n in histogram) or 1
    rows = []
    for low, n in histogram:
        marks = []
        for name, level in (("tag", stats.tag_level), ("kill", stats.kill_level)):
            if level is not None and low <= level < low + 1:
                marks.append(f"<- {name} level {level:g}")
        bar = "#" * max(1 if n else 0, round(n * 30 / peak))
        label = f"{low:>4} .. {low + 1:<4}"
        if low == histogram[-1][0] and max(stats.spam_scores) >= low + 1:
            label = f"{low:>4} and up"
        elif low == histogram[0][0] and min(stats.spam_scores) < low:
            label = f"{low + 1:>4} and below"
        rows.append((label, f"{n:>6}  {bar:<30} {' '.join(marks)}".rstrip()))
    levels = [f"{name} {level:g}" for name, level in (("tag", stats.tag_level), ("kill",
              stats.kill_level)) if level is not None]  # fmt: skip
    if levels:
        rows.append(("levels", ", ".join(levels)))
    return rows


def _pairs(counter: Counter[str], top: int | None = None) -> list[tuple[str, str]]:
    ranked = sorted(counter.items(), key=lambda item: (-item[1], item[0]))
    return [(key, str(n)) for key, n in ranked[:top]]


def _section(write: Any, title: str, rows: list[tuple[str, str]]) -> None:
    write(f"\n{title}\n")
    if not rows:
        write("  (none)\n")
        return
    shown = [(_safe(key), value) for key, value in rows]
    width = min(60, max(len(key) for key, _ in shown))
    for key, value in shown:
        write(f"  {key:<{width}}  {value}\n")


def _safe(text: str, limit: int = 60) -> str:
    text = text.translate(_CONTROLS)
    return text if len(text) <= limit else text[: limit - 3] + "..."
