"""``palisade tls check HOST[:PORT]``: what an SMTP server's TLS looks like from outside.

Owns: the probe (connect; with ``--starttls`` the greeting, EHLO and STARTTLS first, port 25 by
default; without it implicit TLS, port 465), the report it prints and its exit status: 0 no
problem (warnings may be printed), 1 a problem (expired or not yet valid certificate, chain out
of order, chain that does not verify, host-name mismatch, handshake failure, refused or timed out
connection, no STARTTLS offered: one clear line each, never a traceback), 2 bad usage.
The findings about the chain come from :mod:`palisade.tlscheck`; verification against the
system store (or ``--ca-file``) is OpenSSL's, through the stdlib ``ssl`` module.
Must not touch: the gateway's config, spool or logs; it is a client like any other.
Trust: everything the server sends is untrusted: replies are read with a size and time bound,
certificate texts are escaped before printing.

The chain *as sent* (not as rebuilt by verification): ``SSLSocket.get_unverified_chain()`` is
public from Python 3.13; on 3.11 and 3.12 the same OpenSSL call (``SSL_get_peer_cert_chain``)
is already there on the socket's ``_ssl._SSLSocket`` object (added in 3.10, made public in 3.13
without change), and that is used. pyOpenSSL's ``get_peer_cert_chain()`` would do the same for
a new dependency and a second TLS stack in the process; its maintainers point new TLS client
code to the stdlib ``ssl`` module. One connection is made when the chain verifies; when it does
not, a second one without verification fetches the chain to show what is wrong with it.
"""

from __future__ import annotations

import _ssl
import argparse
import contextlib
import datetime
import ipaddress
import re
import socket
import ssl
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from cryptography import x509

from palisade.obs.log import escape
from palisade.server.tls import handshake_failure
from palisade.tlscheck import Finding, analyse_chain, days_left, name

TIMEOUT = 20.0
_REPLY_LINE = re.compile(rb"^(\d{3})([ -])(.*)$")


class ProbeError(Exception):
    """The probe could not get a TLS session: one line for the operator."""


@dataclass
class Probe:
    protocol: str = ""
    cipher: str = ""
    bits: int = 0
    chain: list[bytes] = field(default_factory=list)
    verify_error: str | None = None  # None: the chain verified


def add_arguments(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``tls check`` to ``subparsers`` (from ``add_subparsers()``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser("tls", help="TLS tools")
    sub = parser.add_subparsers(dest="tls_command", required=True)
    check = sub.add_parser(
        "check",
        help="connect to an SMTP server and check its TLS certificate chain",
        description="Connect to an SMTP server, do TLS (implicit, or STARTTLS with --starttls) "
        "and report protocol, cipher, the certificate chain as sent, its order, verification, "
        "host name and expiry. Exit 0: no problem; 1: problems found; 2: bad usage.",
    )
    check.add_argument("target", metavar="HOST[:PORT]")
    check.add_argument(
        "--starttls",
        action="store_true",
        help="EHLO and STARTTLS first (default port 25; without: implicit TLS, port 465)",
    )
    check.add_argument(
        "--servername", metavar="NAME", help="name sent as SNI and checked in the certificate"
    )
    check.add_argument(
        "--ca-file", type=Path, metavar="FILE", help="verify against these CAs, not the system's"
    )
    check.add_argument("--timeout", type=float, default=TIMEOUT, help=argparse.SUPPRESS)
    return parser


def parse_target(target: str, starttls: bool) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address; ValueError when bad."""
    default = 25 if starttls else 465
    if target.startswith("["):
        host, sep, rest = target[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address: {target}")
        port_text = rest[1:] if rest else ""
    elif target.count(":") == 1:
        host, port_text = target.split(":")
    else:
        host, port_text = target, ""
    if not host:
        raise ValueError(f"no host in {target}")
    if not port_text:
        return host, default
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in {target}")
    return host, int(port_text)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _Replies:
    """Reads SMTP replies from a plain socket (bounded: 64 KiB, the socket's time-out)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def read(self) -> tuple[int, list[str]]:
        lines: list[str] = []
        while True:
            while b"\n" not in self.buffer:
                if len(self.buffer) > 65536:
                    raise ProbeError("reply line too long")
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise ProbeError("connection closed by the server")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\n", 1)
            match = _REPLY_LINE.match(raw.rstrip(b"\r"))
            if match is None:
                raise ProbeError(f"not an SMTP reply: {escape(raw.decode('latin-1'), 80)}")
            lines.append(match.group(3).decode("latin-1"))
            if match.group(2) == b" ":
                return int(match.group(1)), lines


def _starttls(sock: socket.socket, helo: str) -> None:
    replies = _Replies(sock)
    code, lines = replies.read()
    if code != 220:
        raise ProbeError(f"greeting {code} {escape(lines[-1], 120)}")
    sock.sendall(f"EHLO {helo}\r\n".encode())
    code, lines = replies.read()
    if code != 250:
        raise ProbeError(f"EHLO answered {code} {escape(lines[-1], 120)}")
    if not any(line.upper().split()[:1] == ["STARTTLS"] for line in lines[1:]):
        raise ProbeError("the server does not offer STARTTLS")
    sock.sendall(b"STARTTLS\r\n")
    code, lines = replies.read()
    if code != 220:
        raise ProbeError(f"STARTTLS answered {code} {escape(lines[-1], 120)}")
    if replies.buffer:
        raise ProbeError("the server sent more after its 220 to STARTTLS (injection?)")


def peer_chain(tls: ssl.SSLSocket) -> list[bytes]:
    """The certificates the server sent, DER, in its order (see the module docstring)."""
    public = getattr(tls, "get_unverified_chain", None)
    if public is not None:  # Python 3.13+
        return [bytes(cert) for cert in public() or []]
    sslobj = getattr(tls, "_sslobj", None)
    chain = sslobj.get_unverified_chain() if sslobj is not None else None
    der = _ssl.ENCODING_DER  # the private module's constant, like the method (3.10-3.12)
    return [cert.public_bytes(der) for cert in chain or []]


def _session(
    host: str,
    port: int,
    starttls: bool,
    servername: str | None,
    context: ssl.SSLContext,
    timeout: float,
) -> Probe:
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise ProbeError(f"cannot connect to {host} port {port}: {exc.strerror or exc}") from None
    with sock:
        try:
            if starttls:
                _starttls(sock, socket.getfqdn() or "localhost")
            with context.wrap_socket(sock, server_hostname=servername) as tls:
                cipher = tls.cipher()
                probe = Probe(
                    protocol=tls.version() or "",
                    cipher=cipher[0] if cipher else "",
                    bits=cipher[2] if cipher else 0,
                    chain=peer_chain(tls),
                )
                with contextlib.suppress(OSError):
                    tls.sendall(b"QUIT\r\n")  # polite; the answer is not needed
            return probe
        except ssl.SSLCertVerificationError:
            raise
        except ssl.SSLError as exc:
            raise ProbeError(f"TLS handshake failed: {handshake_failure(exc)}") from None
        except TimeoutError:
            raise ProbeError(f"no answer from {host} port {port} within {timeout:g}s") from None
        except OSError as exc:
            raise ProbeError(
                f"connection to {host} port {port} failed: {exc.strerror or exc}"
            ) from None


def probe(
    host: str,
    port: int,
    starttls: bool,
    servername: str | None,
    ca_file: Path | None,
    timeout: float = TIMEOUT,
) -> Probe:
    """Connects, verifying against the system store or ``ca_file`` (not the host name: that
    is a finding of its own); when that fails, connects again without verification."""
    sni = servername or (None if _is_address(host) else host)
    verifying = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    verifying.check_hostname = False
    try:
        return _session(host, port, starttls, sni, verifying, timeout)
    except ssl.SSLCertVerificationError as exc:
        reason = exc.verify_message or handshake_failure(exc)
    looking = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    looking.check_hostname = False
    looking.verify_mode = ssl.CERT_NONE
    result = _session(host, port, starttls, sni, looking, timeout)
    result.verify_error = reason
    return result


def report(
    out: TextIO,
    result: Probe,
    hostname: str,
    ca_file: Path | None,
    now: datetime.datetime | None = None,
) -> list[Finding]:
    now = now or datetime.datetime.now(datetime.UTC)
    print(f"protocol  {result.protocol}", file=out)
    print(f"cipher    {result.cipher} ({result.bits} bits)", file=out)
    certs = [x509.load_der_x509_certificate(der) for der in result.chain]
    print(f"chain     {len(certs)} certificate{'s' if len(certs) != 1 else ''} as sent", file=out)
    for index, cert in enumerate(certs):
        print(f"  {index} subject   {name(cert.subject)}", file=out)
        print(f"    issuer    {name(cert.issuer)}", file=out)
        after = cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S UTC")
        print(f"    not after {after} ({days_left(cert, now)} days left)", file=out)
    store = str(ca_file) if ca_file else "the system store"
    findings = analyse_chain(certs, hostname=hostname, now=now)
    if result.verify_error is None:
        findings.append(Finding("ok", f"chain verifies against {store}"))
    else:
        findings.append(
            Finding(
                "error",
                f"chain does not verify against {store}: {escape(result.verify_error, 200)}",
            )
        )
    return findings


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    try:
        host, port = parse_target(args.target, args.starttls)
    except ValueError as exc:
        print(f"palisade tls check: {exc} (expected HOST[:PORT])", file=err)
        return 2
    if args.ca_file is not None and not args.ca_file.is_file():
        print(f"palisade tls check: --ca-file {args.ca_file}: no such file", file=err)
        return 2
    hostname = args.servername or host
    how = "STARTTLS" if args.starttls else "implicit TLS"
    shown = f"[{host}]" if ":" in host else host
    print(f"{shown} port {port}, {how}, server name {hostname}", file=out)
    try:
        result = probe(host, port, args.starttls, args.servername, args.ca_file, args.timeout)
        findings = report(out, result, hostname, args.ca_file)
    except ProbeError as exc:
        print(f"error     {exc}", file=out)
        print("result    1 problem found", file=out)
        return 1
    for finding in findings:
        print(f"{finding.level:<9} {finding.message}", file=out)
    errors = sum(finding.level == "error" for finding in findings)
    warnings = sum(finding.level == "warning" for finding in findings)
    if errors:
        print(f"result    {errors} problem{'s' if errors != 1 else ''} found", file=out)
        return 1
    print(f"result    ok{f' ({warnings} warning(s))' if warnings else ''}", file=out)
    return 0
