"""The runtime policy: rules per stage, the named lists they refer to, the always-on findings.

Owns: the ``Policy`` record the engine, the conversation and ``check-host`` read, and the
``ListRegistry`` of named lists it carries. Built from a loaded config by
``palisade.config.policy.build_policy`` (this package does not know the config); immutable once
built, so a reload builds a new one. Trust: everything here was checked when it was built; the
list handles may re-read their files (``palisade.config.lists``) but keep the last good contents.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from palisade.policy.engine import Rule
from palisade.policy.findings import Finding
from palisade.policy.lists import ListKind, OperatorList
from palisade.policy.rules import Stage


class NamedList(Protocol):
    """One named operator list as checks and reports see it (``config.lists.ListHandle``)."""

    @property
    def kind(self) -> ListKind: ...

    @property
    def path(self) -> Path | None: ...

    @property
    def value(self) -> OperatorList: ...

    def current(self) -> OperatorList: ...


class ListRegistry:
    """The named lists of one config (what ``ListLookup`` means to the checks)."""

    def __init__(self, handles: Mapping[str, NamedList] | None = None) -> None:
        self.handles: dict[str, NamedList] = dict(handles or {})

    def get(self, name: str) -> NamedList | None:
        return self.handles.get(name)


@dataclass(frozen=True)
class Policy:
    """Rules per stage, in the operator's order, and the lists they refer to."""

    rules: dict[Stage, tuple[Rule, ...]] = field(default_factory=dict)
    lists: ListRegistry = field(default_factory=ListRegistry)
    delay_reject: bool = False
    # always-on work per stage (authentication, scans), run by the engine before the rules
    findings: dict[Stage, tuple[Finding, ...]] = field(default_factory=dict)

    def for_stage(self, stage: Stage) -> tuple[Rule, ...]:
        return self.rules.get(stage, ())

    def findings_for(self, stage: Stage) -> tuple[Finding, ...]:
        return self.findings.get(stage, ())
