"""Reading a rule's check options with precise errors (``ValueError`` naming the option)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from palisade.policy.lists import IpSet, ListKind, OperatorList
from palisade.policy.rules import ListLookup


class Options:
    """Takes options out one by one; ``done()`` refuses whatever is left (a typo, usually)."""

    def __init__(self, raw: Mapping[str, Any], check: str) -> None:
        self._raw = dict(raw)
        self._check = check

    def _take(self, key: str, default: Any) -> Any:
        if key in self._raw:
            return self._raw.pop(key)
        if default is _REQUIRED:
            raise ValueError(f"check {self._check!r} needs the option {key!r}")
        return default

    def text(self, key: str, default: Any = ...) -> Any:
        value = self._take(key, _REQUIRED if default is ... else default)
        if value is not default and not isinstance(value, str):
            raise ValueError(f"option {key!r}: expected a string, got {value!r}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self._take(key, default)
        if not isinstance(value, bool):
            raise ValueError(f"option {key!r}: expected true or false, got {value!r}")
        return value

    def number(self, key: str, default: float | None = None, minimum: float = 0) -> Any:
        value = self._take(key, _REQUIRED if default is None else default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
            raise ValueError(f"option {key!r}: expected a number of at least {minimum}")
        return value

    def texts(self, key: str, default: Any = ...) -> list[str]:
        value = self._take(key, _REQUIRED if default is ... else default)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"option {key!r}: expected a list of strings, got {value!r}")
        return list(value)

    def raw(self, key: str, default: Any = None) -> Any:
        return self._take(key, default)

    def done(self) -> None:
        if self._raw:
            keys = ", ".join(sorted(self._raw))
            raise ValueError(f"unknown option(s) for check {self._check!r}: {keys}")


class _Required:
    pass


_REQUIRED: Any = _Required()


def current(handle: Any) -> OperatorList:
    """The list behind a handle as it is now (reloaded when its file changed)."""
    result: OperatorList = handle.current()
    return result


def current_ips(handle: Any) -> IpSet:
    """``current`` for a handle known (checked at build time) to be an IP list."""
    result = handle.current()
    assert isinstance(result, IpSet)
    return result


def named_list(opts: Options, lists: ListLookup, kind: ListKind, key: str = "list") -> Any:
    """The handle of the list named by option ``key`` (required), checked to be of ``kind``;
    returns (handle, name)."""
    name = opts.text(key)
    handle = lists.get(name)
    if handle is None:
        raise ValueError(f"option {key!r}: no list named {name!r} in [lists]")
    if handle.kind is not kind:
        raise ValueError(f"option {key!r}: list {name!r} is not a {kind.value} list")
    return handle, str(name)
