"""Report mails: their destinations (``mailto:`` URIs with a size limit), the MIME message,
the DKIM signature and the spool.

Owns: :func:`mailto_destinations` (RFC 7489 section 6.2 ``dmarc-uri``: ``mailto:addr!10m``;
RFC 8460's ``rua=mailto:...``), :func:`report_message` (a multipart mail with one compressed
attachment, CRLF line ends), and :class:`Outbox`: signs a mail with the ``[dkim]`` key of its
From domain when there is one, and queues it with :func:`palisade.spool.local.queue_local`, one
route per recipient (local and relay domains as for received mail, any other domain
``OUTBOUND``), for the running gateway to deliver.
Must not touch: what the reports say (``dmarc_send``, ``tlsrpt_send``), delivery.
Trust: URIs come from DNS records anybody may publish: only ``mailto:`` with one syntactically
plain address is used (no header fields from ``?...``), at most :data:`MAX_DESTINATIONS`.
"""

from __future__ import annotations

import email.policy
import email.utils
import re
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.message import EmailMessage

from palisade.adapters.dkim_signer import DkimSigner
from palisade.obs.queueid import QueueIdGenerator
from palisade.ports import Route, UnsignableMessage
from palisade.spool import Spool
from palisade.spool.local import queue_local

__all__ = ["Destination", "Outbox", "mailto_destinations", "report_message"]

MAX_DESTINATIONS = 8
_ADDRESS = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$"
)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


@dataclass(frozen=True, slots=True)
class Destination:
    """One report address and the largest report it takes (None: no limit given)."""

    address: str
    limit: int | None = None

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()


def mailto_destinations(uris: Iterable[str]) -> tuple[list[Destination], list[str]]:
    """(usable mailto destinations, the URIs skipped with why) from a record's URI list."""
    found: list[Destination] = []
    skipped: list[str] = []
    for raw in uris:
        uri = raw.strip()
        limit: int | None = None
        match = re.fullmatch(r"(.*)!(\d{1,12})([kmgt]?)", uri, re.IGNORECASE)
        if match:
            uri = match.group(1)
            limit = int(match.group(2)) * _UNITS[match.group(3).lower()]
        scheme, _, rest = uri.partition(":")
        if scheme.lower() != "mailto":
            skipped.append(f"{raw}: not a mailto: URI (only mail is sent)")
            continue
        address = urllib.parse.unquote(rest.partition("?")[0]).strip()
        if not _ADDRESS.match(address) or "," in address:
            skipped.append(f"{raw}: not one plain mail address")
            continue
        if len(found) >= MAX_DESTINATIONS:
            skipped.append(f"{raw}: more than {MAX_DESTINATIONS} destinations")
            continue
        domain_part = address.rpartition("@")[2].lower()
        found.append(Destination(f"{address.rpartition('@')[0]}@{domain_part}", limit))
    return found, skipped


def report_message(
    *,
    sender: str,
    recipients: Sequence[str],
    subject: str,
    text: str,
    attachment: bytes,
    content_type: str,
    filename: str,
    message_id: str,
    extra_headers: Sequence[tuple[str, str]] = (),
    report_type: str | None = None,
    now: float | None = None,
) -> bytes:
    """The report mail: a short text part and the attachment (base64), CRLF line ends.
    ``report_type``: a ``multipart/report`` of that report-type (RFC 8460 section 5.3) instead
    of ``multipart/mixed``."""
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = subject
    message["Date"] = email.utils.formatdate(now, usegmt=True)
    message["Message-ID"] = message_id
    for name, value in extra_headers:
        message[name] = value
    message.set_content(text)
    maintype, _, subtype = content_type.partition("/")
    message.add_attachment(attachment, maintype=maintype, subtype=subtype, filename=filename)
    if report_type is not None:
        message.replace_header("Content-Type", f'multipart/report; report-type="{report_type}"')
        # replace_header drops the boundary: put the one the parts were made with back
        message.set_boundary(message.get_boundary() or email.utils.make_msgid().strip("<>@."))
    return message.as_bytes()


class Outbox:
    """Signs and queues report mails in one spool."""

    def __init__(
        self,
        spool: Spool,
        *,
        helo: str,
        signer: DkimSigner | None,
        local_domains: Iterable[str] = (),
        relay_domains: Iterable[str] = (),
    ) -> None:
        self.spool = spool
        self.helo = helo
        self.signer = signer
        self.local = frozenset(d.lower().rstrip(".") for d in local_domains)
        self.relay = frozenset(d.lower().rstrip(".") for d in relay_domains)
        self.ids = QueueIdGenerator()

    def route(self, address: str) -> Route:
        domain = address.rpartition("@")[2].lower().rstrip(".")
        if domain in self.local:
            return Route.LOCAL
        if domain in self.relay:
            return Route.RELAY
        return Route.OUTBOUND

    def sign(self, data: bytes, from_address: str) -> tuple[bytes, str]:
        """(the mail, signed when a key covers the From domain; what was done, for the
        operator). A key that cannot be used raises ``SigningKeyError``: like received mail,
        a report is never sent unsigned for a broken key."""
        if self.signer is None:
            return data, "not DKIM-signed: [dkim] has no keys"
        domain = self.signer.signing_domain(from_address.rpartition("@")[2].lower())
        if domain is None:
            return data, f"not DKIM-signed: no [dkim] key for {from_address.rpartition('@')[2]}"
        try:
            signature = self.signer.sign_bytes(data, domain)
        except UnsignableMessage as exc:
            return data, f"not DKIM-signed: {exc.reason}"
        return signature.lines + data, f"DKIM-signed d={signature.domain}"

    async def queue(
        self, data: bytes, *, sender: str, recipients: Sequence[str], message_id: str, kind: str
    ) -> str:
        """Queues the mail; returns its queue id. Raises OSError when the spool refuses."""
        return await queue_local(
            self.spool,
            sender=sender,
            recipients=recipients,
            routes=[self.route(r) for r in recipients],
            data=data,
            helo=self.helo,
            message_id=message_id,
            extra={"report": kind},
            ids=self.ids,
        )
