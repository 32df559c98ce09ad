"""Exceptions of the SMTP core, split by who is to blame (as h11 does).

Owns: ``LocalProtocolError``, raised only for mistakes of the code using the core (a reply sent
when none is due, ``tls_started`` outside a STARTTLS, a malformed reply code).

Trust: nothing the peer sends ever raises out of the core; remote mistakes become
``events.CommandError``, a flaw on ``events.DataEnd`` or ``events.TooManyErrors``.
"""

from __future__ import annotations

__all__ = ["LocalProtocolError"]


class LocalProtocolError(Exception):
    """The application used the SMTP core wrongly (a bug on our side, not the peer's)."""
