"""Protection and the ``[incidents]`` config: who is never blocked, built from a real config
file with real list files (reloaded on change), and the settings' validation."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from palisade.config import ConfigError, load_config, parse_config
from palisade.config.feedback import block_policy, build_protection
from palisade.config.lists import ListHandle
from palisade.config.policy import build_policy
from palisade.feedback.protect import Protection, network_of
from palisade.policy.lists import IpSet
from palisade.ports import BlockPolicy


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


CONFIG = """
[relay]
relay_from_hosts = ["192.0.2.0/28", "2001:db8:aa::5"]

[lists]
trusted = { type = "ip", file = "trusted.txt" }
bad = { type = "ip", entries = ["203.0.113.0/24"] }

[[rules.connect]]
check = "ip_list"
list = "trusted"
verb = "accept"

[[rules.connect]]
check = "ip_list"
list = "bad"
verb = "deny"
incident = 3
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    write(tmp_path / "trusted.txt", "198.51.100.7\n2001:db8:bb::/48\n")
    return write(tmp_path / "palisade.toml", CONFIG)


def test_the_sources(config_file: Path) -> None:
    config = load_config(config_file)
    protection = build_protection(config, build_policy(config))
    assert protection.why("127.0.0.1") == "loopback"
    assert protection.why("127.0.0.9") == "loopback"
    assert protection.why("::1") == "loopback"
    assert protection.why("192.0.2.3") == "relay_from_hosts"
    assert protection.why("::ffff:192.0.2.3") == "relay_from_hosts"
    assert protection.why("198.51.100.7") == "connect whitelist trusted"
    assert protection.why("2001:db8:bb:1::9") == "connect whitelist trusted"
    for outside in ("192.0.2.16", "198.51.100.8", "203.0.113.5", "2001:db8:cc::1"):
        assert not protection.covers(outside), outside


def test_a_64_holding_a_protected_address_is_protected(config_file: Path) -> None:
    config = load_config(config_file)
    protection = build_protection(config, build_policy(config))
    # another address of relay_from_hosts' /64: blocking its /64 would block 2001:db8:aa::5
    assert protection.why("2001:db8:aa::77") == "relay_from_hosts"
    assert protection.why("2001:db8:aa::/64") == "relay_from_hosts"
    assert not protection.covers("2001:db8:aa:1::77")


def test_the_whitelist_file_is_read_as_it_is_now(config_file: Path) -> None:
    config = load_config(config_file)
    policy = build_policy(config)
    protection = build_protection(config, policy)
    assert not protection.covers("198.51.100.99")
    trusted = config_file.parent / "trusted.txt"
    write(trusted, "198.51.100.99\n")
    later = os.stat(trusted).st_mtime + 5
    os.utime(trusted, (later, later))
    handle = policy.lists.get("trusted")
    assert isinstance(handle, ListHandle)
    assert handle.reload_if_changed()  # what current() does every check_interval
    assert protection.covers("198.51.100.99")
    assert not protection.covers("198.51.100.7")


def test_loopback_can_be_left_unprotected(tmp_path: Path) -> None:
    config = parse_config("[incidents]\nprotect_loopback = false\n", "<test>")
    protection = build_protection(config)
    assert not protection.covers("127.0.0.2") and not protection.covers("::1")
    assert build_protection(parse_config("", "<test>")).covers("127.0.0.2")


def test_private_ip_whitelist_protects_private_ranges() -> None:
    config = parse_config(
        '[[rules.connect]]\ncheck = "private_ip"\nverb = "accept_all"\nname = "lan"\n', "<t>"
    )
    protection = build_protection(config, build_policy(config))
    assert protection.why("10.1.2.3") == "connect whitelist lan"
    assert protection.why("fd00::1") == "connect whitelist lan"
    assert not protection.covers("192.0.2.1")


def test_observe_or_deny_rules_protect_nobody() -> None:
    config = parse_config(
        '[lists]\nx = { type = "ip", entries = ["192.0.2.1"] }\n'
        '[[rules.connect]]\ncheck = "ip_list"\nlist = "x"\nverb = "accept"\nobserve = true\n'
        '[[rules.connect]]\ncheck = "ip_list"\nlist = "x"\nverb = "deny"\n',
        "<t>",
    )
    assert not build_protection(config, build_policy(config)).covers("192.0.2.1")


def test_network_of() -> None:
    assert str(network_of("192.0.2.1")) == "192.0.2.1/32"
    assert str(network_of("::ffff:192.0.2.1")) == "192.0.2.1/32"
    assert str(network_of("2001:db8:1:2::9")) == "2001:db8:1:2::/64"
    assert str(network_of("2001:db8:1:2::/64")) == "2001:db8:1:2::/64"
    with pytest.raises(ValueError):
        network_of("not-an-ip")


def test_ipset_overlaps() -> None:
    ips = IpSet.of(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "2001:db8::5/128"))
    assert ips.overlaps(ipaddress.ip_network("10.2.3.4/32"))
    assert ips.overlaps(ipaddress.ip_network("0.0.0.0/0"))
    assert not ips.overlaps(ipaddress.ip_network("11.0.0.0/8"))
    assert ips.overlaps(ipaddress.ip_network("2001:db8::/64"))
    assert not ips.overlaps(ipaddress.ip_network("2001:db8:0:1::/64"))


def test_protection_without_sources() -> None:
    assert not Protection(loopback=False).covers("127.0.0.1")


# ---------------------------------------------------------------------------- [incidents]


def test_incidents_section() -> None:
    config = parse_config(
        '[incidents]\nwindow = "2d"\nblock_at = 5\nblock_for = "1h"\nblock_growth = 3\n'
        'block_max = "1d"\npregreet = 0\nsmuggling = 9\n',
        "<t>",
    )
    assert block_policy(config) == BlockPolicy(
        window=2 * 86400.0, block_at=5, block_for=3600.0, growth=3.0, block_max=86400.0
    )
    assert (config.incidents.pregreet, config.incidents.smuggling) == (0, 9)
    assert block_policy(parse_config("", "<t>")) == BlockPolicy()


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("block_at = 0", "incidents.block_at", "at least 1"),
        ('window = "soon"', "incidents.window", "duration"),
        ("block_growth = 0.5", "incidents.block_growth", "at least 1"),
        ('block_for = "2d"\nblock_max = "1d"', "incidents.block_max", "shorter than block_for"),
        ("pregreet = -1", "incidents.pregreet", "at least 0"),
        ("unknown_recipients_burst = 0", "incidents.unknown_recipients_burst", "at least 1"),
        ("block = 3", "incidents.block", "unknown key"),
    ],
)
def test_incidents_section_errors(text: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(f"[incidents]\n{text}\n", "t.toml")
    assert caught.value.key == key and problem in caught.value.problem


def test_rule_incident_weight() -> None:
    config = parse_config(
        '[[rules.helo]]\ncheck = "helo"\nverb = "drop"\nincident = 4\nsyntax = true\n', "<t>"
    )
    assert config.rules[0].incident == 4
    assert build_policy(config).rules[next(iter(build_policy(config).rules))][0].incident == 4


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("incident = -1", "at least 0"),
        ('incident = "3"', "at least 0"),
        ("incident = true", "at least 0"),
    ],
)
def test_rule_incident_errors(line: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(f'[[rules.helo]]\ncheck = "helo"\nverb = "deny"\n{line}\n', "t.toml")
    assert caught.value.key == "rules.helo[1].incident" and problem in caught.value.problem
    assert caught.value.line == 4


@pytest.mark.parametrize("verb", ["defer", "warn", "accept", "accept_all"])
def test_incident_only_on_refusals(verb: str) -> None:
    with pytest.raises(ConfigError, match="only a refusal counts"):
        parse_config(f'[[rules.helo]]\ncheck = "helo"\nverb = "{verb}"\nincident = 1\n', "t")
    # 0 is the default: allowed anywhere
    parse_config(f'[[rules.helo]]\ncheck = "helo"\nverb = "{verb}"\nincident = 0\n', "t")
