"""The durable queue: message files with an END record, group commit, delivery state, recovery.

Knows nothing of SMTP or MIME; see :mod:`palisade.spool.store` for the format and the guarantees.
"""

from palisade.spool.commit import CommitStats
from palisade.spool.envelope import DeliveryState, Envelope, RecipientState, RecipientStatus
from palisade.spool.store import (
    CorruptMessage,
    QueueEntry,
    Spool,
    SpoolError,
    SpoolWriter,
    UnknownMessage,
)

__all__ = [
    "CommitStats",
    "CorruptMessage",
    "DeliveryState",
    "Envelope",
    "QueueEntry",
    "RecipientState",
    "RecipientStatus",
    "Spool",
    "SpoolError",
    "SpoolWriter",
    "UnknownMessage",
]
