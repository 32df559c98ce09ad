"""``[metrics] listen``: a real gateway (a parent and two workers) serves ``/metrics``, scraped
over HTTP and parsed with prometheus-client's own parser.

The traffic is a known mix: messages accepted (smtplib), HELO refusals (a raw client), DNSBL
refusals at connect (a client on 127.0.0.5 listed by a DNS server on loopback), a pregreet
(a raw client that talks before the banner), a deferral (a ``defer`` rule at MAIL). Every count
is a difference between a scrape before the traffic and one after, so the harness's readiness
connection does not count. Counts are summed over the processes by the parent (multiprocess
mode): a worker killed with SIGKILL keeps what it counted, and the one that replaces it counts
on from zero in a file of its own (the sum neither drops nor doubles).
"""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loopback.dnsserver import ZoneServer, start_zone_server
from tests.conftest import (
    GatewayProcess,
    NextHop,
    child_pids,
    free_port,
    open_connections,
    palisade,
    sockets_held,
    wait_for,
)
from tests.scanners.conftest import GTUBE
from tests.scanners.spamd import SpamdProcess, start_spamd
from tests.server.smtpclient import RawClient

LISTED = "127.0.0.5"  # the DNSBL lists this client address (the others come from 127.0.0.1)
DNSBL = {"name": "bl", "check": "dnsbl", "zones": ["bl.test"], "verb": "deny"}
BOT_HELO = {
    "name": "bot-helo",
    "check": "helo",
    "patterns": ["^bot\\.test$"],
    "verb": "deny",
    "incident": 1,
    "message": "Access denied",
}
LATER = {"name": "later", "check": "sender", "patterns": ["^later@"], "verb": "defer"}
MESSAGE = "Subject: metrics\r\n\r\nhello\r\n"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def dns() -> Iterator[ZoneServer]:
    server = start_zone_server()
    server.add_zone("bl.test")
    server.list_address("bl.test", LISTED)
    server.list_address("bl.test", "127.0.0.2")  # the RFC 5782 test address: the probe passes
    yield server
    server.stop()


def metrics_gateway(make_gateway: Any, dns: ZoneServer, workers: int = 2) -> GatewayProcess:
    gw: GatewayProcess = make_gateway(
        server={"workers": workers, "greeting_delay": 0.3},
        metrics={"listen": f"127.0.0.1:{free_port()}"},
        dns={
            "nameservers": [f"127.0.0.1:{dns.port}"],
            "timeout": 2,
            "dnsbl_probe_interval": 0,
        },
        incidents={"protect_loopback": False, "block_at": 2, "pregreet": 0},
        rules={"connect": [DNSBL], "helo": [BOT_HELO], "mail": [LATER]},
    )
    return gw


def url(gw: GatewayProcess, path: str = "/metrics") -> str:
    return f"http://{gw.sections['metrics']['listen']}{path}"


def scrape(gw: GatewayProcess) -> Samples:
    with urllib.request.urlopen(url(gw), timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def settled(gw: GatewayProcess) -> Samples:
    """A scrape taken once every connection that had a session has ended."""

    def done() -> Samples | None:
        samples = scrape(gw)
        opened = sum(
            value(samples, "palisade_connections_total", outcome=o)
            for o in ("accepted", "refused", "pregreet")
        )
        return samples if opened == value(samples, "palisade_connections_closed_total") else None

    result: Samples = wait_for(done)
    return result


def send_message(gw: GatewayProcess, sender: str = "someone@outside.test") -> None:
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
        client.sendmail(sender, ["postmaster@example.test"], MESSAGE)


def refused_helo(gw: GatewayProcess) -> None:
    client = RawClient(gw.port)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    assert client.reply()[0] == 220
    assert client.command("HELO bot.test")[0] == 550
    assert client.command("QUIT")[0] == 221
    client.sock.close()


def refused_listed(gw: GatewayProcess) -> None:
    client = RawClient(gw.port, source=LISTED)
    assert client.reply()[0] == 554
    assert client.closed()


def pregreet(gw: GatewayProcess) -> None:
    client = RawClient(gw.port, source="127.0.0.6")  # 127.0.0.1 has passed: it need not wait
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.send(b"EHLO early.test\r\n")  # before the banner (greeting_delay)
    assert client.reply()[0] == 554
    assert client.closed()


def deferred(gw: GatewayProcess) -> None:
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
        client.ehlo("fine.test")
        code, _ = client.mail("later@outside.test")
        assert code == 451


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_metrics_count_the_traffic_sent_summed_over_two_workers(
    make_gateway: Any, dns: ZoneServer
) -> None:
    gw = metrics_gateway(make_gateway, dns)
    before = settled(gw)
    for _ in range(3):
        send_message(gw)
    during = scrape(gw)  # while the rest is still to come
    assert delta(during, before, "palisade_messages_total", outcome="accepted") == 3
    assert delta(during, before, "palisade_refusals_total", stage="helo", rule="bot-helo") == 0
    for _ in range(2):
        refused_helo(gw)
        refused_listed(gw)
    pregreet(gw)
    deferred(gw)
    wait_for(lambda: len(gw.maildir_messages("postmaster")) == 3)
    after = wait_for(
        lambda: (
            s
            if delta(s := settled(gw), before, "palisade_messages_total", outcome="delivered") == 3
            and value(s, "palisade_firewall_blocks_total") == 1
            else None
        )
    )

    def d(name: str, **labels: str) -> float:
        return delta(after, before, name, **labels)

    # connections: 3 messages, 2 HELO refusals, 1 deferral greeted; 2 refused; 1 pregreet
    assert d("palisade_connections_total", outcome="accepted") == 6
    assert d("palisade_connections_total", outcome="refused") == 2
    assert d("palisade_connections_total", outcome="pregreet") == 1
    assert d("palisade_connections_total", outcome="too_many") == 0
    assert d("palisade_connections_closed_total") == 9
    refusals = {
        (dict(labels)["stage"], dict(labels)["rule"], dict(labels)["verb"]): v
        - value(before, name, **dict(labels))
        for (name, labels), v in after.items()
        if name == "palisade_refusals_total"
    }
    assert {k: v for k, v in refusals.items() if v} == {
        ("connect", "bl", "deny"): 2,
        ("helo", "bot-helo", "deny"): 2,
        ("connect", "pregreet", "drop"): 1,
        ("mail", "later", "defer"): 1,
    }
    assert d("palisade_messages_total", outcome="accepted") == 3
    assert d("palisade_messages_total", outcome="delivered") == 3
    assert d("palisade_messages_total", outcome="deferred") == 0
    # every check run is one observation: the DNSBL rule at each of the 9 connections, the
    # HELO rule at each of 6 HELO/EHLO commands, the sender rule at each of 4 MAIL commands
    assert d("palisade_check_seconds_count", stage="connect", rule="bl") == 9
    assert d("palisade_check_seconds_count", stage="helo", rule="bot-helo") == 6
    assert d("palisade_check_seconds_count", stage="mail", rule="later") == 4
    assert d("palisade_dnsbl_seconds_count", zone="bl.test") == 9
    assert d("palisade_dnsbl_errors_total", zone="bl.test") == 0
    assert d("palisade_check_errors_total", stage="connect", rule="bl") == 0
    # the +Inf bucket holds them all; the sum is time, positive
    assert d("palisade_check_seconds_bucket", stage="helo", rule="bot-helo", le="+Inf") == 6
    assert d("palisade_check_seconds_sum", stage="connect", rule="bl") > 0
    # two HELO refusals, one incident each, block_at = 2: one block
    assert value(after, "palisade_firewall_blocks_total") == 1
    assert value(after, "palisade_queue_messages") == 0
    assert value(after, "palisade_queue_oldest_age_seconds") == 0
    # labels are bounded: no client value (addresses, HELO names, senders) is one
    text = json.dumps(sorted(after))
    for client_value in ("127.0.0.5", "bot.test", "early.test", "later@", "outside.test"):
        assert client_value not in text


def test_a_killed_worker_neither_loses_nor_doubles_its_counts(
    make_gateway: Any, dns: ZoneServer
) -> None:
    gw = metrics_gateway(make_gateway, dns)
    assert gw.proc is not None
    workers = sorted(child_pids(gw.proc.pid))
    assert len(workers) == 2
    before = settled(gw)
    # hold connections until each worker has one, so both count refusals
    clients: list[RawClient] = []

    def both_hold() -> bool:  # in bursts: an idle worker first in line wins every lone accept
        burst = [RawClient(gw.port) for _ in range(5)]
        for client in burst:
            client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            assert client.reply()[0] == 220
        clients.extend(burst)
        return all(open_connections(pid, gw.port) > 0 for pid in workers)

    wait_for(both_hold, timeout=30)  # a loaded machine may start a worker late
    for client in clients:
        assert client.command("HELO bot.test")[0] == 550
        assert client.command("QUIT")[0] == 221
        client.sock.close()
    held = len(clients)
    counted = settled(gw)
    assert delta(counted, before, "palisade_refusals_total", **HELO_LABELS) == held
    victim = workers[0]
    gw_pid = gw.proc.pid
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in child_pids(gw_pid) and len(child_pids(gw_pid)) == 2, timeout=15)
    wait_for(lambda: f"worker {victim} exited" in gw.paniclog())
    after_kill = scrape(gw)
    for key in ("palisade_refusals_total", "palisade_check_seconds_count"):
        labels = HELO_LABELS if key == "palisade_refusals_total" else {"stage": "helo", **_RULE}
        assert value(after_kill, key, **labels) == value(counted, key, **labels), key
    assert value(after_kill, "palisade_connections_total", outcome="accepted") == value(
        counted, "palisade_connections_total", outcome="accepted"
    )
    # the new worker counts on: one more refusal and one message, each counted once
    refused_helo(gw)
    send_message(gw)
    final = settled(gw)
    assert delta(final, counted, "palisade_refusals_total", **HELO_LABELS) == 1
    assert delta(final, counted, "palisade_messages_total", outcome="accepted") == 1
    assert delta(final, before, "palisade_refusals_total", **HELO_LABELS) == held + 1


_RULE = {"rule": "bot-helo"}
HELO_LABELS = {"stage": "helo", "rule": "bot-helo", "verb": "deny"}


def test_only_metrics_is_served(make_gateway: Any, dns: ZoneServer) -> None:
    gw = metrics_gateway(make_gateway, dns, workers=1)
    for path in ("/", "/metrics/", "/metricsx", "/favicon.ico", "/../metrics"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(url(gw, path), timeout=10)
        assert caught.value.code == 404, path
    post = urllib.request.Request(url(gw), data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(post, timeout=10)
    assert caught.value.code == 405
    with urllib.request.urlopen(url(gw, "/metrics?name[]=x"), timeout=10) as response:
        assert b"palisade_connections_total" in response.read()
    host, port = gw.sections["metrics"]["listen"].split(":")
    # a request larger than 8 KiB is not answered: the connection is closed
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 10000 + b"\r\n\r\n")
        assert sock.recv(65536) == b""


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (IPv4)."""
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A":
            port = int(fields[1].split(":")[1], 16)
            if sockets_held(pid, port, "0A"):
                ports.add(port)
    return ports


def test_metrics_off_means_no_port_and_no_files(make_gateway: Any, dns: ZoneServer) -> None:
    on = metrics_gateway(make_gateway, dns, workers=1)
    assert on.proc is not None
    metrics_port = int(on.sections["metrics"]["listen"].split(":")[1])
    assert listening_ports(on.proc.pid) == {on.port, metrics_port}
    assert (on.spool_dir / "metrics").is_dir()
    off: GatewayProcess = make_gateway()
    assert off.proc is not None
    assert listening_ports(off.proc.pid) == {off.port}
    assert not (off.spool_dir / "metrics").exists()


DASHBOARD = Path(__file__).resolve().parents[2] / "contrib" / "grafana" / "palisade.json"


def test_grafana_dashboard_names_only_metrics_the_endpoint_exports(
    make_gateway: Any, dns: ZoneServer
) -> None:
    """Also: a spam scanner that is down (spamd on a closed port, ``on_failure = accept``) is
    one call and one error of service ``spamd`` per message, and the message is accepted."""
    gw: GatewayProcess = make_gateway(
        metrics={"listen": f"127.0.0.1:{free_port()}"},
        dns={"nameservers": [f"127.0.0.1:{dns.port}"], "dnsbl_probe_interval": 0},
        spamd={"address": f"127.0.0.1:{free_port()}", "timeout": 2, "on_failure": "accept"},
        rules={"connect": [DNSBL], "helo": [BOT_HELO]},
    )
    before = settled(gw)
    send_message(gw)
    refused_helo(gw)
    after = settled(gw)
    assert delta(after, before, "palisade_messages_total", outcome="accepted") == 1
    assert delta(after, before, "palisade_service_seconds_count", service="spamd") == 1
    assert delta(after, before, "palisade_service_errors_total", service="spamd") == 1
    with urllib.request.urlopen(url(gw), timeout=10) as response:
        families = {
            f.name for f in text_string_to_metric_families(response.read().decode()) if f.samples
        }
    samples = {name for name, _ in after}
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"], "no panels"
    named = set()
    for panel in dashboard["panels"]:
        exprs = [target["expr"] for target in panel["targets"]]
        assert exprs, panel["title"]
        for expr in exprs:
            names = set(re.findall(r"\bpalisade_[a-z_]+", expr))
            assert names, (panel["title"], expr)
            for name in names:
                assert name in samples or name in families, (panel["title"], name)
            named |= names
    # the main series each have a panel
    for family in (
        "palisade_connections",
        "palisade_refusals",
        "palisade_messages",
        "palisade_queue_messages",
        "palisade_spam_score",
        "palisade_check_seconds",
        "palisade_dnsbl_seconds",
        "palisade_service_seconds",
        "palisade_tls_handshakes",
        "palisade_firewall_blocks",
    ):
        assert any(name.startswith(family) for name in named), family


@pytest.mark.parametrize(
    ("listen", "problem"),
    [
        ("127.0.0.1", "expected host:port"),
        ("127.0.0.1:99999", "expected a port from 1 to 65535"),
        ("[::1", "expected"),
    ],
)
def test_a_bad_metrics_listen_is_one_clear_line(
    make_gateway: Any, listen: str, problem: str
) -> None:
    gw: GatewayProcess = make_gateway(start=False, metrics={"listen": listen})
    result = palisade("config", "check", "--config", str(gw.config_path), cwd=gw.base)
    assert "Traceback" not in result.stderr + result.stdout
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "metrics.listen" in out and problem in out, out


def test_a_metrics_port_in_use_stops_the_start_with_one_line(make_gateway: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gw: GatewayProcess = make_gateway(start=False, metrics={"listen": f"127.0.0.1:{port}"})
        gw.start(greet=False)
        assert gw.proc is not None
        assert gw.proc.wait(20) == 1
    wait_for(lambda: "metrics.listen" in gw.stderr())
    lines = [line for line in gw.stderr().splitlines() if "metrics.listen" in line]
    assert lines == [
        f"palisade: {gw.config_path}: metrics.listen: cannot listen on 127.0.0.1:{port}: "
        "Address already in use"
    ], gw.stderr()
    assert "Traceback" not in gw.stderr()


@pytest.fixture(scope="module")
def spamd() -> Iterator[SpamdProcess]:
    process = start_spamd()
    yield process
    process.stop()


def test_spam_scores_scanner_calls_and_tls_handshakes(
    make_gateway: Any, dns: ZoneServer, spamd: SpamdProcess, tls_files: Any
) -> None:
    """A real spamd scores a ham message (low) and GTUBE (about 1000: killed, refused after
    DATA); both are in the score histogram, as two spamd calls. STARTTLS from smtplib is a
    handshake that succeeds; a client that sends garbage instead of a ClientHello one that
    fails."""
    gw: GatewayProcess = make_gateway(
        metrics={"listen": f"127.0.0.1:{free_port()}"},
        dns={"nameservers": [f"127.0.0.1:{dns.port}"], "dnsbl_probe_interval": 0},
        spamd={"address": spamd.address, "timeout": 30},
        tls={
            "certificate": str(tls_files["certificate"]),
            "private_key": str(tls_files["private_key"]),
        },
    )
    before = settled(gw)
    context = ssl.create_default_context(cafile=str(tls_files["ca"]))
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=60) as client:
        client.starttls(context=context)
        client.sendmail("a@outside.test", ["postmaster@example.test"], MESSAGE)
    with (
        pytest.raises(smtplib.SMTPDataError) as refused,
        smtplib.SMTP("127.0.0.1", gw.port, timeout=60) as client,
    ):
        client.sendmail(
            "b@outside.test", ["postmaster@example.test"], f"Subject: x\r\n\r\n{GTUBE}\r\n"
        )
    assert refused.value.smtp_code == 550
    raw = RawClient(gw.port)
    assert raw.reply()[0] == 220
    assert raw.command("EHLO tls.test")[0] == 250
    assert raw.command("STARTTLS")[0] == 220
    raw.send(b"this is no ClientHello\r\n" * 4)
    assert raw.closed()
    after = settled(gw)
    assert delta(after, before, "palisade_tls_handshakes_total", result="ok") == 1
    assert delta(after, before, "palisade_tls_handshakes_total", result="failed") == 1
    assert delta(after, before, "palisade_spam_score_count") == 2
    assert delta(after, before, "palisade_spam_score_bucket", le="10.0") == 1  # the ham
    assert delta(after, before, "palisade_spam_score_bucket", le="30.0") == 1  # not GTUBE
    assert delta(after, before, "palisade_spam_score_bucket", le="+Inf") == 2
    assert delta(after, before, "palisade_service_seconds_count", service="spamd") == 2
    assert delta(after, before, "palisade_service_errors_total", service="spamd") == 0
    assert delta(after, before, "palisade_messages_total", outcome="accepted") == 1
    refused_after_data = {
        dict(labels)["rule"]: v - value(before, name, **dict(labels))
        for (name, labels), v in after.items()
        if name == "palisade_refusals_total" and dict(labels)["stage"] == "data"
    }
    assert sum(refused_after_data.values()) == 1, refused_after_data


def test_delivery_outcomes_and_the_queue(make_gateway: Any, next_hop: NextHop) -> None:
    """A relay message to a next hop that is down: deferred, in the queue (size 1, an age);
    then the next hop comes up: delivered, the queue empty."""
    gw: GatewayProcess = make_gateway(
        metrics={"listen": f"127.0.0.1:{free_port()}"},
        domains={"local": ["example.test"], "relay": ["corp.test"]},
        delivery={
            "next_hop": f"127.0.0.1:{next_hop.port}",
            "retry_initial": 1,
            "retry_max_interval": 1,
        },
    )
    before = settled(gw)
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
        client.sendmail("postmaster@example.test", ["later@corp.test"], MESSAGE)
    waiting = wait_for(
        lambda: (
            s
            if delta(s := scrape(gw), before, "palisade_messages_total", outcome="deferred") >= 1
            else None
        )
    )
    assert value(waiting, "palisade_queue_messages") == 1
    assert value(waiting, "palisade_queue_oldest_age_seconds") > 0
    next_hop.start()
    wait_for(lambda: next_hop.handler.messages, timeout=20)
    done = wait_for(
        lambda: (
            s
            if delta(s := scrape(gw), before, "palisade_messages_total", outcome="delivered") == 1
            and value(s, "palisade_queue_messages") == 0
            else None
        ),
        timeout=20,
    )
    assert delta(done, before, "palisade_messages_total", outcome="accepted") == 1
    assert delta(done, before, "palisade_messages_total", outcome="failed") == 0
    assert delta(done, before, "palisade_messages_total", outcome="bounced") == 0
    assert value(done, "palisade_queue_oldest_age_seconds") == 0


def test_an_expired_message_fails_and_bounces(make_gateway: Any) -> None:
    """The next hop never answers and ``max_age`` is 1 s: the recipient fails, a bounce is
    made and delivered to the (local) sender's Maildir."""
    gw: GatewayProcess = make_gateway(
        metrics={"listen": f"127.0.0.1:{free_port()}"},
        domains={"local": ["example.test"], "relay": ["corp.test"]},
        delivery={
            "next_hop": f"127.0.0.1:{free_port()}",
            "retry_initial": 1,
            "retry_max_interval": 1,
            "max_age": 1,
        },
    )
    before = settled(gw)
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
        client.sendmail("postmaster@example.test", ["never@corp.test"], MESSAGE)
    wait_for(lambda: len(gw.maildir_messages("postmaster")) == 1, timeout=20)
    after = wait_for(
        lambda: (
            s
            if delta(s := scrape(gw), before, "palisade_messages_total", outcome="delivered") == 1
            else None
        )
    )
    assert delta(after, before, "palisade_messages_total", outcome="accepted") == 1
    assert delta(after, before, "palisade_messages_total", outcome="failed") == 1
    assert delta(after, before, "palisade_messages_total", outcome="bounced") == 1
