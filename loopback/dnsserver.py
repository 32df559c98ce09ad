"""A real DNS server on loopback for tests: records from a Python dict over UDP and TCP.

Owns: a small authoritative-style server (built on dnslib's packet codec and the standard
library's socketserver) that answers from in-memory data which tests may change while it runs,
misbehaves on request (drop, SERVFAIL, REFUSED, truncate, garbage, delay) and counts what it
receives, so tests assert caching and request merging by what the *server* saw.

Must not touch: anything of the ``palisade`` package (it is the other side of the wire). It is
test code, not shipped.

Trust: queries come from the code under test on loopback; unparsable packets are dropped.

Use::

    from tests.dnsserver import start_zone_server

    server = start_zone_server({
        "example.test": {"SOA": ["ns.example.test. hostmaster.example.test. 1 3600 600 86400 60"]},
        "mx.example.test": {"A": ["192.0.2.10"], "AAAA": ["2001:db8::10"]},
        "example.test.": {"MX": (["10 mx.example.test."], 120)},   # (records, ttl)
    })
    server.port, server.address           # -> 5xxxx, ("127.0.0.1", 5xxxx)
    server.set("new.example.test", "TXT", ["v=spf1 -all"], ttl=60)
    server.behave("slow.example.test", "timeout")  # or servfail, refused, truncate, garbage
    server.queries("mx.example.test", "A")          # how many such queries arrived
    server.set("_25._tcp.mx.example.test", "TLSA", ["3 1 1 <sha-256 hex>"])
    server.sign("example.test")   # answers from this zone carry AD (as a validating resolver's)
    server.stop()

Semantics: a name holding an SOA is a zone apex. A name with no data (and no data below it)
inside a zone gets NXDOMAIN, a name with data but not of the asked type gets NODATA; both carry
the zone's SOA in the authority section (for negative caching). Names outside every zone get
NXDOMAIN without SOA. CNAMEs are followed within the served data. UDP answers larger than 512
bytes (or the client's EDNS payload size) are truncated (TC) so the client retries over TCP.

DNSSEC, as a stub sees it: a zone marked with :meth:`ZoneServer.sign` stands for a zone the
validating resolver could validate. Answers about names in it (positive or negative) carry the AD
bit when the query asked for it (AD or DO set, RFC 6840 section 5.7), as unbound does; nothing is
really signed (no RRSIG, no DNSKEY): this server plays the *validating resolver*, and what it
tests is the stub's handling of AD. ``ad_queries`` counts queries that had AD set.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dnslib import (
    AAAA,
    CNAME,
    MX,
    NS,
    PTR,
    QTYPE,
    RCODE,
    RR,
    SOA,
    TLSA,
    TXT,
    A,
    DNSRecord,
)

BEHAVIOURS = ("timeout", "servfail", "refused", "truncate", "garbage", "delay")
RecordsSpec = Sequence[Any] | tuple[Sequence[Any], int]


def _norm(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _txt_chunks(value: Any) -> list[bytes]:
    """One TXT record: a str/bytes (split into 255-byte strings) or a list of strings."""
    if isinstance(value, list | tuple):
        return [v.encode() if isinstance(v, str) else bytes(v) for v in value]
    raw = value.encode() if isinstance(value, str) else bytes(value)
    return [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]


def _rdata(rdtype: str, value: Any) -> Any:
    if rdtype == "A":
        return A(value)
    if rdtype == "AAAA":
        return AAAA(value)
    if rdtype == "MX":
        pref, exchange = str(value).split()
        return MX(exchange, int(pref))
    if rdtype in ("TXT", "SPF"):
        return TXT(_txt_chunks(value))
    if rdtype == "PTR":
        return PTR(value)
    if rdtype == "CNAME":
        return CNAME(value)
    if rdtype == "NS":
        return NS(value)
    if rdtype == "TLSA":
        usage, selector, mtype, *data = str(value).split()
        return TLSA(int(usage), int(selector), int(mtype), bytes.fromhex("".join(data)))
    if rdtype == "SOA":
        mname, rname, *times = str(value).split()
        return SOA(mname, rname, tuple(int(t) for t in times))
    raise ValueError(f"ZoneServer does not serve {rdtype} records")


class _UDPHandler(socketserver.BaseRequestHandler):
    server: _UDPServer

    def handle(self) -> None:
        data, sock = self.request
        reply = self.server.zone._respond(data, "udp")
        if reply is not None:
            sock.sendto(reply, self.client_address)


class _TCPHandler(socketserver.BaseRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(10)
        try:
            while True:
                header = self._read(sock, 2)
                if header is None:
                    return
                data = self._read(sock, struct.unpack("!H", header)[0])
                if data is None:
                    return
                reply = self.server.zone._respond(data, "tcp")
                if reply is not None:
                    sock.sendall(struct.pack("!H", len(reply)) + reply)
        except OSError:
            return

    @staticmethod
    def _read(sock: socket.socket, size: int) -> bytes | None:
        buf = b""
        while len(buf) < size:
            chunk = sock.recv(size - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf


class _UDPServer(socketserver.ThreadingUDPServer):
    daemon_threads = True
    zone: ZoneServer


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    zone: ZoneServer


class ZoneServer:
    """Serves ``records`` ({name: {rdtype: [values] | ([values], ttl)}}) on 127.0.0.1."""

    def __init__(
        self,
        records: Mapping[str, Mapping[str, RecordsSpec]] | None = None,
        *,
        host: str = "127.0.0.1",
        default_ttl: int = 300,
    ) -> None:
        self.host = host
        self.default_ttl = default_ttl
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, tuple[list[Any], int]]] = {}
        self._behaviour: dict[tuple[str, str | None], tuple[str, float]] = {}
        self._counts: Counter[tuple[str, str]] = Counter()
        self._transport_counts: Counter[str] = Counter()
        self._signed: set[str] = set()
        self.ad_queries = 0
        self.log: list[tuple[str, str, str]] = []  # (transport, name, type) in arrival order
        self._udp: _UDPServer | None = None
        self._tcp: _TCPServer | None = None
        self._threads: list[threading.Thread] = []
        self.port = 0
        for name, types in (records or {}).items():
            for rdtype, spec in types.items():
                if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], int):
                    self.set(name, rdtype, spec[0], ttl=spec[1])
                else:
                    self.set(name, rdtype, spec)

    # ------------------------------------------------------------ lifecycle

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def start(self) -> ZoneServer:
        last_error: OSError | None = None
        for _ in range(50):
            udp = _UDPServer((self.host, 0), _UDPHandler)
            port = udp.server_address[1]
            try:
                tcp = _TCPServer((self.host, port), _TCPHandler)
            except OSError as exc:  # the TCP side of that port is taken: try another
                last_error = exc
                udp.server_close()
                continue
            break
        else:
            raise RuntimeError(f"no free UDP+TCP port pair: {last_error}")
        udp.zone = self
        tcp.zone = self
        self._udp, self._tcp, self.port = udp, tcp, port
        for srv in (udp, tcp):
            thread = threading.Thread(
                target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for srv in (self._udp, self._tcp):
            if srv is not None:
                srv.shutdown()
                srv.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._udp = self._tcp = None
        self._threads = []

    def __enter__(self) -> ZoneServer:
        return self.start() if self._udp is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ data

    def set(self, name: str, rdtype: str, records: Iterable[Any], ttl: int | None = None) -> None:
        """Replaces the ``rdtype`` records of ``name`` (an empty list removes them)."""
        rdtype = rdtype.upper()
        values = list(records)
        for value in values:
            _rdata(rdtype, value)  # validate now rather than when a query arrives
        with self._lock:
            node = self._data.setdefault(_norm(name), {})
            if values:
                node[rdtype] = (values, self.default_ttl if ttl is None else ttl)
            else:
                node.pop(rdtype, None)
                if not node:
                    del self._data[_norm(name)]

    def remove(self, name: str, rdtype: str | None = None) -> None:
        """Removes all records of ``name`` (or only those of ``rdtype``)."""
        with self._lock:
            if rdtype is None:
                self._data.pop(_norm(name), None)
            else:
                node = self._data.get(_norm(name), {})
                node.pop(rdtype.upper(), None)
                if not node:
                    self._data.pop(_norm(name), None)

    def add_zone(self, apex: str, *, negative_ttl: int = 60, ttl: int = 3600) -> None:
        """Makes ``apex`` a zone: an SOA whose MINIMUM (and TTL) gives the negative TTL."""
        apex = _norm(apex)
        soa = f"ns.{apex}. hostmaster.{apex}. 1 3600 600 86400 {negative_ttl}"
        self.set(apex, "SOA", [soa], ttl=max(ttl, negative_ttl))
        self.set(apex, "NS", [f"ns.{apex}."], ttl=ttl)

    def sign(self, apex: str, signed: bool = True) -> None:
        """Marks the zone at ``apex`` as DNSSEC-validated (answers about its names get AD when
        asked for), or unmarks it with ``signed=False``."""
        with self._lock:
            if signed:
                self._signed.add(_norm(apex))
            else:
                self._signed.discard(_norm(apex))

    def _is_signed(self, name: str) -> bool:
        apex = self._apex_for(name)
        return apex is not None and apex in self._signed

    def list_address(
        self, zone: str, ip: str, *answers: str, txt: str | None = None, ttl: int = 300
    ) -> str:
        """Lists ``ip`` in the DNSBL ``zone`` (A records ``answers``, default 127.0.0.2) and
        returns the query name."""
        import ipaddress

        addr = ipaddress.ip_address(ip)
        if addr.version == 4:
            labels = ".".join(reversed(str(addr).split(".")))
        else:
            labels = ".".join(reversed(addr.exploded.replace(":", "")))
        name = f"{labels}.{_norm(zone)}"
        self.set(name, "A", list(answers) or ["127.0.0.2"], ttl=ttl)
        if txt is not None:
            self.set(name, "TXT", [txt], ttl=ttl)
        return name

    def behave(
        self, name: str, behaviour: str | None, *, rdtype: str | None = None, delay: float = 0.0
    ) -> None:
        """Misbehaves for queries for ``name`` (any type, or only ``rdtype``).

        ``timeout``: never answer (drop); ``servfail`` / ``refused``: that rcode; ``truncate``:
        answer with TC and no records over UDP (TCP gets the real answer); ``garbage``: a packet
        that does not parse; ``delay``: answer normally after ``delay`` seconds. ``None`` clears.
        ``delay`` also applies before the other behaviours.
        """
        key = (_norm(name), rdtype.upper() if rdtype else None)
        with self._lock:
            if behaviour is None:
                self._behaviour.pop(key, None)
                return
            if behaviour not in BEHAVIOURS:
                raise ValueError(f"unknown behaviour {behaviour!r}; one of {BEHAVIOURS}")
            self._behaviour[key] = (behaviour, delay)

    # ------------------------------------------------------------ counters

    def queries(self, name: str, rdtype: str | None = None) -> int:
        """Queries received for ``name`` (of ``rdtype``, or of any type), UDP and TCP."""
        name = _norm(name)
        with self._lock:
            if rdtype is not None:
                return self._counts[(name, rdtype.upper())]
            return sum(n for (qn, _), n in self._counts.items() if qn == name)

    @property
    def total_queries(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def transport_queries(self, transport: str) -> int:
        """Queries received over ``"udp"`` or ``"tcp"``."""
        with self._lock:
            return self._transport_counts[transport]

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self._transport_counts.clear()
            self.log.clear()

    # ------------------------------------------------------------ answering

    def _respond(self, data: bytes, transport: str) -> bytes | None:
        try:
            request = DNSRecord.parse(data)
        except Exception:
            return None
        if not request.questions:
            return None
        question = request.q
        # the raw labels (str() would escape blanks and other octets as \DDD)
        qname = _norm(".".join(label.decode("latin-1") for label in question.qname.label))
        qtype = QTYPE.get(question.qtype, f"TYPE{question.qtype}")
        with self._lock:
            self._counts[(qname, qtype)] += 1
            self._transport_counts[transport] += 1
            self.log.append((transport, qname, qtype))
            self.ad_queries += bool(request.header.ad)
            behaviour = self._behaviour.get((qname, qtype)) or self._behaviour.get((qname, None))
        if behaviour is not None:
            kind, delay = behaviour
            if delay:
                time.sleep(delay)
            if kind == "timeout":
                return None
            if kind == "garbage":
                return data[:2] + b"\x81\x80\x00\x01\x00\x05\x00\x00\x00\x00\xff\xfe"
            if kind in ("servfail", "refused"):
                reply = request.reply()
                reply.header.rcode = RCODE.SERVFAIL if kind == "servfail" else RCODE.REFUSED
                return bytes(reply.pack())
            if kind == "truncate" and transport == "udp":
                return self._truncated(request)
        reply = request.reply()
        reply.header.ad = 0
        with self._lock:
            names = self._fill(reply, qname, qtype)
            if (request.header.ad or self._asked_do(request)) and all(
                self._is_signed(name) for name in names
            ):
                reply.header.ad = 1
        packed = bytes(reply.pack())
        if transport == "udp" and len(packed) > self._udp_limit(request):
            return self._truncated(request)
        return packed

    @staticmethod
    def _asked_do(request: DNSRecord) -> bool:
        return any(rr.rtype == QTYPE.OPT and rr.ttl & 0x8000 for rr in request.ar)

    @staticmethod
    def _udp_limit(request: DNSRecord) -> int:
        for rr in request.ar:
            if rr.rtype == QTYPE.OPT:
                return max(512, int(rr.rclass))
        return 512

    @staticmethod
    def _truncated(request: DNSRecord) -> bytes:
        reply = request.reply()
        reply.header.tc = 1
        return bytes(reply.pack())

    def _apex_for(self, name: str) -> str | None:
        labels = name.split(".")
        for i in range(len(labels)):
            candidate = ".".join(labels[i:])
            if "SOA" in self._data.get(candidate, {}):
                return candidate
        return None

    def _exists(self, name: str) -> bool:
        return name in self._data or any(other.endswith("." + name) for other in self._data)

    def _add(self, reply: DNSRecord, section: str, name: str, rdtype: str) -> None:
        values, ttl = self._data[name][rdtype]
        add = reply.add_answer if section == "answer" else reply.add_auth
        for value in values:
            add(RR(name + ".", getattr(QTYPE, rdtype), rdata=_rdata(rdtype, value), ttl=ttl))

    def _fill(self, reply: DNSRecord, qname: str, qtype: str) -> list[str]:
        """Fills the reply; returns the names the answer speaks for (for the AD bit)."""
        name = qname
        seen = [name]
        while True:
            node = self._data.get(name, {})
            if qtype in node:
                self._add(reply, "answer", name, qtype)
                return seen
            if "CNAME" in node and qtype != "CNAME":
                self._add(reply, "answer", name, "CNAME")
                target = _norm(str(node["CNAME"][0][0]))
                if target in seen or (target not in self._data and self._apex_for(target) is None):
                    return seen  # loop, or out of our zones: the client chases it
                seen.append(target)
                name = target
                continue
            break
        if not self._exists(name):
            reply.header.rcode = RCODE.NXDOMAIN
        apex = self._apex_for(name)
        if apex is not None:
            self._add(reply, "authority", apex, "SOA")
        return seen


def start_zone_server(
    records: Mapping[str, Mapping[str, RecordsSpec]] | None = None, **kwargs: Any
) -> ZoneServer:
    """Builds and starts a :class:`ZoneServer`; the caller stops it (or uses ``with``)."""
    return ZoneServer(records, **kwargs).start()
