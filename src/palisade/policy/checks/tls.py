"""``tls_required``: the session is not encrypted (use at RCPT with ``deny``; exceptions are an
``ip_list`` accept rule before it, or the ``except_list`` option)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from palisade.policy.checks.options import Options, current_ips
from palisade.policy.lists import ListKind
from palisade.policy.rules import (
    NO_MATCH,
    Check,
    CheckFactory,
    CheckResult,
    Facts,
    ListLookup,
    Ports,
    Stage,
)


class TlsRequiredCheck:
    name: ClassVar[str] = "tls_required"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.MAIL, Stage.RCPT, Stage.DATA})

    def __init__(self, exceptions: Any) -> None:
        self.exceptions = exceptions

    async def evaluate(self, facts: Facts, ports: Ports) -> CheckResult:
        if facts.tls:
            return NO_MATCH
        if self.exceptions is not None and facts.client_ip in current_ips(self.exceptions):
            return NO_MATCH
        return CheckResult(True, "session is not encrypted (STARTTLS required)")


def build(options: Mapping[str, Any], lists: ListLookup) -> Check:
    opts = Options(options, "tls_required")
    name = opts.text("except_list", None)
    handle = None
    if name is not None:
        handle = lists.get(name)
        if handle is None or handle.kind is not ListKind.IP:
            raise ValueError(f"option 'except_list': no ip list named {name!r} in [lists]")
    opts.done()
    return TlsRequiredCheck(handle)


FACTORIES: dict[str, CheckFactory] = {"tls_required": build}
