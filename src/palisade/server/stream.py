"""A minimal byte stream over an asyncio transport, owned by one SMTP session.

Owns: the receive buffer between the socket and the SMTP core, flow control, and the switch to
TLS. Written instead of using ``asyncio.StreamReader`` because STARTTLS must throw away every
plaintext byte received before the handshake (CVE-2011-0411), and StreamReader keeps such bytes
in a private buffer that would be read as if they had come over TLS.
Trust: bytes are passed through untouched; interpreting them is the SMTP core's job.
"""

from __future__ import annotations

import asyncio
import ssl
import typing
from collections.abc import Callable

_HIGH_WATER = 256 * 1024


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class ClientStream(asyncio.Protocol):
    """Transport events in, awaitable reads and writes out."""

    def __init__(
        self,
        on_connect: Callable[[ClientStream], None],
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        implicit_tls: bool = False,
    ) -> None:
        """``implicit_tls``: nothing is read before :meth:`start_tls` (port 465: the client's
        first bytes are its TLS ClientHello, which must reach the TLS layer, not this buffer)."""
        # The loop is kept: asyncio.get_running_loop() makes a getpid() system call each time.
        self.loop = loop or asyncio.get_running_loop()
        self._on_connect = on_connect
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._lost = False
        self._closed: asyncio.Future[None] | None = None  # made on demand: rarely awaited
        self._implicit_tls = implicit_tls

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self.transport = typing.cast(asyncio.Transport, transport)
        if self._implicit_tls:
            # asyncio adds its reader after this call: nothing is read before start_tls. uvloop
            # starts reading right after it: what comes early (the ClientHello) is kept and
            # handed to the TLS layer by start_tls.
            self.transport.pause_reading()
        self._on_connect(self)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > _HIGH_WATER and self.transport and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._lost = True
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    @property
    def closed(self) -> asyncio.Future[None]:
        """Done once the connection is lost."""
        if self._closed is None:
            self._closed = self.loop.create_future()
            if self._lost:
                self._closed.set_result(None)
        return self._closed

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # -- session side ----------------------------------------------------------------------
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def has_data(self) -> bool:
        return bool(self._buffer)

    async def read(self, timeout: float | None) -> bytes:
        """Everything buffered, waiting up to ``timeout`` for some; b"" at EOF.

        Raises TimeoutError when nothing came in time.
        """
        if not self._buffer and not self._eof:
            # A timer on our own future, not asyncio.wait_for: wait_for wraps every read in
            # another future and callbacks, a measurable share of a worker's CPU per message.
            loop = self.loop
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(timeout, _expire, waiter) if timeout is not None else None
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        data = bytes(self._buffer)
        self._buffer.clear()
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    def discard_input(self) -> int:
        """Drops whatever has been received and not read; returns how many bytes."""
        count = len(self._buffer)
        self._buffer.clear()
        return count

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        if self._write_paused and self.transport is not None and not self.transport.is_closing():
            self._drain_waiter = self.loop.create_future()
            await self._drain_waiter

    async def start_tls(self, context: ssl.SSLContext, timeout: float) -> None:
        """Upgrades the connection; plaintext received before this point is discarded.

        Only that plaintext (CVE-2011-0411). From here the transport hands every byte to the TLS
        layer, so whatever this stream holds once the handshake is done arrived encrypted: the
        client's first command, sent with or right after its Finished message (the stdlib loop
        delivers it before this coroutine resumes). It is kept for the session to read.
        """
        assert self.transport is not None
        implicit, self._implicit_tls = self._implicit_tls, False
        loop = asyncio.get_running_loop()
        if implicit:
            # Runs once start_tls (awaited below, which runs on at once up to the handshake)
            # has put the TLS layer on the transport, in the same turn of the loop (no read in
            # between) and before that layer's connection_made starts the handshake, which
            # then reads what came early. (After STARTTLS that input is dropped instead.)
            loop.call_soon(self._hand_to_tls)
        else:
            self.discard_input()
        new_transport = await loop.start_tls(
            self.transport, self, context, server_side=True, ssl_handshake_timeout=timeout
        )
        if new_transport is None:
            raise ConnectionError("TLS handshake did not complete")
        self.transport = new_transport

    def _hand_to_tls(self) -> None:
        """Gives the bytes read before the TLS layer was in place (implicit TLS under uvloop:
        the ClientHello) to that layer."""
        assert self.transport is not None
        data = bytes(self._buffer)
        self._buffer.clear()
        if not data:
            return
        layer = self.transport.get_protocol()
        # uvloop's TLS layer has the BufferedProtocol methods without subclassing it
        if layer is self or not hasattr(layer, "buffer_updated"):
            self.abort()  # start_tls did not go as expected: no handshake without them
            return
        layer = typing.cast(asyncio.BufferedProtocol, layer)
        while data:
            buffer = memoryview(layer.get_buffer(len(data)))
            size = min(len(buffer), len(data))
            buffer[:size] = data[:size]
            layer.buffer_updated(size)
            data = data[size:]

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def peer(self) -> tuple[str, int]:
        assert self.transport is not None
        peer = self.transport.get_extra_info("peername")
        return (str(peer[0]), int(peer[1])) if peer else ("0.0.0.0", 0)

    @property
    def local_ip(self) -> str:
        """The address the client connected to ("" when unknown)."""
        if self.transport is None:
            return ""
        local = self.transport.get_extra_info("sockname")
        return str(local[0]) if local else ""

    def tls_info(self) -> tuple[str, str, int] | None:
        """(protocol, cipher, bits) when the connection is encrypted."""
        if self.transport is None:
            return None
        obj = self.transport.get_extra_info("ssl_object")
        if obj is None:
            return None
        cipher = obj.cipher()
        if not cipher:
            return None
        name, version, bits = cipher
        return (obj.version() or version, name, bits)
