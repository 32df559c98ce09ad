"""The ``palisade stats --html`` page: one self-contained HTML file, tables and two plots.

Owns: the page's markup and style (inline CSS, no script, nothing fetched: it reads without a
network) and the plots, drawn with matplotlib's SVG backend and put inline: the spam score
histogram with the tag and kill levels as vertical lines, and refusals per hour (or day)
stacked by rule. matplotlib is the optional extra ``stats``; it is imported inside
:func:`render_page` only, so nothing else of Palisade (the gateway above all) ever loads it.

Trust: every string of :class:`palisade.obs.stats.Stats` may be client text (HELO names,
addresses, virus names, rule texts): it is HTML-escaped in the tables, and in the plots it goes
through matplotlib's SVG writer (which escapes XML) with ``$`` escaped so that no text is read
as mathtext.
"""

from __future__ import annotations

import html
import io
import re
from collections import Counter
from typing import Any

from palisade.obs.stats import Stats

_CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; background: #fff; max-width: 1200px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.4em 0; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: flex; flex-wrap: wrap; gap: 2em; }
.plot svg { max-width: 100%; height: auto; }
.note { color: #666; font-size: 0.9em; }
"""

# One colour per rule in the stacked plot (matplotlib's tab20, written out: no lookup needed).
_COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
)  # fmt: skip
# The histogram and the two levels in colours of their own (not in the palette above), so that a
# screenshot tells them apart from the refusal bars.
HISTOGRAM_COLOUR = "#4c72b0"
TAG_COLOUR = "#e6ab02"
KILL_COLOUR = "#8b0000"


def render_page(stats: Stats, top: int = 10) -> str:
    """The whole page as text."""
    data = stats.as_json(top)
    period = data["period"]
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>Palisade statistics</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Palisade statistics</h1>",
        f'<p class="note">Since {e(period["since"] or "the start of the logs")}; lines from '
        f"{e(period['first'] or '-')} to {e(period['last'] or '-')}; "
        f"{data['lines']} lines read, {data['malformed']} malformed.</p>",
    ]
    share = stats.tls_share
    summary = [
        ("accepted", stats.accepted),
        ("refused", stats.refused),
        ("deferred", stats.deferred),
        ("tagged as spam", stats.spam_tagged),
        ("killed as spam", stats.spam_killed),
        ("accepted over TLS", f"{share:.1%}" if share is not None else "-"),
        ("AUTH failures", stats.auth_failures),
        ("delivered", stats.delivered),
        ("delivery deferrals", stats.delivery_deferred),
        ("delivery failures", stats.delivery_failed),
    ]
    parts.append('<div class="grid">')
    parts.append(_table("Summary", summary))
    parts.append(_table("Refused by stage", _ranked(stats.refused_by_stage)))
    parts.append(_table("Refused by rule", _ranked(stats.refused_by_rule)))
    parts.append(_table("Deferred by rule", _ranked(stats.deferred_by_rule)))
    parts.append("</div>")
    parts.append("<h2>Refusals per " + e(stats.by) + " by rule</h2>")
    parts.append(f'<div class="plot" id="timeline">{timeline_svg(stats)}</div>')
    parts.append("<h2>Spam scores</h2>")
    parts.append(f'<div class="plot" id="scores">{histogram_svg(stats)}</div>')
    levels = ", ".join(
        f"{name} level {level:g}"
        for name, level in (("tag", stats.tag_level), ("kill", stats.kill_level))
        if level is not None
    )
    parts.append(
        f'<p class="note">{len(stats.spam_scores)} scanned ({stats.spam_tagged} tagged, '
        f"{stats.spam_killed} killed, {stats.spam_unchecked} unchecked, {stats.spam_skipped} "
        f"skipped){'; ' + e(levels) if levels else ''}.{_clipped(stats)}</p>"
    )
    parts.append('<div class="grid">')
    parts.append(_table("Top refused client addresses", _ranked(stats.refused_ips, top)))
    parts.append(_table("Top refused sender domains", _ranked(stats.refused_sender_domains, top)))
    parts.append(_table("Top refused HELO names", _ranked(stats.refused_helos, top)))
    zones = [
        (zone, ", ".join(f"{action} {n}" for action, n in sorted(actions.items())))
        for zone, actions in sorted(stats.dnsbl.items())
    ]
    parts.append(_table("DNSBL hits by zone", zones))
    parts.append(_table("Viruses", _ranked(stats.viruses)))
    tls = [(version, n) for version, n in _ranked(stats.tls_versions)]
    tls.append(("TLS errors", stats.tls_errors))
    parts.append(_table("TLS", tls))
    parts.append(_table("AUTH failures by mechanism", _ranked(stats.auth_failures_by_mechanism)))
    parts.append(_table("Warnings by rule", _ranked(stats.warned_by_rule)))
    parts.append(_table("Observe mode by rule", _ranked(stats.observed_by_rule)))
    parts.append("</div></body></html>\n")
    return "\n".join(parts)


def _clipped(stats: Stats) -> str:
    """The histogram's end bins also hold the scores beyond them: say so when they do."""
    bounds = stats.histogram_range()
    if bounds is None:
        return ""
    low, high = bounds
    notes = []
    if min(stats.spam_scores) < low:
        notes.append(f"the first bar holds every score below {low + 1}")
    if max(stats.spam_scores) >= high + 1:
        notes.append(f"the last bar holds every score of {high} and more")
    return (" " + "; ".join(notes).capitalize() + ".") if notes else ""


def _ranked(counter: Counter[str], top: int | None = None) -> list[tuple[str, Any]]:
    return sorted(counter.items(), key=lambda item: (-item[1], item[0]))[:top]


def _table(title: str, rows: list[tuple[str, Any]]) -> str:
    e = html.escape
    body = (
        "".join(
            f'<tr><td>{e(str(key))}</td><td class="n">{e(str(value))}</td></tr>'
            for key, value in rows
        )
        or '<tr><td colspan="2" class="note">none</td></tr>'
    )
    return f"<section><h2>{e(title)}</h2><table>{body}</table></section>"


def _label(text: str) -> str:
    """Text for matplotlib: ``$`` escaped (no mathtext), bounded."""
    text = text if len(text) <= 60 else text[:57] + "..."
    return text.replace("\\", "\\\\").replace("$", r"\$")


def _svg(figure: Any) -> str:
    """The figure as an inline ``<svg>`` element (no XML prolog, no DOCTYPE)."""
    out = io.StringIO()
    figure.savefig(out, format="svg", metadata={"Date": None}, bbox_inches="tight")
    text = out.getvalue()
    start = text.find("<svg")
    return text[start:] if start >= 0 else text


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("svg", force=True)
    matplotlib.rcParams["svg.fonttype"] = "none"  # text as <text>, not glyph paths
    matplotlib.rcParams["svg.hashsalt"] = "palisade"  # stable ids
    import matplotlib.pyplot as plt

    return plt


def histogram_svg(stats: Stats) -> str:
    """Whole-point bins of every score seen (accepted and killed), with the tag level (orange,
    dashed) and kill level (red) as vertical lines."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(9, 3.6))
    try:
        histogram = stats.histogram()
        lows = [low for low, _ in histogram]
        counts = [n for _, n in histogram]
        if histogram:
            bars = axes.bar(lows, counts, width=1.0, align="edge", color=HISTOGRAM_COLOUR,
                            edgecolor="white", label="messages")  # fmt: skip
            for number, patch in enumerate(bars):
                patch.set_gid(f"score-bar-{number}")
        else:
            axes.text(0.5, 0.5, "no scanned messages", transform=axes.transAxes, ha="center")
        for name, level, colour, style in (
            ("tag", stats.tag_level, TAG_COLOUR, "--"),
            ("kill", stats.kill_level, KILL_COLOUR, "-"),
        ):
            if level is not None:
                axes.axvline(level, color=colour, linestyle=style, linewidth=2.5,
                             label=f"{name} level {level:g}", gid=f"{name}-level")  # fmt: skip
        axes.set_xlabel("spam score")
        axes.set_ylabel("messages")
        axes.yaxis.get_major_locator().set_params(integer=True)
        if histogram or stats.tag_level is not None or stats.kill_level is not None:
            axes.legend(loc="upper right")
        return _svg(figure)
    finally:
        plt.close(figure)


def timeline_svg(stats: Stats, max_rules: int = 10) -> str:
    """Refusals per bucket, one bar per bucket, stacked by rule (the ``max_rules`` most
    frequent; the rest as "other rules")."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(11, 4))
    try:
        buckets = sorted(stats.timeline)
        totals: Counter[str] = Counter()
        for rules in stats.timeline.values():
            totals.update(rules)
        ranked = [rule for rule, _ in _ranked(totals)]
        shown, rest = ranked[:max_rules], ranked[max_rules:]
        bottoms = [0] * len(buckets)
        positions = list(range(len(buckets)))
        series = [(rule, [stats.timeline[b].get(rule, 0) for b in buckets]) for rule in shown]
        if rest:
            series.append(
                ("other rules", [sum(stats.timeline[b].get(r, 0) for r in rest) for b in buckets])
            )
        for number, (rule, counts) in enumerate(series):
            bars = axes.bar(positions, counts, bottom=bottoms, width=0.8,
                            color=_COLOURS[number % len(_COLOURS)], label=_label(rule))  # fmt: skip
            for position, patch in enumerate(bars):
                patch.set_gid(f"rule-{number}-{position}")
            bottoms = [b + n for b, n in zip(bottoms, counts, strict=True)]
        if not buckets:
            axes.text(0.5, 0.5, "no refusals", transform=axes.transAxes, ha="center")
        step = max(1, len(buckets) // 12)
        axes.set_xticks(positions[::step])
        axes.set_xticklabels([_short(b, stats.by) for b in buckets[::step]], rotation=30,
                             ha="right")  # fmt: skip
        axes.set_ylabel(f"refusals per {stats.by}")
        axes.yaxis.get_major_locator().set_params(integer=True)
        if series:
            axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
        return _svg(figure)
    finally:
        plt.close(figure)


def _short(bucket: str, by: str) -> str:
    return bucket[5:] if by == "hour" else bucket


# What the tests look for in a page: no script of any kind.
SCRIPT = re.compile(r"<script|javascript:|\son\w+=", re.I)
