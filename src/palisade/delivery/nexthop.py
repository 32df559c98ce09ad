"""SMTP delivery to the next hop: one transaction per queued message, pipelined when offered.

Owns: the outbound SMTP connections, their TLS policy and the mapping of every outcome
to a per-recipient result: 2xx delivered, 4xx / refused connection / timeout / broken connection
temporary, 5xx permanent. The wire protocol is palisade.delivery.smtpclient (hand-written: see its
docstring for why it replaced aiosmtplib).
Pipelining (RFC 2920): when the next hop offers PIPELINING, MAIL FROM, every RCPT TO and DATA go
out in one write and their replies are read in order; the body follows only after DATA's 354 and
only if some recipient was accepted (a 354 with none accepted is answered with a lone ``.``, as
section 3.1 asks). Without PIPELINING each command waits for its reply. A 421 at any point ends
the session: the recipients still open get that reply as a temporary failure.
TLS policy: STARTTLS is used whenever the next hop offers it. With ``require_tls`` (like Postfix's
``smtp_tls_security_level = encrypt``, but also verifying the certificate with ``tls_context``)
the message is never sent in cleartext: no STARTTLS offered, or a failed handshake or
verification, is a TEMPORARY failure with a clear reason. Without it (opportunistic, like Postfix's
``may``), a failed handshake makes the attempt start again in cleartext on a new connection; the
delivery line then has no ``X=`` field.
``tls_context`` None means ``ssl.create_default_context()`` (system CAs, hostname checked).
Connection cache (as Postfix's smtp connection cache): after a successful transaction the
connection is kept for the next message, for at most ``cache_idle`` seconds idle and
``cache_uses`` transactions. A cached connection found dead when reused (or failing in any way
during the transaction, or answering 421 before the data was sent) is closed and the message
tried once more on a fresh one (if it died after the data was sent, the next hop may get the
message twice: a duplicate, never a loss).
One class for a next hop and an MX host: the MX transport (palisade.delivery.mxdelivery) makes
one ``SmtpNextHop`` per (address, MX name, TLS level) and drives it through :meth:`session`, which
also says how the attempt ended (``kind``: the SMTP transaction took place, the host could not be
used, or TLS could not be had) and what TLS gave (for TLS-RPT), so the caller can move on to the
next MX host. ``tls_name`` is the name sent as SNI and checked in the certificate (the MX name
when ``host`` is its address); ``tls_check`` (DANE) sees the peer's chain after the handshake
and may refuse it. Neither changes anything for the next hop of ``[delivery]``.
Must not touch: the spool or the log (the runner does both); it sees the body bytes only.
Trust: every reply from the next hop is remote text: it is kept verbatim in the result and
escaped by whoever logs it. The body is sent as read from the spool (dot-stuffed on the way out),
so it is held whole in memory for the SEND step only (the one place a message is held whole;
bounded by the gateway's message size limit).
"""

from __future__ import annotations

import _ssl
import contextlib
import re
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from palisade.delivery.outcome import Outcome, RecipientResult
from palisade.delivery.smtpclient import SmtpClient, SmtpClientError, SmtpTimeout, mailbox
from palisade.spool import Envelope

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\b")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _helo_name(name: str) -> str:
    """The HELO/EHLO argument: stripped; blanks or control characters in it are a ValueError."""
    name = name.strip()
    if not name:
        raise ValueError("The local_hostname param must not be empty")
    if any(char.isspace() or ord(char) < 32 or ord(char) == 127 for char in name):
        raise ValueError(
            "The local_hostname param contains prohibited whitespace or control characters"
        )
    return name


class _TlsRefused(Exception):
    """STARTTLS was needed and could not be had. ``failure_type``: RFC 8460's result type."""

    def __init__(
        self, reason: str, host_info: str, failure_type: str, ip: str = "", transient: bool = False
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.host_info = host_info
        self.failure_type = failure_type
        self.ip = ip
        self.transient = transient  # the handshake timed out


@dataclass
class _Conn:
    host_info: str
    tls: bool
    uses: int = 0
    idle_since: float = 0.0
    cached: bool = False
    ip: str = ""


SessionKind = Literal["done", "unusable", "tls"]

# OpenSSL's X509_V_ERR_* codes -> RFC 8460 result types (the rest: certificate-not-trusted)
_VERIFY_FAILURES = {62: "certificate-host-mismatch", 10: "certificate-expired"}

TlsCheck = Callable[[list[bytes]], str | None]


@dataclass(frozen=True)
class Session:
    """How one attempt on one host ended.

    ``kind``: "done" (the transaction took place: ``results`` are the host's answers),
    "unusable" (no connection, a greeting or EHLO refusal, a broken connection before the
    transaction: another host may do), "tls" (the TLS the policy demands could not be had:
    ``tls_failure`` is RFC 8460's result type, ``tls_detail`` why). ``tls``: the message went
    over TLS. ``fresh``: a new connection (a TLS session to report), not a cached one.
    """

    results: list[RecipientResult]
    kind: SessionKind
    tls: bool = False
    fresh: bool = True
    ip: str = ""
    tls_failure: str | None = None
    tls_detail: str = ""


def peer_chain(ssl_object: object) -> list[bytes]:
    """The certificates the peer sent (DER, leaf first). Python 3.11 has no public API for the
    chain (``get_unverified_chain`` is public from 3.13); its ``_ssl`` object has had the method
    since 3.10, so it is used when there, else the leaf alone."""
    inner = getattr(ssl_object, "_sslobj", ssl_object)
    getter = getattr(inner, "get_unverified_chain", None)
    if getter is not None:
        try:
            chain = getter() or []
            # _ssl.Certificate.public_bytes; DER is _ssl.ENCODING_DER (the ssl module does not
            # re-export it; 3.13's public method returns bytes already)
            return [
                cert if isinstance(cert, bytes) else cert.public_bytes(_ssl.ENCODING_DER)
                for cert in chain
            ]
        except (AttributeError, ValueError, ssl.SSLError):
            pass
    getpeercert = getattr(ssl_object, "getpeercert", None)
    leaf = getpeercert(binary_form=True) if getpeercert is not None else None
    return [leaf] if leaf else []


def _ssl_failure(exc: BaseException) -> str:
    """RFC 8460's result type for a failed handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_FAILURES.get(exc.verify_code, "certificate-not-trusted")
    return "validation-failure"


class _StaleConnection(Exception):
    """A cached connection turned out to be closed by the next hop."""


class SmtpNextHop:
    """The smarthost / internal mail server at ``host:port``."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        helo_name: str,
        require_tls: bool = False,
        tls_context: ssl.SSLContext | None = None,
        connect_timeout: float = 30.0,
        command_timeout: float = 60.0,
        data_timeout: float = 600.0,
        cache_idle: float = 10.0,
        cache_uses: int = 100,
        tls_name: str | None = None,
        remote_name: str | None = None,
        tls_check: TlsCheck | None = None,
        router: str = "relay",
    ) -> None:
        self.tls_name = tls_name or host
        self.remote_name = remote_name or host
        self.tls_check = tls_check
        self.router = router
        self.active = 0  # sessions in progress (a host in use is never forgotten)
        self.cache_idle = cache_idle
        self.cache_uses = cache_uses
        self._cache: list[tuple[SmtpClient, _Conn]] = []
        self.host = host
        self.port = port
        self.helo_name = helo_name
        self.require_tls = require_tls
        self.tls_context = tls_context if tls_context is not None else ssl.create_default_context()
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout

    def _result(
        self,
        rcpt: str,
        outcome: Outcome,
        detail: str,
        *,
        host: str,
        errno: int = -1,
        status: str = "",
        diagnostic: str = "",
        reply: str = "",
    ) -> RecipientResult:
        return RecipientResult(
            rcpt,
            outcome,
            detail,
            router=self.router,
            transport="smtp",
            host=host,
            reply=reply,
            errno=errno,
            status=status,
            remote_mta=self.remote_name,
            diagnostic=diagnostic,
        )

    def _smtp_error(
        self, rcpts: Sequence[str], code: int, message: str, after: str, conn: _Conn
    ) -> list[RecipientResult]:
        text = _one_line(message)
        outcome: Outcome = "failed" if 500 <= code < 600 else "deferred"
        match = _ENHANCED.match(text)
        status = match.group(1) if match else ("5.0.0" if outcome == "failed" else "4.0.0")
        detail = f"SMTP error from remote mail server after {after}: {code} {text}"
        return [
            self._result(
                r,
                outcome,
                detail,
                host=conn.host_info,
                errno=-44,
                status=status,
                diagnostic=f"smtp; {code} {text}",
            )
            for r in rcpts
        ]

    async def deliver(
        self, envelope: Envelope, rcpts: Sequence[str], body: bytes
    ) -> list[RecipientResult]:
        """One attempt for ``rcpts``; never raises for anything the network does."""
        return (await self.session(envelope, rcpts, body)).results

    async def session(self, envelope: Envelope, rcpts: Sequence[str], body: bytes) -> Session:
        """One attempt for ``rcpts`` and how it ended (see :class:`Session`)."""
        self.active += 1
        try:
            return await self._session(envelope, rcpts, body)
        finally:
            self.active -= 1

    async def _session(self, envelope: Envelope, rcpts: Sequence[str], body: bytes) -> Session:
        try:
            return await self._attempt(envelope, rcpts, body, use_tls=True)
        except _TlsRefused as exc:
            if self.require_tls:
                results = [
                    self._result(
                        r, "deferred", f"TLS required but {exc.reason}", host=exc.host_info
                    )
                    for r in rcpts
                ]
                # a handshake that timed out says nothing about the host's TLS: another
                # host may do, and this one later (never cleartext)
                kind: SessionKind = "unusable" if exc.transient else "tls"
                return Session(
                    results, kind, ip=exc.ip, tls_failure=exc.failure_type, tls_detail=exc.reason
                )
            failure = (exc.failure_type, exc.reason)
        # opportunistic TLS failed: once more in cleartext, and say so
        session = await self._attempt(envelope, rcpts, body, use_tls=False)
        return Session(
            session.results,
            session.kind,
            tls=False,
            fresh=session.fresh,
            ip=session.ip,
            tls_failure=failure[0],
            tls_detail=failure[1],
        )

    def _take_cached(self, use_tls: bool) -> tuple[SmtpClient, _Conn] | None:
        now = time.monotonic()
        while self._cache:
            client, conn = self._cache.pop()
            conn.cached = False
            fresh = now - conn.idle_since < self.cache_idle and client.usable
            if fresh and (conn.tls or not use_tls or not client.supports("starttls")):
                return client, conn
            client.close()
        return None

    def _keep(self, client: SmtpClient, conn: _Conn) -> bool:
        conn.uses += 1
        if conn.uses >= self.cache_uses or not client.usable:
            return False
        conn.idle_since = time.monotonic()
        conn.cached = True
        self._cache.append((client, conn))
        return True

    def close_expired(self) -> int:
        """Closes the cached connections idle for ``cache_idle`` or more (or dead); returns how
        many are still kept. The MX transport calls it for hosts it has not used lately."""
        now = time.monotonic()
        kept: list[tuple[SmtpClient, _Conn]] = []
        for client, conn in self._cache:
            if now - conn.idle_since < self.cache_idle and client.usable:
                kept.append((client, conn))
            else:
                conn.cached = False
                client.close()
        self._cache = kept
        return len(kept)

    def close_idle(self) -> None:
        """Closes every cached connection (at shutdown)."""
        while self._cache:
            client, conn = self._cache.pop()
            conn.cached = False
            client.close()

    async def _attempt(
        self, envelope: Envelope, rcpts: Sequence[str], body: bytes, *, use_tls: bool
    ) -> Session:
        cached = self._take_cached(use_tls)
        if cached is not None:
            client, conn = cached
            try:
                results = await self._transaction(
                    client, envelope, rcpts, body, conn, stale_ok=False
                )
                return Session(results, "done", tls=conn.tls, fresh=False, ip=conn.ip)
            except (_StaleConnection, SmtpClientError, OSError):
                pass  # dead while cached: start again on a fresh connection
            finally:
                if not conn.cached:
                    client.close()
        helo = _helo_name(self.helo_name)
        conn = _Conn(host_info=f"H={self.remote_name}", tls=False)
        fresh: SmtpClient | None = None
        try:
            fresh, greeting = await SmtpClient.connect(
                self.host, self.port, timeout=self.connect_timeout
            )
            peer = fresh.extra_info("peername")
            if isinstance(peer, tuple) and len(peer) >= 2:
                conn.ip = str(peer[0])
            if greeting.code != 220:
                results = self._smtp_error(
                    rcpts, greeting.code, greeting.text, "initial connection", conn
                )
                return Session(results, "unusable", ip=conn.ip)
            if isinstance(peer, tuple) and len(peer) >= 2:
                conn.host_info = f"H={self.remote_name} [{peer[0]}]:{peer[1]}"
            reply = await fresh.ehlo(helo, self.command_timeout)
            if reply.code != 250:
                results = self._smtp_error(rcpts, reply.code, reply.text, "EHLO", conn)
                return Session(results, "unusable", ip=conn.ip)
            if use_tls:
                await self._starttls(fresh, helo, conn)
            results = await self._transaction(fresh, envelope, rcpts, body, conn, stale_ok=True)
            return Session(results, "done", tls=conn.tls, ip=conn.ip)
        except (SmtpClientError, OSError) as exc:
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
            errno = cause.errno if isinstance(cause, OSError) and cause.errno else -1
            reason = _one_line(str(exc)) or type(exc).__name__
            results = [
                self._result(r, "deferred", reason, host=conn.host_info, errno=errno) for r in rcpts
            ]
            return Session(results, "unusable", tls=conn.tls, ip=conn.ip)
        finally:
            if fresh is not None and not conn.cached:
                fresh.close()

    async def _starttls(self, client: SmtpClient, helo: str, conn: _Conn) -> None:
        if not client.supports("starttls"):
            if self.require_tls:
                raise _TlsRefused(
                    "the next hop does not offer STARTTLS",
                    conn.host_info,
                    "starttls-not-supported",
                    conn.ip,
                )
            return
        try:
            reply = await client.command(b"STARTTLS\r\n", self.command_timeout)
            if reply.code == 220:
                await client.starttls(self.tls_context, self.tls_name, self.command_timeout)
                refused_by_check = self._check_peer(client)
                if refused_by_check:
                    raise _TlsRefused(
                        refused_by_check, conn.host_info, "validation-failure", conn.ip
                    )
                reply = await client.ehlo(helo, self.command_timeout)
                refused = reply.code != 250
            else:
                refused = True
        except (SmtpClientError, OSError) as exc:  # ssl.SSLError is an OSError
            raise _TlsRefused(
                f"TLS negotiation failed: {_one_line(str(exc))}",
                conn.host_info,
                _ssl_failure(exc),
                conn.ip,
                # a timeout says nothing about the host's TLS; a server that closes the
                # connection in the handshake (what many do when it fails) is a TLS failure
                transient=isinstance(exc, SmtpTimeout),
            ) from None
        if refused:  # STARTTLS not answered 220, or the EHLO after the handshake not 250
            raise _TlsRefused(
                f"STARTTLS refused: {reply.code} {_one_line(reply.text)}",
                conn.host_info,
                "starttls-not-supported",
                conn.ip,
            )
        ssl_object = client.extra_info("ssl_object")
        if isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
            cipher = ssl_object.cipher()
            version = (ssl_object.version() or "TLS").replace("v", "")
            if cipher:
                conn.host_info += f" X={version}:{cipher[0]}:{cipher[2]}"
            else:
                conn.host_info += f" X={version}"
        conn.tls = True

    def _check_peer(self, client: SmtpClient) -> str | None:
        """``tls_check``'s verdict on the peer's chain (DANE): None when it accepts."""
        if self.tls_check is None:
            return None
        chain = peer_chain(client.extra_info("ssl_object"))
        if not chain:
            return "the server sent no certificate"
        return self.tls_check(chain)

    async def _transaction(
        self,
        client: SmtpClient,
        envelope: Envelope,
        rcpts: Sequence[str],
        body: bytes,
        conn: _Conn,
        *,
        stale_ok: bool,
    ) -> list[RecipientResult]:
        """One transaction. On a cached connection (``stale_ok`` False) a 421 before the data
        raises _StaleConnection instead of deferring, and any error of the client propagates,
        so the caller can reconnect. Results in the order of ``rcpts``."""
        extensions = client.extensions
        options = ""
        encoding = "ascii"
        if "size" in extensions:
            options += f" SIZE={len(body)}"
        if "8bitmime" in extensions and not body.isascii():
            options += " BODY=8BITMIME"
        if not (envelope.sender + "".join(rcpts)).isascii():
            if "smtputf8" not in extensions:
                return [
                    self._result(
                        r,
                        "failed",
                        "non-ASCII address and the next hop does not offer SMTPUTF8",
                        host=conn.host_info,
                        status="5.6.7",
                        diagnostic="smtp; 553 5.6.7 SMTPUTF8 not offered",
                    )
                    for r in rcpts
                ]
            options += " SMTPUTF8"
            encoding = "utf-8"
        mail = b"MAIL FROM:" + mailbox(envelope.sender, encoding) + options.encode() + b"\r\n"
        rcpt_lines = [b"RCPT TO:" + mailbox(r, encoding) + b"\r\n" for r in rcpts]
        pipelining = "pipelining" in extensions
        timeout = self.command_timeout

        # MAIL (with, when pipelining, every RCPT and DATA in the same write)
        client.write(b"".join((mail, *rcpt_lines, b"DATA\r\n")) if pipelining else mail)
        reply = await client.read_reply(timeout)
        if reply.code != 250:
            if reply.code == 421 and not stale_ok:
                raise _StaleConnection
            after = f"MAIL FROM:<{envelope.sender}>"
            return self._smtp_error(rcpts, reply.code, reply.text, after, conn)

        # RCPT, one reply each
        results: dict[str, RecipientResult] = {}
        accepted: list[str] = []
        for n, rcpt in enumerate(rcpts):
            if not pipelining:
                client.write(rcpt_lines[n])
            reply = await client.read_reply(timeout)
            if reply.code == 250 or reply.code == 251:
                accepted.append(rcpt)
                continue
            if reply.code == 421:  # closing: the rest get this reply too
                if not stale_ok:
                    raise _StaleConnection
                open_rcpts = [r for r in rcpts if r not in results]
                for res in self._smtp_error(
                    open_rcpts, reply.code, reply.text, f"RCPT TO:<{rcpt}>", conn
                ):
                    results[res.rcpt] = res
                return [results[r] for r in rcpts]
            (results[rcpt],) = self._smtp_error(
                [rcpt], reply.code, reply.text, f"RCPT TO:<{rcpt}>", conn
            )

        # DATA and the message
        if not accepted:
            # Every recipient has its answer; a pipelined DATA still gets its reply read, and a
            # 354 (the server had to accept DATA without a recipient) an empty message.
            if pipelining:
                with contextlib.suppress(SmtpClientError, OSError):
                    reply = await client.read_reply(timeout)
                    if reply.code == 354:
                        reply = await client.command(b".\r\n", timeout)
                    if reply.code != 421:
                        await client.command(b"QUIT\r\n", timeout)
            else:
                with contextlib.suppress(SmtpClientError, OSError):
                    await client.command(b"QUIT\r\n", timeout)
            return [results[r] for r in rcpts]
        if not pipelining:
            client.write(b"DATA\r\n")
        reply = await client.read_reply(timeout)
        if reply.code == 354:
            client.write_data(body)
            reply = await client.read_reply(self.data_timeout)
            sent = reply.code == 250
        elif reply.code == 421 and not stale_ok:
            raise _StaleConnection
        else:
            sent = False  # DATA refused (any reply but 354, even a 2xx): nothing was sent
        if not sent:
            errors = self._smtp_error(accepted, reply.code, reply.text, "end of data", conn)
            for res in errors:
                results[res.rcpt] = res
        else:
            confirmation = _one_line(f"{reply.code} {reply.text}")
            for r in accepted:
                results[r] = self._result(
                    r, "delivered", confirmation, host=conn.host_info, reply=confirmation
                )
            if len(accepted) == len(rcpts) and self._keep(client, conn):
                return [results[r] for r in rcpts]
        if reply.code != 421:
            with contextlib.suppress(SmtpClientError, OSError):
                await client.command(b"QUIT\r\n", timeout)
        return [results[r] for r in rcpts]
