"""Operator lists (parsing, reload) and rule configuration errors, with real files."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from palisade.config import ConfigError, load_config
from palisade.config.lists import ListHandle
from palisade.config.policy import build_policy
from palisade.policy.lists import AddressSet, DomainSet, IpSet, ListKind, parse_list
from palisade.policy.rules import Stage
from palisade.policy.verdict import Verb


def test_ip_lists_v4_v6_cidr_and_mapped() -> None:
    ips = parse_list(
        "# whitelist\n192.0.2.0/24\n2001:db8::/32  # docs\n198.51.100.7\n", ListKind.IP
    )
    assert isinstance(ips, IpSet)
    for inside in ("192.0.2.200", "2001:db8:1::1", "198.51.100.7", "::ffff:192.0.2.9"):
        assert ipaddress.ip_address(inside) in ips
    for outside in ("192.0.3.1", "2001:db9::1", "198.51.100.8"):
        assert ipaddress.ip_address(outside) not in ips


@pytest.mark.parametrize(
    ("kind", "text", "line"),
    [
        (ListKind.IP, "10.0.0.1\n300.1.1.1\n", 2),
        (ListKind.DOMAIN, "ok.test\n\nbad domain\n", 3),
        (ListKind.ADDRESS, "a@b.test\nnot-an-address\n", 2),
        (ListKind.REGEX, "^ok$\n(unclosed\n", 2),
    ],
)
def test_bad_list_lines_are_named(kind: ListKind, text: str, line: int) -> None:
    with pytest.raises(ValueError, match=f"line {line}:"):
        parse_list(text, kind)


def test_domain_and_address_lists() -> None:
    domains = parse_list("example.org\n.corp.test\n", ListKind.DOMAIN)
    assert isinstance(domains, DomainSet)
    assert domains.matches("EXAMPLE.org.") and domains.matches("a.b.corp.test")
    assert not domains.matches("corp.test") and not domains.matches("xexample.org")
    addresses = parse_list("Boss@Example.org\n@partner.test\n", ListKind.ADDRESS)
    assert isinstance(addresses, AddressSet)
    assert addresses.matches("boss@example.org") and addresses.matches("x@partner.test")
    assert not addresses.matches("other@example.org")


def current_ips(handle: ListHandle) -> IpSet:
    current = handle.current()
    assert isinstance(current, IpSet)
    return current


def test_list_file_is_reloaded_on_change_and_a_broken_edit_keeps_the_old(tmp_path: Path) -> None:
    path = tmp_path / "wl"
    path.write_text("192.0.2.1\n")
    errors: list[str] = []
    handle = ListHandle.load("wl", ListKind.IP, path, check_interval=0.0, on_error=errors.append)
    assert ipaddress.ip_address("192.0.2.1") in current_ips(handle)
    path.write_text("192.0.2.2\n")
    os.utime(path, (1, 1))  # a different mtime, whatever the clock resolution
    assert ipaddress.ip_address("192.0.2.2") in current_ips(handle)
    path.write_text("not an ip\n")
    os.utime(path, (2, 2))
    assert ipaddress.ip_address("192.0.2.2") in current_ips(handle)
    assert errors and "line 1" in errors[0] and "keeping the old contents" in errors[0]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "palisade.toml"
    path.write_text(text)
    return path


def test_rules_build_in_order_with_lists_next_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "wl").write_text("192.0.2.0/24\n")
    config = load_config(
        write(
            tmp_path,
            """
[lists]
whitelist_connect_hosts = { type = "ip", file = "lists/wl" }
[[rules.connect]]
name = "whitelisted"
check = "ip_list"
list = "whitelist_connect_hosts"
verb = "accept_all"
[[rules.connect]]
check = "private_ip"
verb = "accept"
[[rules.rcpt]]
check = "tls_required"
verb = "deny"
observe = true
""",
        )
    )
    policy = build_policy(config)
    assert [r.verb for r in policy.for_stage(Stage.CONNECT)] == [Verb.ACCEPT_ALL, Verb.ACCEPT]
    assert policy.for_stage(Stage.RCPT)[0].observe


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[[rules.connect]]\ncheck = "nope"\nverb = "deny"\n',
            "rules.connect[1].check: unknown check 'nope'",
        ),
        (
            '[[rules.connect]]\ncheck = "private_ip"\nverb = "deny"\ncolour = "red"\n',
            "rules.connect[1]: unknown option(s) for check 'private_ip': colour",
        ),
        (
            '[[rules.connect]]\ncheck = "ip_list"\nlist = "missing"\nverb = "deny"\n',
            "no list named 'missing'",
        ),
        (
            '[[rules.connect]]\ncheck = "tls_required"\nverb = "deny"\n',
            "cannot be used at stage connect",
        ),
        (
            '[[rules.rcpt]]\ncheck = "private_ip"\nverb = "deny"\non_error = "maybe"\n',
            "rules.rcpt[1].on_error: expected one of defer, deny, match, skip",
        ),
        (
            '[[rules.sometime]]\ncheck = "private_ip"\nverb = "deny"\n',
            "rules.sometime: unknown stage",
        ),
        ('[lists]\nwl = { type = "ip", file = "absent" }\n', "lists.wl: list 'wl': cannot read"),
        ('[lists]\nwl = { type = "ip", entries = ["1.2.3.999"] }\n', "line 1: not an IP address"),
    ],
)
def test_rule_and_list_mistakes_are_precise_config_errors(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        build_policy(load_config(path))
    assert message in str(caught.value)
    assert str(path) in str(caught.value)


def test_rule_errors_carry_the_line_of_the_rule(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[rules.connect]]\ncheck = "private_ip"\nverb = "deny"\n\n'
        '[[rules.connect]]\ncheck = "nope"\nverb = "deny"\n',
    )
    with pytest.raises(ConfigError, match=r"palisade\.toml:5: rules\.connect\[2\]\.check"):
        build_policy(load_config(path))


# ---------------------------------------------------------------- on_error defaults and warnings


def test_blocklists_skip_on_error_by_default_and_every_other_check_defers(tmp_path: Path) -> None:
    from palisade.policy.rules import OnError

    path = write(
        tmp_path,
        '[[rules.connect]]\ncheck = "dnsbl"\nzones = ["zen.spamhaus.org"]\nverb = "deny"\n'
        '[[rules.connect]]\ncheck = "dnsbl"\nzones = ["bl.test"]\nverb = "deny"\n'
        'on_error = "defer"\n'
        '[[rules.connect]]\ncheck = "rdns"\nverb = "deny"\n'
        '[[rules.helo]]\ncheck = "dbl"\nfield = "helo"\nverb = "deny"\n'
        '[[rules.helo]]\ncheck = "helo"\nresolvable = true\nverb = "deny"\n'
        '[[rules.mail]]\ncheck = "sender"\nverify = true\nverb = "deny"\n',
    )
    policy = build_policy(load_config(path))
    on_error = [r.on_error for stage in Stage for r in policy.for_stage(stage)]
    assert on_error == [
        OnError.SKIP,  # dnsbl: a failed lookup is "not listed"
        OnError.DEFER,  # ... unless the rule says otherwise
        OnError.DEFER,
        OnError.SKIP,  # dbl
        OnError.DEFER,
        OnError.DEFER,
    ]


def test_permanent_on_error_warnings_name_every_dns_rule_that_would_bounce(tmp_path: Path) -> None:
    from palisade.config.policy import permanent_on_error_warnings

    path = write(
        tmp_path,
        '[[rules.connect]]\ncheck = "rdns"\nverb = "deny"\non_error = "deny"\n'
        '[[rules.connect]]\ncheck = "rdns"\nverb = "deny"\n'  # default defer: fine
        '[[rules.connect]]\ncheck = "dnsbl"\nzones = ["zen.spamhaus.org"]\nverb = "drop"\n'
        'on_error = "match"\n'
        '[[rules.connect]]\ncheck = "dnsbl"\nzones = ["bl.test"]\nverb = "defer"\n'
        'on_error = "match"\n'  # a match defers: fine
        '[[rules.connect]]\ncheck = "rdns"\nverb = "deny"\non_error = "deny"\nobserve = true\n'
        '[[rules.helo]]\ncheck = "helo"\nresolvable = true\nverb = "deny"\non_error = "deny"\n'
        '[[rules.helo]]\ncheck = "helo"\npatterns = ["x"]\nverb = "deny"\non_error = "deny"\n'
        '[[rules.mail]]\ncheck = "sender"\nverify = true\nverb = "deny"\non_error = "deny"\n'
        '[[rules.mail]]\ncheck = "sender"\npatterns = ["x"]\nverb = "deny"\non_error = "deny"\n'
        '[[rules.mail]]\ncheck = "spf"\nresult = "fail"\nverb = "deny"\non_error = "deny"\n'
        '[[rules.mail]]\ncheck = "dbl"\nverb = "deny"\non_error = "deny"\n'
        '[[rules.data]]\ncheck = "dmarc"\npolicy = ["reject"]\nverb = "deny"\n'
        'on_error = "deny"\n'
        '[[rules.data]]\ncheck = "header_sender"\nverb = "deny"\non_error = "deny"\n',
    )
    warnings = permanent_on_error_warnings(load_config(path))
    named = [w.split(": ", 2)[1] for w in warnings]
    assert named == [
        "rules.connect[1] (rdns #1)",
        "rules.connect[3] (dnsbl #3)",
        "rules.helo[1] (helo #1)",
        "rules.mail[1] (sender #1)",
        "rules.mail[3] (spf #3)",
        "rules.mail[4] (dbl #4)",
        "rules.data[1] (dmarc #1)",
        "rules.data[2] (header_sender #2)",
    ]
    assert all(str(path) in w and "permanent 5xx" in w for w in warnings)
    assert 'on_error = "match"' in warnings[1]


def test_the_example_perimeter_config_has_no_permanent_dns_refusal(tmp_path: Path) -> None:
    from palisade.config.policy import permanent_on_error_warnings
    from tests.conftest import perimeter_copy

    config = perimeter_copy(tmp_path)  # the lists and the LDAP password file present
    assert permanent_on_error_warnings(load_config(config)) == []
