"""``palisade stats`` on the logs of a real run: a gateway with a DNSBL (a loopback DNS server),
a HELO rule, a deferring sender rule, relay control, a real spamd (a site rule of the test's
scores a marked message between the tag and kill levels; GTUBE is over the kill level) and a
real clamd; clients from their own 127.0.0.x addresses, some over STARTTLS.

The test counts what it sent and compares ``--json`` with that, exactly. The log is rotated
between the rounds of traffic (``mainlog.2.gz``, ``mainlog.1``, ``mainlog``), so the rotated
and gzip'd files are read too. Lines that real time cannot make (a month old, an exim
``authenticator failed`` line: AUTH is not built yet, a malformed line, a HELO written raw by
some other writer) are appended by the test and said so. The HTML page is opened in headless
Chromium: its DOM and a screenshot are checked.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import smtplib
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loopback.dnsserver import ZoneServer, start_zone_server
from tests.conftest import GatewayProcess, palisade, wait_for
from tests.scanners.clamd import EICAR, REPORTED, ClamdProcess, start_clamd
from tests.scanners.conftest import GTUBE, HAM_BODY
from tests.scanners.spamd import SpamdProcess, start_spamd
from tests.server.smtpclient import RawClient
from tests.services import need_program

TAG_MARK = "palisade-stats-tag-marker"
SITE_RULES = f"body PALISADE_STATS_TAG /{TAG_MARK}/\nscore PALISADE_STATS_TAG 8.0\n"
TAG_LEVEL, KILL_LEVEL = 5.0, 16.0
LISTED, WARNED = "127.0.0.21", "127.0.0.23"
BLOCK_ZONE, WARN_ZONE = "bl.example.test", "warn.example.test"
HOSTILE_HELO = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def spamd() -> Iterator[SpamdProcess]:
    process = start_spamd(site_rules=SITE_RULES)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def clamd() -> Iterator[ClamdProcess]:
    process = start_clamd()
    yield process
    process.stop()


@pytest.fixture
def dns() -> Iterator[ZoneServer]:
    server = start_zone_server()
    for zone in (BLOCK_ZONE, WARN_ZONE):
        server.add_zone(zone)
        server.list_address(zone, "127.0.0.2", "127.0.0.2")  # the RFC 5782 test point
    server.list_address(BLOCK_ZONE, LISTED, "127.0.0.4")
    server.list_address(WARN_ZONE, WARNED, "127.0.0.3")
    yield server
    server.stop()


def sections(dns: ZoneServer, spamd: SpamdProcess, clamd: ClamdProcess, tls: Any) -> Any:
    return {
        "dns": {"nameservers": [f"127.0.0.1:{dns.port}"], "timeout": 1, "retries": 0},
        "tls": {"certificate": str(tls["certificate"]), "private_key": str(tls["private_key"])},
        "spamd": {"address": spamd.address, "tag_level": TAG_LEVEL, "kill_level": KILL_LEVEL},
        "clamd": {"address": clamd.address, "timeout": "10s"},
        "rules": {
            "connect": [
                {
                    "name": "blocklist",
                    "check": "dnsbl",
                    "zones": [{"zone": BLOCK_ZONE}],
                    "verb": "deny",
                    "message": "$ip is listed at $zone",
                    "log_message": "DENY - listed at $zone ($codes)",
                },
                {
                    "name": "warnlist",
                    "check": "dnsbl",
                    "zones": [{"zone": WARN_ZONE}],
                    "verb": "warn",
                    "log_message": "listed at $zone",
                },
            ],
            "helo": [
                {
                    "name": "bad helo",
                    "check": "helo",
                    "patterns": ["^ylmf-pc$", "script"],
                    "verb": "deny",
                    "message": "Access denied",
                    "log_message": "DENY - HELO $helo",
                }
            ],
            "mail": [
                {
                    "name": "greylist",
                    "check": "sender",
                    "patterns": ["^grey@"],
                    "verb": "defer",
                    "message": "Try again later",
                    "log_message": "DEFER - greylisted $sender",
                }
            ],
        },
    }


def message(body: str, subject: str = "Minutes") -> bytes:
    return (
        f"From: Alice <alice@client.example>\r\nTo: postmaster@example.test\r\n"
        f"Subject: {subject}\r\nDate: Tue, 3 Jun 2025 10:14:58 +0000\r\n"
        f"Message-ID: <{time.monotonic_ns()}@client.example>\r\n\r\n" + body.replace("\n", "\r\n")
    ).encode()


def send(
    gw: GatewayProcess,
    data: bytes,
    source: str = "127.0.0.40",
    sender: str = "alice@client.example",
    tls: ssl.SSLContext | None = None,
    rcpt: str = "postmaster@example.test",
) -> int:
    """One message; the reply code to DATA (or to MAIL/RCPT when those refuse)."""
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=60, source_address=(source, 0)) as client:
        client.ehlo("mx.client.example")
        if tls is not None:
            client.starttls(context=tls)
            client.ehlo("mx.client.example")
        code, _ = client.mail(sender)
        if code != 250:
            return code
        code, _ = client.rcpt(rcpt)
        if code != 250:
            return code
        code, _ = client.data(data)
        return code


def refused_at_connect(gw: GatewayProcess, source: str) -> int:
    client = RawClient(gw.port, source=source)
    code, _ = client.reply()
    client.close()
    return code


def refused_helo(gw: GatewayProcess, name: str) -> int:
    client = RawClient(gw.port, source="127.0.0.41")
    client.reply()
    code, _ = client.command(f"EHLO {name}")
    client.command("QUIT")
    client.close()
    return code


def rotate(gw: GatewayProcess, name: str, compress: bool) -> None:
    """logrotate's rename (the gateway notices it at its next line) and its gzip."""
    log = gw.log_dir / "mainlog"
    if compress:
        with log.open("rb") as src, gzip.open(gw.log_dir / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
        log.unlink()
    else:
        log.rename(gw.log_dir / name)


def stats(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    result = palisade("stats", "--config", str(gw.config_path), *args, cwd=gw.base)
    assert result.returncode == 0, result.stderr
    return result


def stamp(seconds_ago: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - seconds_ago))


@pytest.fixture
def run(
    make_gateway: Any,
    dns: ZoneServer,
    spamd: SpamdProcess,
    clamd: ClamdProcess,
    tls_files: Any,
) -> GatewayProcess:
    """The traffic, in three rounds with a rotation after each of the first two."""
    gw: GatewayProcess = make_gateway(**sections(dns, spamd, clamd, tls_files))
    tls = ssl.create_default_context(cafile=str(tls_files["ca"]))
    # round 1: ham (one over TLS), a tagged message, a listed client twice
    assert send(gw, message(HAM_BODY)) == 250
    assert send(gw, message(HAM_BODY), tls=tls) == 250
    assert send(gw, message(HAM_BODY + TAG_MARK + "\n")) == 250
    assert refused_at_connect(gw, LISTED) == 554
    assert refused_at_connect(gw, LISTED) == 554
    rotate(gw, "mainlog.2.gz", compress=True)
    # round 2: killed (GTUBE) twice, one over TLS; a virus; a client the warn zone lists
    assert send(gw, message(HAM_BODY + GTUBE + "\n")) == 550
    assert send(gw, message(HAM_BODY + GTUBE + "\n"), tls=tls) == 550
    assert send(gw, message(HAM_BODY + EICAR.decode() + "\n")) == 550
    assert send(gw, message(HAM_BODY), source=WARNED) == 250
    rotate(gw, "mainlog.1", compress=False)
    # round 3: a tagged message over TLS, bad HELOs, relaying, a greylisted sender, AUTH
    assert send(gw, message(HAM_BODY + TAG_MARK + "\n"), tls=tls) == 250
    assert refused_helo(gw, "ylmf-pc") == 550
    assert refused_helo(gw, HOSTILE_HELO) == 550
    assert send(gw, message(HAM_BODY), rcpt="someone@elsewhere.test") == 550
    assert send(gw, message(HAM_BODY), sender="grey@client.example") == 451
    client = RawClient(gw.port, source="127.0.0.42")
    client.reply()
    client.command("EHLO auth.client.example")
    assert client.command("AUTH PLAIN AHVzZXIAcGFzcw==")[0] == 503
    client.command("QUIT")
    client.close()
    wait_for(lambda: "AUTH command used when not advertised" in gw.mainlog())
    return gw


EXPECTED_BY_RULE = {
    "blocklist": 2,
    "spam kill level": 2,
    "bad helo": 2,
    "clamd": 1,
    "relay control": 1,
    "AUTH not advertised": 1,
}


def test_stats_json_counts_exactly_what_was_sent(run: GatewayProcess) -> None:
    gw = run
    assert sorted(p.name for p in gw.log_dir.glob("mainlog*")) == [
        "mainlog",
        "mainlog.1",
        "mainlog.2.gz",
    ]
    data = json.loads(stats(gw, "--json").stdout)
    assert [Path(f).name for f in data["files"]] == ["mainlog.2.gz", "mainlog.1", "mainlog"]
    assert data["malformed"] == 0
    assert data["accepted"] == 5  # 2 ham, 2 tagged, 1 from the warned client
    assert data["refused"] == 9
    assert data["deferred"] == 1
    assert data["refused_by_stage"] == {
        "connect": 2, "data": 3, "helo": 2, "protocol": 1, "rcpt": 1,
    }  # fmt: skip
    assert data["refused_by_rule"] == EXPECTED_BY_RULE
    assert data["deferred_by_rule"] == {"greylist": 1}
    assert data["deferred_by_stage"] == {"mail": 1}
    assert data["warned_by_rule"] == {"warnlist": 1}
    assert data["dnsbl"] == {BLOCK_ZONE: {"refused": 2}, WARN_ZONE: {"warned": 1}}
    assert data["top_refused_ips"] == [  # killed, virus, relaying; DNSBL; HELO; AUTH
        ["127.0.0.40", 4], [LISTED, 2], ["127.0.0.41", 2], ["127.0.0.42", 1],
    ]  # fmt: skip
    assert dict(map(tuple, data["top_refused_sender_domains"])) == {"client.example": 4}
    spam = data["spam"]
    assert (spam["scanned"], spam["tagged"], spam["killed"]) == (7, 2, 2)
    assert (spam["tag_level"], spam["kill_level"]) == (TAG_LEVEL, KILL_LEVEL)
    histogram = dict(map(tuple, spam["histogram"]))
    assert sum(histogram.values()) == 7
    assert sum(n for low, n in histogram.items() if low >= KILL_LEVEL) == 2
    assert sum(n for low, n in histogram.items() if TAG_LEVEL <= low < KILL_LEVEL) == 2
    assert data["viruses"] == {REPORTED: 1}
    assert data["tls"]["messages"] == 2  # the third TLS message was killed
    assert data["tls"]["share"] == 0.4
    assert set(data["tls"]["versions"]) <= {"TLS1.2", "TLS1.3"}
    assert data["auth_failures"]["total"] == 0
    assert sum(data["timeline"][b][r] for b in data["timeline"] for r in data["timeline"][b]) == 9


def test_since_leaves_out_older_lines_and_counts_appended_ones(run: GatewayProcess) -> None:
    """Lines real time cannot make are appended: a month-old refusal and arrival, two exim
    AUTH failures, a malformed line. ``--since 7d`` leaves the old ones out, ``all`` not."""
    gw = run
    old = stamp(30 * 86400)
    recent = stamp(60)
    lines = [
        f"{old} H=(old.example) [192.0.2.99]:1000 F=<x@old.example> rejected RCPT "
        "<a@example.test>: relay attempt refused: not a local domain",
        f"{old} 1aAaAa-000000-00 <= x@old.example H=(old.example) [192.0.2.99]:1001 P=esmtp "
        "S=100 spam=1.0 T=<a@example.test>",
        f"{recent} dovecot_plain authenticator failed for (User) [192.0.2.37]:41556: 535 "
        "Incorrect authentication data (set_id=test)",
        f"{recent} login authenticator failed for H=(x) [192.0.2.38]:41557 I=[127.0.0.1]:587: "
        "535 Incorrect authentication data",
        "this is not a log line",
    ]
    with (gw.log_dir / "mainlog").open("a") as log:
        log.write("\n".join(lines) + "\n")
    week = json.loads(stats(gw, "--json", "--since", "7d").stdout)
    assert (week["accepted"], week["refused"], week["malformed"]) == (5, 9, 1)
    assert week["auth_failures"] == {
        "total": 2,
        "by_mechanism": {"dovecot_plain": 1, "login": 1},
        "top_ips": [["192.0.2.37", 1], ["192.0.2.38", 1]],
    }
    every = json.loads(stats(gw, "--json", "--since", "all").stdout)
    assert (every["accepted"], every["refused"]) == (6, 10)
    assert every["refused_by_rule"]["relay control"] == 2
    assert every["spam"]["scanned"] == 8
    # a rotated file last written before the cutoff is not even opened
    two = gw.log_dir / "mainlog.2.gz"
    os.utime(two, (time.time() - 9 * 86400, time.time() - 9 * 86400))
    week = json.loads(stats(gw, "--json", "--since", "7d").stdout)
    assert "mainlog.2.gz" not in [Path(f).name for f in week["files"]]
    assert week["refused"] == 7


def test_text_table_and_a_closed_pipe(run: GatewayProcess) -> None:
    gw = run
    text = stats(gw).stdout
    assert re.search(r"^  accepted +5$", text, re.M)
    assert re.search(r"^  refused +9$", text, re.M)
    assert re.search(r"^  blocklist +2$", text, re.M)
    assert re.search(r"^ +5 \.\. 6 +\d+ +#* *<- tag level 5$", text, re.M)
    assert re.search(r"^ +16 \.\. 17 +\d+ +#* *<- kill level 16$", text, re.M)
    assert re.search(r"^ +26 and up +2 +#+$", text, re.M)  # GTUBE: 1000 points
    assert "\\x3cscript\\x3e" in text  # the writer escaped the HELO; so it stays
    # | head -1: the reader goes away after one line; no traceback, status 0
    shell = subprocess.run(
        f"{sys.executable} -m palisade stats --config {gw.config_path} | head -1",
        shell=True,
        cwd=gw.base,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src")),
    )
    assert shell.stdout.startswith("Palisade statistics since ")
    assert shell.stderr == ""


CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium(page: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    browser = need_program("chromium", "chromium")
    return subprocess.run(
        [
            browser,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp}",
            "--enable-logging=stderr",
            "--v=0",
            *args,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def colour_pixels(image: Any, colour: str, slack: int = 10) -> list[tuple[int, int]]:
    """Where the screenshot shows ``colour`` (``#rrggbb``, within ``slack`` per channel)."""
    want = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
    width, height = image.size
    pixels = image.load()
    return [
        (x, y)
        for y in range(height)
        for x in range(width)
        if all(abs(a - b) <= slack for a, b in zip(pixels[x, y][:3], want, strict=True))
    ]


def test_html_page_renders_in_headless_chromium(run: GatewayProcess, tmp_path: Path) -> None:
    from PIL import Image

    from palisade.obs.statspage import HISTOGRAM_COLOUR, KILL_COLOUR, TAG_COLOUR

    gw = run
    # a HELO written raw by some other writer (the gateway escapes it): still no markup
    with (gw.log_dir / "mainlog").open("a") as log:
        log.write(
            f"{stamp(30)} H=({HOSTILE_HELO}) [192.0.2.77]:999 rejected EHLO or HELO x: "
            "DENY - HELO x\n"
        )
    page = tmp_path / "stats.html"
    stats(gw, "--html", str(page))
    text = page.read_text()
    assert "<script" not in text.lower() and "javascript:" not in text.lower()
    assert not re.search(r"<[^>]+\son\w+\s*=", text)  # no event handler attributes
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert not re.search(r"(?:src|href)=\"(?:https?:)?//", text)  # nothing fetched
    assert text.count("<svg") == 2

    dom = chromium(page, tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0, dom.stderr
    assert "<script" not in dom.stdout
    console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert console == []
    scores = re.search(r'<div class="plot" id="scores">(.*?)</div>', dom.stdout, re.S)
    timeline = re.search(r'<div class="plot" id="timeline">(.*?)</div>', dom.stdout, re.S)
    assert scores is not None and timeline is not None
    for level in ("tag-level", "kill-level"):  # each level a <g> holding its line's path
        assert re.search(rf'<g id="{level}">\s*<path [^>]*d="M ', scores[1]), level
    histogram = json.loads(stats(gw, "--json").stdout)["spam"]["histogram"]
    bars = re.findall(r'<g id="score-bar-(\d+)">\s*<path d="M [^"]*z\s*"', scores[1])
    assert bars == [str(n) for n in range(len(histogram))]  # one rectangle per bin
    buckets = len(json.loads(stats(gw, "--json").stdout)["timeline"])
    for number in range(len(EXPECTED_BY_RULE)):  # one bar series per rule, a bar per bucket
        found = re.findall(rf'<g id="rule-{number}-\d+">\s*<path d="M ', timeline[1])
        assert len(found) == buckets, number
    assert '<g id="rule-6-' not in timeline[1]

    shot = tmp_path / "stats.png"
    result = chromium(page, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000")
    assert result.returncode == 0 and shot.exists(), result.stderr
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2000)
    assert len(image.getcolors(1 << 16) or range(1 << 16)) > 50  # not a blank page
    assert len(colour_pixels(image, HISTOGRAM_COLOUR)) > 200  # the score bars
    for colour in (TAG_COLOUR, KILL_COLOUR):  # each level a tall thin vertical line
        columns = Counter(x for x, _ in colour_pixels(image, colour))
        tall = [x for x, n in columns.items() if n > 100]  # the legend's sample is short
        assert tall and max(tall) - min(tall) < 8, (colour, columns)
    if os.environ.get("PALISADE_STATS_SCREENSHOT"):  # docs/stats.png is made this way
        shutil.copy(shot, os.environ["PALISADE_STATS_SCREENSHOT"])
