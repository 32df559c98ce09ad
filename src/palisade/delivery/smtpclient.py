"""A small asyncio SMTP client for the next hop: one connection, replies parsed in a Protocol.

Why hand-written: the delivering process used aiosmtplib, which has no RFC 2920 PIPELINING (every
command costs a round trip) and puts per-command overhead on the hot path (a lock and a timeout
task per command, regular-expression passes over the whole body for DATA). Relaying is the
parent process's main CPU cost per message, so this client does only what ``SmtpNextHop`` needs,
cheaply: connect and read the greeting, EHLO, STARTTLS (``loop.start_tls``), commands written
singly or as one pipelined group, replies read in order, and the DATA body dot-stuffed and
written at once. What to send and what the replies mean stays in ``palisade.delivery.nexthop``.

Owns: one TCP connection (TLS after STARTTLS), the reply parser and the per-reply timeouts.
Replies: ``Reply(code, text)``; a multi-line reply's text is its lines' texts joined by ``\\n``.
Errors: ``SmtpConnectError`` (connecting or the greeting failed), ``SmtpDisconnected`` (EOF or
connection lost), ``SmtpTimeout`` (no complete reply in time), ``SmtpProtocolError`` (a malformed
reply). After any of them the connection is unusable and must be closed. The messages repeat
the ones aiosmtplib used, so log lines read as before.
Must not touch: delivery results, the spool, the log.
Trust: every reply is remote text: a line longer than ``MAX_LINE``, a reply longer than
``MAX_REPLY``, a line without a valid code or a multi-line reply whose codes differ is a protocol
error; reply text is decoded as UTF-8 with ``surrogateescape`` and kept verbatim (whoever logs it
escapes it). A reply that never ends is a timeout. Bytes the server sends while no command is
outstanding make the connection unusable (``usable``), so they can never be taken for the reply
to a later command; bytes left in the buffer at STARTTLS are discarded (RFC 3207, section 4.2).
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import deque
from typing import Any, NamedTuple, cast

MAX_LINE = 8192  # octets per reply line (RFC 5321 says 512; real servers send longer)
MAX_REPLY = 65536  # octets per reply, all its lines

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_QUOTED_LOCAL = re.compile(r'^"(?:[^"\\\r\n]|\\.)*"')
_UNQUOTED_BAD = re.compile(r'[\s<>"]')
_LINE_ENDS = re.compile(rb"\r\n|\r|\n")


class Reply(NamedTuple):
    code: int
    text: str


class SmtpClientError(Exception):
    """Base of the client's errors; the connection is unusable afterwards."""


class SmtpConnectError(SmtpClientError, ConnectionError):
    """The connection could not be made or closed before the greeting."""


class SmtpDisconnected(SmtpClientError, ConnectionError):
    """The server closed the connection or it was lost."""


class SmtpTimeout(SmtpClientError, TimeoutError):
    """No (complete) reply within the timeout."""


class SmtpProtocolError(SmtpClientError):
    """A reply that is not SMTP."""


def mailbox(address: str, encoding: str) -> bytes:
    """``<address>`` for MAIL FROM / RCPT TO. Raises ValueError for an address that could inject
    a parameter or a command (a control character anywhere; blank, ``<``, ``>`` or ``"`` outside
    a quoted local part), as aiosmtplib did."""
    if _CONTROL.search(address) or _UNQUOTED_BAD.search(_QUOTED_LOCAL.sub("", address, count=1)):
        raise ValueError(
            f"Address {address!r} contains characters not permitted in an SMTP mailbox"
        )
    return b"<" + address.encode(encoding) + b">"


def data_payload(body: bytes) -> bytes:
    """The body as sent after DATA's 354, without the final ``.CRLF``: CRLF line ends (a lone CR
    or LF becomes CRLF; the spool already has CRLF, so this is a count, not a copy), a final CRLF
    added if missing, and every line that starts with ``.`` given one more (RFC 5321, 4.5.2)."""
    crlf = body.count(b"\r\n")
    if crlf != body.count(b"\n") or crlf != body.count(b"\r"):
        body = _LINE_ENDS.sub(b"\r\n", body)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    if body.startswith(b"."):
        body = b"." + body
    return body.replace(b"\r\n.", b"\r\n..")


class _ReplyProtocol(asyncio.Protocol):
    """Parses the byte stream into replies as it arrives; wakes the one reader waiting."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.replies: deque[Reply] = deque()
        self.error: SmtpClientError | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.partial = b""  # an incomplete line
        self.code = b""  # the code of the multi-line reply being read ("" between replies)
        self.lines: list[bytes] = []  # its texts so far
        self.size = 0  # its octets so far

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return
        if self.partial:
            data = self.partial + data
            self.partial = b""
        start = 0
        find = data.find
        try:
            while True:
                end = find(b"\n", start)
                if end < 0:
                    break
                if end - start >= MAX_LINE:
                    raise SmtpProtocolError("Response too long")
                self._line(data[start:end])
                start = end + 1
            if len(data) - start >= MAX_LINE:
                raise SmtpProtocolError("Response too long")
        except SmtpProtocolError as exc:
            self.fail(exc)
            return
        if start < len(data):
            self.partial = data[start:]
        if self.replies:
            self.wake()

    def _line(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        code = line[:3]
        sep = line[3:4]
        if len(code) != 3 or not code.isdigit() or not b"2" <= code[:1] <= b"5" or sep not in b" -":
            shown = line[:100].decode("utf-8", "replace")
            raise SmtpProtocolError(f"Malformed SMTP response line: {shown}")
        if self.code and code != self.code:
            raise SmtpProtocolError(
                f"Inconsistent codes in a multi-line reply: {self.code.decode()} then "
                f"{code.decode()}"
            )
        self.size += len(line) + 2
        if self.size > MAX_REPLY:
            raise SmtpProtocolError("Response too long")
        text = line[4:].strip(b" \t\r\n")
        if sep == b"-":
            self.code = code
            self.lines.append(text)
            return
        if self.lines:
            self.lines.append(text)
            text = b"\n".join(self.lines)
            self.lines = []
            self.code = b""
        self.size = 0
        self.replies.append(Reply(int(code), text.decode("utf-8", "surrogateescape")))

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, exc: SmtpClientError) -> None:
        if self.error is None:
            self.error = exc
        self.wake()

    def eof_received(self) -> bool:
        self.fail(SmtpDisconnected("Unexpected EOF received"))
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        lost = SmtpDisconnected("Connection lost")
        lost.__cause__ = exc
        self.fail(lost)


def _expire(protocol: _ReplyProtocol) -> None:
    protocol.fail(SmtpTimeout("Timed out waiting for server response"))


class SmtpClient:
    """One connection to an SMTP server. Not for concurrent use: one transaction at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: _ReplyProtocol) -> None:
        self._loop = loop
        self._protocol = protocol
        self.extensions: dict[str, str] = {}  # EHLO keywords, lower case -> parameters
        self.tls = False

    @classmethod
    async def connect(cls, host: str, port: int, *, timeout: float) -> tuple[SmtpClient, Reply]:
        """Connects and reads the greeting (whatever its code), both within ``timeout``."""
        loop = asyncio.get_running_loop()
        protocol = _ReplyProtocol()
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(lambda: protocol, host, port)
        except TimeoutError as exc:
            raise SmtpTimeout(f"Timed out connecting to {host} on port {port}") from exc
        except OSError as exc:
            raise SmtpConnectError(f"Error connecting to {host} on port {port}: {exc}") from exc
        client = cls(loop, protocol)
        try:
            greeting = await client.read_reply(timeout)
        except SmtpTimeout as exc:
            client.close()
            raise SmtpTimeout("Timed out waiting for server ready message") from exc
        except SmtpDisconnected as exc:
            client.close()
            raise SmtpConnectError(f"Error connecting to {host} on port {port}: {exc}") from exc
        except BaseException:
            client.close()
            raise
        return client, greeting

    # -- state -------------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Open, not broken, and nothing unread: safe to start another transaction on."""
        p = self._protocol
        t = p.transport
        return (
            p.error is None
            and t is not None
            and not t.is_closing()
            and not p.replies
            and not p.partial
            and not p.lines
        )

    def supports(self, extension: str) -> bool:
        return extension in self.extensions

    def extra_info(self, name: str) -> Any:
        t = self._protocol.transport
        return None if t is None else t.get_extra_info(name)

    def close(self) -> None:
        t = self._protocol.transport
        if t is not None and not t.is_closing():
            t.close()

    # -- I/O -----------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queues ``data`` (one or more complete commands, or the DATA payload) for sending."""
        p = self._protocol
        t = p.transport
        if p.error is not None or t is None or t.is_closing():
            raise SmtpDisconnected("Connection lost")
        t.write(data)

    def write_data(self, body: bytes) -> None:
        """The message after DATA's 354: dot-stuffed, then the terminating ``.CRLF``."""
        p = self._protocol
        t = p.transport
        if p.error is not None or t is None or t.is_closing():
            raise SmtpDisconnected("Connection lost")
        t.writelines((data_payload(body), b".\r\n"))

    async def read_reply(self, timeout: float) -> Reply:
        """The next reply in order, waiting at most ``timeout`` seconds for it to be complete."""
        p = self._protocol
        if p.replies:
            return p.replies.popleft()
        if p.error is None:
            waiter: asyncio.Future[None] = self._loop.create_future()
            p.waiter = waiter
            timer = self._loop.call_later(timeout, _expire, p)
            try:
                await waiter
            finally:
                timer.cancel()
                p.waiter = None
            if p.replies:  # woken by a reply, or by the error after the last replies
                return p.replies.popleft()
        if p.error is None:  # not reached: the waiter is woken for a reply or an error only
            raise SmtpProtocolError("no reply")
        raise p.error

    async def command(self, line: bytes, timeout: float) -> Reply:
        """Sends one command line (CRLF included) and reads its reply."""
        self.write(line)
        return await self.read_reply(timeout)

    async def ehlo(self, name: str, timeout: float) -> Reply:
        """EHLO; on 250 the extensions are replaced by the ones it lists (the first line, the
        server's name, is not one)."""
        reply = await self.command(b"EHLO " + name.encode("ascii") + b"\r\n", timeout)
        if reply.code == 250:
            extensions: dict[str, str] = {}
            for line in reply.text.split("\n")[1:]:
                keyword, _, params = line.strip().partition(" ")
                if keyword:
                    extensions[keyword.lower()] = params
            self.extensions = extensions
        return reply

    async def starttls(self, context: ssl.SSLContext, server_hostname: str, timeout: float) -> None:
        """The TLS handshake after the server's 220 to STARTTLS (``timeout`` for the handshake).
        Raises ssl.SSLError as is; a timeout or a lost connection as the client's errors."""
        p = self._protocol
        t = p.transport
        if p.error is not None or t is None or t.is_closing():
            raise SmtpDisconnected("Connection lost")
        # RFC 3207, 4.2: anything the server sent after its 220 was not protected by TLS
        p.replies.clear()
        p.partial = b""
        p.lines = []
        p.code = b""
        p.size = 0
        self.extensions = {}
        try:
            tls = await self._loop.start_tls(
                t, p, context, server_hostname=server_hostname, ssl_handshake_timeout=timeout
            )
        except TimeoutError as exc:
            raise SmtpTimeout("Timed out while upgrading transport") from exc
        except ConnectionAbortedError as exc:  # what asyncio raises for a handshake timeout
            raise SmtpTimeout("Connection aborted while upgrading transport") from exc
        except ConnectionError as exc:
            raise SmtpDisconnected("Connection reset while upgrading transport") from exc
        if tls is None:
            raise SmtpDisconnected("Connection lost")
        p.transport = tls
        self.tls = True
