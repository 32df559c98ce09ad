"""Delivery: routing, Maildir, the SMTP next hop, the queue runner with retries, DSN bounces."""

from palisade.relay.dsn import build_dsn
from palisade.relay.maildir import MailboxRefused, MaildirDelivery, mailbox_name
from palisade.relay.nexthop import SmtpNextHop
from palisade.relay.outcome import Outcome, RecipientResult
from palisade.relay.router import Route, Router
from palisade.relay.runner import QueueRunner

__all__ = [
    "MailboxRefused",
    "MaildirDelivery",
    "Outcome",
    "QueueRunner",
    "RecipientResult",
    "Route",
    "Router",
    "SmtpNextHop",
    "build_dsn",
    "mailbox_name",
]
