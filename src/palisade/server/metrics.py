"""The Prometheus endpoint of the gateway, and the timing of its scanner and LDAP calls.

Owns: setting the metrics up at start (:func:`start_metrics`: the multiprocess directory
emptied, then ``prometheus_client`` imported; nothing of it is imported while ``[metrics]
listen`` is empty), the HTTP endpoint the parent (or the single process) serves
(:func:`serve_metrics`), the queue gauges read at each scrape (:class:`QueueCollector`), and the
port wrappers that time each call to spamd, rspamd, clamd and the LDAP directory
(:func:`timed_ports`; they report through the event log, so the metrics are still derived in
:mod:`palisade.obs.metrics` alone).

The endpoint answers ``GET /metrics`` (and ``HEAD``; a query string is ignored) and nothing
else: any other path is 404, any other method 405. A request must come whole (request line and
headers, at most 8 KiB, no body) within 5 seconds, else the connection is closed; at most 8
scrapes are served at once, more are closed at once. Responses are ``Connection: close``.
Trust: the scraper is not trusted more than a client: its bytes are only compared with
``/metrics``; the endpoint binds where ``[metrics] listen`` says (keep it on loopback or a
management network: the counts say which rules and zones you use).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from palisade.config import Config
from palisade.obs import metrics as obs_metrics
from palisade.obs.log import EventLog
from palisade.policy.policy import Policy
from palisade.policy.rules import Ports, Stage, active_zones
from palisade.ports import (
    MessageSource,
    RecipientDirectory,
    SpamReport,
    SpamScanner,
    VirusReport,
    VirusScanner,
)
from palisade.spool import Spool

REQUEST_MAX = 8192
REQUEST_TIMEOUT = 5.0
MAX_SCRAPES = 8


def start_metrics(config: Config, policy: Policy) -> obs_metrics.Metrics | None:
    """At start, before any worker is forked: None when ``[metrics] listen`` is empty; else the
    multiprocess directory is emptied and the metric objects made (the workers inherit them),
    with the series of ``policy``'s rules and zones and the configured services at zero."""
    if not config.metrics.listen:
        return None
    obs_metrics.prepare(config.metrics.directory(config.paths.spool))
    metrics = obs_metrics.Metrics()
    rules = [rule for stage in Stage for rule in policy.for_stage(stage)]
    services = [
        name
        for name, on in (
            ("ldap", bool(config.ldap.servers)),
            ("spamd", bool(config.spamd.address)),
            ("rspamd", bool(config.rspamd.url)),
            ("clamd", bool(config.clamd.address)),
        )
        if on
    ]
    metrics.prime(
        rules=[(rule.stage.value, rule.name) for rule in rules],
        zones=sorted({zone for rule in rules for zone in active_zones(rule.check)}),
        services=services,
    )
    return metrics


def worker_gone(pid: int) -> None:
    """A worker died: prometheus-client forgets its live gauges (its counters and histograms
    stay in its file, so what it counted is neither lost nor counted again by the next one)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


# -- scrape -----------------------------------------------------------------------------------


class QueueCollector:
    """``palisade_queue_messages`` and ``palisade_queue_oldest_age_seconds``, read from the
    spool at each scrape (one directory scan, as ``palisade status`` does)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from palisade.server.control import queue_census

        size, oldest = queue_census(self.spool)
        yield GaugeMetricFamily("palisade_queue_messages", "Messages in the queue", value=size)
        age = 0.0 if oldest is None else max(0.0, time.time() - oldest)
        yield GaugeMetricFamily(
            "palisade_queue_oldest_age_seconds",
            "Age of the oldest message in the queue (0 when empty)",
            value=age,
        )


def renderer(spool: Spool) -> Callable[[], bytes]:
    """The text of a scrape: every process's files summed, and the queue gauges."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(QueueCollector(spool))

    def render() -> bytes:
        return bytes(generate_latest(registry))

    return render


class MetricsServer:
    """The HTTP endpoint (see the module docstring)."""

    def __init__(self, render: Callable[[], bytes]) -> None:
        self.render = render
        self.server: asyncio.Server | None = None
        self._busy = 0

    async def start(self, sock: socket.socket) -> None:
        """Serves on ``sock`` (bound at start, before the privilege drop and the forks)."""
        self.server = await asyncio.start_server(self._handle, sock=sock, limit=REQUEST_MAX)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._busy >= MAX_SCRAPES:
            writer.close()
            return
        self._busy += 1
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                await self._answer(head, writer)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except (ConnectionError, OSError):
            pass
        finally:
            self._busy -= 1
            writer.close()

    async def _answer(self, head: bytes, writer: asyncio.StreamWriter) -> None:
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            await self._send(writer, 400, b"bad request\n")
            return
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target != b"/metrics":
            await self._send(writer, 404, b"not found: only /metrics is served\n")
            return
        if method not in (b"GET", b"HEAD"):
            await self._send(writer, 405, b"method not allowed\n", extra=b"Allow: GET, HEAD\r\n")
            return
        from prometheus_client import CONTENT_TYPE_LATEST

        body = await asyncio.get_running_loop().run_in_executor(None, self.render)
        await self._send(
            writer, 200, body, content_type=CONTENT_TYPE_LATEST.encode(), head=method == b"HEAD"
        )

    @staticmethod
    async def _send(
        writer: asyncio.StreamWriter,
        code: int,
        body: bytes,
        *,
        content_type: bytes = b"text/plain; charset=utf-8",
        extra: bytes = b"",
        head: bool = False,
    ) -> None:
        reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed"}
        writer.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s"
            b"Connection: close\r\n\r\n" % (code, reason[code], content_type, len(body), extra)
        )
        if not head:
            writer.write(body)
        await writer.drain()


async def serve_metrics(sock: socket.socket | None, spool: Spool) -> MetricsServer | None:
    """The endpoint on ``sock`` in this process (the parent, or the single one); None when
    ``[metrics] listen`` is off (no socket)."""
    if sock is None:
        return None
    server = MetricsServer(renderer(spool))
    await server.start(sock)
    return server


# -- scanner and LDAP calls ---------------------------------------------------------------------


class _Timed:
    def __init__(self, inner: Any, service: str, log: EventLog) -> None:
        self._inner = inner
        self._service = service
        self._log = log

    def __getattr__(self, name: str) -> Any:  # name, max_size, close, ...: the inner's
        return getattr(self._inner, name)

    def _done(self, started: float, error: bool) -> None:
        self._log.event(
            "service", service=self._service, seconds=time.monotonic() - started, error=error
        )


class TimedDirectory(_Timed):
    """The LDAP directory, each lookup timed (its cache's answers too)."""

    async def exists(self, address: str) -> bool:
        started = time.monotonic()
        try:
            found: bool = await self._inner.exists(address)
        except BaseException:
            self._done(started, True)
            raise
        self._done(started, False)
        return found


class TimedSpamScanner(_Timed):
    async def scan(self, message: MessageSource) -> SpamReport:
        started = time.monotonic()
        try:
            report: SpamReport = await self._inner.scan(message)
        except BaseException:
            self._done(started, True)
            raise
        self._done(started, False)
        return report


class TimedVirusScanner(_Timed):
    async def scan(self, message: MessageSource) -> VirusReport:
        started = time.monotonic()
        try:
            report: VirusReport = await self._inner.scan(message)
        except BaseException:
            self._done(started, True)
            raise
        self._done(started, False)
        return report


def timed_ports(ports: Ports, log: EventLog) -> Ports:
    """``ports`` with the LDAP directory and the scanners timed (service names: ``ldap``, and
    the scanner's own: ``spamd``, ``rspamd``, ``clamd``)."""
    recipients: RecipientDirectory | None = ports.recipients
    spam: SpamScanner | None = ports.spam
    virus: VirusScanner | None = ports.virus
    if recipients is not None:
        recipients = TimedDirectory(recipients, "ldap", log)
    if spam is not None:
        spam = TimedSpamScanner(spam, spam.name, log)
    if virus is not None:
        virus = TimedVirusScanner(virus, virus.name, log)
    return replace(ports, recipients=recipients, spam=spam, virus=virus)
