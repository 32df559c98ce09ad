"""What the session offers (``Features``) and what it tolerates (``Limits``).

Owns: the two frozen settings values an ``SmtpConnection`` is built with, checked when built.

Trust: written by the operator's configuration (already validated by ``config``); values that
would make the core unsafe (a zero or negative cap) are refused here as well.
"""

from __future__ import annotations

from dataclasses import dataclass

from palisade.smtp.errors import LocalProtocolError

__all__ = ["Features", "Limits"]


@dataclass(frozen=True, slots=True)
class Features:
    """The ESMTP extensions advertised in the EHLO reply.

    No CHUNKING is ever offered. STARTTLS is advertised only when ``starttls`` is set and TLS is
    not active yet. ``auth`` (a submission listener) offers ``AUTH PLAIN LOGIN``, and only once
    TLS is active (RFC 4954 section 4: no plaintext passwords on an unencrypted channel); with
    ``auth_required`` MAIL is refused until the client authenticated.
    """

    hostname: str
    max_size: int
    starttls: bool
    pipelining: bool = True
    eightbitmime: bool = True
    enhanced_status: bool = True
    auth: bool = False
    auth_required: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """RFC 5321 §4.5.3 caps; line lengths count the CRLF."""

    max_command_line: int = 512
    max_text_line: int = 1000
    max_message_size: int
    max_recipients: int = 100
    max_errors: int = 10

    def __post_init__(self) -> None:
        if self.max_command_line < 16:
            raise LocalProtocolError("max_command_line must be at least 16 octets")
        if self.max_text_line < 3:
            raise LocalProtocolError("max_text_line must be at least 3 octets")
        if self.max_message_size < 0:
            raise LocalProtocolError("max_message_size must not be negative")
        if self.max_recipients < 1:
            raise LocalProtocolError("max_recipients must be at least 1")
        if self.max_errors < 1:
            raise LocalProtocolError("max_errors must be at least 1")
