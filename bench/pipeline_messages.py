"""The message mix and the sender domains' DNS records of the pipeline benchmark.

Twenty messages, sent in turn to both systems (bench/smtp_load.py ``--message-file`` x 20):

* 13 legitimate messages from ``sender.bench.test``, DKIM-signed (RSA-2048, relaxed/relaxed,
  ``s=bench``; the key made for the run, published in the zone): short and 4 KB plain text,
  an 8 KB multipart/alternative (text + HTML) and a 40 KB one with a base64 PDF attachment;
* 3 newsletters from ``news.bench.test``: unsigned, no DMARC record (DMARC "none"), HTML;
* 2 spammy messages (signed, so they pass DMARC): shouting subject, money and urgency phrases,
  HTML with links; rspamd scores them higher but under its reject level;
* 1 GTUBE message (signed): rspamd says reject, both systems refuse it after DATA;
* 1 EICAR message (signed, the test string as an attachment): clamd finds it, both refuse.

The envelope is the same for all: ``MAIL FROM:<load@sender.bench.test>`` (SPF ``ip4:127.0.0.0/8
-all`` passes for the 127.0.0.x clients), ``EHLO mta.sender.bench.test``, ``RCPT
TO:<rcpt@bench.test>``. ``sender.bench.test`` has MX and A records (sender verification),
``_dmarc.sender.bench.test`` says ``p=reject``.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from harness import make_key

SENDER_DOMAIN = "sender.bench.test"
NEWS_DOMAIN = "news.bench.test"
SELECTOR = "bench"
SENDER = f"load@{SENDER_DOMAIN}"
RCPT = "rcpt@bench.test"
HELO = f"mta.{SENDER_DOMAIN}"
MTA_IP = "127.0.0.9"

SIGNED_HEADERS = [b"from", b"to", b"subject", b"date", b"message-id", b"mime-version"]
SIGNED_HEADERS += [b"content-type"]

# Assembled at run time so that no file of the repository holds the whole test string.
EICAR = "X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + "EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

PROSE = (
    "Thank you for the notes from Tuesday's meeting. As agreed, Carol sends the revised budget "
    "to the team by Friday, and we meet again next week to go through the numbers together. "
    "Please bring the figures from your visit to the Lyon office and the draft of the report.\n"
)


def _head(n: int, domain: str, subject: str, ctype: str, name: str = "Alice Martin") -> str:
    return (
        f"From: {name} <{'alice' if domain == SENDER_DOMAIN else 'news'}@{domain}>\n"
        f"To: Bob Keller <{RCPT}>\n"
        f"Subject: {subject}\n"
        f"Date: Tue, 01 Dec 2026 10:{n:02d}:00 +0000\n"
        f"Message-ID: <{n}.{hashlib.sha1(subject.encode()).hexdigest()[:12]}@{domain}>\n"
        "MIME-Version: 1.0\n"
        f"Content-Type: {ctype}\n"
        "\n"
    )


def _plain(n: int, size: int) -> str:
    body = (PROSE * (size // len(PROSE) + 1))[:size]
    body = body[: body.rfind("\n") + 1] + "\nBest regards,\nAlice\n"
    return _head(n, SENDER_DOMAIN, f"Budget review, part {n}", "text/plain; charset=utf-8") + body


def _alternative(n: int, domain: str, subject: str, paragraphs: list[str], links: int) -> str:
    boundary = f"=_alt_{n}"
    text = "\n".join(paragraphs) + "\n"
    html_links = "".join(
        f'<p><a href="https://www.{domain}/offer/{i}">Read more ({i})</a></p>\n'
        for i in range(links)
    )
    html = (
        "<html><body>\n"
        + "".join(f"<p>{p}</p>\n" for p in paragraphs)
        + html_links
        + "</body></html>\n"
    )
    return _head(
        n,
        domain,
        subject,
        f'multipart/alternative; boundary="{boundary}"',
        "Alice Martin" if domain == SENDER_DOMAIN else "The News Team",
    ) + (
        f"--{boundary}\nContent-Type: text/plain; charset=utf-8\n\n{text}\n"
        f"--{boundary}\nContent-Type: text/html; charset=utf-8\n\n{html}\n"
        f"--{boundary}--\n"
    )


def _attachment(n: int, name: str, ctype: str, data: bytes, intro: str) -> str:
    boundary = f"=_mixed_{n}"
    b64 = base64.encodebytes(data).decode()
    return _head(
        n, SENDER_DOMAIN, f"Documents for review ({n})", f'multipart/mixed; boundary="{boundary}"'
    ) + (
        f"--{boundary}\nContent-Type: text/plain; charset=utf-8\n\n{intro}\n"
        f'--{boundary}\nContent-Type: {ctype}; name="{name}"\n'
        f'Content-Disposition: attachment; filename="{name}"\n'
        f"Content-Transfer-Encoding: base64\n\n{b64}\n"
        f"--{boundary}--\n"
    )


def _pdf(size: int, seed: int) -> bytes:
    out = b"%PDF-1.4\n"
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return out[:size] + b"\n%%EOF\n"


SPAM_PARAS = [
    "URGENT: you have WON $1,000,000 in our international lottery!!!",
    "Click here NOW to claim your prize, this offer expires in 24 hours. 100% FREE, no risk.",
    "Cheap meds, viagra, cialis, best prices online. Act now, limited time offer!!!",
    "Make money fast working from home, earn $5000 per week guaranteed.",
]


def messages() -> list[tuple[str, bool, str]]:
    """(name, DKIM-sign it, text with LF line ends), in sending order."""
    news = [
        "This week in the club: the autumn walk, the new library hours and the garden day.",
        "Members can register for the Saturday workshop on the club's web site.",
    ] * 12
    ham = [
        ("ham-short", True, _plain(1, 600)),
        ("ham-4k", True, _plain(2, 3600)),
        ("ham-alt", True, _alternative(3, SENDER_DOMAIN, "Agenda", [PROSE.strip()] * 20, 2)),
        ("news", False, _alternative(4, NEWS_DOMAIN, "Club news for December", news, 8)),
        ("ham-pdf", True, _attachment(5, "report.pdf", "application/pdf", _pdf(28000, 5), PROSE)),
        ("ham-short2", True, _plain(6, 900)),
        (
            "spam1",
            True,
            _alternative(7, SENDER_DOMAIN, "URGENT!!! YOU WON $1,000,000", SPAM_PARAS, 6),
        ),
        ("ham-4k2", True, _plain(8, 4000)),
        ("ham-alt2", True, _alternative(9, SENDER_DOMAIN, "Minutes", [PROSE.strip()] * 12, 1)),
        ("news2", False, _alternative(10, NEWS_DOMAIN, "Club news: the walk", news, 8)),
        ("gtube", True, _plain(11, 400).replace("Best regards", GTUBE + "\n\nBest regards")),
        ("ham-short3", True, _plain(12, 700)),
        ("ham-8k", True, _plain(13, 8000)),
        ("news3", False, _alternative(14, NEWS_DOMAIN, "Club news: workshop", news, 8)),
        (
            "spam2",
            True,
            _alternative(15, SENDER_DOMAIN, "Make money FAST from home", SPAM_PARAS, 4),
        ),
        ("ham-4k3", True, _plain(16, 4200)),
        (
            "eicar",
            True,
            _attachment(17, "tool.com", "application/octet-stream", EICAR.encode(), PROSE),
        ),
        ("ham-short4", True, _plain(18, 500)),
        (
            "ham-pdf2",
            True,
            _attachment(19, "minutes.pdf", "application/pdf", _pdf(12000, 19), PROSE),
        ),
        ("ham-4k4", True, _plain(20, 3900)),
    ]
    return ham


def write_mix(directory: Path) -> tuple[list[Path], str]:
    """Writes the mix (CRLF line ends, signed where meant) into ``directory``; returns the
    files in sending order and the DKIM public key (base64) to publish."""
    import dkim

    pem, pubkey = make_key()
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (name, sign, text) in enumerate(messages()):
        raw = text.replace("\n", "\r\n").encode()
        if sign:
            raw = (
                dkim.sign(
                    raw,
                    SELECTOR.encode(),
                    SENDER_DOMAIN.encode(),
                    pem,
                    canonicalize=(b"relaxed", b"relaxed"),
                    include_headers=SIGNED_HEADERS,
                )
                + raw
            )
        path = directory / f"{i:02d}-{name}.eml"
        path.write_bytes(raw)
        files.append(path)
    return files, pubkey


def add_records(zone, pubkey: str, ttl: int) -> None:
    """The sender domains' records in the bench.test zone of bench/perimeter_dns.py."""
    zone.set(SENDER_DOMAIN, "TXT", ["v=spf1 ip4:127.0.0.0/8 -all"], ttl=ttl)
    zone.set(SENDER_DOMAIN, "MX", [f"10 {HELO}."], ttl=ttl)
    zone.set(SENDER_DOMAIN, "A", [MTA_IP], ttl=ttl)
    zone.set(HELO, "A", [MTA_IP], ttl=ttl)
    zone.set(
        f"{SELECTOR}._domainkey.{SENDER_DOMAIN}", "TXT", [f"v=DKIM1; k=rsa; p={pubkey}"], ttl=ttl
    )
    zone.set(f"_dmarc.{SENDER_DOMAIN}", "TXT", ["v=DMARC1; p=reject"], ttl=ttl)
    zone.set(NEWS_DOMAIN, "TXT", ["v=spf1 ip4:127.0.0.0/8 -all"], ttl=ttl)
    zone.set(NEWS_DOMAIN, "MX", [f"10 {HELO}."], ttl=ttl)
    zone.set(NEWS_DOMAIN, "A", [MTA_IP], ttl=ttl)
