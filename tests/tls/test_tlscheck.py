"""palisade.tlscheck on real PEM files: order, completeness, key, expiry, host name, bad files."""

from __future__ import annotations

import datetime
from pathlib import Path

from palisade.tlscheck import WARN_DAYS, Finding, analyse_chain, check_certificate_files
from tests.tls.certs import NOW, Pki, issue

DAY = datetime.timedelta(days=1)
HOST = "mx.example.test"


def errors(findings: list[Finding]) -> list[str]:
    return [message for level, message in findings if level == "error"]


def warnings(findings: list[Finding]) -> list[str]:
    return [message for level, message in findings if level == "warning"]


def test_a_good_chain_and_key(tmp_path: Path) -> None:
    pki = Pki.make()
    cert, key = pki.write(tmp_path)
    findings = check_certificate_files(cert, key, HOST, now=NOW)
    assert errors(findings) == [] and warnings(findings) == []
    after = (NOW + 365 * DAY).strftime("%Y-%m-%d %H:%M:%S UTC")
    assert findings == [
        ("ok", f"certificate 0 (CN={HOST}) valid until {after} (365 days left)"),
        (
            "ok",
            f"certificate 1 (CN=Palisade Test Intermediate) valid until {after} (365 days left)",
        ),
        ("ok", "chain in order: leaf first, each certificate issued by the next"),
        ("ok", f"certificate is valid for {HOST}"),
        ("ok", f"private key {key} matches {cert}"),
    ]


def test_chain_with_its_root_at_the_end_is_fine(tmp_path: Path) -> None:
    pki = Pki.make()
    cert, key = pki.write(tmp_path, pki.leaf, pki.intermediate, pki.root)
    findings = check_certificate_files(cert, key, HOST, now=NOW)
    assert errors(findings) == []
    assert ("ok", "chain ends with a self-signed root (not needed; clients have it)") in findings


def test_wrong_order(tmp_path: Path) -> None:
    pki = Pki.make()
    cert, key = pki.write(tmp_path, pki.leaf, pki.root, pki.intermediate)
    assert errors(check_certificate_files(cert, key, HOST, now=NOW)) == [
        f"chain out of order: certificate 0 (CN={HOST}) is not issued by the next certificate "
        "(CN=Palisade Test Root); its issuer is certificate 2: wrong order",
        "chain out of order: certificate 1 (CN=Palisade Test Root) is not issued by the next "
        "certificate (CN=Palisade Test Intermediate); it is a self-signed root: only the end of "
        "a chain may have one",
    ]


def test_intermediate_first(tmp_path: Path) -> None:
    pki = Pki.make()
    cert, key = pki.write(tmp_path, pki.intermediate, pki.leaf)
    found = errors(check_certificate_files(cert, key, HOST, now=NOW))
    assert found[0] == (
        "chain out of order: certificate 0 (CN=Palisade Test Intermediate) is not issued by the "
        f"next certificate (CN={HOST}); its issuer CN=Palisade Test Root is not in the chain: "
        "missing intermediate?"
    )
    assert f"private key {tmp_path / 'key.pem'} does not match" in found[-1]  # key is the leaf's


def test_missing_intermediate(tmp_path: Path) -> None:
    pki = Pki.make()
    cert, key = pki.write(tmp_path, pki.leaf, pki.root)
    assert errors(check_certificate_files(cert, key, HOST, now=NOW)) == [
        f"chain out of order: certificate 0 (CN={HOST}) is not issued by the next certificate "
        "(CN=Palisade Test Root); its issuer CN=Palisade Test Intermediate is not in the chain: "
        "missing intermediate?"
    ]


def test_same_names_but_another_issuer_key_is_not_in_order(tmp_path: Path) -> None:
    """Order is checked by signature, not only by name: a reissued CA with the same name but
    another key does not count as the issuer."""
    pki = Pki.make()
    impostor = issue("Palisade Test Intermediate", pki.root, ca=True)
    cert, key = pki.write(tmp_path, pki.leaf, impostor)
    assert len(errors(check_certificate_files(cert, key, HOST, now=NOW))) == 1


def test_key_mismatch_names_both_files(tmp_path: Path) -> None:
    pki = Pki.make()
    other = issue(HOST, pki.intermediate, names=(HOST,))
    cert, key = pki.write(tmp_path, key=other)
    assert errors(check_certificate_files(cert, key, HOST, now=NOW)) == [
        f"private key {key} does not match {cert} (its first certificate)"
    ]


def test_expired_leaf(tmp_path: Path) -> None:
    pki = Pki.make(not_before=NOW - 90 * DAY, not_after=NOW - 2 * DAY)
    cert, key = pki.write(tmp_path)
    when = (NOW - 2 * DAY).strftime("%Y-%m-%d %H:%M:%S UTC")
    assert errors(check_certificate_files(cert, key, HOST, now=NOW)) == [
        f"certificate 0 (CN={HOST}) expired on {when}"
    ]


def test_not_yet_valid(tmp_path: Path) -> None:
    pki = Pki.make(not_before=NOW + 2 * DAY)
    cert, key = pki.write(tmp_path)
    when = (NOW + 2 * DAY).strftime("%Y-%m-%d %H:%M:%S UTC")
    assert errors(check_certificate_files(cert, key, HOST, now=NOW)) == [
        f"certificate 0 (CN={HOST}) is not valid before {when}"
    ]


def test_near_expiry_is_a_warning(tmp_path: Path) -> None:
    pki = Pki.make(not_after=NOW + (WARN_DAYS - 1) * DAY)
    cert, key = pki.write(tmp_path)
    findings = check_certificate_files(cert, key, HOST, now=NOW)
    when = (NOW + 13 * DAY).strftime("%Y-%m-%d %H:%M:%S UTC")
    assert errors(findings) == []
    assert warnings(findings) == [f"certificate 0 (CN={HOST}) expires on {when} (13 days left)"]
    at_limit = Pki.make(not_after=NOW + WARN_DAYS * DAY)
    cert, key = at_limit.write(tmp_path)
    assert warnings(check_certificate_files(cert, key, HOST, now=NOW)) == []


def test_hostname_mismatch(tmp_path: Path) -> None:
    cert, key = Pki.make().write(tmp_path)
    assert errors(check_certificate_files(cert, key, "mail.other.test", now=NOW)) == [
        f"certificate is not valid for mail.other.test (its names: {HOST})"
    ]


def test_wildcard_name(tmp_path: Path) -> None:
    pki = Pki.make(hostname="*.example.test")
    cert, key = pki.write(tmp_path)
    assert errors(check_certificate_files(cert, key, HOST, now=NOW)) == []
    assert errors(check_certificate_files(cert, key, "a.b.example.test", now=NOW)) != []


def test_unreadable_and_garbage_files(tmp_path: Path) -> None:
    cert, key = Pki.make().write(tmp_path)
    missing = tmp_path / "missing.pem"
    assert check_certificate_files(missing, key, HOST) == [
        ("error", f"{missing}: cannot read: No such file or directory")
    ]
    assert check_certificate_files(cert, missing, HOST, now=NOW)[-1:] == [
        ("error", f"{missing}: cannot read: No such file or directory")
    ]
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    assert check_certificate_files(garbage, key, HOST) == [
        ("error", f"{garbage}: no PEM certificate in it (or a damaged one)")
    ]
    (tmp_path / "plain.txt").write_text("hello\n")
    assert check_certificate_files(tmp_path / "plain.txt", key, HOST)[0][0] == "error"
    assert errors(check_certificate_files(cert, garbage, HOST, now=NOW)) == [
        f"{garbage}: no usable PEM private key in it"
    ]


def test_key_in_the_certificate_file(tmp_path: Path) -> None:
    pki = Pki.make()
    both = tmp_path / "both.pem"
    both.write_bytes(pki.leaf.pem() + pki.intermediate.pem() + pki.leaf.key_pem())
    findings = check_certificate_files(both, None, HOST, now=NOW)
    assert errors(findings) == []
    assert findings[-1] == ("ok", f"private key {both} matches {both}")


def test_analyse_chain_takes_certificates_and_a_key() -> None:
    pki = Pki.make()
    chain = [pki.leaf.cert, pki.intermediate.cert]
    assert errors(analyse_chain(chain, pki.leaf.key, HOST, NOW)) == []
    assert errors(analyse_chain(chain, pki.root.key, None, NOW)) == [
        "the private key does not match the certificate (its first certificate)"
    ]
    assert analyse_chain([]) == [("error", "no certificate")]


def test_certificate_text_cannot_break_a_line(tmp_path: Path) -> None:
    pki = Pki.make()
    evil = issue("evil\nok        forged", pki.intermediate, names=(HOST,))
    cert, key = pki.write(tmp_path, evil, pki.intermediate, key=evil)
    assert all("\n" not in message for _, message in check_certificate_files(cert, key, HOST))


def test_serving_keeps_order_and_key_errors_but_warns_of_expiry_and_host_name(
    tmp_path: Path,
) -> None:
    """Our own certificate before ``serve``: an expired one or another host name must not stop
    the gateway (senders use STARTTLS opportunistically), a wrong order or key must."""
    expired = Pki.make(
        hostname="other.example.test", not_before=NOW - 90 * DAY, not_after=NOW - 2 * DAY
    )
    cert, key = expired.write(tmp_path)
    findings = check_certificate_files(cert, key, HOST, now=NOW, serving=True)
    assert errors(findings) == []
    assert len(warnings(findings)) == 2
    assert errors(check_certificate_files(cert, key, HOST, now=NOW)) != []
    pki = Pki.make()
    cert, key = pki.write(tmp_path, pki.leaf, pki.root, pki.intermediate)
    assert len(errors(check_certificate_files(cert, key, HOST, now=NOW, serving=True))) == 2
