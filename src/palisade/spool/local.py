"""Queueing a message made on this machine (a report, a notice) as if it had been received.

Owns: :func:`queue_local`: the envelope of a locally made message (client 127.0.0.1, protocol
``local``, the routes the caller decided) and its commit into ``queue/`` through the ordinary
writer, so it is as durable as received mail (fsynced before this returns). A running gateway's
queue runner finds it at its next spool scan (``[delivery]``'s scan interval, 10 s): no signal
is needed, and the gateway need not even be running when it is queued.
Must not touch: the message bytes (the caller made them whole: headers, signature, body),
routing decisions (the caller's), SMTP.
Trust: the caller is this program; the bytes are stored as given.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from palisade.obs.queueid import QueueIdGenerator
from palisade.ports import Route
from palisade.spool.envelope import Envelope
from palisade.spool.queue import Spool

__all__ = ["queue_local"]


async def queue_local(
    spool: Spool,
    *,
    sender: str,
    recipients: Sequence[str],
    routes: Sequence[Route],
    data: bytes,
    helo: str,
    message_id: str | None = None,
    extra: Mapping[str, str] | None = None,
    ids: QueueIdGenerator | None = None,
    now: float | None = None,
) -> str:
    """Commits ``data`` for ``recipients`` (one route each) and returns its queue id. Raises
    ``OSError`` when the spool cannot take it (nothing is left behind then)."""
    if len(routes) != len(recipients) or not recipients:
        raise ValueError("one route per recipient, at least one recipient")
    queue_id = (ids or QueueIdGenerator()).new()
    envelope = Envelope(
        queue_id=queue_id,
        sender=sender,
        recipients=tuple(recipients),
        received_at=time.time() if now is None else now,
        client_ip="127.0.0.1",
        client_port=0,
        helo=helo,
        client_name=None,
        protocol="local",
        tls=None,
        message_id=message_id,
        extra=dict(extra or {}),
        routes=tuple(routes),
    )
    writer = spool.open_message(envelope)
    try:
        writer.write(data)
        writer.message_id = message_id
        await writer.commit()
    except BaseException:
        writer.abort()
        raise
    return queue_id
