"""The ``[dkim]`` section: keys as inline tables or ``[[dkim.keys]]``, relative files under
keys_dir, and one precise error per mistake (file, line, key, what was expected)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from palisade.cli.main import effective_config, to_toml
from palisade.config import ConfigError, parse_config
from palisade.config.model import DkimKey
from palisade.config.policy import build_policy


def test_array_of_tables_and_paths() -> None:
    config = parse_config(
        '[dkim]\nkeys_dir = "/etc/palisade/keys"\n\n'
        '[[dkim.keys]]\ndomain = "example.org"\nselector = "r1"\nfile = "example.org.r1.rsa.key"\n'
        '\n[[dkim.keys]]\ndomain = "example.org"\nselector = "e1"\nfile = "/srv/e1.key"\n',
        "t.toml",
    )
    first, second = config.dkim.keys
    assert first == DkimKey("example.org", "r1", Path("example.org.r1.rsa.key"))
    assert config.dkim.key_path(first) == Path("/etc/palisade/keys/example.org.r1.rsa.key")
    assert config.dkim.key_path(second) == Path("/srv/e1.key")
    assert parse_config("", "t.toml").dkim.keys_dir == Path("/etc/palisade/keys")


def test_config_check_prints_dkim_that_reads_back() -> None:
    text = (
        '[dkim]\nkeys_dir = "keys"\nkeys = [{ domain = "example.org", selector = "r1", '
        'file = "a.key" }]\n'
    )
    config = parse_config(text, "t.toml")
    printed = to_toml(effective_config(config), build_policy(config))
    assert tomllib.loads(printed)["dkim"] == {
        "keys_dir": "keys",
        "keys": [{"domain": "example.org", "selector": "r1", "file": "a.key"}],
    }


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ('[{ domain = "example.org", selector = "r1" }]', "missing key(s): file"),
        ('[{ domain = "example.org", selector = "r1", file = "a", algo = "rsa" }]',
         "unknown key 'algo' (expected one of: domain, selector, file)"),
        ('[{ domain = "example.org", selector = 1, file = "a" }]',
         "selector: expected a string, got int 1"),
        ('["example.org"]', "expected a table { ... }, got str 'example.org'"),
        ('[{ domain = "exa mple.org", selector = "r1", file = "a" }]',
         "key 1: expected a domain name, got 'exa mple.org'"),
        ('[{ domain = "example.org", selector = "../r1", file = "a" }]',
         "key 1: expected a selector (letters, digits, '-', '_', dots between labels), got "
         "'../r1'"),
        ('[{ domain = "example.org", selector = "r1", file = "a" }, '
         '{ domain = "EXAMPLE.org", selector = "R1", file = "b" }]',
         "key 2: selector 'R1' of EXAMPLE.org is given twice (a selector publishes one key: "
         "give each key its own)"),
    ],
)  # fmt: skip
def test_mistakes_are_named(keys: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(f'[dkim]\nkeys_dir = "k"\nkeys = {keys}\n', "t.toml")
    assert str(caught.value) == f"config error in t.toml:3: dkim.keys: {problem}"
