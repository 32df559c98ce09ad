"""spamd adapter: SpamAssassin's daemon behind the ``SpamScanner`` port (SPAMC/1.5 protocol).

Owns: talking the SPAMC protocol to one spamd over TCP (``host:port``, ``[v6]:port``) or a Unix
socket (a path starting with ``/``): the ``SYMBOLS`` request with ``Content-length`` and the
optional ``User`` header, the message streamed from the spool file in 64 KiB chunks (never read
whole into memory), the half-close after the body (as spamc does), and parsing the reply:

    SPAMD/1.1 0 EX_OK
    Content-length: 68
    Spam: True ; 1003.3 / 5.0

    GTUBE,MISSING_DATE,MISSING_MID,...

into a :class:`palisade.ports.SpamReport` (the score and the names of the rules that hit). spamd's
own ``required_score`` (the ``5.0``) is not used: the tag and kill levels are Palisade's.
The plumbing it shares with the rspamd and clamd adapters is in ``adapters.scanner_io``.

Must not touch: policy (it scores; whether a score is "too much" is for the checks and the
server), logging, configuration files (the composition root passes plain values), and any project
module other than ``palisade.ports`` (import-linter contract "Adapters import ports only").
Whether a message is too big to scan (``max_size``, as spamc's ``-s``) is decided by the caller
before ``scan``; ``scan`` itself sends whatever it is given.

Trust: spamd is a local service but its reply is parsed defensively: the reply header section is
capped at 64 KiB, the symbol list at 64 KiB, scores must be finite numbers, and only rule names
made of ``[A-Za-z0-9_.:-]`` (at most 100 characters, at most 500 names) are passed on; anything
else in the list is dropped. Every failure -- connection refused or reset, no socket file, the
overall ``timeout`` (connecting, sending and waiting for the verdict together), a non-zero spamd
status (``SPAMD/1.0 76 Bad header line``), a reply that is not SPAMD -- becomes
:class:`palisade.ports.ServiceTempError` with a reason naming the address; nothing else escapes
``scan`` for network input. A reason never contains message content.

The spool file is read with plain blocking reads on the event loop: it is a local file that was
just written (so in the page cache) and each read is one 64 KiB chunk, far cheaper than handing
each chunk to a thread.
"""

from __future__ import annotations

import asyncio
import math
import re

from palisade.adapters.scanner_io import (
    REPLY_LIMIT,
    describe,
    open_stream,
    parse_address,
    parse_rules,
    read_headers,
    read_line,
    send_message,
    service_errors,
    shown,
)
from palisade.ports import MessageSource, ServiceTempError, SpamReport

__all__ = ["SpamdScanner"]

_STATUS = re.compile(r"SPAMD/(\d+\.\d+)\s+(\d+)\s*(.*)")
_NUMBER = r"([-+]?\d+(?:\.\d+)?)"
_SPAM = re.compile(rf"(true|false|yes|no)\s*;\s*{_NUMBER}\s*/\s*{_NUMBER}", re.IGNORECASE)


class SpamdScanner:
    """One spamd; ``scan`` opens a new connection per message (spamd serves one per child)."""

    name = "spamd"

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 30.0,
        max_size: int = 512_000,
        user: str = "",
    ) -> None:
        if any(c in user for c in "\r\n\0"):
            raise ValueError("spamd user must not contain control characters")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.address = parse_address(address, 783)
        self.timeout = timeout
        self.max_size = max_size
        self.user = user

    def __repr__(self) -> str:
        return f"SpamdScanner({describe(self.address)!r})"

    async def scan(self, message: MessageSource) -> SpamReport:
        where = f"spamd {describe(self.address)}"
        writer: asyncio.StreamWriter | None = None
        try:
            with service_errors(where, self.timeout):
                async with asyncio.timeout(self.timeout):
                    reader, writer = await open_stream(self.address)
                    head = f"SYMBOLS SPAMC/1.5\r\nContent-length: {message.size}\r\n"
                    if self.user:
                        head += f"User: {self.user}\r\n"
                    await send_message(writer, message, prefix=(head + "\r\n").encode("utf-8"))
                    if writer.can_write_eof():
                        writer.write_eof()
                    return await self._read_reply(reader)
        finally:
            if writer is not None:
                writer.close()

    async def _read_reply(self, reader: asyncio.StreamReader) -> SpamReport:
        status = await read_line(reader)
        match = _STATUS.fullmatch(status)
        if match is None:
            raise ServiceTempError(f"not a SPAMD reply: {shown(status)}")
        if match.group(2) != "0":
            text = f"{match.group(2)} {match.group(3)}".strip()
            raise ServiceTempError(f"spamd refused the request: {shown(text)}")
        headers = await read_headers(reader, len(status), REPLY_LIMIT)
        spam = headers.get("spam")
        found = _SPAM.fullmatch(spam) if spam is not None else None
        if found is None:
            raise ServiceTempError("reply without a valid Spam header")
        score = float(found.group(2))
        if not math.isfinite(score):
            raise ServiceTempError("score is not a number")
        length_text = headers.get("content-length")
        if length_text is not None:
            if not length_text.isdigit() or int(length_text) > REPLY_LIMIT:
                raise ServiceTempError(f"bad Content-length {shown(length_text)}")
            body = await reader.readexactly(int(length_text))
        else:
            body = await reader.read(REPLY_LIMIT)
        return SpamReport(score=score, rules=parse_rules(body, ","), scanner=self.name)
