"""SMTP delivery to the next hop with aiosmtplib: one transaction per queued message.

Owns: the outbound SMTP connections, their TLS policy and the mapping of every outcome
to a per-recipient result: 2xx delivered, 4xx / refused connection / timeout / broken connection
temporary, 5xx permanent.
TLS policy: STARTTLS is used whenever the next hop offers it. With ``require_tls`` (like Postfix's
``smtp_tls_security_level = encrypt``, but also verifying the certificate with ``tls_context``)
the message is never sent in cleartext: no STARTTLS offered, or a failed handshake or
verification, is a TEMPORARY failure with a clear reason. Without it (opportunistic, like Postfix's
``may``), a failed handshake makes the attempt start again in cleartext on a new connection; the
delivery line then has no ``X=`` field.
``tls_context`` None means ``ssl.create_default_context()`` (system CAs, hostname checked).
Connection cache (as Postfix's smtp connection cache): after a successful transaction the
connection is kept for the next message, for at most ``cache_idle`` seconds idle and
``cache_uses`` transactions. A cached connection found dead when reused is closed and the
message tried once more on a fresh one (if it died after the data was sent, the next hop may get
the message twice: a duplicate, never a loss).
Must not touch: the spool or the log (the runner does both); it sees the body bytes only.
Trust: every reply from the next hop is remote text: it is kept verbatim in the result and
escaped by whoever logs it. The body is sent as read from the spool; aiosmtplib wants the whole
message as one ``bytes`` for DATA, so the body is read into memory for the SEND step only (the
one place a message is held whole; bounded by the gateway's message size limit).
"""

from __future__ import annotations

import contextlib
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiosmtplib

from palisade.relay.outcome import Outcome, RecipientResult
from palisade.spool import Envelope

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\b")


def _one_line(text: str) -> str:
    return " ".join(text.split())


class _TlsRefused(Exception):
    """STARTTLS was needed and could not be had."""

    def __init__(self, reason: str, host_info: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.host_info = host_info


@dataclass
class _Conn:
    host_info: str
    tls: bool
    uses: int = 0
    idle_since: float = 0.0


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
    ) -> None:
        self.cache_idle = cache_idle
        self.cache_uses = cache_uses
        self._cache: list[tuple[aiosmtplib.SMTP, _Conn]] = []
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
            router="relay",
            transport="smtp",
            host=host,
            reply=reply,
            errno=errno,
            status=status,
            remote_mta=self.host,
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
        try:
            return await self._attempt(envelope, rcpts, body, use_tls=True)
        except _TlsRefused as exc:
            if self.require_tls:
                return [
                    self._result(
                        r, "deferred", f"TLS required but {exc.reason}", host=exc.host_info
                    )
                    for r in rcpts
                ]
        # opportunistic TLS failed: once more in cleartext, and say so
        results = await self._attempt(envelope, rcpts, body, use_tls=False)
        return results

    def _take_cached(self, use_tls: bool) -> tuple[aiosmtplib.SMTP, _Conn] | None:
        now = time.monotonic()
        while self._cache:
            smtp, conn = self._cache.pop()
            fresh = now - conn.idle_since < self.cache_idle and smtp.is_connected
            if fresh and (conn.tls or not use_tls or not self._tls_possible(smtp)):
                return smtp, conn
            smtp.close()
        return None

    @staticmethod
    def _tls_possible(smtp: aiosmtplib.SMTP) -> bool:
        return smtp.supports_extension("starttls")

    def _keep(self, smtp: aiosmtplib.SMTP, conn: _Conn) -> bool:
        conn.uses += 1
        if conn.uses >= self.cache_uses or not smtp.is_connected:
            return False
        conn.idle_since = time.monotonic()
        self._cache.append((smtp, conn))
        return True

    def close_idle(self) -> None:
        """Closes every cached connection (at shutdown)."""
        while self._cache:
            self._cache.pop()[0].close()

    async def _attempt(
        self, envelope: Envelope, rcpts: Sequence[str], body: bytes, *, use_tls: bool
    ) -> list[RecipientResult]:
        cached = self._take_cached(use_tls)
        if cached is not None:
            smtp, conn = cached
            try:
                return await self._transaction(smtp, envelope, rcpts, body, conn, stale_ok=False)
            except (_StaleConnection, aiosmtplib.SMTPException, OSError, TimeoutError):
                smtp.close()  # dead while cached: start again on a fresh connection
        smtp = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            local_hostname=self.helo_name,
            timeout=self.command_timeout,
            start_tls=False,
            tls_context=self.tls_context,
        )
        conn = _Conn(host_info=f"H={self.host}", tls=False)
        try:
            try:
                await smtp.connect(timeout=self.connect_timeout)
            except aiosmtplib.SMTPResponseException as exc:
                return self._smtp_error(rcpts, exc.code, exc.message, "initial connection", conn)
            peer = smtp.get_transport_info("peername")
            if isinstance(peer, tuple) and len(peer) >= 2:
                conn.host_info = f"H={self.host} [{peer[0]}]:{peer[1]}"
            try:
                await smtp.ehlo()
            except aiosmtplib.SMTPResponseException as exc:
                return self._smtp_error(rcpts, exc.code, exc.message, "EHLO", conn)
            if use_tls:
                await self._starttls(smtp, conn)
            return await self._transaction(smtp, envelope, rcpts, body, conn, stale_ok=True)
        except _TlsRefused:
            raise
        except aiosmtplib.SMTPResponseException as exc:
            return self._smtp_error(rcpts, exc.code, exc.message, "a command", conn)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
            errno = cause.errno if isinstance(cause, OSError) and cause.errno else -1
            reason = _one_line(str(exc)) or type(exc).__name__
            return [
                self._result(r, "deferred", reason, host=conn.host_info, errno=errno) for r in rcpts
            ]
        finally:
            if not any(smtp is cached_smtp for cached_smtp, _ in self._cache):
                smtp.close()

    async def _starttls(self, smtp: aiosmtplib.SMTP, conn: _Conn) -> None:
        if not smtp.supports_extension("starttls"):
            if self.require_tls:
                raise _TlsRefused("the next hop does not offer STARTTLS", conn.host_info)
            return
        try:
            await smtp.starttls(server_hostname=self.host, tls_context=self.tls_context)
            await smtp.ehlo()
        except aiosmtplib.SMTPResponseException as exc:
            raise _TlsRefused(
                f"STARTTLS refused: {exc.code} {_one_line(exc.message)}", conn.host_info
            ) from None
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError, TimeoutError) as exc:
            raise _TlsRefused(
                f"TLS negotiation failed: {_one_line(str(exc))}", conn.host_info
            ) from None
        ssl_object = smtp.get_transport_info("ssl_object")
        if isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
            cipher = ssl_object.cipher()
            version = (ssl_object.version() or "TLS").replace("v", "")
            if cipher:
                conn.host_info += f" X={version}:{cipher[0]}:{cipher[2]}"
            else:
                conn.host_info += f" X={version}"
        conn.tls = True

    async def _transaction(
        self,
        smtp: aiosmtplib.SMTP,
        envelope: Envelope,
        rcpts: Sequence[str],
        body: bytes,
        conn: _Conn,
        *,
        stale_ok: bool,
    ) -> list[RecipientResult]:
        """One transaction; on a cached connection (``stale_ok`` False) a dead connection at
        MAIL raises _StaleConnection instead of deferring, so the caller can reconnect."""
        options: list[str] = []
        encoding = "ascii"
        if smtp.supports_extension("size"):
            options.append(f"SIZE={len(body)}")
        if smtp.supports_extension("8bitmime") and not body.isascii():
            options.append("BODY=8BITMIME")
        if not (envelope.sender + "".join(rcpts)).isascii():
            if not smtp.supports_extension("smtputf8"):
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
            options.append("SMTPUTF8")
            encoding = "utf-8"
        try:
            await smtp.mail(envelope.sender, options=options, encoding=encoding)
        except aiosmtplib.SMTPServerDisconnected:
            if stale_ok:
                raise
            raise _StaleConnection from None
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code == 421 and not stale_ok:
                raise _StaleConnection from None
            after = f"MAIL FROM:<{envelope.sender}>"
            return self._smtp_error(rcpts, exc.code, exc.message, after, conn)
        results: dict[str, RecipientResult] = {}
        accepted: list[str] = []
        for rcpt in rcpts:
            try:
                await smtp.rcpt(rcpt, encoding=encoding)
                accepted.append(rcpt)
            except aiosmtplib.SMTPResponseException as exc:
                (results[rcpt],) = self._smtp_error(
                    [rcpt], exc.code, exc.message, f"RCPT TO:<{rcpt}>", conn
                )
        if accepted:
            try:
                reply = await smtp.data(body, timeout=self.data_timeout)
            except aiosmtplib.SMTPResponseException as exc:
                for r, res in zip(
                    accepted,
                    self._smtp_error(accepted, exc.code, exc.message, "end of data", conn),
                    strict=True,
                ):
                    results[r] = res
            else:
                confirmation = _one_line(f"{reply.code} {reply.message}")
                for r in accepted:
                    results[r] = self._result(
                        r, "delivered", confirmation, host=conn.host_info, reply=confirmation
                    )
                if len(accepted) == len(rcpts) and self._keep(smtp, conn):
                    return [results[r] for r in rcpts]
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await smtp.quit()
        return [results[r] for r in rcpts]
