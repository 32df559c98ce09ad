"""Every check declares the ``$name`` values its rules' texts may use (config.loader's table)."""

from __future__ import annotations

from palisade.config.loader import CHECK_TEXT_VALUES, unknown_text_values
from palisade.policy.checks import REGISTRY


def test_every_registered_check_has_its_text_values_declared() -> None:
    assert set(CHECK_TEXT_VALUES) == set(REGISTRY)


def test_unknown_text_values() -> None:
    assert unknown_text_values("dnsbl", "$ip at ${zone} ($codes) $$zonee costs $5") == []
    assert unknown_text_values("rdns", "$ptr $zone ${Ip}") == ["zone", "Ip"]
    assert unknown_text_values("no-such-check", "$anything") == []  # reported as the check
