"""The authenticated sender the DATA-stage end-to-end tests share: the zones of client.example
(SPF, MX, DKIM key, DMARC reject) and other.example (SPF -all) on the loopback DNS server, and
messages signed by client.example with dkimpy's test key."""

from __future__ import annotations

from pathlib import Path

import dkim

from loopback.dnsserver import ZoneServer, start_zone_server

DATA = Path(__file__).resolve().parent / "data" / "dkim"

HAM = (
    "Hello Bob,\r\n\r\nthank you for joining the meeting on Tuesday. Carol will send the\r\n"
    "revised budget by Friday and we meet again next week.\r\n\r\nBest regards,\r\nAlice\r\n"
)


def client_example_zones() -> ZoneServer:
    """A started DNS server with the zones; the caller stops it."""
    server = start_zone_server()
    server.add_zone("client.example")
    server.add_zone("other.example")
    server.add_zone("in-addr.arpa")
    server.set("client.example", "TXT", ["v=spf1 ip4:127.0.0.0/8 -all"])
    server.set("client.example", "MX", ["10 mx.client.example."])
    server.set("mx.client.example", "A", ["192.0.2.30"])
    server.set("test._domainkey.client.example", "TXT", [(DATA / "test.txt").read_text().strip()])
    server.set("_dmarc.client.example", "TXT", ["v=DMARC1; p=reject"])
    server.set("other.example", "TXT", ["v=spf1 -all"])
    server.set("other.example", "MX", ["10 mx.client.example."])
    return server


def signed(body: str, *, sender: str = "alice@client.example", extra: str = "") -> bytes:
    """A message from ``sender`` signed by client.example (CRLF line ends)."""
    message = (
        f"From: Alice <{sender}>\r\nTo: postmaster@example.test\r\nSubject: Tuesday\r\n"
        f"Message-ID: <1@client.example>\r\n{extra}\r\n{body}"
    ).encode()
    signature: bytes = dkim.sign(
        message,
        b"test",
        b"client.example",
        (DATA / "test.private").read_bytes(),
        include_headers=[b"from", b"to", b"subject", b"message-id"],
    )
    return signature + message
