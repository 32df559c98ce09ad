"""What one delivery attempt says about one recipient: delivered, deferred (retry) or failed.

Owns: the result record every transport returns and the runner turns into log lines, state and
DSNs. Must not touch: files, sockets, the log. Trust: ``detail`` and ``reply`` may hold remote
text; they are escaped when logged and sanitised when put into a DSN, never here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Outcome = Literal["delivered", "deferred", "failed"]


@dataclass(frozen=True)
class RecipientResult:
    """The outcome for one recipient of one attempt.

    ``router`` / ``transport`` name the route as exim does (``R=`` / ``T=``); ``host`` is the
    ``H=host [ip]:port X=...`` part for SMTP; ``reply`` the remote confirmation (``C="..."``);
    ``errno`` exim's defer number (an OS errno, ``-44`` for an SMTP reply, ``-1`` otherwise);
    ``status`` an enhanced status code for the DSN (``5.1.1``), ``remote_mta`` the next hop's name.
    """

    rcpt: str
    outcome: Outcome
    detail: str
    router: str
    transport: str
    host: str = ""
    reply: str = ""
    errno: int = -1
    status: str = ""
    remote_mta: str = ""
    diagnostic: str = ""
