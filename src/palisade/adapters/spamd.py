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
Also the address parsing and connecting shared with the clamd adapter (``parse_address``,
``open_stream``).

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
import contextlib
import ipaddress
import math
import os
import re
import socket
from collections.abc import Iterator

from palisade.ports import MessageSource, ServiceTempError, SpamReport

__all__ = [
    "CHUNK_SIZE",
    "SpamdScanner",
    "describe",
    "open_stream",
    "os_reason",
    "parse_address",
    "parse_rules",
    "read_line",
    "send_message",
    "service_errors",
    "shown",
]

CHUNK_SIZE = 64 * 1024
_REPLY_LIMIT = 64 * 1024  # bytes of reply header section / symbol list we accept
_MAX_RULES = 500
_RULE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
_STATUS = re.compile(r"SPAMD/(\d+\.\d+)\s+(\d+)\s*(.*)")
_NUMBER = r"([-+]?\d+(?:\.\d+)?)"
_SPAM = re.compile(rf"(true|false|yes|no)\s*;\s*{_NUMBER}\s*/\s*{_NUMBER}", re.IGNORECASE)

Address = tuple[str, int] | str  # (host, port) or a Unix socket path


def parse_address(address: str, default_port: int) -> Address:
    """``"127.0.0.1:783"`` -> ("127.0.0.1", 783); ``"[::1]:783"`` -> ("::1", 783); a path
    starting with ``/`` stays a path; a bare host or address gets ``default_port``.

    Raises ``ValueError`` for an empty address, a bad port or an unbracketed IPv6 with a port.
    """
    address = address.strip()
    if not address:
        raise ValueError("empty address")
    if address.startswith("unix:"):
        address = address[5:]
    if address.startswith("/"):
        return address
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {address!r}: expected [IPv6]:port")
        ipaddress.IPv6Address(host)
        return host, _port(rest[1:], address) if rest else default_port
    if address.count(":") > 1:  # a bare IPv6 address, no port
        ipaddress.IPv6Address(address)
        return address, default_port
    host, sep, port = address.partition(":")
    if not host:
        raise ValueError(f"bad address {address!r}: no host")
    return host, _port(port, address) if sep else default_port


def _port(text: str, address: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad address {address!r}: port must be 1-65535")
    return int(text)


def describe(address: Address) -> str:
    """The address as the operator wrote it, for reasons and logs."""
    if isinstance(address, str):
        return address
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def open_stream(
    address: Address, limit: int = _REPLY_LIMIT
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connects over TCP or a Unix socket; OSError (refused, no such file...) propagates."""
    if isinstance(address, str):
        return await asyncio.open_unix_connection(address, limit=limit)
    host, port = address
    return await asyncio.open_connection(host, port, limit=limit)


async def send_message(
    writer: asyncio.StreamWriter, message: MessageSource, frame: bool = False
) -> None:
    """Writes the ``message.size`` bytes of ``message`` in chunks, waiting for the socket to
    drain after each; ``frame`` prefixes each chunk with its 4-byte big-endian length (clamd's
    INSTREAM). A spool file shorter than its declared size is a ServiceTempError."""
    remaining = message.size
    try:
        source = message.open()
    except OSError as exc:
        raise ServiceTempError(f"cannot read the spool file: {os_reason(exc)}") from None
    with source:
        while remaining > 0:
            try:
                data = source.read(min(CHUNK_SIZE, remaining))
            except OSError as exc:
                raise ServiceTempError(f"cannot read the spool file: {os_reason(exc)}") from None
            if not data:
                raise ServiceTempError(
                    f"spool file ended {remaining} bytes before its size {message.size}"
                )
            if frame:
                writer.write(len(data).to_bytes(4, "big"))
            writer.write(data)
            remaining -= len(data)
            await writer.drain()


def os_reason(exc: OSError) -> str:
    """``Connection refused`` rather than ``[Errno 111] Connect call failed (...)``."""
    if exc.errno and not isinstance(exc, socket.gaierror):
        return os.strerror(exc.errno)
    return exc.strerror or str(exc) or type(exc).__name__


@contextlib.contextmanager
def service_errors(
    where: str, timeout: float, *, too_long: str = "reply line too long"
) -> Iterator[None]:
    """Every way a conversation with a scanner can fail, as ServiceTempError naming ``where``:
    the overall timeout, the scanner's own refusal, an over-long or cut-off reply, a network
    error (shared by the spamd, rspamd and clamd adapters)."""
    try:
        yield
    except TimeoutError:
        raise ServiceTempError(f"{where}: no answer within {timeout:g}s") from None
    except ServiceTempError as exc:
        raise ServiceTempError(f"{where}: {exc.reason}") from None
    except asyncio.LimitOverrunError:
        raise ServiceTempError(f"{where}: {too_long}") from None
    except asyncio.IncompleteReadError as exc:
        what = "without a reply" if not exc.partial else "before a full reply"
        raise ServiceTempError(f"{where}: connection closed {what}") from None
    except OSError as exc:  # ssl.SSLError is an OSError too
        raise ServiceTempError(f"{where}: {os_reason(exc)}") from None


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
                    writer.write((head + "\r\n").encode("utf-8"))
                    await send_message(writer, message)
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
        headers = await read_headers(reader, len(status), _REPLY_LIMIT)
        spam = headers.get("spam")
        found = _SPAM.fullmatch(spam) if spam is not None else None
        if found is None:
            raise ServiceTempError("reply without a valid Spam header")
        score = float(found.group(2))
        if not math.isfinite(score):
            raise ServiceTempError("score is not a number")
        length_text = headers.get("content-length")
        if length_text is not None:
            if not length_text.isdigit() or int(length_text) > _REPLY_LIMIT:
                raise ServiceTempError(f"bad Content-length {shown(length_text)}")
            body = await reader.readexactly(int(length_text))
        else:
            body = await reader.read(_REPLY_LIMIT)
        return SpamReport(score=score, rules=parse_rules(body, ","), scanner=self.name)


async def read_line(reader: asyncio.StreamReader) -> str:
    """One reply line without its line end ("" for a blank line), decoded as latin-1.

    EOF before the line end raises ``asyncio.IncompleteReadError``; a line longer than the
    reader's limit raises ``asyncio.LimitOverrunError``.
    """
    raw = await reader.readuntil(b"\n")
    return raw.rstrip(b"\r\n").decode("latin-1")


async def read_headers(reader: asyncio.StreamReader, seen: int, limit: int) -> dict[str, str]:
    """``Name: value`` lines up to the empty line (SPAMD and HTTP replies alike), names
    lower-cased; ``seen`` bytes of the reply were read already, ``limit`` caps the section."""
    headers: dict[str, str] = {}
    while True:
        line = await read_line(reader)
        seen += len(line) + 2
        if seen > limit:
            raise ServiceTempError("reply header section too long")
        if not line:
            return headers
        name, sep, value = line.partition(":")
        if not sep:
            raise ServiceTempError(f"bad reply header: {shown(line)}")
        headers[name.strip().lower()] = value.strip()


def shown(text: str, limit: int = 120) -> str:
    """Remote text fit for a reason: non-printable characters become spaces, cut at ``limit``."""
    cleaned = "".join(c if c.isprintable() else " " for c in text).strip()
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def parse_rules(body: bytes | list[str], separator: str = ",") -> tuple[str, ...]:
    """Rule names from a symbol list (or a list of names): well-formed names only, in order,
    each once, at most 500."""
    names = body.decode("latin-1").split(separator) if isinstance(body, bytes) else body
    rules: list[str] = []
    seen: set[str] = set()
    for raw in names:
        name = raw.strip()
        if _RULE_NAME.fullmatch(name) and name not in seen:
            seen.add(name)
            rules.append(name)
            if len(rules) >= _MAX_RULES:
                break
    return tuple(rules)
