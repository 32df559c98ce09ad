"""``tls_required``: the session is not encrypted (use at RCPT with ``deny``; exceptions are an
``ip_list`` accept rule before it, or the ``except_list`` option)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from palisade.policy.checks.options import Options, current_ips, named_list
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
    handle = None
    if "except_list" in options:
        handle, _ = named_list(opts, lists, ListKind.IP, "except_list")
    opts.done()
    return TlsRequiredCheck(handle)


FACTORIES: dict[str, CheckFactory] = {"tls_required": build}
