"""End to end: the real gateway asks a real slapd for recipients the static file does not know.

Pins the three answers an operator relies on: known (file or LDAP) → 250, unknown → 550 5.1.1,
LDAP down and not in the file → 451 4.4.3 (never accept-then-bounce), and the LDAP password in
no log line.
"""

from __future__ import annotations

import smtplib
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import GatewayProcess
from tests.ldap.slapd import BIND_DN, BIND_PASSWORD, SUFFIX, SlapdServer, TlsFiles


@pytest.fixture
def slapd(tmp_path: Path) -> Any:
    ca = trustme.CA()
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    files = TlsFiles(tls_dir / "ca.pem", tls_dir / "cert.pem", tls_dir / "key.pem")
    ca.cert_pem.write_to_path(str(files.ca))
    leaf.cert_chain_pems[0].write_to_path(str(files.certificate))
    leaf.private_key_pem.write_to_path(str(files.key))
    server = SlapdServer(tmp_path / "slapd", tls=files).start()
    yield server
    server.stop()


def start(make_gateway: Any, slapd: SlapdServer) -> GatewayProcess:
    gateway: GatewayProcess = make_gateway(
        files={"recipients.txt": "postmaster@example.test\n@catchall.example.test\n"},
        domains={"local": ["example.test", "catchall.example.test"]},
        lists={"recipients": {"type": "address", "file": "recipients.txt"}},
        ldap={
            "servers": [slapd.uri],
            "bind_dn": BIND_DN,
            "bind_password": BIND_PASSWORD,
            "base_dn": SUFFIX,
            "filter": "(mail=%s)",
            "timeout": "2s",
        },
        rules={
            "rcpt": [
                {
                    "name": "valid_recipients",
                    "check": "recipient",
                    "list": "recipients",
                    "verb": "deny",
                    "code": 550,
                    "enhanced": "5.1.1",
                    "timeout": 4,
                    "message": "<$recipient>: Recipient address rejected: User unknown",
                    "log_message": "unknown recipient: $reason",
                }
            ]
        },
    )
    return gateway


def rcpt(gateway: GatewayProcess, address: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=15) as client:
        client.ehlo("client.example")
        client.mail("someone@outside.test")
        return client.rcpt(address)


def test_ldap_and_file_decide_at_rcpt(make_gateway: Any, slapd: SlapdServer) -> None:
    gateway = start(make_gateway, slapd)
    assert rcpt(gateway, "postmaster@example.test")[0] == 250  # in the file
    assert rcpt(gateway, "anyone@catchall.example.test")[0] == 250  # @domain line
    assert rcpt(gateway, "ann@example.test")[0] == 250  # only in LDAP
    code, text = rcpt(gateway, "nobody@example.test")
    assert (code, text) == (
        550,
        b"5.1.1 <nobody@example.test>: Recipient address rejected: User unknown",
    )
    assert "rejected RCPT <nobody@example.test>: unknown recipient" in gateway.rejectlog()


def test_ldap_down_defers_unknown_but_file_still_accepts(
    make_gateway: Any, slapd: SlapdServer
) -> None:
    gateway = start(make_gateway, slapd)
    slapd.stop()
    assert rcpt(gateway, "postmaster@example.test")[0] == 250
    code, text = rcpt(gateway, "ann@example.test")
    assert code == 451 and text.startswith(b"4.4.3")
    log = gateway.mainlog() + gateway.rejectlog()
    assert "temporarily rejected RCPT <ann@example.test>" in log
    assert "temporary failure" in log
    assert BIND_PASSWORD not in log + gateway.paniclog()
