"""The nftables adapter's validation of incident keys before they reach nft (pure: no kernel).
The adapter itself runs against real nft in network namespaces (tests/feedback)."""

from __future__ import annotations

import pytest

from palisade.adapters.nftables import NftablesFirewall, element_key


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("192.0.2.1", ("blocked4", "192.0.2.1")),
        (" 192.0.2.1 ", ("blocked4", "192.0.2.1")),
        ("192.0.2.1/32", ("blocked4", "192.0.2.1")),
        ("::ffff:192.0.2.1", ("blocked4", "192.0.2.1")),
        ("2001:db8:1:2::/64", ("blocked6", "2001:db8:1:2::/64")),
        ("2001:db8:1:2:3:4:5:6", ("blocked6", "2001:db8:1:2::/64")),
        ("2001:DB8:1:2::1/128", ("blocked6", "2001:db8:1:2::/64")),
    ],
)
def test_keys_become_set_elements(key: str, expected: tuple[str, str]) -> None:
    assert element_key(key) == expected


@pytest.mark.parametrize(
    "key",
    ["", "bad", "192.0.2.0/24", "2001:db8::/48", "192.0.2.1; flush ruleset", "1.2.3.4 } drop"],
)
def test_anything_else_is_refused(key: str) -> None:
    with pytest.raises(ValueError):
        element_key(key)


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"table": "inet palisade"}, "not an nftables table name"),
        ({"table": "x" * 33}, "not an nftables table name"),
        ({"ports": ()}, "ports must be TCP port numbers"),
        ({"ports": (25, 70000)}, "ports must be TCP port numbers"),
    ],
)
def test_settings_are_checked(settings: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        NftablesFirewall(**settings)  # type: ignore[arg-type]
