"""Palisade's sans-I/O SMTP core: bytes in, events out, replies to bytes.

Owns: the server side of RFC 5321 with PIPELINING, SIZE, 8BITMIME, ENHANCEDSTATUSCODES and
STARTTLS: the receive buffer with its line caps, the command and path grammar, the one table of
state transitions, the DATA reader (dot-unstuffing, end-of-data, smuggling detection) and the
reply encoding. No sockets, no asyncio, no clock, no logging, no policy, and no imports from the
rest of Palisade.

Trust: every byte received is hostile. Peer mistakes become events, never exceptions; only a
misuse by the application raises (``LocalProtocolError``).

Typical use::

    conn = SmtpConnection(features=Features(...), limits=Limits(max_message_size=...))
    out = conn.greeting(hostname)
    while True:
        event = conn.next_event()
        if event is NEED_DATA or event is PAUSED:
            ...  # flush replies, read, conn.receive_data(data) (b"" at EOF)
        elif isinstance(event, events.DataChunk):
            ...  # stream to the spool
        else:
            out += conn.send_reply(decide(event))
"""

from palisade.smtp import events, replies
from palisade.smtp.address import Address
from palisade.smtp.connection import NEED_DATA, PAUSED, Sentinel, SmtpConnection, State
from palisade.smtp.errors import LocalProtocolError
from palisade.smtp.options import Features, Limits
from palisade.smtp.replies import Reply

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "Address",
    "Features",
    "Limits",
    "LocalProtocolError",
    "Reply",
    "Sentinel",
    "SmtpConnection",
    "State",
    "events",
    "replies",
]
