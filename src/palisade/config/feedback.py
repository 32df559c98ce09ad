"""Builds the feedback parts (``palisade.feedback``) from a loaded config.

Owns: the ``BlockPolicy`` of ``[incidents]`` and the ``Protection`` of a config and its built
policy: loopback (unless ``[incidents] protect_loopback = false``), ``[relay]
relay_from_hosts``, a ``[lists] relay_from_hosts`` ip list, and the connect whitelists: every
connect rule with verb ``accept`` or ``accept_all`` (not negated, not in observe mode) whose
check is ``ip_list`` (its list, as the file is now and after each reload of it) or
``private_ip`` (the private and loopback ranges). The gateway, ``palisade history``,
``palisade scan`` and ``palisade firewall`` all build theirs here, so they agree on who is
never blocked.
Trust: the config was validated by the loader; nothing here reads a file but through the list
handles the policy already holds.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable

from palisade.config.model import Config
from palisade.feedback.protect import Membership, Protection
from palisade.policy.checks.lists import IpListCheck, PrivateIpCheck
from palisade.policy.checks.options import current_ips
from palisade.policy.policy import Policy
from palisade.policy.rules import Stage
from palisade.policy.verdict import Verb
from palisade.ports import BlockPolicy

__all__ = ["PRIVATE_RANGES", "block_policy", "build_protection"]

# what a connect rule ``check = "private_ip"`` matches (policy.lists.PRIVATE_NETWORKS)
PRIVATE_RANGES = tuple(
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
        "100.64.0.0/10", "::1/128", "fc00::/7", "fe80::/10",
    )
)  # fmt: skip


def block_policy(config: Config) -> BlockPolicy:
    """``[incidents]`` window and block settings."""
    incidents = config.incidents
    return BlockPolicy(
        window=incidents.window,
        block_at=incidents.block_at,
        block_for=incidents.block_for,
        growth=incidents.block_growth,
        block_max=incidents.block_max,
    )


def build_protection(config: Config, policy: Policy | None = None) -> Protection:
    """Who ``config`` never blocks (see the module docstring). Without ``policy`` (not built)
    only loopback and ``[relay] relay_from_hosts`` count."""
    networks: list[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network]] = [
        ("relay_from_hosts", net) for net in config.relay.relay_from_hosts
    ]
    lists: list[tuple[str, Callable[[], Membership]]] = []
    if policy is not None:
        relay_list = policy.lists.get("relay_from_hosts")
        if relay_list is not None:
            lists.append(("list relay_from_hosts", functools.partial(current_ips, relay_list)))
        for rule in policy.for_stage(Stage.CONNECT):
            if rule.verb not in (Verb.ACCEPT, Verb.ACCEPT_ALL) or rule.negate or rule.observe:
                continue
            check = rule.check
            if isinstance(check, IpListCheck):
                source = f"connect whitelist {check.list_name}"
                lists.append((source, functools.partial(current_ips, check.handle)))
            elif isinstance(check, PrivateIpCheck):
                networks.extend((f"connect whitelist {rule.name}", net) for net in PRIVATE_RANGES)
    return Protection(networks, lists, loopback=config.incidents.protect_loopback)
