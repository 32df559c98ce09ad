"""Policy replay against the live truth: a real gateway records a mixed run (``[record]
facts``), ``palisade replay`` evaluates a changed policy on it offline, and the same clients
then meet a real gateway running that changed policy. Per connection, replay's accepted /
refused must be what the clients got live.

Real parts: the gateway (``palisade serve``), the repository's DNS server on loopback
(``loopback.dnsserver``) with PTRs, forward names, a blocklist and SPF records, and clients
bound to their own 127.0.77.x source addresses. Replay is shown to be offline by pointing the
changed config's resolver at a UDP socket this test holds and checking that nothing arrives
(and that the DNS server got no query meanwhile).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from loopback.dnsserver import ZoneServer, start_zone_server
from tests.conftest import GatewayProcess, palisade, wait_for, write_config
from tests.server.smtpclient import RawClient


def ptr_name(ip: str) -> str:
    return ".".join(reversed(ip.split("."))) + ".in-addr.arpa"


@dataclass(frozen=True)
class Client:
    ip: str
    helo: str
    sender: str
    before: str  # what the recording policy does to it (documentation; checked against live)
    after: str


N = "127.0.77."
CLIENTS = [
    *(
        Client(f"{N}{n}", f"host{n}.client.test", f"user{n}@good.test", "ok", "ok")
        for n in (10, 11, 12)
    ),
    Client(f"{N}16", "host16.client.test", "a@good.test", "rdns", "rdns"),  # no PTR
    Client(f"{N}17", "host17.client.test", "a@good.test", "rdns", "rdns"),  # no PTR
    Client(f"{N}18", "host18.client.test", "a@good.test", "bl", "ok"),  # listed: rule removed
    Client(f"{N}19", "host19.client.test", "a@good.test", "bl", "ok"),
    Client(f"{N}20", "dsl-20.pool.client.test", "a@good.test", "ok", "generic"),  # added rule
    Client(f"{N}21", "dsl-21.pool.client.test", "a@good.test", "ok", "generic"),
    Client(f"{N}22", "ylmf-pc", "a@good.test", "helo", "helo"),
    Client(f"{N}23", "host23.client.test", "x@spam.test", "ok", "spam sender"),  # added rule
    Client(f"{N}24", "dsl-24.pool.client.test", "a@good.test", "bl", "generic"),  # moved
    Client(f"{N}25", "host25.client.test", "a@good.test", "rdns", "rdns"),  # PTR not back
    Client(f"{N}26", "host26.client.test", "a@softly.test", "ok", "spf"),  # SPF fail, DATA
    Client(f"{N}27", "host27.client.test", "Anastasia1985@good.test", "botnet", "botnet"),
]


@pytest.fixture
def dns() -> Iterator[ZoneServer]:
    server = start_zone_server()
    for client in CLIENTS:
        last = client.ip.rsplit(".", 1)[1]
        if last in ("16", "17"):
            continue
        name = client.helo if "pool" in client.helo else f"host{last}.client.test"
        server.set(ptr_name(client.ip), "PTR", [f"{name}."])
        server.set(name, "A", ["192.0.2.99" if last == "25" else client.ip])
    for zone in ("bl.test", "bl2.test"):
        server.add_zone(zone)
        server.list_address(zone, "127.0.0.2")  # the RFC 5782 test point: the zone is alive
    for last in ("18", "19", "24"):
        server.list_address("bl.test", f"{N}{last}")
    server.set("good.test", "TXT", [f"v=spf1 ip4:{N}0/24 -all"])
    server.set("spam.test", "TXT", [f"v=spf1 ip4:{N}0/24 -all"])
    server.set("softly.test", "TXT", ["v=spf1 ip4:192.0.2.0/24 -all"])
    yield server
    server.stop()


def rules(*, bl: bool = True, generic: bool = False, spam: bool = False, spf: bool = False,
          bl2: bool = False, once: bool = False) -> dict[str, Any]:  # fmt: skip
    connect: list[dict[str, Any]] = [
        {"check": "ip_list", "list": "probe", "verb": "accept_all", "name": "probe"},
        {"name": "rate", "check": "ratelimit", "limit": 50, "window": "15m", "verb": "defer"},
        {"name": "rdns", "check": "rdns", "fcrdns": True, "verb": "deny", "message": "No rDNS"},
    ]
    if bl:
        connect.append({"name": "bl", "check": "dnsbl", "zones": ["bl.test"], "verb": "deny"})
    if bl2:
        connect.append({"name": "bl2", "check": "dnsbl", "zones": ["bl2.test"], "verb": "deny"})
    if generic:
        connect.append({"name": "generic", "check": "rdns", "generic": True, "verb": "deny"})
    if once:  # a counter the recording never had: counted over the replayed traffic
        connect.append({"name": "one", "check": "ratelimit", "limit": 1, "window": "1h",
                        "verb": "defer"})  # fmt: skip
    mail: list[dict[str, Any]] = [
        {"name": "botnet", "check": "sender", "patterns": ["^Anastasia.{2,5}@"], "verb": "deny"}
    ]
    if spam:
        mail.append({"name": "spam sender", "check": "sender", "patterns": ["@spam\\.test$"],
                     "verb": "deny"})  # fmt: skip
    data = [{"name": "spf", "check": "spf", "result": ["fail"], "verb": "deny"}] if spf else []
    return {
        "connect": connect,
        "helo": [{"name": "helo", "check": "helo", "patterns": ["^ylmf-pc$"], "verb": "deny"}],
        "mail": mail,
        **({"data": data} if data else {}),
    }


OLD = {"bl": True}
NEW = {"bl": False, "generic": True, "spam": True, "spf": True}


def sections(base: Path, port: int, dns_port: int, **policy: bool) -> dict[str, Any]:
    return {
        "server": {"hostname": "mx.example.test", "listen": [f"127.0.0.1:{port}"]},
        "limits": {"command_timeout": 20, "data_timeout": 30},
        "domains": {"local": ["example.test"]},
        "paths": {
            "spool": "var/spool",
            "mail": "var/mail",
            "log": "var/log",
            "state": "var/state.sqlite",
        },
        "dns": {"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": 1, "retries": 0},
        "authentication": {"enabled": True},
        "record": {"facts": "var/log/facts.jsonl"},
        "lists": {"probe": {"type": "ip", "entries": ["127.0.0.1"]}},
        "rules": rules(**policy),
    }


def start(base: Path, dns_port: int, **policy: bool) -> GatewayProcess:
    from tests.conftest import free_port

    base.mkdir(parents=True)
    port = free_port()
    config = write_config(base / "palisade.toml", sections(base, port, dns_port, **policy))
    gateway = GatewayProcess(base=base, port=port, config_path=config, sections={})
    return gateway.start()


def speak(port: int, client: Client) -> str:
    """One client's connection: EHLO, MAIL, RCPT, DATA, stopping at the first refusal.
    ``accepted`` when the message got its 250, else ``refused``."""
    try:
        raw = RawClient(port, source=client.ip)
    except OSError as exc:
        raise AssertionError(f"cannot connect from {client.ip}: {exc}") from None
    try:
        code, _ = raw.reply()
        if code != 220:
            return "refused"
        for line in (f"EHLO {client.helo}", f"MAIL FROM:<{client.sender}>",
                     "RCPT TO:<user@example.test>", "DATA"):  # fmt: skip
            code, _ = raw.command(line)
            if code >= 400:
                raw.command("QUIT")
                return "refused"
        code, _ = raw.command(f"From: <{client.sender}>\r\nSubject: hi\r\n\r\nhello\r\n.")
        raw.command("QUIT")
        return "accepted" if code == 250 else "refused"
    except ConnectionError:
        return "refused"
    finally:
        raw.close()


def traffic(gateway: GatewayProcess) -> dict[str, str]:
    return {client.ip: speak(gateway.port, client) for client in CLIENTS}


def facts_lines(gateway: GatewayProcess, count: int) -> list[dict[str, Any]]:
    path = gateway.base / "var" / "log" / "facts.jsonl"
    assert gateway.stop() == 0
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    ours = [r for r in lines if r["ip"].startswith(N)]
    assert len(ours) == count, lines
    return lines


class Silent:
    """A UDP socket nothing should ever be sent to: the replay's "nameserver"."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    def received(self) -> bytes:
        try:
            return self.sock.recv(4096)
        except BlockingIOError:
            return b""


def replay_config(tmp_path: Path, name: str, dns_port: int, **policy: bool) -> Path:
    (tmp_path / name).mkdir()
    return write_config(
        tmp_path / name / "palisade.toml", sections(tmp_path, 2525, dns_port, **policy)
    )


def run_replay(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return palisade("replay", *args, cwd=cwd)


def test_replay_matches_the_changed_policy_live(tmp_path: Path, dns: ZoneServer) -> None:
    old = start(tmp_path / "old", dns.port, **OLD)
    live_old = traffic(old)
    recorded = facts_lines(old, len(CLIENTS))
    facts = old.base / "var" / "log" / "facts.jsonl"

    silent = Silent()
    config = replay_config(tmp_path, "replay", silent.port, **NEW)
    dns.reset_counts()
    result = run_replay(tmp_path, "--config", str(config), "--json", "--each", str(facts))
    assert result.returncode == 0, result.stderr
    assert silent.received() == b"" and dns.total_queries == 0  # offline: nothing was asked
    report = json.loads(result.stdout)

    new = start(tmp_path / "new", dns.port, **NEW)
    live_new = traffic(new)
    new.stop()

    each = {c["ip"]: c for c in report["connections"] if c["ip"].startswith(N)}
    assert {ip: c["before"]["result"] for ip, c in each.items()} == live_old
    assert {ip: c["after"]["result"] for ip, c in each.items()} == live_new
    assert all(c["status"] != "unknown" for c in each.values()), report
    # the rule that decided, as the clients were told it (the table above)
    for client in CLIENTS:
        for when, expected in (("before", client.before), ("after", client.after)):
            decision = each[client.ip][when]
            got = decision["rule"] if decision["result"] == "refused" else "ok"
            assert got == expected, (client, when, decision)
    totals = report["totals"]
    assert totals["connections"] == len(recorded)
    assert totals["refused_before"] == list(live_old.values()).count("refused")
    assert totals["refused_after"] == list(live_new.values()).count("refused")
    changed = sum(live_old[ip] != live_new[ip] for ip in live_old)
    assert totals["changed"] == changed + 1  # and 127.0.77.24, refused by another rule now
    assert totals["unknown"] == 0 and totals["partial"] == 2  # .18 and .19: cut off at connect
    per_rule = report["rules"]
    assert per_rule["bl"]["newly_accepted"] == 2 and per_rule["bl"]["moved_away"] == 1
    assert per_rule["generic"]["newly_refused"] == 2 and per_rule["generic"]["moved_here"] == 1
    assert per_rule["spam sender"]["newly_refused"] == 1
    assert per_rule["spf"]["newly_refused"] == 1
    example = per_rule["spam sender"]["examples"]["newly_refused"][0]
    assert (example["ip"], example["helo"], example["sender"]) == (
        f"{N}23",
        "host23.client.test",
        "x@spam.test",
    )
    # what a line holds: the raw answers, keyed by question, and the decision
    line = next(r for r in recorded if r["ip"] == f"{N}18")
    assert line["dns"]["18.77.0.127.in-addr.arpa PTR"] == {"r": ["host18.client.test"]}
    assert line["dns"]["18.77.0.127.bl.test A"] == {"r": ["127.0.0.2"]}
    assert line["decision"]["rule"] == "bl" and line["decision"]["code"] == 554
    assert line["rates"] == {f"rate:50/900s:ip:{N}18 900": [1]}
    spf = next(r for r in recorded if r["ip"] == f"{N}26")["steps"][-1]
    assert spf["s"] == "data" and spf["find"]["spf"]["ok"]["result"] == "fail"
    assert "hello" not in facts.read_text()  # no message body


def test_questions_never_recorded_are_unknown_not_asked(tmp_path: Path, dns: ZoneServer) -> None:
    old = start(tmp_path / "old", dns.port, **OLD)
    traffic(old)
    facts_lines(old, len(CLIENTS))
    facts = old.base / "var" / "log" / "facts.jsonl"
    silent = Silent()
    config = replay_config(tmp_path, "replay", silent.port, bl=True, bl2=True)
    dns.reset_counts()
    result = run_replay(tmp_path, "--config", str(config), "--json", str(facts))
    assert result.returncode == 0, result.stderr
    assert silent.received() == b"" and dns.total_queries == 0
    report = json.loads(result.stdout)
    # bl2 is asked after rdns and bl: of ours, only those they let through reach it
    reached = [c for c in CLIENTS if c.before not in ("rdns", "bl")]
    assert report["totals"]["unknown"] == len(reached)
    assert report["unknown_questions"]["DNS 10.77.0.127.bl2.test A"] == 1
    assert report["totals"]["changed"] == 0


def test_operator_cli(tmp_path: Path, dns: ZoneServer) -> None:
    old = start(tmp_path / "old", dns.port, **OLD)
    speak(old.port, CLIENTS[0])
    speak(old.port, CLIENTS[5])  # refused by bl
    facts = old.base / "var" / "log" / "facts.jsonl"
    wait_for(lambda: facts.exists() and facts.read_text().count("\n") >= 3)
    # rotation as logrotate does it: rename, then the next connection makes a new file
    rotated = facts.with_name("facts.jsonl.1")
    facts.rename(rotated)
    speak(old.port, CLIENTS[1])
    wait_for(lambda: facts.exists() and f'"{CLIENTS[1].ip}"' in facts.read_text())
    # SIGUSR1 reopens: the queued lines go out at once
    old.signal(signal.SIGUSR1)
    facts_lines(old, 1)
    assert f'"{CLIENTS[0].ip}"' in rotated.read_text()
    silent = Silent()
    config = replay_config(tmp_path, "replay", silent.port, **NEW)

    result = run_replay(tmp_path, "--config", str(config), str(rotated), str(facts))
    assert result.returncode == 0, result.stderr
    assert 'rule "bl": 1 newly accepted' in result.stdout
    assert (
        f"newly accepted: [{CLIENTS[5].ip}] helo=- from=<-> (deny 554 by bl at connect -> "
        "accepted partial: its client said no more)"
    ) in result.stdout
    assert result.stdout.splitlines()[-1].startswith("connections 4, refused before 1, ")

    many = tmp_path / "many.jsonl"  # enough output that `head` closes the pipe mid-way
    many.write_text(rotated.read_text() * 500)
    piped = subprocess.run(
        f"{sys.executable} -m palisade replay --config {config} --each {many} | head -1",
        shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr
    assert len(piped.stdout.splitlines()) == 1

    counted = replay_config(tmp_path, "counted", silent.port, bl=True, once=True)
    estimated = run_replay(tmp_path, "--config", str(counted), "--json", str(many))
    document = json.loads(estimated.stdout)
    assert document["totals"]["estimated"] == 500  # CLIENTS[0]'s copies reach the new counter
    assert document["rules"]["one"]["newly_refused"] == 499  # all in one hour: 1 let through
    assert document["totals"]["unknown"] == 0

    as_json = json.loads(run_replay(tmp_path, "--config", str(config), "--json", str(facts)).stdout)
    assert as_json["totals"]["connections"] == 1

    missing = run_replay(tmp_path, "--config", str(config), str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2
    assert missing.stderr == f"palisade replay: {tmp_path / 'nope.jsonl'}: no such file\n"

    broken = tmp_path / "broken.jsonl"
    good = rotated.read_text().splitlines()
    broken.write_text("\n".join([good[0], '{"v": 1, "t": 1, "ip": "x", "steps": []}', "{"]) + "\n")
    bad = run_replay(tmp_path, "--config", str(config), str(broken))
    assert bad.returncode == 2
    assert bad.stderr == (
        f"palisade replay: {broken}:2: not a facts line: \"ip\": not an IP address: 'x'\n"
    )
    skipped = run_replay(tmp_path, "--config", str(config), "--skip-broken", "--json", str(broken))
    assert skipped.returncode == 0, skipped.stderr
    assert json.loads(skipped.stdout)["totals"]["broken_lines"] == 2

    bad_config = tmp_path / "bad.toml"
    bad_config.write_text("[record]\nfacts = 3\n")
    refused = run_replay(tmp_path, "--config", str(bad_config), str(facts))
    assert refused.returncode == 2 and "record.facts" in refused.stderr
    assert "expected a file path" in refused.stderr

    helped = run_replay(tmp_path, "--help")
    assert helped.returncode == 0 and "--json" in helped.stdout
    assert os.environ.get("PALISADE_CONFIG")  # the suite's guard against a system config


def test_config_check_takes_record_facts(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[record]\nfacts = "var/log/facts.jsonl"\n')
    checked = palisade("config", "check", "--no-dns", "--config", str(good), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "ok: [record] facts var/log/facts.jsonl can be created" in checked.stderr
    assert '[record]\nfacts = "var/log/facts.jsonl"' in checked.stdout
    (tmp_path / "adir").mkdir()
    for value, reason in (
        ('"adir"', "record.facts: expected the path of a file, got the directory 'adir'"),
        ("true", "record.facts: expected a file path string, got bool True"),
    ):
        bad = tmp_path / "bad.toml"
        bad.write_text(f"[record]\nfacts = {value}\n")
        refused = palisade("config", "check", "--no-dns", "--config", str(bad), cwd=tmp_path)
        assert refused.returncode == 2
        assert refused.stderr == f"palisade: config error in {bad}:2: {reason}\n"


DQS_KEY = "k3yk3yk3yk3yk3yk3yk3yk3yk3y"


def test_record_turned_on_by_reload_and_no_dqs_key_written(tmp_path: Path, dns: ZoneServer) -> None:
    zone = f"{DQS_KEY}.zen.dq.spamhaus.net"
    dns.add_zone(zone)
    dns.list_address(zone, "127.0.0.2")
    dns.list_address(zone, f"{N}10", "127.0.0.4")
    gateway = start(tmp_path / "gw", dns.port, **OLD)
    facts = gateway.base / "var" / "log" / "facts.jsonl"
    values = sections(gateway.base, gateway.port, dns.port, **OLD)
    del values["record"]  # off: the default
    write_config(gateway.config_path, values)
    gateway.signal(signal.SIGHUP)
    wait_for(lambda: gateway.mainlog().count("configuration reloaded") >= 1)
    assert speak(gateway.port, CLIENTS[1]) == "accepted"
    values = sections(gateway.base, gateway.port, dns.port, **OLD)  # [record] back on
    zen = {"zone": "zen.spamhaus.org", "codes": ["127.0.0.2-127.0.0.11"]}
    values["rules"]["connect"].append(
        {"name": "zen", "check": "dnsbl", "zones": [zen], "dqs_key": DQS_KEY, "verb": "deny"}
    )
    write_config(gateway.config_path, values)
    gateway.signal(signal.SIGHUP)
    wait_for(lambda: gateway.mainlog().count("configuration reloaded") >= 2)
    assert speak(gateway.port, CLIENTS[0]) == "refused"
    lines = facts_lines(gateway, 1)
    assert [r["ip"] for r in lines if r["ip"].startswith(N)] == [CLIENTS[0].ip]  # not [1]'s
    text = facts.read_text()
    assert DQS_KEY not in text
    assert '"10.77.0.127.{key}.zen.dq.spamhaus.net A":{"r":["127.0.0.4"]}' in text
    # replayed with the key of the config (whatever it is), the recorded answer serves
    dns.reset_counts()
    result = run_replay(
        tmp_path, "--config", str(gateway.config_path), "--json", "--each", str(facts)
    )
    assert result.returncode == 0, result.stderr
    assert dns.total_queries == 0
    ours = [c for c in json.loads(result.stdout)["connections"] if c["ip"] == CLIENTS[0].ip]
    assert ours[0]["status"] == "same" and ours[0]["after"]["rule"] == "zen"


def test_two_workers_share_one_facts_file(tmp_path: Path, dns: ZoneServer) -> None:
    """Each worker appends whole batches of whole lines: the file from two processes under
    concurrent clients is all good lines, one per connection."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.conftest import free_port

    base = tmp_path / "gw"
    base.mkdir()
    port = free_port()
    values = sections(base, port, dns.port, **OLD)
    values["server"]["workers"] = 2
    config = write_config(base / "palisade.toml", values)
    gateway = GatewayProcess(base=base, port=port, config_path=config, sections={}).start()
    clients = [c for c in CLIENTS if c.before in ("ok", "bl", "rdns")] * 5
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda c: speak(port, c), clients))
    lines = facts_lines(gateway, len(clients))  # stops the gateway: every queued line written
    assert outcomes.count("accepted") == sum(c.before == "ok" for c in clients)
    assert sorted(r["ip"] for r in lines if r["ip"].startswith(N)) == sorted(c.ip for c in clients)
    assert sum(r["decision"]["result"] == "accepted" for r in lines if r["ip"].startswith(N)) == (
        outcomes.count("accepted")
    )
