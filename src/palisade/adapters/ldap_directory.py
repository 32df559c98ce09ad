"""The recipient directory over LDAP (ldap3): who exists, for the ``recipient`` check.

Owns: the connection to the directory (several server URIs tried in order, one bound connection
reused across lookups and re-bound after a failure, ldaps:// or StartTLS with TLS 1.2 or later
and the host name checked against the certificate), the search filter built from the operator's
template, the positive and negative answer cache, and ``all_addresses`` for
``palisade recipients sync``.

Must not touch: policy (the check decides what an unknown recipient means), logging (failures are
reported as :class:`~palisade.ports.ServiceTempError` with a reason the caller logs), any project
module other than :mod:`palisade.ports`.

Trust: the address comes from the SMTP client. It is escaped per RFC 4515 before it enters the
filter, so ``*``, ``(``, ``)``, ``\\`` and NUL in it match themselves and nothing else.
Entries coming back are network input: ``exists`` uses only the presence of an entry;
``all_addresses`` keeps only attribute values that look like ``local@domain`` (a ``smtp:``
prefix removed, values with another ``type:`` prefix such as ``X500:`` dropped).
The bind password is a secret: it is read from the settings or the password file, given to ldap3
and nothing else; it is never part of a ``repr``, an exception text or a reason (every text that
leaves this module passes ``_redact``), and ldap3's own ``repr`` of a connection, which shows it,
is never formatted.

Timing: ldap3 is synchronous, so the directory runs it on one private worker thread (lookups are
serialised on the one connection). Each server gets ``timeout`` seconds to connect and
``timeout`` seconds per answer; an ``exists`` call as a whole answers within ``timeout`` seconds
(a late answer is still cached when the thread gets it). A server that failed is tried last for
the next ``retry_dead`` seconds (the "exhaust" behaviour of ldap3's server pools).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ldap3
from ldap3.utils.conv import escape_filter_chars

from palisade.ports import Clock, ServiceTempError

__all__ = ["LdapDirectory", "LdapSettings", "address_of"]

_PAGED_RESULTS = "1.2.840.113556.1.4.319"
_PAGE_SIZE = 500
_SUCCESS = 0
_SIZE_LIMIT_EXCEEDED = 4


@dataclass(frozen=True, slots=True)
class LdapSettings:
    """What the directory needs; the same names as the ``[ldap]`` section of the config."""

    servers: tuple[str, ...]  # "ldap://dc1.example.com", "ldaps://dc2.example.com:636"
    base_dn: str
    bind_dn: str = ""  # empty: anonymous bind
    bind_password: str = field(default="", repr=False)
    bind_password_file: Path | None = None  # read at every bind (a rotated password is seen)
    filter: str = "(mail=%s)"  # %s: the address, RFC 4515-escaped
    attributes: tuple[str, ...] = ("mail",)  # what all_addresses() exports
    start_tls: bool = False
    ca_file: Path | None = None  # trust anchors for ldaps:// and StartTLS (default: system)
    timeout: float = 5.0
    positive_ttl: float = 3600.0
    negative_ttl: float = 300.0
    retry_dead: float = 30.0  # a failed server is tried last for this long
    cache_size: int = 100_000  # answers kept at most (the oldest half is dropped when full)

    def __post_init__(self) -> None:
        if not self.servers:
            raise ValueError("ldap: no servers")
        for uri in self.servers:
            if not uri.lower().startswith(("ldap://", "ldaps://")):
                raise ValueError(f"ldap: server {uri!r} is not an ldap:// or ldaps:// URI")
        if self.filter.count("%s") < 1:
            raise ValueError(f"ldap: filter {self.filter!r} has no %s for the address")
        if not (self.filter.startswith("(") and self.filter.endswith(")")):
            raise ValueError(f"ldap: filter {self.filter!r} must be in parentheses")
        if not self.attributes:
            raise ValueError("ldap: no attributes")
        if self.timeout <= 0:
            raise ValueError("ldap: timeout must be positive")


def address_of(value: str) -> str | None:
    """The address in an attribute value, lower-cased: ``SMTP:Ann@Example.test`` ->
    ``ann@example.test``; None for values that are no mail address (``X500:/o=...``)."""
    text = value.strip()
    kind, colon, rest = text.partition(":")
    if colon and "@" not in kind:
        if kind.lower() != "smtp":
            return None
        text = rest.strip()
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain or any(c.isspace() for c in text):
        return None
    return text.lower()


class _StrictTls(ldap3.Tls):  # type: ignore[misc]
    """TLS 1.2 or later, the peer's certificate verified and its name checked by ``ssl``."""

    def __init__(self, ca_file: Path | None) -> None:
        super().__init__(validate=ssl.CERT_REQUIRED)
        self._context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self._context.minimum_version = ssl.TLSVersion.TLSv1_2

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        connection.socket = self._context.wrap_socket(
            connection.socket,
            server_side=False,
            do_handshake_on_connect=do_handshake,
            server_hostname=connection.server.host,
        )


class LdapDirectory:
    """The :class:`~palisade.ports.RecipientDirectory` port over LDAP.

    ``clock``: where cache lifetimes are read (its ``monotonic``); the system clock by default.
    ``close()`` unbinds and stops the worker thread.
    """

    def __init__(self, settings: LdapSettings, *, clock: Clock | None = None) -> None:
        self.settings = settings
        self._monotonic: Callable[[], float] = clock.monotonic if clock else time.monotonic
        self._tls = _StrictTls(settings.ca_file)
        self._servers = [self._server(uri) for uri in settings.servers]
        self._down_until: dict[str, float] = {}
        self._connection: Any = None  # an open, bound ldap3.Connection, or None
        self._connected_to = ""
        self._cache: dict[str, tuple[bool, float]] = {}
        self._cache_lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "palisade-ldap")
        self._closed = False
        self.queries = 0  # searches sent (for tests and the status page)

    def __repr__(self) -> str:
        return f"LdapDirectory(servers={list(self.settings.servers)!r})"

    # -- the port --------------------------------------------------------------------------

    async def exists(self, address: str) -> bool:
        address = address.lower()
        cached = self._cached(address)
        if cached is not None:
            return cached
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self._executor, self._lookup, address)
        try:
            return await asyncio.wait_for(job, self.settings.timeout)
        except TimeoutError:
            raise ServiceTempError(
                f"LDAP lookup timed out after {self.settings.timeout:g}s"
                + (f" ({self._connected_to})" if self._connected_to else "")
            ) from None
        except RuntimeError as exc:  # the executor was shut down by close()
            raise ServiceTempError(f"LDAP directory closed: {self._redact(str(exc))}") from None

    async def all_addresses(self) -> list[str]:
        """Every address the directory knows (the filter with ``*``), sorted, lower-cased."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.all_addresses_sync)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._executor.submit(self._drop)
            self._executor.shutdown(wait=True, cancel_futures=False)

    # -- cache -----------------------------------------------------------------------------

    def _cached(self, address: str) -> bool | None:
        with self._cache_lock:
            entry = self._cache.get(address)
            if entry is None:
                return None
            if entry[1] <= self._monotonic():
                del self._cache[address]
                return None
            return entry[0]

    def _remember(self, address: str, found: bool) -> None:
        ttl = self.settings.positive_ttl if found else self.settings.negative_ttl
        if ttl <= 0:
            return
        with self._cache_lock:
            if len(self._cache) >= self.settings.cache_size:
                now = self._monotonic()
                self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
                if len(self._cache) >= self.settings.cache_size:
                    keep = list(self._cache.items())[len(self._cache) // 2 :]
                    self._cache = dict(keep)
            self._cache[address] = (found, self._monotonic() + ttl)

    # -- the worker thread -----------------------------------------------------------------

    def _lookup(self, address: str) -> bool:
        cached = self._cached(address)  # answered while this call waited for the thread
        if cached is not None:
            return cached
        search = self.settings.filter.replace("%s", escape_filter_chars(address))
        result = bool(self._with_connection(lambda conn: self._search_one(conn, search)))
        self._remember(address, result)
        return result

    def all_addresses_sync(self) -> list[str]:
        """``all_addresses`` for callers without an event loop (the sync command)."""
        search = self.settings.filter.replace("%s", "*")
        addresses: list[str] = self._with_connection(lambda conn: self._search_all(conn, search))
        return addresses

    def _with_connection(self, work: Callable[[Any], Any]) -> Any:
        """Runs ``work`` on the bound connection; after a failure of a reused connection, once
        more on a fresh one (the server may have closed an idle connection)."""
        reused = self._connection is not None
        try:
            return self._attempt(work)
        except ServiceTempError:
            if not reused:
                raise
        return self._attempt(work)

    def _attempt(self, work: Callable[[Any], Any]) -> Any:
        try:
            return work(self._connect())
        except _Unusable as exc:
            self._drop()
            raise ServiceTempError(exc.reason) from None
        except Exception as exc:  # ldap3 fails in many ways (LDAPException, OSError, struct...)
            where = self._connected_to or "LDAP"
            self._drop()
            raise ServiceTempError(self._failure(f"{where}: search failed", exc)) from None

    def _search_one(self, conn: Any, search: str) -> bool:
        self.queries += 1
        conn.search(
            self.settings.base_dn,
            search,
            search_scope=ldap3.SUBTREE,
            dereference_aliases=ldap3.DEREF_NEVER,
            attributes=[ldap3.NO_ATTRIBUTES],
            size_limit=1,
            time_limit=max(1, int(self.settings.timeout + 0.999)),
        )
        code = conn.result.get("result")
        if code not in (_SUCCESS, _SIZE_LIMIT_EXCEEDED):
            raise _Unusable(self._answer_error(conn))
        return any(item.get("type") == "searchResEntry" for item in conn.response or ())

    def _search_all(self, conn: Any, search: str) -> list[str]:
        found: set[str] = set()
        wanted = {a.lower() for a in self.settings.attributes}
        cookie: Any = None
        while True:
            self.queries += 1
            conn.search(
                self.settings.base_dn,
                search,
                search_scope=ldap3.SUBTREE,
                dereference_aliases=ldap3.DEREF_NEVER,
                attributes=list(self.settings.attributes),
                paged_size=_PAGE_SIZE,
                paged_cookie=cookie,
            )
            if conn.result.get("result") != _SUCCESS:
                raise _Unusable(self._answer_error(conn))
            for item in conn.response or ():
                if item.get("type") != "searchResEntry":
                    continue
                for name, values in (item.get("attributes") or {}).items():
                    if name.lower() not in wanted:
                        continue
                    for value in values if isinstance(values, list) else [values]:
                        if isinstance(value, bytes):
                            value = value.decode("utf-8", "replace")
                        address = address_of(str(value))
                        if address is not None:
                            found.add(address)
            controls = conn.result.get("controls") or {}
            cookie = controls.get(_PAGED_RESULTS, {}).get("value", {}).get("cookie")
            if not cookie:
                return sorted(found)

    def _connect(self) -> Any:
        if self._connection is not None:
            return self._connection
        now = self._monotonic()
        order = sorted(
            range(len(self._servers)),
            key=lambda i: (self._down_until.get(self.settings.servers[i], 0.0) > now, i),
        )
        problems = []
        for index in order:
            uri = self.settings.servers[index]
            try:
                self._connection = self._open(self._servers[index], uri)
            except _Unusable as exc:
                problems.append(exc.reason)
                self._down_until[uri] = self._monotonic() + self.settings.retry_dead
                continue
            self._down_until.pop(uri, None)
            self._connected_to = uri
            return self._connection
        raise _Unusable("no LDAP server answered: " + "; ".join(problems))

    def _open(self, server: Any, uri: str) -> Any:
        settings = self.settings
        password = self._password() if settings.bind_dn else None
        conn = ldap3.Connection(
            server,
            user=settings.bind_dn or None,
            password=password,
            auto_bind=ldap3.AUTO_BIND_NONE,
            client_strategy=ldap3.SYNC,
            read_only=True,
            raise_exceptions=False,
            auto_referrals=False,
            auto_escape=False,
            receive_timeout=max(1, math.ceil(settings.timeout)),  # ldap3 wants whole seconds
            return_empty_attributes=False,
        )
        try:
            conn.open()
            if settings.start_tls and not server.ssl:
                conn.start_tls()
            if not conn.bind():
                what = conn.result.get("description") or "refused"
                raise _Unusable(f"{uri}: bind as {settings.bind_dn or 'anonymous'} failed: {what}")
        except _Unusable as exc:
            _quietly_close(conn)
            raise _Unusable(self._redact(exc.reason)) from None
        except Exception as exc:  # LDAPException, OSError, ssl.SSLError, ...
            _quietly_close(conn)
            raise _Unusable(self._failure(uri, exc)) from None
        return conn

    def _server(self, uri: str) -> Any:
        return ldap3.Server(
            uri,
            get_info=ldap3.NONE,
            tls=self._tls,
            connect_timeout=self.settings.timeout,
            mode=ldap3.IP_V4_PREFERRED,
        )

    def _password(self) -> str:
        path = self.settings.bind_password_file
        if path is None:
            return self.settings.bind_password
        try:
            return path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise _Unusable(f"cannot read the bind password file {path}: {exc.strerror}") from None

    def _drop(self) -> None:
        if self._connection is not None:
            _quietly_close(self._connection)
        self._connection = None
        self._connected_to = ""

    # -- texts -----------------------------------------------------------------------------

    def _answer_error(self, conn: Any) -> str:
        result = conn.result or {}
        return self._redact(
            f"{self._connected_to}: search in {self.settings.base_dn} failed: "
            f"{result.get('description') or 'error'} ({result.get('result')})"
        )

    def _failure(self, where: str, exc: BaseException) -> str:
        text = str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError) or "timed out" in text:
            text = f"no answer within {self.settings.timeout:g}s"
        return self._redact(f"{where}: {type(exc).__name__}: {text}")

    def _redact(self, text: str) -> str:
        """Removes the bind password (both sources) from ``text``, whatever put it there."""
        secrets = [self.settings.bind_password]
        path = self.settings.bind_password_file
        if path is not None:
            with contextlib.suppress(OSError):
                secrets.append(path.read_text(encoding="utf-8").rstrip("\r\n"))
        for secret in secrets:
            if secret:
                text = text.replace(secret, "<password>")
        return text


class _Unusable(Exception):
    """This connection or server cannot answer; ``reason`` is already redacted."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _quietly_close(conn: Any) -> None:
    try:
        conn.unbind()
    except Exception:  # closing a broken connection may fail in any way
        try:
            if conn.socket is not None:
                conn.socket.close()
        except OSError:
            pass
