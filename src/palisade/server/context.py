"""What every session of one process shares: config, log, spool, policy, TLS, queue ids.

Owns nothing but references; the composition root (``app``) builds it and swaps its fields on
reload, so a reload changes what new commands see without touching sessions mid-command.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from palisade.config import Config
from palisade.config.policy import Policy
from palisade.obs.log import EventLog
from palisade.obs.queueid import QueueIdGenerator
from palisade.policy.relay import RelayPolicy
from palisade.policy.rules import IPAddress, Ports
from palisade.spool import Spool


@dataclass
class ServerContext:
    config: Config
    log: EventLog
    spool: Spool
    relay_policy: RelayPolicy
    tls_context: ssl.SSLContext | None
    queue_ids: QueueIdGenerator
    submit: Callable[[str], None]
    policy: Policy
    ports: Ports
    our_ips: frozenset[IPAddress] = frozenset()
    draining: bool = False
    # DNSBL zone -> when (monotonic) its failure last went to the panic log: once per probe
    # interval per zone, however many lookups fail (each is in the main log).
    zone_failure_reported: dict[str, float] = field(default_factory=dict)
