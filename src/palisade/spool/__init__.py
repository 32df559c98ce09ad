"""The durable queue: record format, writer, queue and delivery state, recovery, message handle.

Knows nothing of SMTP or MIME. The modules, in the order a message meets them:

* ``format``: the records of a queue file (envelope line, body, added lines, LATE/ADD/END) and
  their defensive parser;
* ``envelope``: the envelope (with each recipient's route, stored not read) and the delivery
  state, as JSON;
* ``writer``: one message being received, up to the commit point (``commit``: the group commit
  thread that batches directory fsyncs; ``recycle``: reused files);
* ``queue``: :class:`Spool`, the one public face: directory tree, loading, state, removal, listing;
* ``message``: the handle delivery reads a message through, loaded once per attempt;
* ``recovery``: what start-up does after a crash.

Must not touch: SMTP, policy, the server or delivery (import-linter); it stores routes and
states that others decide.
Trust: the message body is the client's and is stored as bytes, never interpreted; queue files
read back are checked by the defensive parser (``CorruptMessage`` for one that does not parse,
never a crash of the queue); paths are built from queue ids this package made, never from text.
"""

from palisade.spool.commit import CommitStats
from palisade.spool.envelope import DeliveryState, Envelope, RecipientState, RecipientStatus
from palisade.spool.errors import CorruptMessage, SpoolError, UnknownMessage
from palisade.spool.message import Message
from palisade.spool.queue import QueueEntry, Spool
from palisade.spool.writer import SpoolWriter

__all__ = [
    "CommitStats",
    "CorruptMessage",
    "DeliveryState",
    "Envelope",
    "Message",
    "QueueEntry",
    "RecipientState",
    "RecipientStatus",
    "Spool",
    "SpoolError",
    "SpoolWriter",
    "UnknownMessage",
]
