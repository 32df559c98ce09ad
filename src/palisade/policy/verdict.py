"""Verdicts: what a check may conclude. Only the server core turns them into SMTP replies.

Owns: the five verbs of an exim-style ACL (accept, deny, drop, defer, warn) and the pair of texts a
rule carries: ``message`` for the client (terse, unhelpful to spammers) and ``log_message`` for the
operator. Imports nothing but the SMTP reply type.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from palisade.smtp.replies import Reply


class Action(enum.Enum):
    ACCEPT = "accept"
    DENY = "deny"  # 5xx, the conversation goes on
    DROP = "drop"  # 5xx, then the connection is closed
    DEFER = "defer"  # 4xx
    WARN = "warn"  # log (and maybe a header), checking goes on


@dataclass(frozen=True, slots=True)
class Verdict:
    """A decision with the reply the client gets and the line the log gets."""

    action: Action
    reply: Reply | None
    log_message: str

    @property
    def refuses(self) -> bool:
        return self.action in (Action.DENY, Action.DROP, Action.DEFER)

    @property
    def closes(self) -> bool:
        return self.action is Action.DROP


def deny(code: int, enhanced: str, message: str, log_message: str) -> Verdict:
    action = Action.DEFER if 400 <= code < 500 else Action.DENY
    return Verdict(action, Reply(code, enhanced, message), log_message)


ACCEPT = Verdict(Action.ACCEPT, None, "")
