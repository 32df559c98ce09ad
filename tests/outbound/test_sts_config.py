"""The MTA-STS, DANE and TLS-RPT settings (``[outbound] mta_sts``, ``mta_sts_port``, ``dane``,
``tls_reports``; ``[dns] trust_ad``) as an operator meets them: ``palisade config check`` accepts
them and names each mistake (file, key, reason); the composition root builds the parts they ask
for, and nothing when they are off."""

from __future__ import annotations

import tomllib
from pathlib import Path

from palisade.adapters.mta_sts import MtaStsPolicies
from palisade.adapters.tlsrpt_file import TlsResultFiles
from palisade.config import parse_config
from palisade.delivery.dane import DaneTlsaSource, matches
from palisade.server.generation import build_outbound
from tests.conftest import palisade


def test_config_check_accepts_the_settings(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(
        '[dns]\ntrust_ad = "yes"\n'
        '[outbound]\ndelivery = "mx"\nmta_sts = false\nmta_sts_port = 8443\ndane = false\n'
        'tls_reports = "reports/tls"\n'
    )
    result = palisade("config", "check", "--config", str(good), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    printed = tomllib.loads(result.stdout[result.stdout.index("[") :])
    assert printed["dns"]["trust_ad"] == "yes"
    outbound = parse_config(good.read_text(), str(good)).outbound
    assert (outbound.mta_sts, outbound.mta_sts_port, outbound.dane) == (False, 8443, False)
    assert outbound.tls_reports == Path("reports/tls")
    defaults = parse_config("", "t.toml")
    assert defaults.dns.trust_ad == "auto"
    assert (defaults.outbound.mta_sts, defaults.outbound.dane) == (True, True)
    assert defaults.outbound.tls_reports == Path("var/tlsrpt")


def test_config_check_names_each_mistake(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a directory")
    cases = {
        "[dns]\ntrust_ad = true\n": "dns.trust_ad: expected a string, got bool True",
        '[dns]\ntrust_ad = "always"\n': (
            "dns.trust_ad: expected one of 'auto', 'yes', 'no', got 'always'"
        ),
        '[outbound]\nmta_sts = "yes"\n': "outbound.mta_sts: expected true or false",
        "[outbound]\ndane = 1\n": "outbound.dane: expected true or false",
        "[outbound]\nmta_sts_port = 0\n": "outbound.mta_sts_port: expected a number of at least 1",
        "[outbound]\nmta_sts_port = 70000\n": (
            "outbound.mta_sts_port: expected a TCP port number (1-65535), got 70000"
        ),
        '[outbound]\ntls_reports = "afile"\n': "outbound.tls_reports: not a directory: afile",
        "[outbound]\ntls_reports = 3\n": "outbound.tls_reports: expected a file path string",
    }
    for number, (text, expected) in enumerate(cases.items()):
        path = tmp_path / f"bad{number}.toml"
        path.write_text(text)
        result = palisade("config", "check", "--config", str(path), cwd=tmp_path)
        assert result.returncode == 2, (text, result.stdout, result.stderr)
        assert expected in result.stderr, (text, result.stderr)
        assert str(path) in result.stderr


def test_the_composition_root_builds_what_is_asked(tmp_path: Path) -> None:
    on = parse_config(
        f'[paths]\nstate = "{tmp_path}/lib/state.sqlite"\n'
        f'[outbound]\ndelivery = "mx"\nmta_sts_port = 8443\ntls_reports = "{tmp_path}/tlsrpt"\n',
        "t.toml",
    )
    transport = build_outbound(on)
    assert transport is not None
    assert isinstance(transport.mta_sts, MtaStsPolicies)
    assert isinstance(transport.tlsa, DaneTlsaSource)
    assert transport.dane_match is matches
    assert isinstance(transport.tls_results, TlsResultFiles)
    assert transport.tls_results.directory == tmp_path / "tlsrpt"
    off = parse_config(
        '[outbound]\ndelivery = "mx"\nmta_sts = false\ndane = false\ntls_reports = ""\n', "t.toml"
    )
    transport = build_outbound(off)
    assert transport is not None
    assert (transport.mta_sts, transport.tlsa, transport.dane_match, transport.tls_results) == (
        None,
        None,
        None,
        None,
    )


def test_self_check_warns_when_dane_cannot_apply_or_results_cannot_be_kept(
    tmp_path: Path,
) -> None:
    (tmp_path / "afile").write_text("a file where a directory should be")
    config = tmp_path / "warn.toml"
    config.write_text(
        '[dns]\nnameservers = ["192.0.2.53"]\n'
        '[outbound]\ndelivery = "mx"\ntls_reports = "afile/tlsrpt"\n'
    )
    result = palisade("config", "check", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr  # warnings, not errors
    output = result.stdout + result.stderr
    assert "cannot create [outbound] tls_reports afile/tlsrpt" in output
    assert "TLS-RPT results are lost" in output
    assert "[outbound] dane is on but the resolver's AD bit is not believed" in output
    assert "not all on loopback" in output
    fine = tmp_path / "fine.toml"
    fine.write_text(
        '[dns]\nnameservers = ["127.0.0.1:53"]\n[outbound]\ndelivery = "mx"\n'
        'tls_reports = "reports"\n'
    )
    result = palisade("config", "check", "--config", str(fine), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert "ok: [outbound] tls_reports reports can be created" in output
    assert "AD bit is not believed" not in output
