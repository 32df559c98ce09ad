"""The pure part of ``palisade init``: answers -> config text (``palisade.config.generate``).

Each generated config is loaded by the real loader and policy builder (the list files it names
written beside it); the rules are compared with ``examples/perimeter.toml``, whose texts they
reuse, and the README's table of answer keys with the questions.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from palisade.config import parse_config
from palisade.config.generate import QUESTIONS, Environment, generate, resolve
from palisade.config.policy import build_policy
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("palisade_user")


ENV = Environment(fqdn="mx.example.test")
EXAMPLE = tomllib.loads((ROOT / "examples" / "perimeter.toml").read_text())
EXAMPLE_RULES = {
    rule["name"]: rule for rules in EXAMPLE["rules"].values() for rule in rules if "name" in rule
}
ALL_ON: dict[str, Any] = {
    "relay_from_hosts": ["10.0.0.0/8"],
    "generic_rdns": "on",
    "recipients": "ldap",
    "ldap_servers": ["ldap://127.0.0.1:3890"],
    "spam_scanner": "rspamd",
    "clamd": True,
}


def build(tmp_path: Path, answers: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    generated = generate(resolve(answers, ENV))
    source = tmp_path / "palisade.toml"
    source.write_text(generated.config)
    for relative, text in generated.lists.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    config = parse_config(generated.config, str(source))
    build_policy(config)  # every rule's check, options and stage are valid
    return tomllib.loads(generated.config), config


@pytest.mark.parametrize(
    "answers",
    [
        {},
        ALL_ON,
        {**ALL_ON, "recipients": "ad", "spam_scanner": "spamd", "generic_rdns": "off"},
        {**ALL_ON, "recipients": "file", "whitelist": False, "sender_whitelist": False},
        {"dnsbl": False, "dbl": True, "dqs_key": "abcdefgh12345678"},
    ],
    ids=["defaults", "all-on", "ad-spamd", "file-no-whitelists", "dbl-only-dqs"],
)
def test_every_feature_set_loads_and_its_rules_are_the_examples(
    tmp_path: Path, answers: dict[str, Any]
) -> None:
    written, _ = build(tmp_path, answers)
    for stage, rules in written.get("rules", {}).items():
        for rule in rules:
            example = EXAMPLE_RULES.get(rule["name"])
            if example is None:  # the DBL: documented in the README, not in the example
                assert rule["check"] == "dbl", rule
                continue
            for key in (
                "check",
                "verb",
                "message",
                "log_message",
                "patterns",
                "threshold",
                "incident",
            ):
                assert rule.get(key) == example.get(key), (stage, rule["name"], key)


def test_a_dqs_key_without_a_spamhaus_zone_adds_zen(tmp_path: Path) -> None:
    answers = {"dnsbl_zones": ["bl.spamcop.net"], "dqs_key": "abcdefgh12345678"}
    written, _ = build(tmp_path, answers)
    zones = [z["zone"] for z in written["rules"]["connect"][-2]["zones"]]
    assert zones == ["zen.spamhaus.org", "bl.spamcop.net"]


def test_the_readme_names_every_answer_key() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Choosing features: palisade init", 1)[1].split("\n## ", 1)[0]
    missing = [q.key for q in QUESTIONS if f"`{q.key}`" not in section]
    assert missing == []


def test_the_generated_service_user_is_palisade_unless_answered() -> None:
    assert tomllib.loads(generate(resolve({}, ENV)).config)["server"]["user"] == "palisade"
    assert "user" not in tomllib.loads(generate(resolve({"user": ""}, ENV)).config)["server"]
