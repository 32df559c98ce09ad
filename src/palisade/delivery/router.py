"""Routing: which transport gets each recipient, and one delivery attempt over all of them.

Owns: the decision local domain -> Maildir (``R=local_maildir T=maildir``), relay domain -> the
SMTP next hop (``R=relay T=smtp``), anything else -> "Unrouteable address". A bounce (an envelope
marked ``extra["bounce_of"]``) to a non-local domain goes to the next hop when one is configured
(it is the smarthost), else it is undeliverable. Domains compare case-insensitively.
Must not touch: delivery state or logs (the runner does both); the spool is only read.
Trust: recipients were accepted by the SMTP session, but the Maildir transport re-checks the
local part before using it as a directory name.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from palisade.delivery.maildir import MailboxRefused, MaildirDelivery
from palisade.delivery.nexthop import SmtpNextHop
from palisade.delivery.outcome import RecipientResult
from palisade.spool import Envelope, Spool, SpoolError

Route = Literal["local", "relay", "none"]


def domain_of(rcpt: str) -> str:
    return rcpt.rpartition("@")[2].lower().rstrip(".")


class Router:
    """Composes the transports. Constructor parameters only; the config module wires them."""

    def __init__(
        self,
        *,
        local_domains: frozenset[str],
        relay_domains: frozenset[str],
        maildir_root: Path,
        next_hop: tuple[str, int] | None,
        helo_name: str,
        require_tls: bool = False,
        tls_context: ssl.SSLContext | None = None,
        connect_timeout: float = 30.0,
        command_timeout: float = 60.0,
        data_timeout: float = 600.0,
        maildir_fsync: bool = True,
        maildir_group: int | None = None,
    ) -> None:
        self.local_domains = frozenset(d.lower().rstrip(".") for d in local_domains)
        self.relay_domains = frozenset(d.lower().rstrip(".") for d in relay_domains)
        self.helo_name = helo_name
        self.maildir = MaildirDelivery(maildir_root, fsync=maildir_fsync, group=maildir_group)
        self.next_hop = (
            None
            if next_hop is None
            else SmtpNextHop(
                next_hop[0],
                next_hop[1],
                helo_name=helo_name,
                require_tls=require_tls,
                tls_context=tls_context,
                connect_timeout=connect_timeout,
                command_timeout=command_timeout,
                data_timeout=data_timeout,
            )
        )

    def close(self) -> None:
        """Closes cached next-hop connections (at shutdown)."""
        if self.next_hop is not None:
            self.next_hop.close_idle()

    def route(self, envelope: Envelope, rcpt: str) -> Route:
        domain = domain_of(rcpt)
        if domain in self.local_domains:
            return "local"
        if domain in self.relay_domains:
            return "relay"
        # Bounces, and mail from relay_from_hosts to other domains (accepted only when a next hop
        # exists), leave through the next hop acting as smarthost.
        outbound = "bounce_of" in envelope.extra or "outbound" in envelope.extra
        if outbound and self.next_hop is not None:
            return "relay"
        return "none"

    async def deliver(
        self,
        spool: Spool,
        envelope: Envelope,
        rcpts: Sequence[str],
        message: bytes | None = None,
    ) -> list[RecipientResult]:
        """One attempt for ``rcpts``; results in the same order. Never raises for I/O trouble.

        ``message``: the message as delivered when the caller already read it (a small queue
        file); otherwise it is read from the spool here.
        """
        routes = {r: self.route(envelope, r) for r in rcpts}
        results: dict[str, RecipientResult] = {}
        local = [r for r in rcpts if routes[r] == "local"]
        relay = [r for r in rcpts if routes[r] == "relay"]
        for rcpt in rcpts:
            if routes[rcpt] == "none":
                bounce = "bounce_of" in envelope.extra
                reason = "bounce undeliverable: no route" if bounce else "Unrouteable address"
                results[rcpt] = RecipientResult(rcpt, "failed", reason, "", "", status="5.4.4")
        if local:
            for res in await asyncio.to_thread(self._deliver_local, spool, envelope, local):
                results[res.rcpt] = res
        if relay:
            for res in await self._deliver_relay(spool, envelope, relay, message):
                results[res.rcpt] = res
        return [results[r] for r in rcpts]

    def _deliver_local(
        self, spool: Spool, envelope: Envelope, rcpts: Sequence[str]
    ) -> list[RecipientResult]:
        out = []
        r, t = "local_maildir", "maildir"
        for rcpt in rcpts:
            try:
                self.maildir.deliver(envelope, rcpt, spool.iter_body(envelope.queue_id))
            except MailboxRefused as exc:
                detail = f"Unrouteable address: {exc}"
                out.append(RecipientResult(rcpt, "failed", detail, r, t, status="5.1.3"))
            except (OSError, SpoolError) as exc:
                errno = exc.errno if isinstance(exc, OSError) and exc.errno else -1
                detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                out.append(RecipientResult(rcpt, "deferred", detail, r, t, errno=errno))
            else:
                out.append(RecipientResult(rcpt, "delivered", "", r, t))
        return out

    async def _deliver_relay(
        self, spool: Spool, envelope: Envelope, rcpts: Sequence[str], message: bytes | None
    ) -> list[RecipientResult]:
        if self.next_hop is None:
            reason = "no next hop configured for a relay domain"
            return [RecipientResult(r, "deferred", reason, "relay", "smtp") for r in rcpts]
        try:
            body = message if message is not None else spool.read_body(envelope.queue_id)
        except (OSError, SpoolError) as exc:
            return [RecipientResult(r, "deferred", str(exc), "relay", "smtp") for r in rcpts]
        return await self.next_hop.deliver(envelope, rcpts, body)
