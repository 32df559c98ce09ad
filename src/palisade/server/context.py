"""What every session of one process shares: the log, the spool, queue ids, the way to the queue
runner, shutdown state, and where to find the newest generation.

Owns nothing but references and two pieces of process state (``draining``, the DNSBL failure
reports). Everything built from the config lives in a
:class:`~palisade.server.generation.Generation`, never here: the listener asks ``current()`` for
the newest one when a client connects, and the session keeps that one to its end, so a reload
never changes the rules, the clients or the domains under a conversation in progress.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from palisade.feedback.incidents import IncidentRecorder
from palisade.obs.factsfile import FactsFile
from palisade.obs.log import EventLog
from palisade.obs.queueid import QueueIdGenerator
from palisade.server.generation import Generation
from palisade.spool import Spool


@dataclass
class ServerContext:
    log: EventLog
    spool: Spool
    queue_ids: QueueIdGenerator
    submit: Callable[[str], None]
    current: Callable[[], Generation]  # this process's newest generation
    incidents: IncidentRecorder  # writes the sessions' incidents behind their replies
    facts: FactsFile | None = None  # where connections' facts lines go ([record] facts)
    draining: bool = False
    # DNSBL zone -> when (monotonic) its failure last went to the panic log: once per probe
    # interval per zone, however many lookups fail (each is in the main log).
    zone_failure_reported: dict[str, float] = field(default_factory=dict)
