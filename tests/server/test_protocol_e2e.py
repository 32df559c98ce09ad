"""The SMTP surface over real sockets: limits, relay tricks, smuggling, pipelining, STARTTLS."""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import time
from typing import Any

import pytest

from tests.conftest import GatewayProcess, wait_for
from tests.server.smtpclient import RawClient, transaction

BODY = b"Subject: t\r\n\r\nhello\r\n.\r\n"


def start_transaction(client: RawClient, rcpt: str = "user@example.test") -> None:
    assert client.reply()[0] == 220
    assert client.command("EHLO client.test")[0] == 250
    assert client.command("MAIL FROM:<s@outside.test>")[0] == 250
    assert client.command(f"RCPT TO:<{rcpt}>")[0] == 250


# -- relay control --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rcpt", "why"),
    [
        ("victim@elsewhere.test", "not permitted"),
        ("victim%elsewhere.test@example.test", "percent hack"),
        ("elsewhere.test!victim@example.test", "bang path"),
        ("@example.test:victim@elsewhere.test", "source route"),
        ('"victim@elsewhere.test"@example.test', "quoted local part containing @"),
        ("victim@[192.0.2.1]", "not permitted"),
    ],
)
def test_relay_tricks_are_refused_permanently(gateway: GatewayProcess, rcpt: str, why: str) -> None:
    with RawClient(gateway.port) as client:
        assert client.reply()[0] == 220
        client.command("EHLO prober.test")
        assert client.command("MAIL FROM:<spam@outside.test>")[0] == 250
        code, text = client.command(f"RCPT TO:<{rcpt}>")
        assert (code, text[:5]) == (550, "5.7.1"), text
        code, _ = client.command("DATA")
        assert code in (503, 554)  # no valid recipient: nothing can be relayed
    line = wait_for(
        lambda: [ln for ln in gateway.rejectlog().splitlines() if "rejected RCPT" in ln]
    )
    assert re.search(
        r"H=\(prober\.test\) \[127\.0\.0\.1\]:\d+ F=<spam@outside\.test> rejected "
        r"RCPT <.+>: relay (?:attempt refused: )?" + re.escape(why) + "$",
        line[-1],
    )


def test_relay_from_hosts_may_relay_through_next_hop(make_gateway: Any, next_hop: Any) -> None:
    next_hop.start()
    gw = make_gateway(
        relay={"relay_from_hosts": ["127.0.0.1/32"]},
        delivery={"next_hop": f"127.0.0.1:{next_hop.port}"},
    )
    with RawClient(gw.port) as client:
        code, text = transaction(client, "me@example.test", "friend@elsewhere.test", BODY)
        assert code == 250, text
    assert wait_for(lambda: next_hop.handler.messages)[0][1] == ["friend@elsewhere.test"]


# -- protocol discipline ----------------------------------------------------------------------
def test_helo_required_vrfy_auth_and_malformed_addresses(gateway: GatewayProcess) -> None:
    with RawClient(gateway.port) as client:
        assert client.reply()[0] == 220
        assert client.command("MAIL FROM:<a@outside.test>")[:1] == (503,)
        assert client.command("EHLO c.test")[0] == 250
        assert client.command("VRFY root")[0] == 252
        assert client.command("AUTH LOGIN")[0] == 503
        for bad in [
            "<>",
            "<no-domain>",
            "<a b@outside.test>",
            "<a@[300.1.1.1]>",
            "a@outside.test",
            "<a@outside..test>",
        ]:
            code, text = client.command(f"MAIL FROM:{bad}" if bad != "<>" else "RCPT TO:<>")
            assert code in (501, 503), (bad, code, text)
    log = wait_for(
        lambda: (
            "AUTH command used when not advertised" in gateway.rejectlog() and gateway.rejectlog()
        )
    )
    assert re.search(
        r'SMTP protocol error in "AUTH LOGIN" H=\(c\.test\) \[127\.0\.0\.1\]:\d+ '
        r"AUTH command used when not advertised",
        log,
    )


def test_pipelined_group_is_answered_in_order_in_one_write(gateway: GatewayProcess) -> None:
    with RawClient(gateway.port) as client:
        assert client.reply()[0] == 220
        assert client.command("EHLO pipe.test")[0] == 250
        client.send(
            b"MAIL FROM:<s@outside.test>\r\nRCPT TO:<a@example.test>\r\n"
            b"RCPT TO:<nobody@elsewhere.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
        )
        time.sleep(0.3)  # let every reply arrive; then one recv must hold them all
        client.sock.settimeout(5)
        first = client.sock.recv(65536)
        codes = [int(line[:3]) for line in first.split(b"\r\n") if line]
        assert codes == [250, 250, 550, 250, 354]
        client.send(BODY)
        assert client.reply()[0] == 250


def test_pipelining_after_helo_is_refused_and_closed(gateway: GatewayProcess) -> None:
    with RawClient(gateway.port) as client:
        assert client.reply()[0] == 220
        assert client.command("HELO old.test")[0] == 250
        client.send(b"MAIL FROM:<s@outside.test>\r\nRCPT TO:<a@example.test>\r\n")
        code, text = client.reply()
        assert code in (521, 554) and "synchronization" in text.lower()
        assert client.closed()
    assert wait_for(lambda: "SMTP protocol synchronization error" in gateway.rejectlog())


def test_helo_with_a_space_is_refused_and_counted(make_gateway: Any) -> None:
    """``EHLO a b`` is not a domain or address literal: 501 5.5.4, counted towards max_errors,
    logged as a protocol error; trailing spaces after a real name are tolerated."""
    gw = make_gateway(limits={"max_errors": 3})
    with RawClient(gw.port) as client:
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert client.reply()[0] == 220
        code, text = client.command("EHLO a b")
        assert (code, text[:5]) == (501, "5.5.4"), text
        assert client.command("HELO  a.test  b  ")[0] == 501
        code, text = client.command("EHLO client.test   ")  # trailing spaces: still a name
        assert code == 250, text
        assert client.command("EHLO x [192.0.2.1] rejected")[0] == 501
        assert client.command("NOOP")[0] == 421  # the third error was the last one allowed
        assert client.closed()
    wait_for(lambda: gw.rejectlog().count("not one domain or address literal") == 3)
    assert re.search(
        r"SMTP protocol error in syntax: H=\[127\.0\.0\.1\]:\d+ EHLO argument is not one "
        r"domain or address literal",
        gw.rejectlog(),
    )
    # the client's text shows only escaped, in exim's "last command was" of the drop line
    assert "[192.0.2.1]" not in gw.rejectlog() + gw.mainlog()
    assert re.search(
        r"H=\(client\.test\) \[127\.0\.0\.1\]:\d+ dropped: too many syntax or protocol errors "
        r'\(last command was "EHLO x \\x5b192\.0\.2\.1\\x5d rejected"\)$',
        gw.rejectlog(),
        re.MULTILINE,
    )


@pytest.mark.skipif(
    shutil.which("swaks") is None and not os.environ.get("CI"),
    reason="swaks not installed (make test installs it)",
)
def test_swaks_helo_with_a_space_is_refused(gateway: GatewayProcess) -> None:
    result = subprocess.run(
        [
            *("swaks", "--server", f"127.0.0.1:{gateway.port}", "--helo", "a b"),
            *("--from", "a@outside.test", "--to", "user@example.test"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0, result.stdout
    # swaks tries EHLO, then falls back to HELO: both refused, nothing accepted
    assert re.search(r"-> EHLO a b\s+<\*\* 501 5\.5\.4 ", result.stdout), result.stdout
    assert re.search(r"-> HELO a b\s+<\*\* 501 5\.5\.4 ", result.stdout), result.stdout
    assert "MAIL FROM" not in result.stdout
    wait_for(lambda: gateway.rejectlog().count("not one domain or address literal") == 2)


def test_early_talker_is_refused_before_the_greeting(make_gateway: Any) -> None:
    gw = make_gateway(server={"greeting_delay": 1.0})
    with RawClient(gw.port) as client:
        client.send(b"EHLO eager.test\r\n")
        code, _ = client.reply()
        assert code == 554
        assert client.closed()
    assert wait_for(lambda: "input sent without waiting for greeting" in gw.rejectlog())
    with RawClient(gw.port) as polite:  # a patient client is greeted after the pause
        assert polite.reply()[0] == 220


def test_starttls_injection_gets_no_reply_after_handshake(
    make_gateway: Any, tls_files: Any
) -> None:
    gw = make_gateway(
        tls={
            "certificate": str(tls_files["certificate"]),
            "private_key": str(tls_files["private_key"]),
        }
    )
    context = ssl.create_default_context(cafile=str(tls_files["ca"]))
    with RawClient(gw.port) as client:
        assert client.reply()[0] == 220
        assert client.command("EHLO inject.test")[0] == 250
        client.send(b"STARTTLS\r\nRSET\r\n")  # one packet: RSET is plaintext to be discarded
        assert client.reply()[0] == 220
        assert client.buffer == b""
        client.starttls(context)
        assert client.quiet_for(1.0) == b""  # no answer to the injected RSET
        code, _ = client.command("EHLO inject.test")
        assert code == 250


# -- limits -------------------------------------------------------------------------------------
def test_command_line_limit(gateway: GatewayProcess) -> None:
    with RawClient(gateway.port) as client:
        assert client.reply()[0] == 220
        code, text = client.command("EHLO " + "a" * 600)
        assert (code, text[:5]) == (500, "5.5.2")
        assert client.command("NOOP")[0] == 250  # the connection goes on
    assert wait_for(lambda: re.search(r"\[127\.0\.0\.1\]:\d+", gateway.rejectlog()))


def test_nul_in_command_is_refused(gateway: GatewayProcess) -> None:
    with RawClient(gateway.port) as client:
        assert client.reply()[0] == 220
        client.send(b"EHLO a\x00b\r\n")
        assert client.reply()[0] == 500


def test_text_line_limit_refuses_message(gateway: GatewayProcess) -> None:
    with RawClient(gateway.port) as client:
        start_transaction(client)
        assert client.command("DATA")[0] == 354
        client.send(b"Subject: long\r\n\r\n" + b"x" * 1200 + b"\r\n.\r\n")
        code, _ = client.reply()
        assert 500 <= code < 600
    assert gateway.maildir_messages("user") == []


def test_declared_and_actual_size_limits(make_gateway: Any) -> None:
    gw = make_gateway(limits={"max_message_size": 2048})
    with RawClient(gw.port) as client:
        assert client.reply()[0] == 220
        ehlo = client.command("EHLO big.test")
        assert ehlo[0] == 250
        code, text = client.command("MAIL FROM:<s@outside.test> SIZE=100000")
        assert (code, text[:5]) == (552, "5.3.4")
        assert client.command("MAIL FROM:<s@outside.test> SIZE=1000")[0] == 250
        assert client.command("RCPT TO:<user@example.test>")[0] == 250
        assert client.command("DATA")[0] == 354
        client.send(b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 100 + b".\r\n")
        code, text = client.reply()
        assert (code, text[:5]) == (552, "5.3.4")
    assert gw.maildir_messages("user") == []


def test_recipient_limit(make_gateway: Any) -> None:
    gw = make_gateway(limits={"max_recipients": 3})
    with RawClient(gw.port) as client:
        start_transaction(client, "r0@example.test")
        assert client.command("RCPT TO:<r1@example.test>")[0] == 250
        assert client.command("RCPT TO:<r2@example.test>")[0] == 250
        code, text = client.command("RCPT TO:<r3@example.test>")
        assert (code, text[:5]) == (452, "4.5.3")


def test_too_many_errors_gets_421_and_close(make_gateway: Any) -> None:
    gw = make_gateway(limits={"max_errors": 3})
    with RawClient(gw.port) as client:
        assert client.reply()[0] == 220
        codes = [client.command("BOGUS")[0] for _ in range(3)]
        assert codes[:2] == [500, 500]
        assert codes[2] == 421 or client.reply()[0] == 421
        assert client.closed()
    assert wait_for(lambda: "dropped: too many syntax or protocol errors" in gw.rejectlog())


def test_idle_command_timeout(make_gateway: Any) -> None:
    gw = make_gateway(limits={"command_timeout": 1})
    with RawClient(gw.port) as client:
        assert client.reply()[0] == 220
        code, text = client.reply()  # nothing sent: the server gives up
        assert (code, text[:5]) == (421, "4.4.2")
        assert client.closed()


def test_trickling_client_is_cut_off_by_the_request_deadline(make_gateway: Any) -> None:
    gw = make_gateway(limits={"command_timeout": 2})
    with RawClient(gw.port) as client:
        assert client.reply()[0] == 220
        started = time.monotonic()
        cut = False
        for byte in b"EHLO slow.example.test.and.more.and.more\r\n":
            try:
                client.send(bytes([byte]))
            except OSError:
                cut = True
                break
            time.sleep(0.25)  # 0.25 s between bytes: an idle timer would never fire
            if client.quiet_for(0.01).startswith(b"421"):
                cut = True
                break
        assert cut, "a client trickling one byte every 0.25 s was never cut off"
        assert time.monotonic() - started < 6


def test_slow_data_is_cut_off_by_minimum_rate(make_gateway: Any) -> None:
    gw = make_gateway(limits={"min_data_rate": 1000, "min_data_rate_grace": 1})
    with RawClient(gw.port) as client:
        start_transaction(client)
        assert client.command("DATA")[0] == 354
        deadline = time.monotonic() + 8
        got = b""
        while time.monotonic() < deadline and not got:
            try:
                client.send(b"x")
            except OSError:
                break
            got = client.quiet_for(0.3)
        assert got.startswith(b"421 4.4.2"), got
    assert gw.maildir_messages("user") == []


def _greeted_client(port: int) -> RawClient | None:
    """A client that got 220 (the start-up probe's slot may take a moment to be released)."""
    client = RawClient(port)
    if client.reply()[0] == 220:
        return client
    client.close()
    return None


def test_connection_limits(make_gateway: Any) -> None:
    gw = make_gateway(server={"max_connections_per_ip": 2, "max_connections": 100})
    held = [wait_for(lambda: _greeted_client(gw.port)) for _ in range(2)]
    try:
        with RawClient(gw.port) as third:
            code, text = third.reply()
            assert (code, text[:5]) == (421, "4.7.0")
    finally:
        for client in held:
            client.close()
    assert wait_for(lambda: "too many connections from that IP" in gw.rejectlog())


def test_total_connection_limit(make_gateway: Any) -> None:
    gw = make_gateway(server={"max_connections": 2, "max_connections_per_ip": 50})
    held = [wait_for(lambda: _greeted_client(gw.port)) for _ in range(2)]
    try:
        with RawClient(gw.port) as third:
            assert third.reply()[0] == 421
    finally:
        for client in held:
            client.close()


# -- SMTP smuggling -------------------------------------------------------------------------------
SMUGGLING = [b"\n.\r\n", b"\r.\r\n", b"\n.\n", b"\r\n.\r", b"\r\n.\n", b"\r.\n"]


@pytest.mark.parametrize("fake_end", SMUGGLING, ids=[repr(s) for s in SMUGGLING])
def test_smuggling_variants_never_end_data(gateway: GatewayProcess, fake_end: bytes) -> None:
    smuggled = (
        b"Subject: outer\r\n\r\nouter body"
        + fake_end
        + b"MAIL FROM:<ceo@example.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nsmuggled\r\n.\r\n"
    )
    with RawClient(gateway.port) as client:
        start_transaction(client, "victim@example.test")
        assert client.command("DATA")[0] == 354
        client.send(smuggled)
        code, text = client.reply()
        assert 500 <= code < 600, text
        assert client.quiet_for(0.5) == b""  # exactly one reply: nothing was smuggled through
        assert client.command("NOOP")[0] == 250
    assert gateway.maildir_messages("victim") == []
    assert wait_for(lambda: "SMTP smuggling attempt" in gateway.rejectlog())


def test_vrfy_never_confirms(gateway: GatewayProcess) -> None:
    with RawClient(gateway.port) as client:
        assert client.reply()[0] == 220
        client.command("EHLO v.test")
        assert client.command("VRFY user@example.test")[0] == 252
        assert client.command("VRFY nobody@example.test")[0] == 252


def test_bare_lf_command_is_refused_and_logged_with_ip(gateway: GatewayProcess) -> None:
    with RawClient(gateway.port) as client:
        assert client.reply()[0] == 220
        client.send(b"EHLO lf.test\n")
        assert client.reply()[0] == 500
    log = wait_for(lambda: gateway.rejectlog())
    assert re.search(r"bare_lf.*\[127\.0\.0\.1\]", log)


def test_connection_survives_many_clients(gateway: GatewayProcess) -> None:
    socks = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", gateway.port))
        socks.append(s)
    for s in socks:
        s.settimeout(5)
        assert s.recv(100).startswith(b"220")
        s.close()


def test_relay_from_hosts_list_file_is_honoured_and_reloaded(
    make_gateway: Any, next_hop: Any
) -> None:
    next_hop.start()
    gw = make_gateway(
        files={"lists/relay_from_hosts": "127.0.0.41\n"},
        lists={"relay_from_hosts": {"type": "ip", "file": "lists/relay_from_hosts"}},
        delivery={"next_hop": f"127.0.0.1:{next_hop.port}"},
    )
    with RawClient(gw.port, source="127.0.0.41") as trusted:
        assert transaction(trusted, "me@example.test", "friend@elsewhere.test", BODY)[0] == 250
    with RawClient(gw.port, source="127.0.0.42") as stranger:
        assert stranger.reply()[0] == 220
        stranger.command("EHLO s.test")
        stranger.command("MAIL FROM:<me@example.test>")
        assert stranger.command("RCPT TO:<friend@elsewhere.test>")[0] == 550
    assert wait_for(lambda: next_hop.handler.messages)[0][1] == ["friend@elsewhere.test"]
