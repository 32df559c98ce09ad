"""The envelope of a queued message and its per-recipient delivery state, as JSON.

Owns: the two small records the spool keeps next to the body bytes (the envelope, fixed at
acceptance, and the delivery state, rewritten after each attempt) and their JSON encodings.
Must not touch: files (palisade.spool.format, .writer and .queue do the I/O), SMTP or MIME.
Trust: the records are written by this program, but they are read back from disk, where a crash or
an operator may have damaged them, so decoding checks every type and raises ``ValueError`` on any
mismatch rather than hand a half-valid record to the delivery code.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, cast

from palisade.obs.queueid import is_queue_id
from palisade.ports import Route

RecipientStatus = Literal["pending", "delivered", "failed"]
_STATUSES: frozenset[str] = frozenset({"pending", "delivered", "failed"})


def _str(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string")
    return value


def _opt_str(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string or null")
    return value


def _num(obj: Mapping[str, Any], key: str, default: float | None = None) -> float:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"field {key!r} must be a number")
    return float(value)


def _int(obj: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"field {key!r} must be an integer")
    return value


@dataclass(frozen=True)
class Envelope:
    """What the SMTP session learnt about a message; fixed once the message is queued.

    ``sender`` is ``''`` for the null sender (bounces). ``extra`` is free-form string data for
    later features (delivery uses ``bounce_of`` to mark a DSN); it is stored read-only.
    ``routes`` holds, in the order of ``recipients``, the route relay control decided for each
    one at RCPT (or delivery for a bounce it queued); the spool only stores it. Empty: a file
    written before routes were stored (delivery then routes by domain, as it used to).
    """

    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    received_at: float
    client_ip: str
    client_port: int
    helo: str
    client_name: str | None
    protocol: str
    tls: str | None
    message_id: str | None = None
    extra: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    routes: tuple[Route, ...] = ()

    def __post_init__(self) -> None:
        if not is_queue_id(self.queue_id):
            raise ValueError(f"not a queue id: {self.queue_id!r}")
        if not isinstance(self.recipients, tuple):
            object.__setattr__(self, "recipients", tuple(self.recipients))
        if not isinstance(self.extra, MappingProxyType):
            object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))
        if not isinstance(self.routes, tuple):
            object.__setattr__(self, "routes", tuple(self.routes))
        if self.routes and len(self.routes) != len(self.recipients):
            raise ValueError("one route per recipient, or none")

    def route_of(self, rcpt: str) -> Route | None:
        """The route stored for ``rcpt`` (None: not stored, or not a recipient)."""
        for address, route in zip(self.recipients, self.routes, strict=False):
            if address == rcpt:
                return route
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "queue_id": self.queue_id,
            "sender": self.sender,
            "recipients": list(self.recipients),
            "received_at": self.received_at,
            "client_ip": self.client_ip,
            "client_port": self.client_port,
            "helo": self.helo,
            "client_name": self.client_name,
            "protocol": self.protocol,
            "tls": self.tls,
            "message_id": self.message_id,
            "extra": dict(self.extra),
            "routes": [route.value for route in self.routes],
        }

    @classmethod
    def from_json(cls, obj: object) -> Envelope:
        if not isinstance(obj, dict):
            raise ValueError("envelope must be a JSON object")
        rcpts = obj.get("recipients")
        if not isinstance(rcpts, list) or not all(isinstance(r, str) for r in rcpts):
            raise ValueError("field 'recipients' must be a list of strings")
        extra = obj.get("extra", {})
        if not isinstance(extra, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in extra.items()
        ):
            raise ValueError("field 'extra' must map strings to strings")
        routes = obj.get("routes", [])  # absent in files written before routes were stored
        if not isinstance(routes, list) or not all(isinstance(r, str) for r in routes):
            raise ValueError("field 'routes' must be a list of strings")
        return cls(
            queue_id=_str(obj, "queue_id"),
            sender=_str(obj, "sender"),
            recipients=tuple(cast(list[str], rcpts)),
            received_at=_num(obj, "received_at"),
            client_ip=_str(obj, "client_ip"),
            client_port=_int(obj, "client_port"),
            helo=_str(obj, "helo"),
            client_name=_opt_str(obj, "client_name"),
            protocol=_str(obj, "protocol"),
            tls=_opt_str(obj, "tls"),
            message_id=_opt_str(obj, "message_id"),
            extra=cast(dict[str, str], extra),
            routes=tuple(Route(r) for r in routes),  # an unknown one: ValueError
        )

    def dumps(self) -> str:
        """One line of ASCII JSON (no newline can appear inside)."""
        return json.dumps(self.to_json(), ensure_ascii=True, separators=(",", ":"))


_LATE_KEYS = frozenset({"message_id"})


def merge_late(fields: object, late: object) -> object:
    """The envelope JSON ``fields`` (a freshly parsed object: updated in place) completed by a
    spool file's late fields, learnt from the message after the envelope was written. Unknown
    keys or wrong types raise ``ValueError``."""
    if not isinstance(late, dict) or not late.keys() <= _LATE_KEYS:
        raise ValueError("late envelope fields must be an object with known keys")
    message_id = late.get("message_id")
    if message_id is not None:
        if not isinstance(message_id, str):
            raise ValueError("late field 'message_id' must be a string or null")
        if isinstance(fields, dict):  # else from_json says what is wrong
            fields["message_id"] = message_id
    return fields


@dataclass
class RecipientState:
    """Where one recipient stands. ``dsn_queued`` is set once its failure has been reported.

    ``code``, ``diagnostic`` and ``remote`` are opaque strings the delivery side keeps for its
    failure report (an enhanced status code, a diagnostic, the remote host); the spool never
    interprets them.
    """

    status: RecipientStatus = "pending"
    detail: str = ""
    updated_at: float = 0.0
    dsn_queued: bool = False
    code: str = ""
    diagnostic: str = ""
    remote: str = ""


@dataclass
class DeliveryState:
    """The mutable part of a queued message, saved atomically after each delivery attempt.

    A missing state file means "nothing attempted yet": :meth:`fresh` builds that state.
    Recipients are keyed by address; a recipient listed twice in the envelope is delivered once.
    """

    recipients: dict[str, RecipientState]
    attempts: int = 0
    next_attempt: float = 0.0
    last_attempt: float | None = None
    last_error: str = ""

    @classmethod
    def fresh(cls, recipients: Iterable[str], next_attempt: float = 0.0) -> DeliveryState:
        return cls(recipients={r: RecipientState() for r in recipients}, next_attempt=next_attempt)

    def pending(self) -> list[str]:
        return [r for r, s in self.recipients.items() if s.status == "pending"]

    def unreported_failures(self) -> list[str]:
        return [r for r, s in self.recipients.items() if s.status == "failed" and not s.dsn_queued]

    def finished(self) -> bool:
        """True when no recipient is pending and every failure has been reported."""
        return not self.pending() and not self.unreported_failures()

    def summary(self) -> str:
        counts = {s: 0 for s in ("pending", "delivered", "failed")}
        for st in self.recipients.values():
            counts[st.status] += 1
        return " ".join(f"{k}={v}" for k, v in counts.items())

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "attempts": self.attempts,
            "next_attempt": self.next_attempt,
            "last_attempt": self.last_attempt,
            "last_error": self.last_error,
            "recipients": {
                r: {
                    "status": s.status,
                    "detail": s.detail,
                    "updated_at": s.updated_at,
                    "dsn_queued": s.dsn_queued,
                    "code": s.code,
                    "diagnostic": s.diagnostic,
                    "remote": s.remote,
                }
                for r, s in self.recipients.items()
            },
        }

    @classmethod
    def from_json(cls, obj: object) -> DeliveryState:
        if not isinstance(obj, dict) or obj.get("version") != 1:
            raise ValueError("delivery state must be a version 1 JSON object")
        rcpts_obj = obj.get("recipients")
        if not isinstance(rcpts_obj, dict):
            raise ValueError("field 'recipients' must be an object")
        rcpts: dict[str, RecipientState] = {}
        for rcpt, item in rcpts_obj.items():
            if not isinstance(item, dict):
                raise ValueError("recipient state must be an object")
            status = _str(item, "status")
            if status not in _STATUSES:
                raise ValueError(f"unknown recipient status {status!r}")
            dsn = item.get("dsn_queued", False)
            if not isinstance(dsn, bool):
                raise ValueError("field 'dsn_queued' must be a boolean")
            rcpts[rcpt] = RecipientState(
                status=cast(RecipientStatus, status),
                detail=_str(item, "detail"),
                updated_at=_num(item, "updated_at", 0.0),
                dsn_queued=dsn,
                code=_str(item, "code") if "code" in item else "",
                diagnostic=_str(item, "diagnostic") if "diagnostic" in item else "",
                remote=_str(item, "remote") if "remote" in item else "",
            )
        last = obj.get("last_attempt")
        if last is not None and (isinstance(last, bool) or not isinstance(last, int | float)):
            raise ValueError("field 'last_attempt' must be a number or null")
        return cls(
            recipients=rcpts,
            attempts=_int(obj, "attempts", 0),
            next_attempt=_num(obj, "next_attempt", 0.0),
            last_attempt=None if last is None else float(last),
            last_error=_str(obj, "last_error"),
        )
