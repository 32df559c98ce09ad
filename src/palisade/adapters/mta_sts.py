"""MTA-STS (RFC 8461): a domain's policy, discovered in the DNS, fetched over HTTPS, cached.

Owns: the ``_mta-sts.<domain>`` TXT record (section 3.1), the HTTPS fetch of
``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (section 3.3) with httpx, the policy's
parsing (section 3.2), the cache (memory and a JSON file, so a restart or another worker process
keeps it; section 5.1), and the TLS-RPT results of failed fetches (RFC 8460 section 4.3:
``sts-policy-fetch-error``, ``sts-policy-invalid``, ``sts-webpki-invalid``). It implements the
``MtaStsSource`` port: ``policy(domain)`` gives the policy in force as a ``DomainTlsPolicy``.

Must not touch: MX selection and the SMTP side (the MX delivery filters MX hosts by the
patterns and verifies their certificates), any project module other than ``palisade.ports``
and ``palisade.clock``.

Trust: the TXT record and the policy text come from the domain and are hostile until parsed:
the body is read to at most 64 KiB, the whole fetch is bounded by ``timeout`` (10 s), redirects
are never followed (section 3.3), the content type must be ``text/plain``, the server's
certificate must chain to a trusted CA (the system's, plus ``ca_file``) and name
``mta-sts.<domain>``. The host name is resolved through the ``Resolver`` port (the gateway's own
resolver, not the system's), and the connection is made to that address with the name as SNI
and as the name the certificate is checked against.

Discovery and caching (section 5.1), in order:

1. a cached policy that has not outlived its ``max_age`` and whose id is the TXT record's id is
   used as is (no fetch);
2. no usable TXT record (none, several, malformed, or the lookup failed): the cached policy if
   it is still valid, else no policy;
3. a new id (or no cached policy): fetch. Success replaces the cached policy (``mode: none``
   too: that is how a domain withdraws one). Failure is reported for TLS-RPT and the cached
   policy, if still valid, stays in force; after a failure the domain is not fetched again for
   ``retry_after`` seconds (a broken policy host would otherwise cost every delivery 10 s).

Concurrent calls for one domain share one fetch. The JSON file is rewritten (whole, through a
temporary file and a rename) after each successful fetch, merged with what other processes wrote
meanwhile (the newer fetch of a domain wins); a process that does not find a domain in memory
reads the file again when it changed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import ssl
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from palisade.clock import SYSTEM_CLOCK
from palisade.ports import (
    Clock,
    DnsTempError,
    DomainTlsPolicy,
    Resolver,
    TlsLevel,
    TlsResult,
    TlsResultSink,
)

__all__ = ["MtaStsPolicies", "PolicyError", "StsPolicy", "parse_policy", "parse_txt_id"]

MAX_BODY = 64 * 1024
MAX_AGE_LIMIT = 31_557_600  # section 3.2: one year
FETCH_TIMEOUT = 10.0
RETRY_AFTER = 300.0
WELL_KNOWN = "/.well-known/mta-sts.txt"
CACHE_VERSION = 1
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DOMAIN_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})+$")
_ID_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")


class PolicyError(ValueError):
    """A policy or TXT record that does not follow RFC 8461; the text says what is wrong."""


@dataclass(frozen=True, slots=True)
class StsPolicy:
    """A fetched policy and what the cache needs to know about it."""

    domain: str
    id: str
    mode: str  # enforce | testing | none
    max_age: int
    mx: tuple[str, ...]
    lines: tuple[str, ...]  # the policy text, line by line (TLS-RPT's policy-string)
    fetched: float  # epoch seconds

    def valid_at(self, now: float) -> bool:
        return now < self.fetched + self.max_age

    def as_tls_policy(self, on_failure: str) -> DomainTlsPolicy | None:
        if self.mode == "none":
            return None
        return DomainTlsPolicy(
            level=TlsLevel.VERIFY,
            source="mta-sts",
            mx_patterns=self.mx,
            testing=self.mode == "testing",
            on_failure=on_failure,
            policy_strings=self.lines,
        )


def parse_txt_id(records: tuple[str, ...]) -> str | None:
    """The ``id`` of the one ``v=STSv1`` TXT record (section 3.1), or None: no such record,
    several (then the domain is treated as having none), or one that does not parse."""
    candidates = [r for r in records if r.startswith("v=STSv1;") or r == "v=STSv1"]
    if len(candidates) != 1:
        return None
    fields: dict[str, str] = {}
    for part in candidates[0].split(";"):
        part = part.strip(" \t")
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            return None
        fields.setdefault(key.strip(" \t"), value.strip(" \t"))
    ident = fields.get("id", "")
    return ident if _ID_RE.match(ident) else None


def _valid_mx_pattern(pattern: str) -> bool:
    name = pattern[2:] if pattern.startswith("*.") else pattern
    return bool(_DOMAIN_RE.match(name)) and len(name) <= 253


def parse_policy(body: bytes) -> tuple[str, int, tuple[str, ...], tuple[str, ...]]:
    """(mode, max_age, mx patterns, lines) of a policy body (section 3.2), or PolicyError.

    Lines end with LF or CRLF; blank lines are skipped; unknown keys are ignored; of a repeated
    key other than ``mx`` the first counts. ``max_age`` above a year is cut to a year (the
    domain asked for the longest there is). ``mx`` may be left out only with ``mode: none``.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("the policy is not UTF-8 text") from None
    fields: dict[str, str] = {}
    mx: list[str] = []
    lines: list[str] = []
    for raw in text.split("\n"):
        line = raw.removesuffix("\r").strip(" \t")
        if not line:
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyError(f"line {line[:60]!r} is not 'key: value'")
        key, value = key.strip(" \t"), value.strip(" \t")
        lines.append(f"{key}: {value}")
        if key == "mx":
            pattern = value.lower().rstrip(".")
            if not _valid_mx_pattern(pattern):
                raise PolicyError(f"mx {value[:80]!r} is not a host name or *.name pattern")
            mx.append(pattern)
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyError(f"version is {fields.get('version')!r}, not 'STSv1'")
    mode = fields.get("mode")
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"mode is {mode!r}, not enforce, testing or none")
    max_age_text = fields.get("max_age", "")
    if not re.fullmatch(r"[0-9]{1,10}", max_age_text):
        raise PolicyError(f"max_age is {max_age_text[:20]!r}, not a number of seconds")
    if not mx and mode != "none":
        raise PolicyError(f"mode {mode} without any mx line")
    return mode, min(int(max_age_text), MAX_AGE_LIMIT), tuple(mx), tuple(lines)


class _FetchFailed(Exception):
    def __init__(self, failure_type: str, detail: str, ip: str = "") -> None:
        super().__init__(detail)
        self.failure_type = failure_type
        self.detail = detail
        self.ip = ip


def _cert_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        current = current.__cause__ or current.__context__
    return None


class MtaStsPolicies:
    """The ``MtaStsSource`` port (see the module docstring).

    ``cache_file``: the JSON file (None: memory only). ``ca_file``: CAs trusted in addition to
    the system's (tests: the test CA). ``report``: where failed fetches go (TLS-RPT).
    ``on_failure``: copied into the policies given out (``[outbound] on_tls_failure``). ``port``:
    the HTTPS port, 443 but for tests.
    """

    def __init__(
        self,
        resolver: Resolver,
        *,
        cache_file: Path | None = None,
        ca_file: Path | None = None,
        report: TlsResultSink | None = None,
        on_failure: str = "fail",
        clock: Clock = SYSTEM_CLOCK,
        port: int = 443,
        timeout: float = FETCH_TIMEOUT,
        retry_after: float = RETRY_AFTER,
    ) -> None:
        self._resolver = resolver
        self._cache_file = cache_file
        self._report = report
        self._on_failure = on_failure
        self._clock = clock
        self._port = int(port)
        self._timeout = float(timeout)
        self._retry_after = float(retry_after)
        self._ssl = ssl.create_default_context()
        if ca_file is not None:
            self._ssl.load_verify_locations(cafile=str(ca_file))
        self._cache: dict[str, StsPolicy] = {}
        self._failed: dict[str, float] = {}  # domain -> monotonic time of the last failure
        self._inflight: dict[str, asyncio.Task[StsPolicy | None]] = {}
        self._file_stamp: tuple[int, int] | None = None
        self.fetches = 0  # HTTPS fetches tried (for tests and the curious)
        self._load_file()

    # ------------------------------------------------------------------ the port

    async def policy(self, domain: str) -> DomainTlsPolicy | None:
        domain = domain.strip().rstrip(".").lower()
        if not _DOMAIN_RE.match(domain):
            return None
        found = await self._current(domain)
        return found.as_tls_policy(self._on_failure) if found is not None else None

    def forget(self, domain: str) -> None:
        """Drops ``domain``'s policy from memory (not from the file): the next call fetches it
        again (for benchmarks and tests)."""
        self._cache.pop(domain.rstrip(".").lower(), None)
        self._failed.pop(domain.rstrip(".").lower(), None)

    def cached(self, domain: str) -> StsPolicy | None:
        """The cached policy of ``domain`` (valid or not), for tests and the CLI."""
        return self._cache.get(domain.rstrip(".").lower())

    # ------------------------------------------------------------------ discovery

    async def _current(self, domain: str) -> StsPolicy | None:
        now = self._clock.now()
        cached = self._cache.get(domain)
        if cached is None and self._load_file():
            cached = self._cache.get(domain)
        valid = cached if cached is not None and cached.valid_at(now) else None
        try:
            txt = await self._resolver.query(f"_mta-sts.{domain}", "TXT")
            ident = parse_txt_id(txt.records)
        except DnsTempError:
            ident = None
        if ident is None:
            return valid
        if valid is not None and valid.id == ident:
            return valid
        last_failure = self._failed.get(domain)
        if last_failure is not None and self._clock.monotonic() - last_failure < self._retry_after:
            return valid
        task = self._inflight.get(domain)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._refresh(domain, ident))
            self._inflight[domain] = task
            task.add_done_callback(lambda done: self._forget(domain, done))
        fetched = await asyncio.shield(task)
        return fetched if fetched is not None else valid

    def _forget(self, domain: str, task: asyncio.Task[StsPolicy | None]) -> None:
        if self._inflight.get(domain) is task:
            del self._inflight[domain]

    async def _refresh(self, domain: str, ident: str) -> StsPolicy | None:
        """Fetches and caches; None on failure (reported). Never raises but for cancellation."""
        self.fetches += 1
        try:
            async with asyncio.timeout(self._timeout):
                body = await self._fetch(domain)
            mode, max_age, mx, lines = parse_policy(body)
        except TimeoutError:
            self._failure(domain, "sts-policy-fetch-error", f"no policy within {self._timeout}s")
            return None
        except _FetchFailed as exc:
            self._failure(domain, exc.failure_type, exc.detail, exc.ip)
            return None
        except PolicyError as exc:
            self._failure(domain, "sts-policy-invalid", str(exc))
            return None
        except Exception as exc:  # hostile input must not escape as anything else
            self._failure(domain, "sts-policy-fetch-error", f"{type(exc).__name__}: {exc}")
            return None
        policy = StsPolicy(domain, ident, mode, max_age, mx, lines, self._clock.now())
        self._cache[domain] = policy
        self._failed.pop(domain, None)
        self._save_file()
        return policy

    def _failure(self, domain: str, failure_type: str, detail: str, ip: str = "") -> None:
        self._failed[domain] = self._clock.monotonic()
        if self._report is None:
            return
        self._report.record(
            TlsResult(
                domain=domain,
                policy_type="sts",
                policy_strings=(),
                mx_host=f"mta-sts.{domain}",
                ip=ip,
                success=False,
                failure_type=failure_type,
                detail=detail[:500],
                time=self._clock.now(),
            )
        )

    # ------------------------------------------------------------------ HTTPS

    async def _addresses(self, host: str) -> list[str]:
        found: list[str] = []
        errors = []
        for rdtype in ("A", "AAAA"):
            try:
                found.extend((await self._resolver.query(host, rdtype)).records)
            except DnsTempError as exc:
                errors.append(exc.reason)
        if not found:
            why = "; ".join(errors) if errors else "no A or AAAA record"
            raise _FetchFailed("sts-policy-fetch-error", f"{host}: {why}")
        return found

    async def _fetch(self, domain: str) -> bytes:
        host = f"mta-sts.{domain}"
        last: _FetchFailed | None = None
        for ip in await self._addresses(host):
            try:
                return await self._fetch_from(host, ip)
            except _FetchFailed as exc:
                if exc.failure_type != "sts-policy-fetch-error":
                    raise  # the server answered: its certificate or its policy is the problem
                last = exc
        assert last is not None
        raise last

    async def _fetch_from(self, host: str, ip: str) -> bytes:
        literal = f"[{ip}]" if ipaddress.ip_address(ip).version == 6 else ip
        url = f"https://{literal}:{self._port}{WELL_KNOWN}"
        host_header = host if self._port == 443 else f"{host}:{self._port}"
        try:
            async with (
                httpx.AsyncClient(
                    verify=self._ssl,
                    follow_redirects=False,
                    timeout=self._timeout,
                    trust_env=False,
                ) as client,
                client.stream(
                    "GET",
                    url,
                    headers={"Host": host_header, "Accept": "text/plain"},
                    extensions={"sni_hostname": host},
                ) as response,
            ):
                if response.status_code != 200:
                    where = response.headers.get("location", "")
                    extra = f" (redirect to {where[:100]!r} not followed)" if where else ""
                    raise _FetchFailed(
                        "sts-policy-fetch-error", f"HTTP {response.status_code}{extra}", ip
                    )
                ctype = response.headers.get("content-type", "")
                if ctype.split(";")[0].strip().lower() != "text/plain":
                    raise _FetchFailed(
                        "sts-policy-invalid", f"Content-Type {ctype[:60]!r}, not text/plain", ip
                    )
                body = bytearray()
                async for chunk in response.aiter_raw():
                    body += chunk
                    if len(body) > MAX_BODY:
                        raise _FetchFailed(
                            "sts-policy-invalid", f"policy larger than {MAX_BODY} bytes", ip
                        )
                return bytes(body)
        except _FetchFailed:
            raise
        except httpx.HTTPError as exc:
            cert = _cert_error(exc)
            if cert is not None:
                reason = cert.verify_message or str(cert)
                raise _FetchFailed("sts-webpki-invalid", f"{host}: {reason}", ip) from None
            raise _FetchFailed(
                "sts-policy-fetch-error", f"{host} [{ip}]: {type(exc).__name__}: {exc}", ip
            ) from None

    # ------------------------------------------------------------------ the file

    def _stamp(self) -> tuple[int, int] | None:
        if self._cache_file is None:
            return None
        try:
            st = os.stat(self._cache_file)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _read_file(self) -> dict[str, StsPolicy]:
        if self._cache_file is None:
            return {}
        try:
            data = json.loads(self._cache_file.read_text())
            if data.get("version") != CACHE_VERSION:
                return {}
            out = {}
            for domain, item in data.get("policies", {}).items():
                out[domain] = StsPolicy(
                    domain=str(domain),
                    id=str(item["id"]),
                    mode=str(item["mode"]),
                    max_age=int(item["max_age"]),
                    mx=tuple(str(m) for m in item["mx"]),
                    lines=tuple(str(line) for line in item["lines"]),
                    fetched=float(item["fetched"]),
                )
            return out
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}  # missing or damaged: start empty (it is only a cache)

    def _load_file(self) -> bool:
        """Merges the file into memory when it changed; True when it did."""
        stamp = self._stamp()
        if stamp is None or stamp == self._file_stamp:
            return False
        self._file_stamp = stamp
        for domain, policy in self._read_file().items():
            mine = self._cache.get(domain)
            if mine is None or policy.fetched > mine.fetched:
                self._cache[domain] = policy
        return True

    def _save_file(self) -> None:
        if self._cache_file is None:
            return
        now = self._clock.now()
        merged = self._read_file()
        for domain, policy in self._cache.items():
            other = merged.get(domain)
            if other is None or policy.fetched >= other.fetched:
                merged[domain] = policy
        policies = {d: asdict(p) for d, p in merged.items() if p.valid_at(now)}
        for item in policies.values():
            del item["domain"]
        text = json.dumps({"version": CACHE_VERSION, "policies": policies}, sort_keys=True)
        try:
            self._cache_file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".mta-sts.", dir=self._cache_file.parent)
            try:
                with os.fdopen(fd, "w") as out:
                    out.write(text)
                os.replace(tmp, self._cache_file)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError:
            return  # the memory cache still works; the file is only for restarts
        self._file_stamp = self._stamp()
