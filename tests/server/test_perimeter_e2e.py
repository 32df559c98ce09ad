"""Golden transcripts for the seed scenarios: a real gateway, a real DNS server on loopback,
clients bound to their own 127.0.0.x source address (each with its own PTR and listing data).

Each scenario pins the exact replies and the exact reject-log line (timestamps and client ports
normalised)."""

from __future__ import annotations

import re
import smtplib
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loopback.dnsserver import ZoneServer, start_zone_server
from tests.conftest import GatewayProcess, child_pids, listening_sockets, perimeter_copy, wait_for
from tests.server.smtpclient import RawClient

DQS_KEY = "k3yk3yk3yk3yk3yk3yk3yk3yk3y"
GOOD = [f"127.0.0.{n}" for n in range(30, 60)]  # PTR that resolves back, not listed
WHITELIST = "127.0.0.1  # the test harness's readiness probe\n"


def ptr_name(ip: str) -> str:
    return ".".join(reversed(ip.split("."))) + ".in-addr.arpa"


@pytest.fixture
def dns() -> Iterator[ZoneServer]:
    server = start_zone_server()
    for ip in [*GOOD, "127.0.0.21", "127.0.0.23", "127.0.0.24"]:
        host = f"host{ip.rsplit('.', 1)[1]}.client.test"
        server.set(ptr_name(ip), "PTR", [f"{host}."])
        server.set(host, "A", [ip])
    for zone in ("zen.spamhaus.org", f"{DQS_KEY}.zen.dq.spamhaus.net"):
        server.add_zone(zone)
        server.list_address(zone, "127.0.0.2", "127.0.0.2", txt="test point")  # RFC 5782 probe
        server.list_address(
            zone, "127.0.0.21", "127.0.0.4", txt="https://www.spamhaus.org/query/ip/127.0.0.21"
        )
    server.set("outside.test", "MX", ["10 mx.outside.test."])
    server.set("mx.outside.test", "A", ["192.0.2.25"])
    yield server
    server.stop()


def perimeter(dns: ZoneServer, **extra: Any) -> dict[str, Any]:
    zone = {"zone": "zen.spamhaus.org", "codes": ["127.0.0.2-127.0.0.11"], "txt": True}
    dnsbl: dict[str, Any] = {
        "name": "zen",
        "check": "dnsbl",
        "zones": [zone],
        "verb": "deny",
        "message": "$ip is listed at $zone",
        "log_message": "DENY - listed at $zone ($codes)",
    }
    dnsbl.update(extra.pop("dnsbl", {}))
    return {
        "dns": {"nameservers": [f"127.0.0.1:{dns.port}"], "timeout": 1, "retries": 0},
        "lists": {"whitelist_connect_hosts": {"type": "ip", "file": "lists/whitelist"}},
        "rules": {
            "connect": [
                {
                    "check": "ip_list",
                    "list": "whitelist_connect_hosts",
                    "verb": "accept_all",
                    "log_message": "ACCEPT - whitelisted",
                },
                {
                    "check": "history",
                    "threshold": 10,
                    "verb": "deny",
                    "message": "Blacklisted: Denied access - history of unwanted activity",
                    "log_message": "DENY - history of unwanted activity ($count incidents)",
                },
                {
                    "check": "ratelimit",
                    "limit": 10,
                    "window": "15m",
                    "log_rates": True,
                    "verb": "defer",
                    "message": "Too many connections, slow down",
                    "log_message": "DEFER - rate limit exceeded ($rate)",
                },
                {  # as examples/perimeter.toml: on_error is the default (defer)
                    "check": "rdns",
                    "verb": "deny",
                    "message": "Reverse DNS lookup failed",
                    "log_message": "DENY - Reverse DNS check failed",
                },
                dnsbl,
            ],
            "helo": [
                {
                    "check": "helo",
                    "patterns": ["^ylmf-pc$"],
                    "verb": "deny",
                    "message": "Access denied",
                    "log_message": "DENY - HELO $helo",
                }
            ],
            "mail": [
                {
                    "check": "sender",
                    "patterns": ["^Anastasia.{2,5}@"],
                    "verb": "deny",
                    "message": "Access denied",
                    "log_message": "DENY - botnet sender pattern",
                }
            ],
        },
        **extra,
    }


@pytest.fixture
def gw(make_gateway: Any, dns: ZoneServer) -> GatewayProcess:
    gateway: GatewayProcess = make_gateway(
        files={"lists/whitelist": WHITELIST + "127.0.0.25  # a trusted partner\n"}, **perimeter(dns)
    )
    return gateway


def normalise(line: str) -> str:
    line = re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", "", line)
    return re.sub(r"\]:\d+", "]:PORT", line)


def rejects(gw: GatewayProcess) -> list[str]:
    return [normalise(line) for line in gw.rejectlog().splitlines()]


def greeting(gw: GatewayProcess, source: str) -> tuple[int, str, RawClient]:
    client = RawClient(gw.port, source=source)
    code, text = client.reply()
    return code, text, client


def greeting_code(gw: GatewayProcess, source: str) -> int:
    code, _, client = greeting(gw, source)
    client.close()
    return code


def test_no_ptr_is_refused_at_connect(gw: GatewayProcess) -> None:
    code, text, client = greeting(gw, "127.0.0.20")
    assert (code, text) == (554, "5.7.1 Reverse DNS lookup failed")
    assert client.closed()
    assert wait_for(lambda: rejects(gw)) == [
        'H=[127.0.0.20]:PORT rejected connection in "connect" ACL: DENY - Reverse DNS check failed'
    ]


def test_listed_on_zen_is_refused_at_connect(gw: GatewayProcess) -> None:
    code, text, client = greeting(gw, "127.0.0.21")
    assert (code, text) == (554, "5.7.1 127.0.0.21 is listed at zen.spamhaus.org")
    assert client.closed()
    assert wait_for(lambda: rejects(gw)) == [
        'H=[127.0.0.21]:PORT rejected connection in "connect" ACL: '
        "DENY - listed at zen.spamhaus.org (127.0.0.4)"
    ]


def test_helo_ylmf_pc_is_refused(gw: GatewayProcess) -> None:
    code, _, client = greeting(gw, "127.0.0.30")
    assert code == 220
    assert client.command("EHLO ylmf-pc") == (550, "5.7.1 Access denied")
    assert client.command("EHLO mail.client.test")[0] == 250  # a proper name may try again
    client.close()
    assert wait_for(lambda: rejects(gw)) == [
        "H=(ylmf-pc) [127.0.0.30]:PORT rejected EHLO or HELO ylmf-pc: DENY - HELO ylmf-pc"
    ]


def test_anastasia_sender_is_refused(gw: GatewayProcess) -> None:
    code, _, client = greeting(gw, "127.0.0.31")
    assert code == 220
    client.command("EHLO host31.client.test")
    assert client.command("MAIL FROM:<Anastasia1985@outside.test>") == (550, "5.7.1 Access denied")
    assert client.command("MAIL FROM:<anna@outside.test>")[0] == 250
    client.close()
    assert wait_for(lambda: rejects(gw)) == [
        "H=(host31.client.test) [127.0.0.31]:PORT F=<Anastasia1985@outside.test> rejected MAIL "
        "<Anastasia1985@outside.test>: DENY - botnet sender pattern"
    ]


def test_history_over_the_threshold_is_refused(gw: GatewayProcess) -> None:
    added = subprocess.run(
        [
            sys.executable,
            "-m",
            "palisade",
            "history",
            "add",
            "127.0.0.23",
            "--count",
            "12",
            "--config",
            str(gw.config_path),
        ],
        cwd=gw.base,
        capture_output=True,
        text=True,
    )
    assert added.returncode == 0, added.stderr
    code, text, _ = greeting(gw, "127.0.0.23")
    assert (code, text) == (554, "5.7.1 Blacklisted: Denied access - history of unwanted activity")
    assert wait_for(lambda: rejects(gw)) == [
        'H=[127.0.0.23]:PORT rejected connection in "connect" ACL: '
        "DENY - history of unwanted activity (12 incidents)"
    ]


def test_eleventh_connection_in_fifteen_minutes_is_deferred(gw: GatewayProcess) -> None:
    for _ in range(9):  # the fixture's start-up probe came from 127.0.0.1, not from this client
        code, _, client = greeting(gw, "127.0.0.24")
        assert code == 220
        client.command("QUIT")
        client.close()
    code, _, client = greeting(gw, "127.0.0.24")
    assert code == 220  # the 10th
    client.close()
    code, text, _ = greeting(gw, "127.0.0.24")
    assert (code, text) == (421, "4.7.1 Too many connections, slow down")
    assert wait_for(lambda: rejects(gw)) == [
        'H=[127.0.0.24]:PORT temporarily rejected connection in "connect" ACL: '
        "DEFER - rate limit exceeded (11/900s)"
    ]
    rates = [
        line
        for line in map(normalise, gw.mainlog().splitlines())
        if re.fullmatch(r"H=\[127\.0\.0\.24\]:PORT rate \d+/900s", line)
    ]
    assert rates == [f"H=[127.0.0.24]:PORT rate {n}/900s" for n in range(1, 12)]


def test_whitelisted_host_skips_every_check(gw: GatewayProcess, dns: ZoneServer) -> None:
    dns.list_address("zen.spamhaus.org", "127.0.0.25", "127.0.0.2")  # listed, and no PTR
    code, _, client = greeting(gw, "127.0.0.25")
    assert code == 220
    assert client.command("EHLO ylmf-pc")[0] == 250
    assert client.command("MAIL FROM:<Anastasia1985@outside.test>")[0] == 250
    assert client.command("RCPT TO:<user@example.test>")[0] == 250
    assert client.command("DATA")[0] == 354
    client.send(b"Subject: partner\r\n\r\nhello\r\n.\r\n")
    assert client.reply()[0] == 250
    client.close()
    assert wait_for(lambda: gw.maildir_messages("user"))
    assert gw.rejectlog() == ""


def test_good_client_passes_and_warn_mode_adds_the_seed_header(
    make_gateway: Any, dns: ZoneServer
) -> None:
    gw = make_gateway(
        files={"lists/whitelist": WHITELIST},
        **perimeter(dns, dnsbl={"verb": "warn", "log_message": "listed at $zone"}),
    )
    code, _, client = greeting(gw, "127.0.0.21")  # listed: warn only
    assert code == 220
    client.command("EHLO host21.client.test")
    client.command("MAIL FROM:<anna@outside.test>")
    assert client.command("RCPT TO:<user@example.test>")[0] == 250
    client.command("DATA")
    client.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
    assert client.reply()[0] == 250
    client.close()
    message = wait_for(lambda: gw.maildir_messages("user"))[0]
    assert (
        b"X-Warning: 127.0.0.21 is listed at zen.spamhaus.org (127.0.0.4: "
        b"https://www.spamhaus.org/query/ip/127.0.0.21)\n"
    ) in message
    assert wait_for(lambda: "Warning: listed at zen.spamhaus.org" in gw.mainlog())


def test_dqs_key_never_appears_in_replies_or_logs(make_gateway: Any, dns: ZoneServer) -> None:
    gw = make_gateway(
        files={"lists/whitelist": WHITELIST}, **perimeter(dns, dnsbl={"dqs_key": DQS_KEY})
    )
    code, text, _ = greeting(gw, "127.0.0.21")
    assert code == 554 and "zen.spamhaus.org" in text and DQS_KEY not in text
    dns.behave(f"53.0.0.127.{DQS_KEY}.zen.dq.spamhaus.net", "timeout")  # a zone that hangs
    dns.set(ptr_name("127.0.0.53"), "PTR", ["host53.client.test."])
    dns.set("host53.client.test", "A", ["127.0.0.53"])
    code, text, client = greeting(gw, "127.0.0.53")
    assert code == 220 and DQS_KEY not in text  # a silent zone is "not listed" (on_error skip)
    client.close()
    wait_for(lambda: "127.0.0.53" in gw.mainlog() and "DNSBL zone" in gw.paniclog())
    for log in Path(gw.log_dir).iterdir():
        assert DQS_KEY not in log.read_text(), log.name
    assert dns.queries(f"21.0.0.127.{DQS_KEY}.zen.dq.spamhaus.net") >= 1  # the key was used


def test_a_zone_failing_the_rfc5782_probe_is_disabled(make_gateway: Any, dns: ZoneServer) -> None:
    dns.list_address("zen.spamhaus.org", "127.0.0.1", "127.0.0.2")  # lists everything: broken
    gw = make_gateway(files={"lists/whitelist": WHITELIST}, **perimeter(dns))
    wait_for(lambda: "DNSBL zone zen.spamhaus.org disabled" in gw.paniclog())
    assert "127.0.0.1 listed (zone lists everything)" in gw.paniclog()
    code, _, client = greeting(gw, "127.0.0.21")  # listed, but the zone is not trusted now
    assert code == 220
    client.close()


def test_check_host_shows_each_rule_and_the_reply(gw: GatewayProcess) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "palisade",
            "check-host",
            "127.0.0.21",
            "--helo",
            "x.test",
            "--config",
            str(gw.config_path),
        ],
        cwd=gw.base,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stderr  # refused
    out = result.stdout
    assert "1. accept_all if ip_list" in out and "-> no match" in out
    assert "deny if dnsbl: zen" in out
    assert "MATCH: DENY - listed at zen.spamhaus.org (127.0.0.4)" in out
    assert "<<< 554 5.7.1 127.0.0.21 is listed at zen.spamhaus.org" in out
    assert re.search(r"\[\d+\.\d ms\]", out)


def test_data_stage_rules_refuse_after_the_final_dot_and_keep_nothing(
    make_gateway: Any, dns: ZoneServer
) -> None:
    sections = perimeter(dns)
    sections["rules"]["data"] = [
        {
            "check": "tls_required",
            "verb": "deny",
            "message": "Encryption required",
            "log_message": "DENY - TLS required",
        }
    ]
    gw = make_gateway(files={"lists/whitelist": WHITELIST}, **sections)
    code, _, client = greeting(gw, "127.0.0.32")
    assert code == 220
    client.command("EHLO host32.client.test")
    client.command("MAIL FROM:<anna@outside.test>")
    assert client.command("RCPT TO:<user@example.test>")[0] == 250
    assert client.command("DATA")[0] == 354
    client.send(b"Subject: plain\r\n\r\nhello\r\n.\r\n")
    assert client.reply() == (550, "5.7.1 Encryption required")
    client.close()
    assert wait_for(lambda: rejects(gw)) == [
        "H=(host32.client.test) [127.0.0.32]:PORT F=<anna@outside.test> rejected after DATA: "
        "DENY - TLS required"
    ]
    assert gw.maildir_messages("user") == []
    assert not list((gw.spool_dir / "queue").iterdir())


def test_rate_limit_is_exact_with_two_steered_workers(make_gateway: Any, dns: ZoneServer) -> None:
    """With two worker processes each client IP is steered to one worker, whose in-memory
    counter is exact: the 11th connection in 15 minutes is still the one deferred."""
    sections = perimeter(dns)
    sections["server"] = {"workers": 2}
    gw = make_gateway(files={"lists/whitelist": WHITELIST}, **sections)
    workers = child_pids(gw.proc.pid)
    assert len(workers) == 2
    # Steered: each worker holds (and accepts from) only its own socket of the group.
    assert [listening_sockets(pid, gw.port) for pid in workers] == [1, 1]
    assert listening_sockets(gw.proc.pid, gw.port) == 2
    for source in ("127.0.0.33", "127.0.0.34"):
        dns.set(ptr_name(source), "PTR", [f"h{source[-2:]}.client.test."])
        dns.set(f"h{source[-2:]}.client.test", "A", [source])
        codes = []
        for _ in range(11):
            code, _, client = greeting(gw, source)
            codes.append(code)
            client.close()
        assert codes == [220] * 10 + [421], (source, codes)


def test_an_edited_whitelist_file_takes_effect_without_a_restart(gw: GatewayProcess) -> None:
    code, _, _ = greeting(gw, "127.0.0.20")  # no PTR: refused
    assert code == 554
    (gw.base / "lists" / "whitelist").write_text(WHITELIST + "127.0.0.20\n")
    # the file is looked at again at most every 2 s: wait for the change, not for a fixed time
    assert wait_for(lambda: greeting_code(gw, "127.0.0.20") == 220, timeout=10, interval=0.5)


def test_the_example_perimeter_config_validates(tmp_path: Path) -> None:
    """The example as shipped, with its LDAP password file present (config check reads it:
    without it the example is refused, naming the key)."""
    root = Path(__file__).resolve().parents[2]
    example = (root / "examples" / "perimeter.toml").read_text()
    assert 'bind_password_file = "/etc/palisade/ldap.pw"' in example
    config = perimeter_copy(tmp_path)  # its /etc, /var paths rewritten into tmp_path
    result = subprocess.run(
        [sys.executable, "-m", "palisade", "config", "check", "--no-dns", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "7. deny if dnsbl: DNS blocklists" in result.stdout
    assert "1. deny if helo: botnet HELO names" in result.stdout
    assert "3. deny if recipient: valid recipients" in result.stdout
    assert "1. deny if virus: clamd" in result.stdout  # implied by [clamd], before the operator's
    assert "5. deny if spam_score: spam kill level" in result.stdout  # implied by [spamd], last


# ---------------------------------------------------------------- DNS trouble is never a bounce

ZEN = "zen.spamhaus.org"
REFUSED = "zen.spamhaus.org: answer 127.255.255.254 (Spamhaus: query via a public/open resolver)"


def zone_panics(gw: GatewayProcess) -> list[str]:
    return [line for line in gw.paniclog().splitlines() if "DNSBL zone zen.spamhaus.org" in line]


def test_a_dnsbl_error_answer_or_silence_is_not_a_listing_and_the_zone_is_reported_once(
    gw: GatewayProcess, dns: ZoneServer
) -> None:
    """Spamhaus answers 127.255.255.254 ("query refused") for these clients: they are not
    deferred (that was every retry, forever), each lookup is logged, the zone once."""
    dns.list_address(ZEN, "127.0.0.41", "127.255.255.254")
    dns.list_address(ZEN, "127.0.0.42", "127.255.255.254")
    dns.behave(f"43.0.0.127.{ZEN}", "timeout")
    code, _, client = greeting(gw, "127.0.0.41")  # a raw client
    assert code == 220
    assert client.command("EHLO host41.client.test")[0] == 250
    client.close()
    with smtplib.SMTP("127.0.0.1", gw.port, source_address=("127.0.0.42", 0), timeout=10) as smtp:
        assert smtp.ehlo("host42.client.test")[0] == 250  # smtplib got a 220 to get here
    code, _, client = greeting(gw, "127.0.0.43")  # the zone does not answer at all
    assert code == 220
    client.close()
    skipped = wait_for(
        lambda: (
            [
                line
                for line in map(normalise, gw.mainlog().splitlines())
                if "dnsbl lookup failed, skipped" in line
            ]
            if "127.0.0.43" in gw.mainlog()
            else None
        )
    )
    assert skipped[:2] == [
        f'H=[127.0.0.{n}]:PORT connect rule "zen" (temporary failure): '
        f"dnsbl lookup failed, skipped: {REFUSED}"
        for n in (41, 42)
    ]
    assert skipped[2].startswith(
        'H=[127.0.0.43]:PORT connect rule "zen" (temporary failure): dnsbl lookup failed, '
        "skipped: zen.spamhaus.org: lookup failed: "
    )
    assert len(skipped) == 3
    panics = zone_panics(gw)
    assert len(panics) == 1  # once per zone per probe interval, however many lookups fail
    assert f"DNSBL zone zen.spamhaus.org lookup failed: {REFUSED}" in panics[0]
    assert gw.rejectlog() == ""


@pytest.mark.parametrize(
    ("on_error", "code", "reply", "log"),
    [
        (
            "defer",
            421,
            "4.4.3 Temporary local problem, please try again later",
            f'temporarily rejected connection in "connect" ACL: DEFER - dnsbl lookup failed: '
            f"{REFUSED}",
        ),
        (
            "deny",
            554,
            "5.7.1 Access denied",  # the rule's "$ip is listed at $zone" would be a lie
            f'rejected connection in "connect" ACL: DENY - dnsbl lookup failed '
            f"(on_error = deny): {REFUSED}",
        ),
    ],
)
def test_a_dnsbl_failure_under_on_error_logs_a_failure_never_a_listing(
    make_gateway: Any, dns: ZoneServer, on_error: str, code: int, reply: str, log: str
) -> None:
    gw = make_gateway(
        files={"lists/whitelist": WHITELIST}, **perimeter(dns, dnsbl={"on_error": on_error})
    )
    dns.list_address(ZEN, "127.0.0.44", "127.255.255.254")
    got, text, client = greeting(gw, "127.0.0.44")
    assert (got, text) == (code, reply)
    assert client.closed()
    assert wait_for(lambda: rejects(gw)) == [f"H=[127.0.0.44]:PORT {log}"]
    assert "listed at" not in gw.rejectlog() and "$" not in gw.rejectlog()


def example_rule(stage: str, name: str) -> dict[str, Any]:
    root = Path(__file__).resolve().parents[2]
    with open(root / "examples" / "perimeter.toml", "rb") as f:
        rules = tomllib.load(f)["rules"][stage]
    found: dict[str, Any] = next(r for r in rules if r.get("name") == name)
    return found


@pytest.fixture
def resolver(request: pytest.FixtureRequest, dns: ZoneServer) -> Iterator[str]:
    """A resolver address that is dead (nothing listening), silent (a UDP socket that never
    answers) or answering SERVFAIL for every PTR question."""
    kind = request.param
    if kind == "servfail":
        for n in (45, 46):
            dns.behave(ptr_name(f"127.0.0.{n}"), "servfail")
        yield f"127.0.0.1:{dns.port}"
        return
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    if kind == "dead":
        sock.close()  # the port answers ICMP "unreachable" now
        yield f"127.0.0.1:{port}"
        return
    try:
        yield f"127.0.0.1:{port}"  # silent: queries arrive and are never read
    finally:
        sock.close()


@pytest.mark.parametrize("resolver", ["dead", "silent", "servfail"], indirect=True)
def test_the_example_rdns_rule_defers_while_the_resolver_is_down(
    make_gateway: Any, resolver: str
) -> None:
    """The shipped example must never turn a resolver outage into a bounce: 4xx, never 5xx."""
    rule = example_rule("connect", "reverse DNS")
    gw = make_gateway(
        dns={"nameservers": [resolver], "timeout": 0.5, "retries": 0},
        rules={"connect": [rule]},
    )
    code, text, client = greeting(gw, "127.0.0.45")  # a raw client
    assert (code, text) == (421, "4.4.3 Temporary local problem, please try again later")
    assert client.closed()
    with pytest.raises(smtplib.SMTPConnectError) as refused:  # and smtplib
        smtplib.SMTP("127.0.0.1", gw.port, source_address=("127.0.0.46", 0), timeout=10)
    assert refused.value.smtp_code == 421

    def clients() -> list[str]:  # the readiness probe from 127.0.0.1 is refused as well
        lines = [line for line in rejects(gw) if re.match(r"H=\[127\.0\.0\.4[56]\]", line)]
        return lines if len(lines) == 2 else []

    for n, line in zip((45, 46), wait_for(clients), strict=True):
        assert line.startswith(
            f'H=[127.0.0.{n}]:PORT temporarily rejected connection in "connect" ACL: '
            f"DEFER - rdns lookup failed: PTR lookup for 127.0.0.{n} failed: "
        )


# ---------------------------------------------------------------- check-host exit status


def check_host(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "palisade", "check-host", *args, "--config", str(gw.config_path)],
        cwd=gw.base,
        capture_output=True,
        text=True,
    )


def test_check_host_exit_status_says_accepted_refused_or_deferred(
    make_gateway: Any, dns: ZoneServer
) -> None:
    sections = perimeter(dns)
    sections["rules"]["connect"][-1]["on_error"] = "defer"
    sections["rules"]["helo"].append(
        {"check": "helo", "resolvable": True, "verb": "deny", "message": "Unknown HELO name"}
    )
    gw = make_gateway(start=False, files={"lists/whitelist": WHITELIST}, **sections)
    dns.set("host30.client.test", "A", ["127.0.0.30"])
    accepted = check_host(
        gw, "127.0.0.30", "--helo", "host30.client.test", "--from", "a@outside.test",
        "--rcpt", "user@example.test",
    )  # fmt: skip
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert "<<< 250 2.1.5 Ok" in accepted.stdout

    listed = check_host(gw, "127.0.0.21")
    assert listed.returncode == 1
    unknown_helo = check_host(gw, "127.0.0.31", "--helo", "nowhere.client.test")
    assert unknown_helo.returncode == 1
    assert "HELO nowhere.client.test has no A or AAAA record" in unknown_helo.stdout
    assert "<<< 550 5.7.1 Unknown HELO name" in unknown_helo.stdout

    dns.behave(f"47.0.0.127.{ZEN}", "servfail")
    deferred = check_host(gw, "127.0.0.47", "--helo", "host47.client.test")
    assert deferred.returncode == 3, deferred.stdout + deferred.stderr
    out = deferred.stdout
    assert re.search(
        r"-> ERROR \(temporary\): zen\.spamhaus\.org: lookup failed: .* -> on_error=defer \[", out
    )
    assert "MATCH" not in out and "listed at" not in out
    assert "<<< 421 4.4.3 Temporary local problem, please try again later" in out


def test_check_host_skipped_zone_and_a_bad_sender(make_gateway: Any, dns: ZoneServer) -> None:
    gw = make_gateway(start=False, files={"lists/whitelist": WHITELIST}, **perimeter(dns))
    dns.list_address(ZEN, "127.0.0.48", "127.255.255.254")
    skipped = check_host(gw, "127.0.0.48")
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    assert f"-> ERROR (temporary): {REFUSED} -> on_error=skip, skipped [" in skipped.stdout
    for bad in ("no spaces allowed@outside.test", "a@", "<a@outside.test> SIZE=1", "a@b@c"):
        result = check_host(gw, "127.0.0.30", "--from", bad)
        assert result.returncode == 2, (bad, result.stdout)
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("palisade check-host: --from "), lines
    null = check_host(gw, "127.0.0.30", "--from", "")
    assert null.returncode == 0, null.stdout + null.stderr  # the null sender is valid


def test_config_check_and_serve_warn_about_a_permanent_refusal_on_dns_failure(
    make_gateway: Any, dns: ZoneServer
) -> None:
    sections = perimeter(dns)
    sections["rules"]["connect"][3]["on_error"] = "deny"  # the seed's rdns rule, as it was
    gw = make_gateway(files={"lists/whitelist": WHITELIST}, **sections)
    result = subprocess.run(
        [
            sys.executable, "-m", "palisade", "config", "check", "--no-dns",
            "--config", str(gw.config_path),
        ],
        cwd=gw.base,
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "on_error" in line]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"warning: {gw.config_path}: rules.connect[4] (rdns #4): ")
    assert 'on_error = "deny"' in warnings[0] and "permanent 5xx" in warnings[0]
    # serve says it at start, in the panic log (and starts: it is a warning)
    assert f"start-up self-check: {warnings[0].removeprefix('warning: ')}" in gw.paniclog()
