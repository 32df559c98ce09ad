"""Shared helpers for the spool tests: envelopes with fresh queue ids."""

from __future__ import annotations

import time

from palisade.obs.queueid import QueueIdGenerator
from palisade.spool import Envelope

IDS = QueueIdGenerator()


def make_envelope(
    sender: str = "alice@example.org",
    recipients: tuple[str, ...] = ("bob@example.com",),
    received_at: float | None = None,
) -> Envelope:
    return Envelope(
        queue_id=IDS.new(),
        sender=sender,
        recipients=recipients,
        received_at=time.time() if received_at is None else received_at,
        client_ip="192.0.2.1",
        client_port=40000,
        helo="mx.example.org",
        client_name="mx.example.org",
        protocol="esmtps",
        tls="TLS1.3:TLS_AES_256_GCM_SHA384:256",
        message_id="<m1@example.org>",
    )
