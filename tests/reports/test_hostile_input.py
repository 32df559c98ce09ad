"""Any bytes given to the readers give reports or a named reason, never an exception: random
bytes, damaged samples (bytes flipped, cut short), and mails and archives made of them."""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from palisade.reports import dmarc_aggregate, tlsrpt
from palisade.reports.sources import Broken, Document, expand

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "dmarc-reports" / "samples"
XML = (
    SAMPLES / "aggregate" / "rfc9990-example.net!example.com!1700000000!1700086399.xml"
).read_bytes()
JSON = (SAMPLES / "smtp_tls" / "rfc8460.json").read_bytes()
MAIL = (SAMPLES / "aggregate" / "twilight.eml").read_bytes()


def _read_all(data: bytes) -> None:
    for item in expand("input", data):
        assert isinstance(item, Document | Broken)
        if isinstance(item, Document):
            for parse in (dmarc_aggregate.parse_report, tlsrpt.parse_report):
                try:
                    parse(item.data)
                except dmarc_aggregate.ReportError as exc:
                    assert str(exc)


def _damaged(base: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
    data = bytearray(base[: max(1, cut % (len(base) + 1))])
    for where, value in flips:
        if data:
            data[where % len(data)] = value
    return bytes(data)


damage = st.tuples(
    st.integers(min_value=0, max_value=10**6),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    _read_all(data)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([XML, JSON, MAIL]), damage)
def test_damaged_samples_and_their_archives(
    base: bytes, how: tuple[int, list[tuple[int, int]]]
) -> None:
    data = _damaged(base, *how)
    _read_all(data)
    _read_all(gzip.compress(data))
    _read_all(_damaged(gzip.compress(data), len(data), how[1]))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("report.xml", data)
    _read_all(buffer.getvalue())
    _read_all(_damaged(buffer.getvalue(), 10**6, how[1]))
