"""End to end through the real gateway with ``[rspamd]``: a real rspamd 3.4 on loopback
(``tests/scanners/rspamd.py``), spoken to on its controller, behind its password.

Pins what an operator who picks rspamd instead of spamd sees on the default levels: GTUBE (which
rspamd scores at its own reject threshold, 15) refused with 550 after the final dot and nothing
kept; a clean message delivered with the X-Spam headers and rspamd's rule names; a wrong
password or a hung rspamd accepted unchecked; the password in no log line, reply or message.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import GatewayProcess, wait_for
from tests.scanners.conftest import GTUBE
from tests.scanners.rspamd import RspamdProcess, start_rspamd

HAM = (
    "Hello Bob,\r\n\r\nthank you for joining the meeting on Tuesday. Carol will send the\r\n"
    "revised budget by Friday and we meet again next week.\r\n\r\nBest regards,\r\nAlice\r\n"
)


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RspamdProcess]:
    process = start_rspamd(tmp_path_factory.mktemp("rspamd"))
    yield process
    process.stop()


def gateway_for(
    make_gateway: Any, rspamd: RspamdProcess, password: str | None = None, timeout: str = "20s"
) -> GatewayProcess:
    table = {
        "url": rspamd.controller_url,
        "password": rspamd.password if password is None else password,
        "timeout": timeout,
    }
    gateway: GatewayProcess = make_gateway(rspamd=table)
    return gateway


def message(body: str) -> bytes:
    return (
        "From: Alice <alice@client.example>\r\nTo: postmaster@example.test\r\n"
        "Subject: Tuesday\r\nDate: Tue, 3 Jun 2025 10:14:58 +0000\r\n"
        f"Message-ID: <1@client.example>\r\n\r\n{body}"
    ).encode()


def send(gateway: GatewayProcess, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=60) as client:
        client.ehlo("mx.client.example")
        try:
            client.sendmail("alice@client.example", ["postmaster@example.test"], data)
        except smtplib.SMTPDataError as exc:
            assert isinstance(exc.smtp_error, bytes)  # smtplib's own reply text is bytes
            return exc.smtp_code, exc.smtp_error
        return 250, b""


def header_block(data: bytes) -> list[str]:
    """The delivered header section, unfolded, one field a line."""
    head = data.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode()
    return head.replace("\n\t", " ").replace("\n ", " ").split("\n")


def everything_written(gateway: GatewayProcess) -> str:
    """Every log file, the gateway's stderr and every delivered message, as text."""
    files = [p for p in gateway.base.rglob("*") if p.is_file() and p != gateway.config_path]
    texts = [p.read_bytes().decode(errors="replace") for p in files]
    return "\n".join([*texts, gateway.stderr()])


def test_gtube_is_refused_at_the_default_kill_level(
    make_gateway: Any, rspamd: RspamdProcess
) -> None:
    gateway = gateway_for(make_gateway, rspamd)
    code, text = send(gateway, message(HAM + GTUBE + "\r\n"))
    assert (code, text) == (550, b"5.7.1 Message rejected as spam")
    reject = wait_for(gateway.rejectlog)
    assert "rejected after DATA: spam score 15.0" in reject and "GTUBE" in reject
    assert gateway.maildir_messages("postmaster") == []
    assert list((gateway.spool_dir / "queue").iterdir()) == []
    assert rspamd.password not in everything_written(gateway)


def test_clean_message_is_delivered_with_spam_headers(
    make_gateway: Any, rspamd: RspamdProcess
) -> None:
    gateway = gateway_for(make_gateway, rspamd)
    assert send(gateway, message(HAM)) == (250, b"")
    delivered = wait_for(lambda: gateway.maildir_messages("postmaster"))[0]
    lines = header_block(delivered)
    spam = [line for line in lines if line.startswith("X-Spam-")]
    assert spam[0] == "X-Spam-Checker-Version: Palisade (rspamd) on mx.example.test"
    assert not any(line.startswith("X-Spam-Flag:") for line in spam)
    assert spam[-1].startswith("X-Spam-Status: No, score=")
    tests = [name.strip() for name in spam[-1].split(" tests=", 1)[1].split(",")]
    assert "MIME_GOOD" in tests and tests == sorted(tests)
    main = wait_for(lambda: [ln for ln in gateway.mainlog().splitlines() if " <= " in ln])[0]
    assert " spam=" in main and "spam=unchecked" not in main
    assert rspamd.password not in everything_written(gateway)


def test_wrong_password_is_accepted_unchecked(make_gateway: Any, rspamd: RspamdProcess) -> None:
    gateway = gateway_for(make_gateway, rspamd, password="not-the-password")
    assert send(gateway, message(HAM + GTUBE + "\r\n")) == (250, b"")
    delivered = wait_for(lambda: gateway.maildir_messages("postmaster"))[0]
    assert "X-Spam-Status: unchecked (scanner unavailable)" in header_block(delivered)
    log = wait_for(lambda: gateway.mainlog() if "spam=unchecked" in gateway.mainlog() else "")
    assert f"rspamd {rspamd.controller_url}: HTTP status 401: Unauthorized" in log
    assert "not-the-password" not in everything_written(gateway)


def test_hung_rspamd_costs_its_timeout_then_accepted_unchecked(
    make_gateway: Any, rspamd: RspamdProcess
) -> None:
    gateway = gateway_for(make_gateway, rspamd, timeout="1s")
    with rspamd.paused():
        assert send(gateway, message(HAM)) == (250, b"")
    delivered = wait_for(lambda: gateway.maildir_messages("postmaster"))[0]
    assert "X-Spam-Status: unchecked (scanner unavailable)" in header_block(delivered)
    log = wait_for(lambda: gateway.mainlog() if "spam=unchecked" in gateway.mainlog() else "")
    assert "no answer within 1s" in log
