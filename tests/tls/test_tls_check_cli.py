"""``palisade tls check`` as an operator runs it, against a real gateway (STARTTLS) and a real
implicit-TLS server, with chains made for each case."""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from palisade.cli.tlscheck import parse_target
from tests.conftest import GatewayProcess, free_port
from tests.tls.certs import DAY, NOW, Issued, Pki

HOST = "mx.example.test"


def tls_check(*args: str) -> tuple[int, str, str]:
    done = subprocess.run(
        [sys.executable, "-m", "palisade", "tls", "check", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stdout, done.stderr


def serving(make_gateway: Any, tmp_path: Path, pki: Pki, *chain: Issued) -> GatewayProcess:
    cert, key = pki.write(tmp_path, *chain)
    gateway: GatewayProcess = make_gateway(tls={"certificate": str(cert), "private_key": str(key)})
    return gateway


def test_a_good_gateway(make_gateway: Any, tmp_path: Path) -> None:
    pki = Pki.make()
    gw = serving(make_gateway, tmp_path, pki)
    code, out, err = tls_check(
        f"127.0.0.1:{gw.port}", "--starttls", "--servername", HOST,
        "--ca-file", str(tmp_path / "ca.pem"),
    )  # fmt: skip
    assert (code, err) == (0, ""), out
    lines = out.splitlines()
    assert lines[0] == f"127.0.0.1 port {gw.port}, STARTTLS, server name {HOST}"
    assert lines[1] == "protocol  TLSv1.3"
    assert re.fullmatch(r"cipher    TLS_\w+ \(\d+ bits\)", lines[2])
    assert lines[3] == "chain     2 certificates as sent"
    assert lines[4] == f"  0 subject   CN={HOST}"
    assert lines[5] == "    issuer    CN=Palisade Test Intermediate"
    assert re.fullmatch(
        r"    not after \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(36[45] days left\)", lines[6]
    )
    assert lines[7] == "  1 subject   CN=Palisade Test Intermediate"
    assert lines[8] == "    issuer    CN=Palisade Test Root"
    assert "ok        chain in order: leaf first, each certificate issued by the next" in lines
    assert f"ok        certificate is valid for {HOST}" in lines
    assert f"ok        chain verifies against {tmp_path / 'ca.pem'}" in lines
    assert lines[-1] == "result    ok"


def test_wrong_order_is_a_problem(tmp_path: Path) -> None:
    """Another server's chain out of order (Palisade itself refuses to start with one: its
    self-check, tests/cli/test_selfcheck_e2e.py)."""
    pki = Pki.make()
    cert, key = pki.write(tmp_path, pki.leaf, pki.root, pki.intermediate)
    with implicit_tls_server(cert, key) as port:
        code, out, _ = tls_check(
            f"127.0.0.1:{port}", "--servername", HOST, "--ca-file", str(tmp_path / "ca.pem")
        )
    assert code == 1
    assert "chain     3 certificates as sent" in out
    assert (
        f"error     chain out of order: certificate 0 (CN={HOST}) is not issued by the next "
        "certificate (CN=Palisade Test Root); its issuer is certificate 2: wrong order"
    ) in out.splitlines()
    assert out.splitlines()[-1] == "result    2 problems found"


def test_expired_certificate(make_gateway: Any, tmp_path: Path) -> None:
    pki = Pki.make(not_before=NOW - 90 * DAY, not_after=NOW - 2 * DAY)
    gw = serving(make_gateway, tmp_path, pki)
    code, out, _ = tls_check(
        f"127.0.0.1:{gw.port}", "--starttls", "--servername", HOST,
        "--ca-file", str(tmp_path / "ca.pem"),
    )  # fmt: skip
    assert code == 1
    assert re.search(rf"^error     certificate 0 \(CN={HOST}\) expired on ", out, re.M)
    assert (
        f"error     chain does not verify against {tmp_path / 'ca.pem'}: certificate has expired"
    ) in out.splitlines()


def test_near_expiry_warns_but_passes(make_gateway: Any, tmp_path: Path) -> None:
    pki = Pki.make(not_after=NOW + 5 * DAY)
    gw = serving(make_gateway, tmp_path, pki)
    code, out, _ = tls_check(
        f"127.0.0.1:{gw.port}", "--starttls", "--servername", HOST,
        "--ca-file", str(tmp_path / "ca.pem"),
    )  # fmt: skip
    assert code == 0, out
    assert re.search(
        rf"^warning   certificate 0 \(CN={HOST}\) expires on .* \([45] days left\)$", out, re.M
    )
    assert out.splitlines()[-1] == "result    ok (1 warning(s))"


def test_hostname_mismatch_and_system_store(make_gateway: Any, tmp_path: Path) -> None:
    gw = serving(make_gateway, tmp_path, Pki.make())
    code, out, _ = tls_check(f"127.0.0.1:{gw.port}", "--starttls", "--servername", "mx.other.test")
    assert code == 1
    lines = out.splitlines()
    assert f"error     certificate is not valid for mx.other.test (its names: {HOST})" in lines
    assert (
        "error     chain does not verify against the system store: "
        "unable to get local issuer certificate"
    ) in lines
    assert lines[-1] == "result    2 problems found"


def test_no_starttls_offered(gateway: GatewayProcess) -> None:
    code, out, err = tls_check(f"127.0.0.1:{gateway.port}", "--starttls")
    assert (code, err) == (1, "")
    assert out.splitlines()[1:] == [
        "error     the server does not offer STARTTLS",
        "result    1 problem found",
    ]


def test_connection_refused_is_one_line() -> None:
    port = free_port()
    code, out, err = tls_check(f"127.0.0.1:{port}", "--starttls")
    assert (code, err) == (1, "")
    assert (
        out.splitlines()[1]
        == f"error     cannot connect to 127.0.0.1 port {port}: Connection refused"
    )


def test_handshake_failure_is_one_line(make_gateway: Any, tmp_path: Path) -> None:
    """Implicit TLS against a STARTTLS port: the server answers a ClientHello in plaintext."""
    gw = serving(make_gateway, tmp_path, Pki.make())
    code, out, err = tls_check(f"127.0.0.1:{gw.port}")
    assert (code, err) == (1, "")
    assert re.fullmatch(r"error     TLS handshake failed: [a-z ]+", out.splitlines()[1]), out


@contextlib.contextmanager
def implicit_tls_server(cert: Path, key: Path) -> Iterator[int]:
    """A real TLS listener that greets like an SMTP server on port 465 would."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"220 implicit.test ESMTP\r\n")
                tls.recv(100)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        listener.close()
        thread.join(5)


def test_implicit_tls(tmp_path: Path) -> None:
    pki = Pki.make()
    cert, key = pki.write(tmp_path)
    with implicit_tls_server(cert, key) as port:
        code, out, _ = tls_check(
            f"localhost:{port}", "--servername", HOST, "--ca-file", str(tmp_path / "ca.pem")
        )
    assert code == 0, out
    assert out.splitlines()[0] == f"localhost port {port}, implicit TLS, server name {HOST}"


@pytest.mark.parametrize(
    "target",
    ["127.0.0.1:port", "127.0.0.1:0", "127.0.0.1:70000", "[::1", ":25"],
)
def test_bad_usage_exits_2(target: str) -> None:
    code, out, err = tls_check(target)
    assert code == 2 and out == ""
    assert err.startswith("palisade tls check: ") and "(expected HOST[:PORT])" in err
    assert "Traceback" not in err


def test_missing_ca_file_and_no_target_exit_2(tmp_path: Path) -> None:
    code, _, err = tls_check("127.0.0.1", "--ca-file", str(tmp_path / "nope.pem"))
    assert (code, err) == (
        2,
        f"palisade tls check: --ca-file {tmp_path / 'nope.pem'}: no such file\n",
    )
    assert tls_check()[0] == 2


def test_parse_target() -> None:
    assert parse_target("mx.example.test", starttls=True) == ("mx.example.test", 25)
    assert parse_target("mx.example.test", starttls=False) == ("mx.example.test", 465)
    assert parse_target("192.0.2.1:587", starttls=True) == ("192.0.2.1", 587)
    assert parse_target("[2001:db8::1]:2525", starttls=True) == ("2001:db8::1", 2525)
    assert parse_target("2001:db8::1", starttls=True) == ("2001:db8::1", 25)
