"""rspamd adapter: rspamd's normal worker behind the ``SpamScanner`` port (HTTP ``/checkv2``).

Owns: one HTTP/1.1 request per message, written on asyncio streams (no HTTP library needed for
one POST): ``POST <base path>/checkv2`` with ``Content-Length`` and ``Connection: close``, the
optional ``Password`` header, and the message from the spool file as the body in 64 KiB chunks
(never whole in memory). The reply's JSON body gives the report (rspamd 3.4, stock rules)::

    {"is_skipped": false, "score": 1.0, "required_score": 15.0, "action": "no action",
     "symbols": {"MIME_GOOD": {"name": "MIME_GOOD", "score": -0.1, ...}, ...}, ...}

``score`` becomes ``SpamReport.score``; the names in ``symbols`` (sorted) become
``SpamReport.rules``. rspamd's own ``required_score`` and ``action`` are not used: Palisade's tag
and kill levels are compared with the score. An action rspamd forces comes with that action's
threshold as the score: GTUBE is ``"action": "reject"`` with ``"score": 15.0`` (rspamd's reject
threshold) and one symbol ``GTUBE`` of weight 0, so it is refused when ``kill_level`` is at
most rspamd's reject threshold, as by default.

``url`` is ``http://host:port`` (or ``https://``, verified against the system CA store), with an
optional base path (``http://127.0.0.1:11333/rspamd``).

Must not touch: policy, logging, configuration files, and any project module other than
``palisade.ports`` (and the stream helpers of :mod:`palisade.adapters.spamd`).

Trust: the reply is parsed defensively: header section and body capped (64 KiB / 1 MiB),
``Content-Length`` and chunked bodies supported, scores must be finite numbers, symbol names
filtered to ``[A-Za-z0-9_.:-]``. Any failure -- connection refused or reset, the overall
``timeout``, a status other than 200, a body that is not the expected JSON -- becomes
:class:`palisade.ports.ServiceTempError`. The password is a secret: it never appears in a reason
or in ``repr``.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import ssl
from typing import Any
from urllib.parse import urlsplit

from palisade.adapters.scanner_io import (
    parse_rules,
    read_headers,
    read_line,
    send_message,
    service_errors,
    shown,
)
from palisade.ports import MessageSource, ServiceTempError, SpamReport

__all__ = ["RspamdScanner"]

_HEAD_LIMIT = 64 * 1024
_BODY_LIMIT = 1024 * 1024
_STATUS = re.compile(r"HTTP/1\.[01] (\d{3})(?: .*)?")


class RspamdScanner:
    """One rspamd worker; ``scan`` opens a new connection per message."""

    name = "rspamd"

    def __init__(
        self,
        url: str,
        *,
        password: str = "",
        timeout: float = 30.0,
        max_size: int = 512_000,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"rspamd url must be http://host:port, not {url!r}")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("rspamd url takes no query, fragment or credentials")
        if any(c in password for c in "\r\n\0"):
            raise ValueError("rspamd password must not contain control characters")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.tls = parts.scheme == "https"
        self.path = parts.path.rstrip("/") + "/checkv2"
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.authority = host if parts.port is None else f"{host}:{self.port}"
        self.where = f"rspamd {parts.scheme}://{self.authority}"
        self._password = password
        self.timeout = timeout
        self.max_size = max_size

    def __repr__(self) -> str:
        return f"RspamdScanner({self.where[7:]!r})"

    async def scan(self, message: MessageSource) -> SpamReport:
        where = self.where
        writer: asyncio.StreamWriter | None = None
        try:
            with service_errors(where, self.timeout):
                async with asyncio.timeout(self.timeout):
                    context = ssl.create_default_context() if self.tls else None
                    reader, writer = await asyncio.open_connection(
                        self.host, self.port, ssl=context, limit=_HEAD_LIMIT
                    )
                    head = (
                        f"POST {self.path} HTTP/1.1\r\n"
                        f"Host: {self.authority}\r\n"
                        f"Content-Length: {message.size}\r\n"
                        "Content-Type: message/rfc822\r\n"
                        "Connection: close\r\n"
                        "User-Agent: palisade\r\n"
                    )
                    if self._password:
                        head += f"Password: {self._password}\r\n"
                    await send_message(writer, message, prefix=(head + "\r\n").encode("utf-8"))
                    status, body = await _read_response(reader)
                return self._report(status, body)
        finally:
            if writer is not None:
                writer.close()

    def _report(self, status: int, body: bytes) -> SpamReport:
        try:
            data: Any = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            data = None
        if status != 200:
            detail = data.get("error") if isinstance(data, dict) else None
            text = f": {shown(detail)}" if isinstance(detail, str) else ""
            raise ServiceTempError(f"HTTP status {status}{text}")
        if not isinstance(data, dict):
            raise ServiceTempError("reply is not a JSON object")
        if isinstance(data.get("error"), str):
            raise ServiceTempError(f"rspamd error: {shown(data['error'])}")
        score = data.get("score")
        if isinstance(score, bool) or not isinstance(score, int | float):
            raise ServiceTempError("reply without a numeric score")
        if not math.isfinite(score):
            raise ServiceTempError("score is not a number")
        symbols = data.get("symbols", {})
        if not isinstance(symbols, dict):
            raise ServiceTempError("symbols is not an object")
        return SpamReport(score=float(score), rules=parse_rules(sorted(symbols)), scanner=self.name)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status_line = await read_line(reader)
    match = _STATUS.fullmatch(status_line)
    if match is None:
        raise ServiceTempError(f"not an HTTP reply: {shown(status_line)}")
    headers = await read_headers(reader, len(status_line), _HEAD_LIMIT)
    encoding = headers.get("transfer-encoding", "").lower()
    if encoding == "chunked":
        body = await _read_chunked(reader)
    elif encoding:
        raise ServiceTempError(f"unsupported Transfer-Encoding {shown(encoding)}")
    elif "content-length" in headers:
        length = headers["content-length"]
        if not length.isdigit() or int(length) > _BODY_LIMIT:
            raise ServiceTempError(f"bad Content-Length {shown(length)}")
        body = await reader.readexactly(int(length))
    else:  # Connection: close delimits the body
        body = await reader.read(_BODY_LIMIT + 1)
        if len(body) > _BODY_LIMIT:
            raise ServiceTempError("reply body too long")
    if headers.get("content-encoding", "identity").lower() != "identity":
        raise ServiceTempError("compressed reply (not asked for)")
    return int(match.group(1)), body


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        size_text = (await read_line(reader)).split(";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise ServiceTempError(f"bad chunk size {shown(size_text)}") from None
        if size < 0 or total + size > _BODY_LIMIT:
            raise ServiceTempError("reply body too long")
        if size == 0:
            while await read_line(reader):  # trailer fields, up to the blank line
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        total += size
        if await read_line(reader):
            raise ServiceTempError("chunk not followed by CRLF")
