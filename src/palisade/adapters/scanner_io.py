"""What the scanner adapters (spamd, rspamd, clamd) share: parsing a scanner's address,
connecting over TCP or a Unix socket, streaming a spool file in chunks, reading reply lines and
header sections, cleaning remote text for a reason, parsing rule-name lists, and turning every
way a conversation can fail into one ``ServiceTempError`` naming the scanner.

Owns no protocol of its own; each adapter module speaks its protocol with these pieces and does
not import another adapter. Must not touch policy, logging or configuration; imports only
``palisade.ports``.

Trust: everything read is network input: lines are bounded by the reader's limit, header
sections by ``limit``, rule names by a pattern and a count, remote text shown in a reason is cut
and stripped of non-printable characters.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import socket
from collections.abc import Iterator

from palisade.ports import MessageSource, ServiceTempError

CHUNK_SIZE = 64 * 1024
REPLY_LIMIT = 64 * 1024  # bytes of reply header section / symbol list we accept
_MAX_RULES = 500
_RULE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,100}")

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
    address: Address, limit: int = REPLY_LIMIT
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connects over TCP or a Unix socket; OSError (refused, no such file...) propagates."""
    if isinstance(address, str):
        return await asyncio.open_unix_connection(address, limit=limit)
    host, port = address
    return await asyncio.open_connection(host, port, limit=limit)


async def send_message(
    writer: asyncio.StreamWriter,
    message: MessageSource,
    frame: bool = False,
    *,
    prefix: bytes = b"",
    suffix: bytes = b"",
) -> None:
    """Writes ``prefix``, the ``message.size`` bytes of ``message`` in chunks, then ``suffix``,
    waiting for the socket to drain after each chunk; ``frame`` prefixes each chunk with its
    4-byte big-endian length (clamd's INSTREAM). A spool file shorter than its declared size is
    a ServiceTempError.

    Each chunk goes to the transport as one piece with whatever comes before or after it (the
    request head first, the terminator last): a message up to ``CHUNK_SIZE`` is one ``send``,
    one segment for the scanner to read, not three or four small ones (the command, each
    length, each chunk): fewer system calls on both ends of every scan."""
    remaining = message.size
    try:
        source = message.open()
    except OSError as exc:
        raise ServiceTempError(f"cannot read the spool file: {os_reason(exc)}") from None
    pending = prefix
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
            remaining -= len(data)
            parts = [pending, len(data).to_bytes(4, "big") if frame else b"", data]
            if remaining == 0:
                parts.append(suffix)
            writer.write(b"".join(parts))
            pending = b""
            await writer.drain()
    if pending or (message.size == 0 and suffix):
        writer.write(pending + suffix)
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
