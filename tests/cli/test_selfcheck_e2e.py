"""The start-up self-check (resolver, DNSBL probes) and ``config check``'s TOML and JSON output.

Real parts only: ``python -m palisade`` in a subprocess, a real DNS server on loopback
(``loopback/dnsserver.py``) serving the blocklist zones, a real gateway for ``serve``.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loopback.dnsserver import ZoneServer, start_zone_server
from tests.conftest import free_port, palisade, wait_for, write_config

DQS_KEY = "s3cr3tdqsk3y0000000000000a"
REFUSED = "your resolver is refused by this list (public resolver or missing DQS key)"


@pytest.fixture
def dns() -> Iterator[ZoneServer]:
    server = start_zone_server()
    server.add_zone("good.bl.test")
    server.list_address("good.bl.test", "127.0.0.2")  # RFC 5782: 127.0.0.2 listed, .1 not
    server.add_zone("refused.bl.test")
    server.list_address("refused.bl.test", "127.0.0.2", "127.255.255.254")  # public resolver
    server.add_zone("empty.bl.test")  # lists nothing, not even 127.0.0.2: dead
    server.add_zone(f"{DQS_KEY}.zen.dq.spamhaus.net")
    server.list_address(f"{DQS_KEY}.zen.dq.spamhaus.net", "127.0.0.2", "127.255.255.252")
    yield server
    server.stop()


def dnsbl_rule(*zones: str, **extra: Any) -> dict[str, Any]:
    return {"check": "dnsbl", "verb": "deny", "zones": list(zones), **extra}


def test_config_check_probes_the_resolver_and_every_dnsbl_zone(
    tmp_path: Path, dns: ZoneServer
) -> None:
    sections: dict[str, dict[str, Any]] = {
        "dns": {"nameservers": [f"127.0.0.1:{dns.port}"]},
        "rules": {
            "connect": [dnsbl_rule("good.bl.test", "refused.bl.test", "empty.bl.test")],
            "rcpt": [dnsbl_rule("zen.spamhaus.org", dqs_key=DQS_KEY)],
        },
    }
    config = write_config(tmp_path / "p.toml", sections)
    result = palisade("config", "check", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr  # DNS trouble is a warning, not an error
    err = result.stderr
    assert f"ok: [dns] the resolver 127.0.0.1:{dns.port} answers" in err
    assert "ok: DNSBL zone good.bl.test passes the RFC 5782 probe" in err
    assert (
        "warning: DNSBL zone refused.bl.test fails the RFC 5782 probe: answer 127.255.255.254 "
        f"(Spamhaus: query via public/open resolver): {REFUSED}; the zone is not used until "
        "a probe passes"
    ) in err
    assert "warning: DNSBL zone empty.bl.test fails the RFC 5782 probe: 127.0.0.2 not listed" in err
    assert "warning: DNSBL zone zen.spamhaus.org fails" in err and REFUSED in err
    assert DQS_KEY not in err + result.stdout
    assert dns.queries(f"2.0.0.127.{DQS_KEY}.zen.dq.spamhaus.net") == 1  # probed with the key
    result = palisade("config", "check", "--no-dns", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0 and "DNSBL" not in result.stderr


def test_a_dead_resolver_is_a_warning(tmp_path: Path) -> None:
    sections: dict[str, dict[str, Any]] = {
        "dns": {"nameservers": [f"127.0.0.1:{free_port()}"], "timeout": 0.5},
        "rules": {"connect": [dnsbl_rule("good.bl.test")]},
    }
    config = write_config(tmp_path / "p.toml", sections)
    result = palisade("config", "check", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning: [dns] the resolver 127.0.0.1:" in result.stderr
    assert "did not answer a query for mx.example.test A" in result.stderr
    assert "DNS outages are usually transient" in result.stderr
    assert "warning: DNSBL zones not probed: the resolver did not answer" in result.stderr


def test_serve_logs_the_warnings_and_starts(make_gateway: Any, dns: ZoneServer) -> None:
    gw = make_gateway(
        dns={"nameservers": [f"127.0.0.1:{dns.port}"]},
        rules={"connect": [dnsbl_rule("good.bl.test", "refused.bl.test")]},
    )
    line = "start-up self-check: DNSBL zone refused.bl.test fails the RFC 5782 probe"
    assert wait_for(lambda: line in gw.paniclog())
    assert REFUSED in gw.paniclog() and line in gw.mainlog()
    assert "palisade: warning: DNSBL zone refused.bl.test fails" in gw.stderr()
    assert "good.bl.test passes" not in gw.paniclog()  # ok findings are not logged
    disabled = "DNSBL zone refused.bl.test disabled: failed the RFC 5782 probe: answer"
    assert wait_for(lambda: disabled in gw.paniclog())  # the periodic probe says it plainly too
    assert f"{disabled} 127.255.255.254 (Spamhaus: query via public/open resolver): {REFUSED}" in (
        gw.paniclog()
    )


# -- the effective config as TOML and JSON -----------------------------------------------------


def without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_none(v) for v in value]
    return value


def test_config_check_prints_toml_that_round_trips_and_json_without_secrets(
    tmp_path: Path,
) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "friends").write_text("192.0.2.0/24\n")
    (tmp_path / "ldap.pw").write_text("Bind-Pw-From-File-9\n")
    sections: dict[str, Any] = {
        "server": {"hostname": "mx.example.test"},
        "relay": {"relay_from_hosts": ["192.0.2.0/24", "2001:db8::/32"]},
        "lists": {
            "friends": {"type": "ip", "file": "lists/friends"},
            "partners": {"type": "address", "entries": ["boss@partner.test", "@partner.test"]},
        },
        "ldap": {
            "servers": ["ldap://127.0.0.1:3890"],
            "base_dn": "dc=example,dc=test",
            "bind_password": "Sekrit-Bind-Pw-1",
            "bind_password_file": str(tmp_path / "ldap.pw"),
        },
        "rspamd": {"url": "http://127.0.0.1:11333", "password": "Rspamd-Pw-2"},
        "clamd": {"address": "127.0.0.1:3310"},
        "rules": {
            "connect": [
                {"name": "friends", "check": "ip_list", "list": "friends", "verb": "accept"},
                dnsbl_rule(
                    "zen.spamhaus.org",
                    name="blocklists",
                    dqs_key=DQS_KEY,
                    message='listed: "$zone" \\ tab\there, ünïcode ✓',
                ),
                {"name": "no ptr", "check": "rdns", "verb": "defer", "timeout": "3s"},
            ],
            "data": [{"check": "spam_score", "min": 5, "verb": "warn", "name": "scored"}],
        },
    }
    config = write_config(tmp_path / "p.toml", sections)
    toml_run = palisade("config", "check", "--no-dns", "--config", str(config), cwd=tmp_path)
    json_run = palisade(
        "config", "check", "--no-dns", "--json", "--config", str(config), cwd=tmp_path
    )
    assert toml_run.returncode == 0 and json_run.returncode == 0, toml_run.stderr
    parsed = tomllib.loads(toml_run.stdout)
    document = json.loads(json_run.stdout)
    assert document["source"] == str(config) and document["valid"] is True
    assert {k: v for k, v in document["findings"][0].items() if k != "message"} == {
        "level": "ok",
        "where": "paths.spool",
    }
    assert parsed == without_none(document["config"])  # the same data, in both forms
    assert parsed["relay"]["relay_from_hosts"] == ["192.0.2.0/24", "2001:db8::/32"]
    assert parsed["ldap"]["bind_password"] == "(set, not shown)"
    assert parsed["rspamd"]["password"] == "(set, not shown)"
    assert parsed["lists"]["partners"] == {
        "type": "address",
        "entries": ["boss@partner.test", "@partner.test"],
    }
    connect = parsed["rules"]["connect"]
    assert [rule["name"] for rule in connect] == ["friends", "blocklists", "no ptr"]  # in order
    assert connect[1]["dqs_key"] == "(set, not shown)"
    assert connect[1]["message"] == 'listed: "$zone" \\ tab\there, ünïcode ✓'
    assert connect[2]["timeout"] == 3.0
    assert "code" not in connect[2] and document["config"]["rules"]["connect"][2]["code"] is None
    out = toml_run.stdout
    assert "# 1. deny if virus: clamd (implied by its section)" in out  # before the operator's
    assert "# 2. warn if spam_score: scored" in out
    assert "# 3. deny if spam_score: spam kill level (implied by its section)" in out
    for secret in (DQS_KEY, "Sekrit-Bind-Pw-1", "Bind-Pw-From-File-9", "Rspamd-Pw-2"):
        for text in (toml_run.stdout, toml_run.stderr, json_run.stdout, json_run.stderr):
            assert secret not in text


def test_config_check_reports_the_certificate_chain(tmp_path: Path) -> None:
    """The configured ``[tls]`` chain goes through the self-check: a chain out of order stops
    the gateway (exit 1), a certificate for another host name is only a warning."""
    from tests.tls.certs import Pki

    pki = Pki.make(hostname="mx.other.test")
    cert, key = pki.write(tmp_path)
    config = write_config(
        tmp_path / "palisade.toml",
        {
            "server": {"hostname": "mx.example.test"},
            "tls": {"certificate": str(cert), "private_key": str(key)},
            "paths": {"spool": "var/spool", "log": "var/log", "mail": "var/mail"},
        },
    )
    result = palisade("config", "check", "--no-dns", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning: [tls] certificate is not valid for mx.example.test" in result.stderr
    cert, key = pki.write(tmp_path, pki.leaf, pki.root, pki.intermediate)
    result = palisade("config", "check", "--no-dns", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 1
    assert "error: [tls] chain out of order: certificate 0" in result.stderr
