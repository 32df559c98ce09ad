"""Delivery status notifications (RFC 3464 multipart/report) for mail that was accepted and failed.

Owns: the text of a bounce: a human-readable part, a ``message/delivery-status`` part (one block
per failed recipient: Final-Recipient, Action: failed, Status, Remote-MTA, Diagnostic-Code) and the
original message's headers as ``text/rfc822-headers``. Built with the stdlib ``email`` package.
Must not touch: the spool, the network, the log: the runner queues what this returns. Bounces are
only ever made for mail already accepted (rejecting at SMTP time prevents backscatter), and never
for the null sender (the runner checks that before calling).
Trust: failure reasons and original headers are remote text: reasons are folded onto one line
with control characters and non-ASCII replaced; headers are attached as data, never parsed. The
original Message-ID (client text, cleaned when it was received) is quoted in In-Reply-To and
References only when it has the shape of a msg-id, written as is: the ``email`` package would
encode a long one as RFC 2047 words, which no mail reader matches against a Message-ID.
"""

from __future__ import annotations

import email.policy
import email.utils
import re
from collections.abc import Sequence
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

from palisade.delivery.outcome import RecipientResult
from palisade.spool import Envelope

_UNSAFE = re.compile(r"[^\x20-\x7e]")
# A msg-id fit to quote (RFC 5322 3.6.4): one token of printable ASCII in angle brackets, short
# enough that "In-Reply-To: <id>" is one line within 998 octets. Anything else is left out.
_MSG_ID = re.compile(r"<[!-;=?-~]{1,983}>")


def _clean(text: str, limit: int = 900) -> str:
    text = _UNSAFE.sub("?", " ".join(text.split()))
    return text[:limit]


def header_block(body_prefix: bytes) -> bytes:
    """The header section of a message (up to the first empty line), CRLF line ends."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = body_prefix.find(sep)
        if end >= 0:
            body_prefix = body_prefix[: end + len(sep) // 2]
            break
    return re.sub(rb"\r?\n", b"\r\n", body_prefix)


def build_dsn(
    original: Envelope,
    failures: Sequence[RecipientResult],
    original_headers: bytes,
    *,
    reporting_mta: str,
    message_id: str,
    now: float,
) -> bytes:
    """The bounce message to ``original.sender``, as bytes with CRLF line ends."""
    if not original.sender:
        raise ValueError("never bounce a message from the null sender")
    sender = _clean(original.sender, 300)
    lines = [
        "This message was created automatically by mail delivery software.",
        "",
        "A message that you sent could not be delivered to one or more of its",
        "recipients. This is a permanent error. The following address(es) failed:",
        "",
    ]
    for failure in failures:
        lines += [f"  {_clean(failure.rcpt, 300)}", f"    {_clean(failure.detail)}"]
    lines += ["", f"The message's queue id was {original.queue_id}; its headers follow below."]
    human = MIMEText("\n".join(lines) + "\n", "plain", "us-ascii")

    status = Message()
    status.set_type("message/delivery-status")
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {_clean(reporting_mta, 255)}"
    per_message["X-Palisade-Queue-ID"] = original.queue_id
    per_message["Arrival-Date"] = email.utils.formatdate(original.received_at, localtime=True)
    blocks: list[Message | str] = [per_message]
    for failure in failures:
        block = Message()
        block["Final-Recipient"] = f"rfc822; {_clean(failure.rcpt, 300)}"
        block["Action"] = "failed"
        block["Status"] = failure.status or "5.0.0"
        if failure.remote_mta:
            block["Remote-MTA"] = f"dns; {_clean(failure.remote_mta, 255)}"
        if failure.diagnostic:
            block["Diagnostic-Code"] = _clean(failure.diagnostic)
        else:
            block["Diagnostic-Code"] = f"X-Palisade; {_clean(failure.detail)}"
        block["Last-Attempt-Date"] = email.utils.formatdate(now, localtime=True)
        blocks.append(block)
    status.set_payload(blocks)

    try:
        headers_text = original_headers.decode("ascii")
        charset = "us-ascii"
    except UnicodeDecodeError:
        headers_text = original_headers.decode("utf-8", "replace")
        charset = "utf-8"
    headers_part = MIMEText(headers_text.replace("\r\n", "\n"), "rfc822-headers", charset)

    report = MIMEMultipart("report", report_type="delivery-status")
    for part in (human, status, headers_part):
        del part["MIME-Version"]
        report.attach(part)
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{_clean(reporting_mta, 255)}>"
    report["To"] = sender
    report["Subject"] = "Mail delivery failed: returning message to sender"
    report["Date"] = email.utils.formatdate(now, localtime=True)
    report["Message-ID"] = message_id
    report["Auto-Submitted"] = "auto-replied"
    threading = b""
    if original.message_id and _MSG_ID.fullmatch(original.message_id):
        mid = original.message_id.encode("ascii")
        threading = b"In-Reply-To: %s\r\nReferences: %s\r\n" % (mid, mid)
    return threading + report.as_bytes(policy=email.policy.SMTP)
