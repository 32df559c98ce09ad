"""STARTTLS with real clients against a real gateway: the first command after the handshake,
handshake failures in the log, and third-party clients (openssl s_client, swaks)."""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import socket
import ssl
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GatewayProcess, wait_for
from tests.server.smtpclient import RawClient


def without_uvloop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gateways started from here run on the stdlib loop, as on a machine without uvloop (the
    ``fast`` extra): ``import uvloop`` fails in them."""
    hidden = tmp_path / "no-uvloop"
    hidden.mkdir()
    (hidden / "uvloop.py").write_text('raise ImportError("uvloop hidden by the test")\n')
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hidden), *([path] if path else [])]))


@pytest.fixture(params=["uvloop", "asyncio"])
def tls_gateway(
    request: pytest.FixtureRequest,
    make_gateway: Any,
    tls_files: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> GatewayProcess:
    """A gateway with STARTTLS, on each event loop it can run on: uvloop (the ``fast`` extra)
    and the stdlib loop, as on a machine without uvloop (their TLS layers deliver the bytes
    that follow the handshake differently)."""
    if request.param == "asyncio":
        without_uvloop(tmp_path, monkeypatch)
    gateway: GatewayProcess = make_gateway(
        server={"max_connections_per_ip": 100},
        tls={
            "certificate": str(tls_files["certificate"]),
            "private_key": str(tls_files["private_key"]),
        },
    )
    return gateway


def _ehlo_right_after_handshake(
    port: int, context: ssl.SSLContext, nodelay: bool
) -> tuple[bool, str]:
    """One connection: STARTTLS, handshake, EHLO written the moment the handshake completes.
    True when the EHLO is answered (within 5 s: the gateway's command timeout is 20 s)."""
    try:
        client = RawClient(port, timeout=5)
    except OSError as exc:
        return False, f"connect: {exc}"
    if nodelay:  # before the client writes anything
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        assert client.reply()[0] == 220
        assert client.command("EHLO fast.test")[0] == 250
        assert client.command("STARTTLS")[0] == 220
        client.starttls(context)  # wrap_socket: the handshake is done when this returns
        client.send(b"EHLO fast.test\r\n")
        code, _ = client.reply()
        version = client.sock.version() if isinstance(client.sock, ssl.SSLSocket) else None
        return code == 250, f"{version} {code}"
    except (OSError, ConnectionError) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    finally:
        client.close()


@pytest.mark.timeout(120)
def test_first_command_after_handshake_is_answered(
    tls_gateway: GatewayProcess, tls_files: Any
) -> None:
    """200 connections: TLS 1.2 and 1.3, with and without TCP_NODELAY. Encrypted bytes that come
    with (or right after) the client's Finished are the client's first command, not plaintext to
    be discarded."""
    jobs = []
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        context = ssl.create_default_context(cafile=str(tls_files["ca"]))
        context.minimum_version = context.maximum_version = version
        for nodelay in (True, False):
            jobs.extend([(context, nodelay)] * 50)
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        results = list(
            pool.map(lambda job: _ehlo_right_after_handshake(tls_gateway.port, *job), jobs)
        )
    failed = [
        (job[0].maximum_version.name, job[1], detail)
        for job, (ok, detail) in zip(jobs, results, strict=True)
        if not ok
    ]
    assert not failed, f"{len(failed)} of {len(jobs)} unanswered: {failed[:5]}"


def test_plaintext_pipelined_after_starttls_is_still_discarded(
    tls_gateway: GatewayProcess, tls_files: Any
) -> None:
    """CVE-2011-0411 on each loop: what came in the STARTTLS packet is never answered over TLS."""
    context = ssl.create_default_context(cafile=str(tls_files["ca"]))
    with RawClient(tls_gateway.port) as client:
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert client.reply()[0] == 220
        assert client.command("EHLO inject.test")[0] == 250
        client.send(b"STARTTLS\r\nMAIL FROM:<inject@evil.test>\r\n")
        assert client.reply()[0] == 220
        client.starttls(context)
        client.send(b"EHLO inject.test\r\n")  # at once, as in the test above
        assert client.reply()[0] == 250
        assert client.command("NOOP")[0] == 250  # no reply was left over for the injected MAIL
        assert client.command("RCPT TO:<postmaster@example.test>")[0] == 503  # no sender


def test_openssl_s_client_first_command_after_starttls(
    tls_gateway: GatewayProcess, tls_files: Any
) -> None:
    """Debian's openssl s_client does EHLO and STARTTLS itself, then writes what is waiting on
    its stdin the moment the handshake is done."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed (Makefile APT_PACKAGES)")
    for version in ("-tls1_2", "-tls1_3"):
        for _ in range(5):
            proc = subprocess.Popen(
                [
                    "openssl",
                    "s_client",
                    "-starttls",
                    "smtp",
                    "-connect",
                    f"127.0.0.1:{tls_gateway.port}",
                    "-CAfile",
                    str(tls_files["ca"]),
                    "-verify_return_error",
                    "-verify_hostname",
                    "mx.example.test",
                    version,
                    "-crlf",
                    "-quiet",
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(b"EHLO sclient.test\n")  # waiting before the handshake ends
                proc.stdin.flush()
                lines = [proc.stdout.readline()]
                while lines[-1][:4] not in (b"250 ", b""):
                    lines.append(proc.stdout.readline())
                assert lines[0].startswith(b"250-mx.example.test"), (version, lines)
                assert lines[-1].startswith(b"250 "), (version, lines)
                proc.stdin.write(b"QUIT\n")
                proc.stdin.flush()
                assert proc.stdout.readline().startswith(b"221 "), version
            finally:
                proc.stdin.close()
                proc.wait(timeout=30)


def test_swaks_delivers_over_starttls(tls_gateway: GatewayProcess) -> None:
    if shutil.which("swaks") is None:
        pytest.fail("swaks is not installed (Makefile APT_PACKAGES)")
    done = subprocess.run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{tls_gateway.port}",
            "--tls",
            "--from",
            "someone@sender.test",
            "--to",
            "postmaster@example.test",
            "--helo",
            "swaks.test",
        ],
        capture_output=True,
        timeout=60,
    )
    out = done.stdout.decode(errors="replace")
    assert done.returncode == 0, out
    assert "<~  250 2.0.0 Ok: queued as" in out, out


# -- handshake failures in the main log ----------------------------------------------------------
def _starttls_then(port: int, helo: str = "client.test") -> RawClient:
    client = RawClient(port)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    assert client.reply()[0] == 220
    assert client.command(f"EHLO {helo}")[0] == 250
    assert client.command("STARTTLS")[0] == 220
    return client


def _legacy_context(**settings: Any) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    for name, value in settings.items():
        if name == "ciphers":
            context.set_ciphers(value)
        else:
            setattr(context, name, value)
    return context


def _tls11_only(client: RawClient) -> None:
    with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        context = _legacy_context(
            ciphers="DEFAULT:@SECLEVEL=0",
            minimum_version=ssl.TLSVersion.TLSv1,
            maximum_version=ssl.TLSVersion.TLSv1_1,
        )
    with pytest.raises(ssl.SSLError):
        client.starttls(context)


def _cbc_only(client: RawClient) -> None:  # static RSA with CBC: not offered by the gateway
    context = _legacy_context(maximum_version=ssl.TLSVersion.TLSv1_2, ciphers="AES128-SHA")
    with pytest.raises(ssl.SSLError):
        client.starttls(context)


def _plaintext(client: RawClient) -> None:  # goes on as if STARTTLS had not been said
    client.send(b"MAIL FROM:<a@b.test>\r\n")
    assert client.closed()


def _half_hello(client: RawClient) -> None:  # the first bytes of a ClientHello, then gone
    client.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    client.sock.close()


@pytest.mark.parametrize(
    ("client_does", "reason"),
    [
        (_tls11_only, "unsupported protocol"),
        (_cbc_only, "no shared cipher"),
        (_plaintext, "wrong version number"),
        (_half_hello, "connection closed by client"),
    ],
)
def test_handshake_failure_is_logged_with_client_and_reason(
    tls_gateway: GatewayProcess, client_does: Any, reason: str
) -> None:
    client = _starttls_then(tls_gateway.port)
    port = client.sock.getsockname()[1]
    try:
        client_does(client)
    finally:
        client.close()
    expected = (
        f"TLS error on connection from (client.test) [127.0.0.1]:{port} (SSL_accept): {reason}"
    )
    lines = wait_for(
        lambda: [line for line in tls_gateway.mainlog().splitlines() if "TLS error" in line]
    )
    assert [line[20:] for line in lines] == [expected]  # after "YYYY-MM-DD HH:MM:SS "
    assert "TLS error" not in tls_gateway.rejectlog()  # exim: the main log only


def test_helo_text_cannot_forge_an_address_in_the_tls_error_line(
    tls_gateway: GatewayProcess,
) -> None:
    client = _starttls_then(tls_gateway.port, helo='x)[10.9.8.7]:25(SSL_accept):"forged"')
    port = client.sock.getsockname()[1]
    try:
        _half_hello(client)
    finally:
        client.close()
    line = wait_for(
        lambda: [line for line in tls_gateway.mainlog().splitlines() if "TLS error" in line]
    )[0]
    assert line[20:] == (
        r"TLS error on connection from (x\x29\x5b10.9.8.7\x5d:25\x28SSL_accept\x29:"
        rf"\x22forged\x22) [127.0.0.1]:{port} (SSL_accept): connection closed by client"
    )
    assert re.findall(r"\[([^\]]*)\]", line) == ["127.0.0.1"]


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_handshake_timeout_is_logged(
    make_gateway: Any, tls_files: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    """A client that says STARTTLS and then nothing: the handshake times out (the command
    time-out bounds it) and the line says so."""
    if loop == "asyncio":
        without_uvloop(tmp_path, monkeypatch)
    gw = make_gateway(
        limits={"command_timeout": 1},
        tls={
            "certificate": str(tls_files["certificate"]),
            "private_key": str(tls_files["private_key"]),
        },
    )
    with _starttls_then(gw.port) as client:
        port = client.sock.getsockname()[1]
        assert client.closed(timeout=10)  # the gateway gives up, not the client
    line = wait_for(lambda: [line for line in gw.mainlog().splitlines() if "TLS error" in line])
    assert [entry[20:] for entry in line] == [
        f"TLS error on connection from (client.test) [127.0.0.1]:{port} (SSL_accept): timed out"
    ]
