"""clamd adapter: ClamAV's daemon behind the ``VirusScanner`` port (the INSTREAM command).

Owns: one scan per connection to clamd over TCP (``host:port``) or a Unix socket (a path):
``zINSTREAM\\0``, then the message from the spool file in chunks of
``<4-byte big-endian length><data>`` (64 KiB each, never the whole message in memory), then a
zero-length chunk; the NUL-terminated reply is

* ``stream: OK`` -> clean (``VirusReport()``);
* ``stream: <signature> FOUND`` -> infected (``VirusReport("<signature>")``; signatures from
  a database clamd does not consider official carry the ``.UNOFFICIAL`` suffix clamd adds);
* ``<text> ERROR`` (``INSTREAM size limit exceeded. ERROR`` when the message is larger than
  clamd's ``StreamMaxLength``) -> :class:`palisade.ports.ServiceTempError`.

``max_size`` is kept for the caller (a larger message is not sent: see the ``virus`` check); keep
it at or below clamd's ``StreamMaxLength``, or big messages meet the size-limit error.

Must not touch: policy, logging, configuration files, and any project module other than
``palisade.ports`` (and the connection helpers of :mod:`palisade.adapters.spamd`).

Trust: the reply is read up to 4 KiB and parsed defensively; the signature name is passed on as
text decoded from UTF-8 (undecodable bytes replaced), stripped and cut at 200 characters: callers
must still make it safe before logging it. Every failure -- refused, reset, no socket file, the
overall ``timeout``, an ERROR reply, a reply that is neither OK nor FOUND -- becomes
:class:`palisade.ports.ServiceTempError` with a reason naming the address. When clamd stops
reading early (it answers the size-limit error and closes while we are still sending), the reply
it sent is still read and reported.
"""

from __future__ import annotations

import asyncio

from palisade.adapters.scanner_io import (
    describe,
    open_stream,
    parse_address,
    send_message,
    service_errors,
    shown,
)
from palisade.ports import MessageSource, ServiceTempError, VirusReport

__all__ = ["ClamdScanner"]

_REPLY_LIMIT = 4096
_MAX_SIGNATURE = 200
_END = b"\0\0\0\0"  # the zero-length chunk that ends INSTREAM


class ClamdScanner:
    """One clamd; each ``scan`` is one connection and one INSTREAM."""

    name = "clamd"

    def __init__(self, address: str, *, timeout: float = 60.0, max_size: int = 26_214_400) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.address = parse_address(address, 3310)
        self.timeout = timeout
        self.max_size = max_size

    def __repr__(self) -> str:
        return f"ClamdScanner({describe(self.address)!r})"

    async def scan(self, message: MessageSource) -> VirusReport:
        where = f"clamd {describe(self.address)}"
        writer: asyncio.StreamWriter | None = None
        try:
            with service_errors(where, self.timeout, too_long="reply too long"):
                async with asyncio.timeout(self.timeout):
                    reader, writer = await open_stream(self.address, limit=_REPLY_LIMIT)
                    sending: OSError | None = None
                    try:  # the command, the framed message and the terminator, in one go
                        await send_message(
                            writer, message, frame=True, prefix=b"zINSTREAM\0", suffix=_END
                        )
                    except (ConnectionResetError, BrokenPipeError) as exc:
                        sending = exc  # clamd may have answered (size limit) and closed
                    try:
                        reply = await reader.readuntil(b"\0")
                    except asyncio.IncompleteReadError as exc:
                        if exc.partial:  # a reply without its NUL (clamd closed right after it)
                            reply = exc.partial
                        elif sending is not None:
                            raise sending from None
                        else:
                            raise
                    except OSError:
                        if sending is None:
                            raise
                        raise sending from None
                    return _parse(reply)
        finally:
            if writer is not None:
                writer.close()


def _parse(raw: bytes) -> VirusReport:
    text = raw.rstrip(b"\0").decode("utf-8", "replace").strip()
    body = text[len("stream:") :].strip() if text.startswith("stream:") else text
    if body == "OK":
        return VirusReport()
    if body.endswith(" FOUND"):
        signature = body[: -len(" FOUND")].strip()
        if signature:
            return VirusReport(signature[:_MAX_SIGNATURE])
    if body.endswith("ERROR"):
        raise ServiceTempError(shown(body))
    raise ServiceTempError(f"unexpected reply: {shown(text)}")
