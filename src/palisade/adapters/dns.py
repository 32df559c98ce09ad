"""DNS adapter: a caching, request-merging stub resolver behind the ``Resolver`` port.

Owns: talking DNS to the configured recursive resolvers (UDP with EDNS, TCP on truncation,
timeouts and retries), following CNAME chains, rendering answers as the text that
``palisade.ports.DnsAnswer`` documents, the in-process answer cache, the merging of identical
concurrent lookups, and the counters the benchmark reports (``DnsResolver.stats``).

Must not touch: policy (it reports NXDOMAIN/NODATA/records or a ``DnsTempError``, never a
verdict), logging, configuration files (the composition root passes plain values), and any
project module other than ``palisade.ports`` (import-linter contract "Adapters import ports
only"). ``/etc/resolv.conf`` is read only when no nameserver is configured.

Trust: everything that comes off the wire is hostile until parsed. The wire format is parsed by
dnspython (a well-kept library; we do not hand-roll DNS parsing). Responses must match our query
(id, question, source address; dnspython checks this, and unmatched or unparsable UDP datagrams are
ignored, as a spoofing defence, so they end as a timeout). Any failure to get a usable answer --
timeout, SERVFAIL, REFUSED, FORMERR, network error, malformed packet, CNAME loop -- becomes
``DnsTempError`` with a reason; nothing else escapes ``query``/``ptr`` for network input. Names
given by callers usually come from SMTP clients (HELO, sender domains): a name that cannot exist
in the DNS (empty label, label over 63 octets, name over 255 octets, backslash escapes) is
answered as NXDOMAIN with TTL 0 without sending anything. A bad ``rdtype`` or IP address passed
to ``ptr`` is a programming error and raises ``ValueError``. Record contents (TXT text, names)
are returned verbatim: callers must still escape them before logging.

Why the cache and the merging are written here rather than taken from dnspython: dnspython's
``dns.resolver.Cache``/``LRUCache`` are synchronous, keyed on its own ``Answer`` objects, do not
cache NXDOMAIN/NODATA with RFC 2308 negative TTLs under our caps, have no notion of an injectable
clock (tests must expire entries without sleeping) and no request merging; and its async resolver
reads resolv.conf and raises a family of exceptions we would have to translate anyway. The part
where correctness is hard (the wire protocol) comes from dnspython; the policy-shaped parts
(what to cache for how long, what counts as a temporary failure) are ours and small.

DNSSEC (for DANE, RFC 7672): every query goes out with the AD bit set (RFC 6840 section 5.7: "I
understand AD, tell me"), without DO, so a validating resolver says whether it validated the
answer without sending signatures. The answer's AD bit becomes ``DnsAnswer.authentic`` (for a
CNAME chain chased with several queries, only when every answer had it), and the cache keeps it.
This stub does not validate: AD is only as good as the resolver that set it and the path to it.
``trust_ad`` says whether to believe it: by default (None) only when every nameserver is on
loopback (a validating unbound on 127.0.0.1, the documented set-up), where nobody on the network
can forge the bit; False never reports an answer as authentic; True believes any nameserver (a
resolver on a link the operator trusts).

Cache semantics:
* positive answers live for the smallest TTL of the answer RRset and of the CNAMEs followed to it,
  raised to ``cache_min_ttl`` and capped at ``cache_max_ttl``;
* NXDOMAIN and NODATA live for min(SOA TTL, SOA MINIMUM) of the SOA in the authority section
  (RFC 2308 section 5), or ``negative_ttl_default`` when there is none, raised to ``cache_min_ttl``
  and capped at ``negative_ttl_cap``;
* temporary failures (timeout, SERVFAIL, REFUSED, ...) are remembered for ``failure_ttl`` seconds
  (default 5, 0 disables): during a resolver outage every SMTP connection would otherwise wait
  ``timeout * (retries + 1)`` again for the same name; a few seconds bounds that without hiding a
  recovery for long (RFC 2308 section 7 allows up to five minutes);
* TTL 0 answers are not stored; the cache holds at most ``cache_size`` entries and drops the
  oldest-inserted first; expiry uses ``clock.monotonic()``.
* cache hits return the remaining lifetime (rounded up) as ``DnsAnswer.ttl``.

Merging: while a lookup for (name, type) is on the wire, further identical lookups await the
same task instead of sending. The task is shielded, so one caller being cancelled (a per-check
deadline) does not cancel the lookup for the others. Its outcome, answer or failure, reaches all
waiters.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import math
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.reversename
import dns.rrset

from palisade.clock import SYSTEM_CLOCK
from palisade.ports import Clock, DnsAnswer, DnsTempError

__all__ = ["DnsResolver", "DnsStats"]

MAX_CNAME_HOPS = 8
_META_TYPES = frozenset(
    {
        dns.rdatatype.ANY,
        dns.rdatatype.AXFR,
        dns.rdatatype.IXFR,
        dns.rdatatype.OPT,
        dns.rdatatype.TSIG,
        dns.rdatatype.TKEY,
    }
)
_NAME_TYPES = frozenset({dns.rdatatype.PTR, dns.rdatatype.CNAME, dns.rdatatype.NS})
_TEXT_TYPES = frozenset({dns.rdatatype.TXT, dns.rdatatype.SPF})


@dataclass
class DnsStats:
    """Counters since construction (or the last ``reset``).

    ``lookups`` counts calls to ``query``/``ptr``; each is exactly one of ``cache_hits``,
    ``merged`` (joined an in-flight lookup), ``resolutions`` (went to the network) or
    ``invalid_names``. ``queries_sent`` counts packets put on the wire: every UDP try, every TCP
    retry after truncation and every extra query to chase a CNAME the resolver did not chase.
    """

    lookups: int = 0
    cache_hits: int = 0
    merged: int = 0
    resolutions: int = 0
    invalid_names: int = 0
    queries_sent: int = 0
    tcp_fallbacks: int = 0
    failures: int = 0
    evictions: int = 0

    def snapshot(self) -> dict[str, int]:
        return asdict(self)

    def reset(self) -> None:
        for key in self.snapshot():
            setattr(self, key, 0)


# Cache and merge key: the canonical (lower-case, absolute) name as text and the type number.
# Text rather than dns.name.Name: a Name computes its hash anew at every dict probe.
_Key = tuple[str, int]


@dataclass(frozen=True, slots=True)
class _Entry:
    records: tuple[str, ...]
    nxdomain: bool
    ttl: int  # seconds to keep, after caps
    error: str | None = None  # set for a temporary failure
    authentic: bool = False  # every answer behind it had AD set (and AD is trusted)


def _parse_rdtype(rdtype: str) -> dns.rdatatype.RdataType:
    try:
        value = dns.rdatatype.from_text(rdtype.strip().upper())
    except (dns.exception.DNSException, ValueError) as exc:
        raise ValueError(f"unknown DNS record type {rdtype!r}") from exc
    if value in _META_TYPES or dns.rdatatype.is_metatype(value):
        raise ValueError(f"record type {rdtype!r} cannot be queried here")
    return value


def _parse_name(name: str) -> dns.name.Name | None:
    """An absolute, lowercased name, or None when ``name`` cannot exist in the DNS.

    A label may hold any printable octet, blanks included (SPF macros expand to such names,
    RFC 7208 7.3); control characters and backslashes (which would be read as escapes) are
    refused without a query.
    """
    text = name[:-1] if name.endswith(".") else name
    if not text or "\\" in text or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        return None
    try:
        parsed = dns.name.from_text(text, origin=dns.name.root)
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return None
    if parsed == dns.name.root:
        return None
    return parsed.canonicalize()


def _render(rdata: dns.rdata.Rdata) -> str:
    rdtype = rdata.rdtype
    if rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        return str(rdata.address)  # type: ignore[attr-defined]
    if rdtype == dns.rdatatype.MX:
        exchange = rdata.exchange.to_text().lower()  # type: ignore[attr-defined]
        return f"{rdata.preference} {exchange}"  # type: ignore[attr-defined]
    if rdtype in _TEXT_TYPES:
        return b"".join(rdata.strings).decode("latin-1")  # type: ignore[attr-defined]
    if rdtype in _NAME_TYPES:
        return str(rdata.target.to_text()).rstrip(".").lower()  # type: ignore[attr-defined]
    return str(rdata.to_text())


def _system_nameservers() -> list[tuple[str, int]]:
    try:
        system = dns.resolver.Resolver(configure=True)
        found = [
            (str(ns), int(system.port))
            for ns in system.nameservers
            if isinstance(ns, str) and _is_ip(ns)
        ]
    except (dns.exception.DNSException, OSError):
        found = []
    return found or [("127.0.0.1", 53)]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class DnsResolver:
    """A caching stub resolver that sends RD queries to the given recursive resolvers.

    ``nameservers`` are (address, port) pairs of recursive resolvers, tried in turn; an empty
    list means the system's resolv.conf (port 53). ``timeout`` is per try, ``retries`` is the
    number of extra tries after the first (each try goes to the next nameserver, round-robin).
    A SERVFAIL/REFUSED/network error from a nameserver is not retried on that same nameserver.
    ``redact`` lists secrets (a Spamhaus DQS key is part of the zone name) that are replaced by
    ``<redacted>`` in every ``DnsTempError`` reason, since reasons end up in logs.
    ``trust_ad``: whether the resolvers' AD bit is believed (see the module docstring; None:
    only when every nameserver is a loopback address).
    """

    def __init__(
        self,
        nameservers: list[tuple[str, int]] | None = None,
        *,
        timeout: float = 2.0,
        retries: int = 1,
        cache_max_ttl: int = 3600,
        cache_min_ttl: int = 0,
        negative_ttl_cap: int = 900,
        negative_ttl_default: int = 60,
        failure_ttl: float = 5.0,
        redact: Sequence[str] = (),
        cache_size: int = 100_000,
        use_tcp_fallback: bool = True,
        edns_payload: int = 1232,
        clock: Clock | None = None,
        trust_ad: bool | None = None,
    ) -> None:
        servers = list(nameservers) if nameservers else _system_nameservers()
        for host, port in servers:
            if not _is_ip(host):
                raise ValueError(f"nameserver {host!r} is not an IP address")
            if not 0 < int(port) < 65536:
                raise ValueError(f"nameserver port {port!r} out of range")
        if timeout <= 0 or retries < 0 or cache_size < 0 or edns_payload < 0:
            raise ValueError("timeout must be positive; retries, cache_size, edns_payload >= 0")
        self._nameservers = [(str(ipaddress.ip_address(h)), int(p)) for h, p in servers]
        self._trust_ad = (
            all(ipaddress.ip_address(h).is_loopback for h, _ in self._nameservers)
            if trust_ad is None
            else bool(trust_ad)
        )
        self._timeout = float(timeout)
        self._tries = int(retries) + 1
        self._max_ttl = int(cache_max_ttl)
        self._min_ttl = int(cache_min_ttl)
        self._neg_cap = int(negative_ttl_cap)
        self._neg_default = int(negative_ttl_default)
        self._failure_ttl = float(failure_ttl)
        self._redact = tuple(sorted({s.lower() for s in redact if s}, key=len, reverse=True))
        self._cache_size = int(cache_size)
        self._tcp_fallback = bool(use_tcp_fallback)
        self._edns_payload = int(edns_payload)
        self._clock: Clock = clock if clock is not None else SYSTEM_CLOCK
        self._cache: OrderedDict[_Key, tuple[float, _Entry]] = OrderedDict()
        self._inflight: dict[_Key, asyncio.Task[_Entry]] = {}
        # (name text, rdtype text) -> parsed key: a warm-cache lookup then costs two dict probes
        # instead of dnspython's name parsing (measured: ~9 % of a worker's time under load).
        self._parsed: dict[
            tuple[str, str], tuple[dns.name.Name, dns.rdatatype.RdataType, _Key] | None
        ] = {}
        self._ptr_names: dict[str, str] = {}
        self.stats = DnsStats()

    # ---------------------------------------------------------------- public API

    @property
    def nameservers(self) -> list[tuple[str, int]]:
        return list(self._nameservers)

    @property
    def trusts_ad(self) -> bool:
        """Whether answers may be reported ``authentic`` (the AD bit is believed)."""
        return self._trust_ad

    def cache_len(self) -> int:
        return len(self._cache)

    def cache_clear(self) -> None:
        self._cache.clear()

    async def ptr(self, ip: str) -> DnsAnswer:
        """PTR lookup of ``ip``; an IPv4-mapped IPv6 address is looked up as its IPv4 address."""
        name = self._ptr_names.get(ip)
        if name is None:
            addr = ipaddress.ip_address(ip)
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            name = dns.reversename.from_address(str(addr)).to_text()
            if len(self._ptr_names) >= self._cache_size:
                self._ptr_names.clear()
            self._ptr_names[ip] = name
        return await self.query(name, "PTR")

    async def query(self, name: str, rdtype: str) -> DnsAnswer:
        """Cached, merged lookup; see the module docstring for what is cached and for how long."""
        self.stats.lookups += 1
        text_key = (name, rdtype)
        if text_key in self._parsed:
            parsed = self._parsed[text_key]
        else:
            qtype_parsed = _parse_rdtype(rdtype)  # ValueError for a bad type: not memoised
            qname_parsed = _parse_name(name)
            parsed = (
                None
                if qname_parsed is None
                else (qname_parsed, qtype_parsed, (qname_parsed.to_text(), int(qtype_parsed)))
            )
            if len(self._parsed) >= self._cache_size:
                self._parsed.clear()
            self._parsed[text_key] = parsed
        if parsed is None:
            self.stats.invalid_names += 1
            return DnsAnswer(records=(), ttl=0, nxdomain=True)
        qname, qtype, key = parsed
        cached = self._cache_get(key)
        if cached is not None:
            self.stats.cache_hits += 1
            entry, remaining = cached
            if entry.error is not None:
                raise DnsTempError(f"{entry.error} (remembered for {remaining}s)")
            return self._deliver(entry, remaining)
        loop = asyncio.get_running_loop()
        task = self._inflight.get(key)
        if task is not None and task.get_loop() is loop and not task.done():
            self.stats.merged += 1
        else:
            self.stats.resolutions += 1
            task = loop.create_task(self._resolve(key, qname, qtype))
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._forget, key))
        entry = await asyncio.shield(task)
        return self._deliver(entry, entry.ttl)

    def _redacted(self, text: str) -> str:
        for secret in self._redact:
            text = re.sub(re.escape(secret), "<redacted>", text, flags=re.IGNORECASE)
        return text

    # ---------------------------------------------------------------- cache

    def _cache_get(self, key: _Key) -> tuple[_Entry, int] | None:
        item = self._cache.get(key)
        if item is None:
            return None
        expires, entry = item
        remaining = expires - self._clock.monotonic()
        if remaining <= 0:
            del self._cache[key]
            return None
        return entry, math.ceil(remaining)

    def _cache_put(self, key: _Key, entry: _Entry, ttl: float) -> None:
        if ttl <= 0 or self._cache_size == 0:
            return
        self._cache.pop(key, None)
        self._cache[key] = (self._clock.monotonic() + ttl, entry)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
            self.stats.evictions += 1

    def _forget(self, key: _Key, task: asyncio.Task[_Entry]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]

    @staticmethod
    def _deliver(entry: _Entry, ttl: int) -> DnsAnswer:
        if entry.error is not None:
            raise DnsTempError(entry.error)
        return DnsAnswer(
            records=entry.records, ttl=ttl, nxdomain=entry.nxdomain, authentic=entry.authentic
        )

    # ---------------------------------------------------------------- resolution

    async def _resolve(
        self, key: _Key, qname: dns.name.Name, qtype: dns.rdatatype.RdataType
    ) -> _Entry:
        """Never raises (but for cancellation): failures become error entries."""
        label = f"{qname.to_text()} {dns.rdatatype.to_text(qtype)}"
        try:
            entry = await self._lookup(qname, qtype)
        except DnsTempError as exc:
            entry = _Entry((), False, 0, error=self._redacted(f"{label}: {exc.reason}"))
            self.stats.failures += 1
            self._cache_put(key, entry, self._failure_ttl)
            return entry
        except Exception as exc:  # defensive: hostile input must never escape as anything else
            reason = f"{label}: unusable answer ({type(exc).__name__})"
            entry = _Entry((), False, 0, error=self._redacted(reason))
            self.stats.failures += 1
            self._cache_put(key, entry, self._failure_ttl)
            return entry
        self._cache_put(key, entry, entry.ttl)
        return entry

    async def _lookup(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType) -> _Entry:
        current = qname
        seen = {qname}
        chain_ttls: list[int] = []
        authentic = self._trust_ad
        for _ in range(MAX_CNAME_HOPS + 1):
            msg = await self._exchange(current, qtype)
            authentic = authentic and bool(msg.flags & dns.flags.AD)
            target = current
            while True:
                rrset = msg.get_rrset(msg.answer, target, dns.rdataclass.IN, qtype)
                if rrset is not None and len(rrset) > 0:
                    records = tuple(_render(rdata) for rdata in rrset)
                    ttl = self._positive_ttl([*chain_ttls, rrset.ttl])
                    return _Entry(records, False, ttl, authentic=authentic)
                if qtype == dns.rdatatype.CNAME:
                    break
                cname = msg.get_rrset(msg.answer, target, dns.rdataclass.IN, dns.rdatatype.CNAME)
                if cname is None or len(cname) == 0:
                    break
                chain_ttls.append(cname.ttl)
                target = cname[0].target.canonicalize()
                if target in seen:
                    raise DnsTempError("CNAME loop")
                if len(seen) > MAX_CNAME_HOPS:
                    raise DnsTempError("CNAME chain too long")
                seen.add(target)
            soa = self._authority_soa(msg)
            if msg.rcode() == dns.rcode.NXDOMAIN:
                ttl = self._negative_ttl(soa, chain_ttls)
                return _Entry((), True, ttl, authentic=authentic)
            if target == current or soa is not None:
                ttl = self._negative_ttl(soa, chain_ttls)
                return _Entry((), False, ttl, authentic=authentic)
            current = target  # the resolver did not chase the CNAME for us: ask for the target
        raise DnsTempError("CNAME chain too long")

    @staticmethod
    def _authority_soa(msg: dns.message.Message) -> dns.rrset.RRset | None:
        for rrset in msg.authority:
            if rrset.rdtype == dns.rdatatype.SOA and rrset.rdclass == dns.rdataclass.IN:
                return rrset if len(rrset) > 0 else None
        return None

    def _positive_ttl(self, ttls: list[int]) -> int:
        return max(self._min_ttl, min(min(ttls), self._max_ttl))

    def _negative_ttl(self, soa: dns.rrset.RRset | None, chain_ttls: list[int]) -> int:
        ttl = self._neg_default if soa is None else min(soa.ttl, soa[0].minimum)
        ttl = min([ttl, *chain_ttls])
        return min(max(self._min_ttl, ttl), self._neg_cap)

    async def _exchange(
        self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType
    ) -> dns.message.Message:
        """One question to the nameservers with retries; NOERROR/NXDOMAIN or DnsTempError."""
        if self._edns_payload:
            query = dns.message.make_query(qname, qtype, use_edns=0, payload=self._edns_payload)
        else:
            query = dns.message.make_query(qname, qtype, use_edns=False)
        query.flags |= dns.flags.AD  # RFC 6840 section 5.7: tell us whether you validated it
        errors: list[str] = []
        refused_by: set[tuple[str, int]] = set()
        for attempt in range(self._tries):
            server = self._nameservers[attempt % len(self._nameservers)]
            if server in refused_by:
                continue
            host, port = server
            where = f"{host}#{port}"
            self.stats.queries_sent += 1
            try:
                response = await dns.asyncquery.udp(
                    query,
                    host,
                    timeout=self._timeout,
                    port=port,
                    ignore_unexpected=True,
                    ignore_errors=True,
                    raise_on_truncation=self._tcp_fallback,
                )
            except dns.message.Truncated:
                self.stats.tcp_fallbacks += 1
                self.stats.queries_sent += 1
                try:
                    response = await dns.asyncquery.tcp(
                        query, host, timeout=self._timeout, port=port
                    )
                except dns.exception.Timeout:
                    errors.append(f"{where} TCP timeout")
                    continue
                except OSError as exc:
                    errors.append(f"{where} TCP network error ({exc.strerror or exc})")
                    refused_by.add(server)
                    continue
                except Exception as exc:
                    errors.append(f"{where} malformed TCP answer ({type(exc).__name__})")
                    refused_by.add(server)
                    continue
            except dns.exception.Timeout:
                errors.append(f"{where} timeout")
                continue
            except OSError as exc:
                errors.append(f"{where} network error ({exc.strerror or exc})")
                refused_by.add(server)
                continue
            except Exception as exc:
                errors.append(f"{where} malformed answer ({type(exc).__name__})")
                refused_by.add(server)
                continue
            rcode = response.rcode()
            if response.flags & dns.flags.TC and not response.answer:
                # only reachable with TCP fallback off: an empty truncated answer is no answer
                errors.append(f"{where} truncated answer (TCP fallback disabled)")
                continue
            if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                return response
            errors.append(f"{where} {dns.rcode.to_text(rcode)}")
            refused_by.add(server)
        raise DnsTempError(_summarise(errors))


def _summarise(errors: list[str]) -> str:
    """``127.0.0.1#53 timeout x2`` rather than the same text twice."""
    counts: dict[str, int] = {}
    for error in errors:
        counts[error] = counts.get(error, 0) + 1
    return "; ".join(text if n == 1 else f"{text} x{n}" for text, n in counts.items())
