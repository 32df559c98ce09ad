"""Delivery: everything after the commit, for mail already accepted.

Owns: the queue runner (runner: one attempt per message, retries with backoff, expiry), the
router (router: each recipient to the transport its route names, the route relay control decided
at RCPT and the spool stored with the recipient), the transports (maildir; nexthop over the
hand-written client smtpclient), per-recipient outcomes (outcome) and DSN bounces (dsn). A
message is read once per attempt, through the spool's message handle. "relay" names relay
control only (palisade.policy.relay); this package was ``palisade.relay`` up to 0.4.0.
Must not touch: SMTP sessions, policy (it follows the routes, never decides acceptance).
Trust: the spool's records were written by this gateway and checked by its parser; the message
is the sender's and is passed on as stored, never interpreted; a recipient's mailbox name is
checked so it cannot leave the Maildir root (``maildir``). Next hops' replies are untrusted:
parsed defensively (a malformed one is a failure of the attempt) and escaped by whoever logs them.
"""

from palisade.delivery.dsn import build_dsn
from palisade.delivery.maildir import MailboxRefused, MaildirDelivery, mailbox_name
from palisade.delivery.nexthop import SmtpNextHop
from palisade.delivery.outcome import Outcome, RecipientResult
from palisade.delivery.router import Router
from palisade.delivery.runner import QueueRunner

__all__ = [
    "MailboxRefused",
    "MaildirDelivery",
    "Outcome",
    "QueueRunner",
    "RecipientResult",
    "Router",
    "SmtpNextHop",
    "build_dsn",
    "mailbox_name",
]
