"""Verdicts: what a rule may conclude. Only the conversation turns them into SMTP replies.

Owns: the verbs of an exim-style ACL (accept, accept_all, deny, drop, defer, warn), one type for
what a rule is configured to do and what a verdict concludes, and the pair of texts a rule
carries: ``message`` for the client (terse, unhelpful to spammers) and ``log_message`` for the
operator. Imports nothing but the SMTP reply type.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from palisade.smtp.replies import Reply


class Verb(enum.Enum):
    """What a rule does when its condition holds (the TOML ``verb``), and what a verdict says."""

    ACCEPT = "accept"  # ends this stage's checks
    ACCEPT_ALL = "accept_all"  # ends every remaining check of the connection
    DENY = "deny"  # 5xx, the conversation goes on
    DROP = "drop"  # 5xx, then the connection is closed
    DEFER = "defer"  # 4xx
    WARN = "warn"  # log line and/or header; checking goes on


@dataclass(frozen=True, slots=True)
class Verdict:
    """A decision with the reply the client gets and the line the log gets."""

    action: Verb  # accept, deny, drop or defer (a verdict is never warn or accept_all)
    reply: Reply | None
    log_message: str
    rule: str = ""  # the rule that decided ("" for verdicts that are not a rule's)
    incident: int = 0  # incidents this refusal records for the client (the rule's weight)

    @property
    def closes(self) -> bool:
        return self.action is Verb.DROP


def deny(code: int, enhanced: str, message: str, log_message: str) -> Verdict:
    action = Verb.DEFER if 400 <= code < 500 else Verb.DENY
    return Verdict(action, Reply(code, enhanced, message), log_message)


ACCEPT = Verdict(Verb.ACCEPT, None, "")
