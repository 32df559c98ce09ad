"""``palisade dmarc report`` as an operator runs it, on the real providers' reports in
tests/data/dmarc-reports (parsedmarc's samples) and Mail::DMARC's sample.

The expected numbers are worked out here from the XML with the standard library (gzip, zipfile,
email, ElementTree), not by the code under test, and compared with the command's JSON and table.
"""

from __future__ import annotations

import email
import email.policy
import gzip
import io
import json
import shutil
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from pathlib import Path

from tests.conftest import palisade

DATA = Path(__file__).resolve().parents[1] / "data"
SAMPLES = DATA / "dmarc-reports" / "samples" / "aggregate"
BROKEN = {"invalid_xml.xml", "ikea.com!example.de!1538690400!1538776800.xml"}


def _xml_of(path: Path) -> list[bytes]:
    """The XML documents in a sample file, extracted with the standard library."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        return [gzip.decompress(data)]
    if path.suffix == ".zip":
        return [
            zipfile.ZipFile(io.BytesIO(data)).read(n)
            for n in zipfile.ZipFile(io.BytesIO(data)).namelist()
        ]
    if path.suffix == ".eml":
        message = email.message_from_bytes(data, policy=email.policy.default)
        out = []
        for part in message.walk():
            name = part.get_filename() or ""
            raw = part.get_payload(decode=True)
            if name.endswith(".zip"):
                assert isinstance(raw, bytes)
                archive = zipfile.ZipFile(io.BytesIO(raw))
                out += [archive.read(n) for n in archive.namelist()]
            elif name.endswith(".gz"):
                assert isinstance(raw, bytes)
                out.append(gzip.GzipFile(fileobj=io.BytesIO(raw)).read1(10**7))
        return out
    return [data]


def _expected(paths: list[Path]) -> dict[str, Counter[str]]:
    """report domain -> source ip -> summed count."""
    found: dict[str, Counter[str]] = {}
    for path in paths:
        for xml in _xml_of(path):
            text = xml.decode("utf-8", "replace")
            root = ET.fromstring(text.replace(' xmlns="urn:ietf:params:xml:ns:dmarc-2.0"', ""))
            domain = root.findtext("policy_published/domain", "").strip().lower()
            for record in root.iter("record"):
                ip = record.findtext("row/source_ip", "").strip()
                count = int(record.findtext("row/count", ""))
                found.setdefault(domain, Counter())[ip] += count
    return found


def _good_samples() -> list[Path]:
    return sorted(p for p in SAMPLES.iterdir() if p.name not in BROKEN)


def test_every_good_sample_is_read_and_counted_per_domain_and_source_ip(tmp_path: Path) -> None:
    paths = _good_samples()
    result = palisade("dmarc", "report", "--json", *map(str, paths), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    document = json.loads(result.stdout)
    got: dict[str, Counter[str]] = {}
    for domain in document["domains"]:
        counter = got.setdefault(domain["domain"], Counter())
        for row in domain["rows"]:
            counter[row["source_ip"]] += row["count"]
        assert domain["total"] == sum(counter.values())
        assert domain["pass"] + domain["fail"] == domain["total"]
    assert got == _expected(paths)
    assert document["broken"] == []
    assert sum(got["example.com"].values()) > 2286


def test_the_table_shows_each_source_ip_and_the_total(tmp_path: Path) -> None:
    sample = SAMPLES / "rfc9990-example.net!example.com!1700000000!1700086399.xml"
    root = ET.fromstring(
        sample.read_text().replace(' xmlns="urn:ietf:params:xml:ns:dmarc-2.0"', "")
    )
    result = palisade("dmarc", "report", str(sample), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    total = 0
    for record in root.iter("record"):
        ip = record.findtext("row/source_ip")
        count = int(record.findtext("row/count", ""))
        dkim = record.findtext("row/policy_evaluated/dkim")
        spf = record.findtext("row/policy_evaluated/spf")
        dmarc = "pass" if "pass" in (dkim, spf) else "fail"
        disposition = record.findtext("row/policy_evaluated/disposition")
        row = next(line for line in lines if line.split()[:1] == [ip])
        assert row.split()[1:6] == [str(count), spf, dkim, dmarc, disposition]
        total += count
    assert f"total {total} message(s)" in result.stdout


def test_mail_dmarc_sample_and_the_domain_filter(tmp_path: Path) -> None:
    sample = DATA / "dmarc" / "test_dmarc.xml"
    result = palisade(
        "dmarc",
        "report",
        "--json",
        "--domain",
        "example.com",
        str(sample),
        str(SAMPLES / "twilight.eml"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert [d["domain"] for d in document["domains"]] == ["example.com"]
    assert document["domains"][0]["rows"] == [
        {
            "source_ip": "1.2.3.4",
            "header_from": "example.com",
            "spf": "pass",
            "dkim": "pass",
            "dmarc": "pass",
            "disposition": "none",
            "spf_auth": "example.com=pass",
            "dkim_auth": "example.com=pass",
            "count": 1,
        }
    ]


def test_a_maildir_of_report_mails(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    mails = sorted(SAMPLES.glob("*.eml"))
    for number, mail in enumerate(mails):
        shutil.copy(mail, maildir / ("new" if number % 2 else "cur") / f"{number}.host:2,S")
    result = palisade("dmarc", "report", "--json", str(maildir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    got = {d["domain"]: d["total"] for d in json.loads(result.stdout)["domains"]}
    expected = {domain: sum(c.values()) for domain, c in _expected(mails).items()}
    assert got == expected and len(got) == 3


def test_broken_reports_are_named_with_their_reason_and_the_rest_is_read(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.xml.gz"
    bomb.write_bytes(gzip.compress(b"<feedback>" + b" " * (40 * 1024 * 1024)))
    laughs = tmp_path / "laughs.xml"
    laughs.write_text(
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>'
        "<feedback>&lol2;</feedback>"
    )
    not_mail = tmp_path / "note.eml"
    not_mail.write_text("From: a@b.example\nSubject: hi\n\nno attachment\n")
    good = SAMPLES / "example.net!example.com!1529366400!1529452799.xml"
    paths = [SAMPLES / "invalid_xml.xml", bomb, laughs, not_mail, good, tmp_path / "missing.xml"]
    result = palisade("dmarc", "report", *map(str, paths), cwd=tmp_path)
    assert result.returncode == 1
    err = result.stderr
    assert "invalid_xml.xml: broken: not well-formed XML" in err
    assert "bomb.xml.gz: broken: decompresses to more than 32 MiB" in err
    assert "laughs.xml: broken: document type declarations and entities are refused" in err
    assert "note.eml: broken: a mail without a report attachment" in err
    assert "no such file or directory:" in err and "missing.xml" in err
    assert "199.230.200.36" in result.stdout
    assert "1 report(s) read, 4 broken" in result.stdout


def test_help_and_usage(tmp_path: Path) -> None:
    result = palisade("dmarc", "report", "--help", cwd=tmp_path)
    assert result.returncode == 0 and "--domain" in result.stdout
    result = palisade("dmarc", "report", cwd=tmp_path)
    assert result.returncode == 2
    for command in (("dmarc", "send-reports"), ("tlsrpt", "report"), ("tlsrpt", "send-reports")):
        result = palisade(*command, "--help", cwd=tmp_path)
        assert result.returncode == 0 and "usage: palisade" in result.stdout
    assert "--dry-run" in result.stdout and "--day" in result.stdout
    result = palisade("dmarc", "send-reports", "--day", "2026-13-01", cwd=tmp_path)
    assert result.returncode == 2 and "--day: expected YYYY-MM-DD" in result.stderr
