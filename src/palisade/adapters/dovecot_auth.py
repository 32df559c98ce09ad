"""Dovecot auth adapter: the ``Authenticator`` port over Dovecot's auth client protocol (v1),
the protocol Postfix's ``smtpd_sasl_type = dovecot`` and exim's ``dovecot`` authenticator speak
to ``/run/dovecot/auth-client`` or to an ``inet_listener`` of Dovecot's ``service auth``.

Owns: one connection to Dovecot per instance (one per worker process), opened on first use and
reused for every attempt, with a request id per AUTH so that concurrent attempts of the worker's
connections share it; the handshake (``VERSION 1 2`` and ``CPID`` from us; ``VERSION``,
``MECH``, ``SPID``, ``CUID``, ``COOKIE``, ``DONE`` from Dovecot: major version 1 and a ``PLAIN``
mechanism are required); the request

    AUTH <id> PLAIN service=smtp nologin no-penalty lip=<ip> rip=<ip> [secured] resp=<base64>

(both SMTP mechanisms become PLAIN towards Dovecot: the SMTP side has decoded LOGIN's user name
and password already, so they are re-encoded as ``authzid NUL authcid NUL password``); and the
replies ``OK <id> user=...`` (the user name as Dovecot knows it, which may differ in case or
form from what the client typed), ``FAIL <id> ...`` (wrong credentials, unknown user, disabled
user: ``None``; ``code=temp_fail`` or, before Dovecot 2.3, ``temp``: ServiceTempError) and
``CONT`` (never expected after a PLAIN initial response: a protocol error).

``no-penalty``: Dovecot's anvil penalty would delay each further failure of a client address by
2, 4, 8 then 15 s on top of ``auth_failure_delay``, past Palisade's ``auth_timeout``, so a
password guesser would get 454 (and no ``authenticator failed`` line for fail2ban) instead of
535. Palisade charges failures itself (the growing per-address delay and
``max_auth_failures``), so it asks Dovecot not to.

Fields use Dovecot's tab-escaping (``\\001`` then ``1``, ``t``, ``r``, ``n`` or ``0`` for
``\\001``, TAB, CR, LF, NUL): every value we write is escaped, every value we read is unescaped.
The client's user name and password travel only inside the base64 ``resp=`` field, never as a
field of their own; a user name, authzid or password containing NUL cannot be encoded in PLAIN
and is refused (``None``) without asking Dovecot.

Must not touch: policy (what a failure costs, what the client is told), logging, configuration
files (the composition root passes plain values), any project module other than
``palisade.ports`` and the shared address helpers of ``adapters.scanner_io``.

Trust: Dovecot is a local service but its lines are parsed defensively: each line is capped
(64 KiB), a line that is not the protocol closes the connection, a user name with control
characters in an OK is refused. Every failure -- no socket file, connection refused or reset,
the ``timeout`` (connecting, the handshake and the reply together), a protocol error, Dovecot's
temporary failure -- is :class:`palisade.ports.ServiceTempError` with a reason naming the
address; nothing else escapes ``authenticate``. No reason ever contains the password or the
``resp=`` field.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import os

from palisade.adapters.scanner_io import (
    REPLY_LIMIT,
    Address,
    describe,
    open_stream,
    os_reason,
    parse_address,
    shown,
)
from palisade.ports import AuthAttempt, ServiceTempError

__all__ = ["DovecotAuthenticator", "tab_escape", "tab_unescape"]

_MAJOR_VERSION = 1
_MINOR_VERSION = 2
_MAX_ID = 2**32 - 1
_ESCAPES = {"\x01": "\x011", "\t": "\x01t", "\r": "\x01r", "\n": "\x01n", "\0": "\x010"}
_UNESCAPES = {"1": "\x01", "t": "\t", "r": "\r", "n": "\n", "0": "\0"}


def tab_escape(value: str) -> str:
    """Dovecot's ``str_tabescape``: \\001, TAB, CR, LF and NUL written as \\001 + one letter."""
    if not any(c in value for c in _ESCAPES):
        return value
    return "".join(_ESCAPES.get(c, c) for c in value)


def tab_unescape(value: str) -> str:
    """Dovecot's ``str_tabunescape``: \\001 + letter back to the character; \\001 + anything
    else is that character; a trailing \\001 is dropped."""
    if "\x01" not in value:
        return value
    out: list[str] = []
    chars = iter(value)
    for c in chars:
        if c != "\x01":
            out.append(c)
            continue
        following = next(chars, None)
        if following is not None:
            out.append(_UNESCAPES.get(following, following))
    return "".join(out)


class _ProtocolError(Exception):
    """Dovecot said something that is not the auth protocol."""


class _Connection:
    """One handshaken connection; replies are routed to the waiting attempt by request id."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.pending: dict[int, asyncio.Future[list[str]]] = {}
        self.next_id = 0
        self.failure: str | None = None  # why the connection is unusable, once it is
        self.task: asyncio.Task[None] | None = None

    def new_id(self) -> int:
        self.next_id = self.next_id % _MAX_ID + 1
        return self.next_id

    async def run(self) -> None:
        """Reads replies until the connection ends; then fails whatever still waits."""
        reason = "connection closed by Dovecot"
        try:
            while True:
                raw = await self.reader.readuntil(b"\n")
                fields = raw[:-1].decode("utf-8", "replace").split("\t")
                command = fields[0]
                if command not in ("OK", "FAIL", "CONT"):
                    continue  # the protocol says: ignore what you do not know
                if len(fields) < 2 or not fields[1].isdigit():
                    raise _ProtocolError(f"bad {command} line: {shown(raw.decode('latin-1'))}")
                future = self.pending.pop(int(fields[1]), None)
                if future is not None and not future.done():
                    future.set_result(fields)
        except asyncio.IncompleteReadError:
            pass
        except asyncio.LimitOverrunError:
            reason = "reply line too long"
        except _ProtocolError as exc:
            reason = str(exc)
        except OSError as exc:
            reason = os_reason(exc)
        finally:
            self.close(reason)

    def close(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ServiceTempError(self.failure))
        self.pending.clear()
        self.writer.close()


class DovecotAuthenticator:
    """Dovecot's auth service at ``address`` (a Unix socket path, or ``host:port``)."""

    name = "dovecot"

    def __init__(self, address: str, *, timeout: float = 10.0, service: str = "smtp") -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        parsed: Address = parse_address(address, 0)
        if not isinstance(parsed, str) and parsed[1] == 0:
            raise ValueError(f"bad Dovecot address {address!r}: expected a path or host:port")
        self.address = parsed
        self.where = f"dovecot auth {describe(parsed)}"
        self.timeout = timeout
        self.service = service
        self._connection: _Connection | None = None
        self._connecting = asyncio.Lock()

    async def authenticate(self, attempt: AuthAttempt) -> str | None:
        if "\0" in attempt.authcid or "\0" in attempt.authzid or "\0" in attempt.password:
            return None  # cannot be said in PLAIN; no real account has it
        try:
            async with asyncio.timeout(self.timeout):
                fields = await self._request(attempt)
        except TimeoutError:
            raise ServiceTempError(f"{self.where}: no answer within {self.timeout:g}s") from None
        except ServiceTempError as exc:
            raise ServiceTempError(f"{self.where}: {exc.reason}") from None
        except OSError as exc:
            raise ServiceTempError(f"{self.where}: {os_reason(exc)}") from None
        return self._verdict(fields, attempt)

    async def close(self) -> None:
        """Closes the connection (the worker is stopping)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close("closed")
            if connection.task is not None:
                with contextlib.suppress(BaseException):
                    await connection.task

    # -- the exchange --------------------------------------------------------------------------

    async def _request(self, attempt: AuthAttempt) -> list[str]:
        for retry in (True, False):
            connection, fresh = await self._connected()
            request_id = connection.new_id()
            future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
            connection.pending[request_id] = future
            try:
                connection.writer.write(self._auth_line(request_id, attempt))
                await connection.writer.drain()
                return await future
            except (ServiceTempError, OSError):
                # A reused connection Dovecot closed while it was idle (a restart): try once
                # more on a new one, as Postfix does.
                if fresh or not retry or connection.failure is None:
                    raise
            finally:
                connection.pending.pop(request_id, None)
        raise AssertionError("unreachable")

    def _auth_line(self, request_id: int, attempt: AuthAttempt) -> bytes:
        plain = f"{attempt.authzid}\0{attempt.authcid}\0{attempt.password}".encode()
        fields = [
            "AUTH",
            str(request_id),
            "PLAIN",
            f"service={tab_escape(self.service)}",
            "nologin",
            "no-penalty",
        ]
        for name, value in (("lip", attempt.local_ip), ("rip", attempt.client_ip)):
            if _is_ip(value):
                fields.append(f"{name}={tab_escape(value)}")
        if attempt.secured:
            fields.append("secured")
        fields.append("resp=" + base64.b64encode(plain).decode("ascii"))  # last, as required
        return ("\t".join(fields) + "\n").encode("ascii")

    def _verdict(self, fields: list[str], attempt: AuthAttempt) -> str | None:
        command, params = fields[0], fields[2:]
        if command == "CONT":
            self._drop("Dovecot asked for more data after a PLAIN initial response")
            raise ServiceTempError(f"{self.where}: unexpected CONT after a PLAIN response")
        values: dict[str, str] = {}
        flags: set[str] = set()
        for param in params:
            key, sep, value = param.partition("=")
            if sep:
                values.setdefault(key, tab_unescape(value))
            else:
                flags.add(key)
        if command == "FAIL":
            if "temp" in flags or values.get("code") == "temp_fail":
                reason = values.get("reason", "temporary failure")
                raise ServiceTempError(f"{self.where}: {shown(reason)}")
            return None
        user = values.get("user", attempt.authcid)
        if not user or any(not c.isprintable() for c in user):
            raise ServiceTempError(
                f"{self.where}: user name with control characters in an OK: {shown(user)!r}"
            )
        return user

    # -- the connection ------------------------------------------------------------------------

    async def _connected(self) -> tuple[_Connection, bool]:
        """The open connection, or a new one after the handshake; ``True`` when new."""
        async with self._connecting:
            connection = self._connection
            if connection is not None and connection.failure is None:
                return connection, False
            self._connection = None
            connection = await self._handshake()
            self._connection = connection
            connection.task = asyncio.create_task(connection.run())
            return connection, True

    async def _handshake(self) -> _Connection:
        reader, writer = await open_stream(self.address, limit=REPLY_LIMIT)
        try:
            writer.write(
                f"VERSION\t{_MAJOR_VERSION}\t{_MINOR_VERSION}\nCPID\t{os.getpid()}\n".encode()
            )
            await writer.drain()
            mechanisms: set[str] = set()
            version_seen = False
            while True:
                try:
                    raw = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    raise ServiceTempError("connection closed during the handshake") from None
                except asyncio.LimitOverrunError:
                    raise ServiceTempError("handshake line too long") from None
                fields = raw[:-1].decode("utf-8", "replace").split("\t")
                if fields[0] == "VERSION":
                    if len(fields) < 3 or fields[1] != str(_MAJOR_VERSION):
                        raise ServiceTempError(
                            f"unsupported protocol version: {shown(' '.join(fields[1:]))}"
                        )
                    version_seen = True
                elif fields[0] == "MECH" and len(fields) > 1:
                    mechanisms.add(fields[1].upper())
                elif fields[0] == "DONE":
                    break
            if not version_seen:
                raise ServiceTempError("no VERSION in the handshake")
            if "PLAIN" not in mechanisms:
                raise ServiceTempError(
                    "PLAIN is not offered (Dovecot's auth_mechanisms must include plain)"
                )
        except BaseException:
            writer.close()
            raise
        return _Connection(reader, writer)

    def _drop(self, reason: str) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close(reason)


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
