"""Routing: which transport gets each recipient, and one delivery attempt over all of them.

Owns: following each recipient's :class:`palisade.ports.Route`, decided once at RCPT by relay
control and stored with the recipient in the spool envelope: ``LOCAL`` -> Maildir
(``R=local_maildir T=maildir``), ``RELAY`` -> the SMTP next hop (``R=relay T=smtp``; deferred
while none is configured), ``OUTBOUND`` (relay_from_hosts' mail to other domains, and bounces to
them) -> the MX hosts of each recipient domain when an ``outbound`` transport is given
(``[outbound] delivery = "mx"``: palisade.delivery.mxdelivery, ``R=dnslookup T=smtp``), else the
next hop as smarthost, or "Unrouteable address" when there is none.
The router decides a route itself in two cases only, from its domain sets: a bounce the runner
queues (:meth:`Router.bounce_route`, stored with it like an RCPT route), and a recipient of a
spool file written before routes were stored (:meth:`Router.fallback_route`). Domains compare
case-insensitively.
Must not touch: delivery state or logs (the runner does both), the spool (it reads the message
through the handle the runner loaded once per attempt: palisade.spool.message).
Trust: recipients were accepted by the SMTP session, but the Maildir transport re-checks the
local part before using it as a directory name.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from pathlib import Path

from palisade.delivery.maildir import MailboxRefused, MaildirDelivery
from palisade.delivery.mxdelivery import MxDelivery
from palisade.delivery.nexthop import SmtpNextHop
from palisade.delivery.outcome import RecipientResult
from palisade.ports import Route
from palisade.spool import Envelope, Message, SpoolError


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
        outbound: MxDelivery | None = None,
    ) -> None:
        self.outbound = outbound
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
        if self.outbound is not None:
            self.outbound.close_idle()

    def domain_route(self, rcpt: str) -> Route | None:
        """``LOCAL`` or ``RELAY`` by the domain of ``rcpt``; None for any other domain."""
        domain = domain_of(rcpt)
        if domain in self.local_domains:
            return Route.LOCAL
        if domain in self.relay_domains:
            return Route.RELAY
        return None

    def bounce_route(self, rcpt: str) -> Route:
        """The route of a bounce to ``rcpt`` (the original sender), stored when it is queued.

        Not a local or relay domain: ``OUTBOUND``, which leaves through the next hop acting as
        smarthost, or is undeliverable when there is none.
        """
        return self.domain_route(rcpt) or Route.OUTBOUND

    def fallback_route(self, envelope: Envelope, rcpt: str) -> Route | None:
        """The route of a recipient stored without one, worked out as before routes were stored.

        Only spool files written by versions up to 0.4.0 lack routes. This method (with the
        ``outbound`` mark in ``extra`` that those files carry) can go once no such file can be
        left in any queue: ``[delivery] max_age`` (5 days by default) after every gateway was
        upgraded past 0.4.0.
        """
        route = self.domain_route(rcpt)
        if route is None and ("bounce_of" in envelope.extra or "outbound" in envelope.extra):
            return Route.OUTBOUND
        return route

    def routes(self, envelope: Envelope, rcpts: Sequence[str]) -> dict[str, Route | None]:
        """The route of each of ``rcpts``: as stored at RCPT, else :meth:`fallback_route`."""
        stored = dict(zip(envelope.recipients, envelope.routes, strict=False))
        return {r: stored.get(r) or self.fallback_route(envelope, r) for r in rcpts}

    async def deliver(
        self, envelope: Envelope, rcpts: Sequence[str], message: Message
    ) -> list[RecipientResult]:
        """One attempt for ``rcpts``; results in the same order. Never raises for I/O trouble.

        ``message`` is the handle the runner loaded once for this attempt: every Maildir copy
        and the next hop read the message from it.
        """
        routes = self.routes(envelope, rcpts)
        results: dict[str, RecipientResult] = {}
        local = [r for r in rcpts if routes[r] is Route.LOCAL]
        world = self.outbound is not None
        hop = self.next_hop is not None or world
        relay = [
            r
            for r in rcpts
            if routes[r] is Route.RELAY or (routes[r] is Route.OUTBOUND and hop and not world)
        ]
        outbound = [r for r in rcpts if routes[r] is Route.OUTBOUND and world]
        for rcpt in rcpts:
            if routes[rcpt] is None or (routes[rcpt] is Route.OUTBOUND and not hop):
                bounce = "bounce_of" in envelope.extra
                reason = "bounce undeliverable: no route" if bounce else "Unrouteable address"
                results[rcpt] = RecipientResult(rcpt, "failed", reason, "", "", status="5.4.4")
        if local:
            for res in await asyncio.to_thread(self._deliver_local, envelope, local, message):
                results[res.rcpt] = res
        if relay:
            for res in await self._deliver_relay(envelope, relay, message):
                results[res.rcpt] = res
        if outbound:
            for res in await self._deliver_outbound(envelope, outbound, message):
                results[res.rcpt] = res
        return [results[r] for r in rcpts]

    async def _deliver_outbound(
        self, envelope: Envelope, rcpts: Sequence[str], message: Message
    ) -> list[RecipientResult]:
        assert self.outbound is not None
        try:
            body = message.read()
        except (OSError, SpoolError) as exc:
            return [RecipientResult(r, "deferred", str(exc), "dnslookup", "smtp") for r in rcpts]
        return await self.outbound.deliver(envelope, rcpts, body)

    def _deliver_local(
        self, envelope: Envelope, rcpts: Sequence[str], message: Message
    ) -> list[RecipientResult]:
        out = []
        r, t = "local_maildir", "maildir"
        for rcpt in rcpts:
            try:
                self.maildir.deliver(envelope, rcpt, message.chunks())
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
        self, envelope: Envelope, rcpts: Sequence[str], message: Message
    ) -> list[RecipientResult]:
        if self.next_hop is None:
            reason = "no next hop configured for a relay domain"
            return [RecipientResult(r, "deferred", reason, "relay", "smtp") for r in rcpts]
        try:
            body = message.read()  # in memory already for a small file: no copy, no I/O
        except (OSError, SpoolError) as exc:
            return [RecipientResult(r, "deferred", str(exc), "relay", "smtp") for r in rcpts]
        return await self.next_hop.deliver(envelope, rcpts, body)
