"""Delivery: routing, Maildir, the SMTP next hop, the queue runner with retries, DSN bounces."""

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
