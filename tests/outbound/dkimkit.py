"""What the outbound tests share: keys made by the real ``palisade dkim keygen``, the records it
printed served by the loopback DNS server, and dkimpy verification that asks that server over
the wire (dnspython), as a receiving MTA would."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import dkim
import dns.resolver

from loopback.dnsserver import ZoneServer
from tests.conftest import palisade

RECORD_RE = re.compile(r"^(\S+)\. IN TXT \( (.*) \)$", re.MULTILINE)


def records(output: str) -> dict[str, list[str]]:
    """The TXT records in a command's zone-file output: name -> its character-strings."""
    return {name: re.findall(r'"([^"]*)"', strings) for name, strings in RECORD_RE.findall(output)}


def keygen(base: Path, domain: str, selector: str, *extra: str) -> str:
    """Runs ``palisade dkim keygen`` in ``base`` (its palisade.toml); its standard output."""
    result = palisade(
        "dkim", "keygen", domain, "--selector", selector, *extra, "--config", "palisade.toml",
        cwd=base,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def publish(server: ZoneServer, output: str) -> dict[str, list[str]]:
    """Serves every record ``output`` printed, exactly as split there."""
    found = records(output)
    for name, strings in found.items():
        server.set(name, "TXT", [strings])
    return found


def dnsfunc(server: ZoneServer) -> Callable[..., bytes]:
    """dkimpy's key lookup, asked of the loopback DNS server over UDP/TCP (dnspython)."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [server.address[0]]
    resolver.port = server.address[1]

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        try:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return b""
        return b"".join(b"".join(rdata.strings) for rdata in answer)

    return lookup


def verify_all(message: bytes, server: ZoneServer) -> list[dict[bytes, bytes]]:
    """Verifies every DKIM-Signature of ``message``; the tags of each (all must verify)."""
    checker = dkim.DKIM(message)
    count = sum(1 for name, _ in checker.headers if name.lower() == b"dkim-signature")
    tags = []
    for index in range(count):
        assert checker.verify(idx=index, dnsfunc=dnsfunc(server)), (index, message[:2000])
        tags.append(dict(checker.signature_fields))
    return tags
