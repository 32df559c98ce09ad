"""The checks a rule can name, one module each; ``REGISTRY`` maps the name to its factory.

A check module defines a class with ``name``, ``stages`` and ``async evaluate(facts, ports)``,
and a ``build(options, lists)`` factory registered here. Checks return facts (``CheckResult``)
or raise ``CheckError`` for a temporary failure; they never decide the reply.
Must not touch: anything but ``smtp``, ``ports`` and the rest of ``policy`` (the outside world
only through the ports in ``Ports``). Trust: options were checked by each ``build`` at config
load (``ValueError`` naming the option); facts from the network are untrusted text.
"""

from __future__ import annotations

from palisade.policy.rules import CheckFactory

REGISTRY: dict[str, CheckFactory] = {}


def register(name: str, factory: CheckFactory) -> None:
    REGISTRY[name] = factory


def _load_builtin() -> None:
    from palisade.policy.checks import (
        content,
        dbl,
        dkim,
        dmarc,
        dnsbl,
        header_sender,
        helo,
        history,
        lists,
        ratelimit,
        rdns,
        recipients,
        sender,
        spf,
        tls,
    )

    for module in (
        lists,
        tls,
        rdns,
        dnsbl,
        dbl,
        helo,
        sender,
        history,
        ratelimit,
        header_sender,
        spf,
        dkim,
        dmarc,
        content,
        recipients,
    ):
        for name, factory in module.FACTORIES.items():
            register(name, factory)


_load_builtin()
