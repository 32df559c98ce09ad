"""Prometheus metrics, derived in one place from the events the program already logs.

Owns: the metric names, their labels and buckets (README "Prometheus metrics"), and
:meth:`Metrics.observe`, the one function that turns an event into counter increments and
histogram observations. Events are what the rest of the program hands its ``EventLog``
(:mod:`palisade.obs.log`): a log line whose fields carry ``event=NAME`` (a refusal, an arrival,
a delivery, a block), or a line-less :meth:`~palisade.obs.log.EventLog.event` (a stage's check
times, a closed connection, a TLS handshake, a scanner call). Nothing else in the program touches
a metric: the conversation stays sans-I/O, the sessions and the queue runner only log.

Several processes: prometheus-client's multiprocess mode. Each process writes its own file
(``counter_PID.db``, ``histogram_PID.db``) in ``[metrics] dir``, which :func:`prepare` empties
before the first process starts and before ``prometheus_client`` is imported (the library
chooses its value class at import, from ``PROMETHEUS_MULTIPROC_DIR``). The parent reads every
file at each scrape; a dead worker's file stays, so its counts are neither lost nor counted
twice by the worker that replaces it (that one writes a file of its own pid).

Trust: label values come from the config (rule names, DNSBL zone names) or from this program
(stages, verbs, outcomes, scanner names), never from a client; a value is cut to 64 characters
all the same, so a mistake cannot make a series of unbounded size.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["ENV", "Metrics", "prepare"]

ENV = "PROMETHEUS_MULTIPROC_DIR"
_LABEL_MAX = 64
# seconds: a warm cache answers in tens of microseconds, a scanner in tens of milliseconds, a
# dead dependency at its time-out
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
# SpamAssassin points: tag is usually 4.5-5, kill 10-16
SCORE_BUCKETS = (-5.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0, 30.0)
CONNECTION_OUTCOMES = ("accepted", "refused", "pregreet", "too_many")
MESSAGE_OUTCOMES = {
    "accepted": "accepted",
    "delivered": "delivered",
    "deferred": "deferred",
    "failed": "failed",
    "bounce": "bounced",
}


def prepare(directory: Path) -> None:
    """Before any process of the gateway starts: ``directory`` made empty (the counts of a
    previous run go; Prometheus sees a counter reset) and named to prometheus-client."""
    if directory.is_dir():
        shutil.rmtree(directory)
    directory.mkdir(mode=0o700, parents=True)
    os.environ[ENV] = str(directory)


def _label(value: object) -> str:
    return str(value)[:_LABEL_MAX]


class Metrics:
    """The metric objects of this program, and :meth:`observe`, which feeds them."""

    def __init__(self) -> None:
        if ENV not in os.environ:
            raise RuntimeError("palisade.obs.metrics.prepare() must come first")
        from prometheus_client import Counter, Histogram

        self.connections = Counter(
            "palisade_connections",
            "Client connections by outcome: accepted (greeted), refused (a connect rule), "
            "pregreet (spoke before the banner), too_many (connection limits)",
            ["outcome"],
        )
        self.closed = Counter("palisade_connections_closed", "Client connections that ended")
        self.refusals = Counter(
            "palisade_refusals",
            "Refusals (5xx and 4xx answers that refuse) by stage, rule and verb",
            ["stage", "rule", "verb"],
        )
        self.messages = Counter(
            "palisade_messages",
            "Messages accepted (250 after DATA), delivery outcomes per recipient (delivered, "
            "deferred, failed) and bounce messages made (bounced)",
            ["outcome"],
        )
        self.spam_score = Histogram(
            "palisade_spam_score", "Spam scanner scores of messages scanned", buckets=SCORE_BUCKETS
        )
        self.check_seconds = Histogram(
            "palisade_check_seconds",
            "Time each rule's check took, by stage and rule",
            ["stage", "rule"],
            buckets=LATENCY_BUCKETS,
        )
        self.check_errors = Counter(
            "palisade_check_errors",
            "Checks that failed temporarily (time-out, DNS or store error), by stage and rule",
            ["stage", "rule"],
        )
        self.dnsbl_seconds = Histogram(
            "palisade_dnsbl_seconds",
            "Time each DNSBL zone took to answer, by zone (public name)",
            ["zone"],
            buckets=LATENCY_BUCKETS,
        )
        self.dnsbl_errors = Counter(
            "palisade_dnsbl_errors", "DNSBL lookups that failed or gave an error code", ["zone"]
        )
        self.service_seconds = Histogram(
            "palisade_service_seconds",
            "Time of each call to a scanner (spamd, rspamd, clamd) or the LDAP directory",
            ["service"],
            buckets=LATENCY_BUCKETS,
        )
        self.service_errors = Counter(
            "palisade_service_errors",
            "Calls to a scanner or the LDAP directory that failed",
            ["service"],
        )
        self.tls = Counter(
            "palisade_tls_handshakes", "STARTTLS handshakes by result (ok, failed)", ["result"]
        )
        self.blocks = Counter(
            "palisade_firewall_blocks",
            "Blocks made by incidents (an address reaching [incidents] block_at)",
        )
        # label values -> child, per metric: ``labels()`` costs microseconds (it validates and
        # takes a lock), a dict lookup tens of nanoseconds; the label space is the config's
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}
        self._tls_ok = self.tls.labels("ok")
        self._tls_failed = self.tls.labels("failed")
        self._connection = {o: self.connections.labels(o) for o in CONNECTION_OUTCOMES}
        self._message = {k: self.messages.labels(v) for k, v in MESSAGE_OUTCOMES.items()}

    def _child(self, metric: Any, *labels: object) -> Any:
        key = (metric, tuple(map(_label, labels)))
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*key[1])
        return child

    def prime(
        self,
        rules: Iterable[tuple[str, str]],
        zones: Iterable[str],
        services: Iterable[str],
    ) -> None:
        """Makes the series of the configured rules (stage, name), DNSBL zones and services
        (scanners, ``ldap``) exist at zero from the start: a dashboard shows them before the
        first event, and ``rate()`` sees the first increment."""
        for stage, rule in rules:
            self._child(self.check_seconds, stage, rule)
            self._child(self.check_errors, stage, rule)
        for zone in zones:
            self._child(self.dnsbl_seconds, zone)
            self._child(self.dnsbl_errors, zone)
        for service in services:
            self._child(self.service_seconds, service)
            self._child(self.service_errors, service)

    def observe(self, name: object, fields: Mapping[str, Any]) -> None:
        """One event (see the module docstring); events that no metric follows are ignored."""
        if name == "checks":
            self._checks(fields)
        elif name == "refused":
            connection = fields.get("connection")
            if connection in self._connection:
                self._connection[connection].inc()
            self._child(
                self.refusals,
                fields.get("stage", ""),
                fields.get("rule", ""),
                fields.get("verb", ""),
            ).inc()
        elif name in self._message:
            self._message[name].inc()
        elif name == "greeted":
            self._connection["accepted"].inc()
        elif name == "closed":
            self.closed.inc()
        elif name == "tls":
            (self._tls_ok if fields.get("ok") else self._tls_failed).inc()
        elif name == "service":
            service = fields.get("service", "")
            self._child(self.service_seconds, service).observe(float(fields.get("seconds", 0.0)))
            if fields.get("error"):
                self._child(self.service_errors, service).inc()
        elif name == "block":
            self.blocks.inc()

    def _checks(self, fields: Mapping[str, Any]) -> None:
        stage = fields.get("stage", "")
        rules: Iterable[tuple[str, float, bool]] = fields.get("rules", ())
        for rule, seconds, failed in rules:
            self._child(self.check_seconds, stage, rule).observe(seconds)
            if failed:
                self._child(self.check_errors, stage, rule).inc()
        zones: Iterable[tuple[str, float, bool]] = fields.get("zones", ())
        for zone, seconds, failed in zones:
            self._child(self.dnsbl_seconds, zone).observe(seconds)
            if failed:
                self._child(self.dnsbl_errors, zone).inc()
        score = fields.get("spam_score")
        if score is not None:
            self.spam_score.observe(float(score))
