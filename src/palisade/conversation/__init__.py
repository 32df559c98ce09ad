"""The SMTP conversation, without I/O: one object per client that the server's session,
``check-host`` and the tests all drive.

Owns: stages, ``delay_reject``, the transaction and its facts, replies, log lines, the Received
header and the headers the DATA stage adds (:mod:`.conversation`, :mod:`.content`). It imports
neither ``server`` nor ``adapters``: checks reach the world through the policy engine's ports,
the spool file is opened by the caller and handed in.
Trust: every event comes from the SMTP core, which has parsed the client's bytes; the values in
it (HELO name, addresses, header text) are still untrusted text, escaped before they reach a log
line or a reply and used as data only.
"""

from palisade.conversation.conversation import (
    Conversation,
    ConversationContext,
    Observer,
    Role,
    Settings,
    Step,
    Transaction,
)

__all__ = [
    "Conversation",
    "ConversationContext",
    "Observer",
    "Role",
    "Settings",
    "Step",
    "Transaction",
]
