"""``[scan]`` in the config: every mistake is one error line naming the file, line and key
(``palisade scan`` exits 2), and a config without files says what to set (exit 1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from palisade.config import ConfigError, parse_config
from tests.conftest import palisade


def test_a_good_scan_section() -> None:
    config = parse_config(
        """
[scan]
files = ["/var/log/mail.log", "/var/log/dovecot.log"]
interval = "30s"
formats = ["dovecot", "postfix"]

[scan.weights]
dovecot-auth = 2
postfix-reject = 0

[[scan.patterns]]
rule = "sshd"
regex = 'sshd\\[\\d+\\]: Failed password for \\S+ from (?P<ip>[0-9a-fA-F:.]+) port'
weight = 1
""",
        "t.toml",
    )
    scan = config.scan
    assert [str(p) for p in scan.files] == ["/var/log/mail.log", "/var/log/dovecot.log"]
    assert scan.interval == 30.0
    assert dict(scan.weights) == {"dovecot-auth": 2, "postfix-reject": 0}
    assert scan.patterns[0].rule == "sshd"
    assert scan.offsets_path(Path("/var/lib/palisade/state.sqlite")) == Path(
        "/var/lib/palisade/scan-offsets.json"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[scan]\nfiles = ["/x"]\n\n[[scan.patterns]]\nrule = "ssh"\nregex = "from (\\\\S+)"\n',
            "t.toml:6: scan.patterns[1].regex: (rule 'ssh') the regex needs a named group",
        ),
        (
            '[scan]\n\n[[scan.patterns]]\nrule = "ssh"\nregex = "from (?P<ip>"\n',
            "t.toml:5: scan.patterns[1].regex: (rule 'ssh') not a valid regular expression",
        ),
        (
            '[scan]\n\n[[scan.patterns]]\nrule = "ssh"\nregex = "(?P<ip>(a+)+)"\n',
            "t.toml:5: scan.patterns[1].regex: (rule 'ssh') nested repetition",
        ),
        (
            '[scan]\n\n[[scan.patterns]]\nregex = "(?P<ip>x)"\n',
            "t.toml:3: scan.patterns[1].rule: every pattern needs rule",
        ),
        (
            "[scan]\n\n[scan.weights]\ndovecot-failures = 1\n",
            "t.toml:4: scan.weights.dovecot-failures: unknown built-in rule",
        ),
        ('[scan]\nformats = ["sendmail"]\n', "t.toml:2: scan.formats: unknown format 'sendmail'"),
        ('[scan]\ninterval = "soon"\n', "t.toml:2: scan.interval: expected a duration"),
        ('[scan]\nfiles = "/var/log/mail.log"\n', "t.toml:2: scan.files: expected a list"),
    ],
)
def test_mistakes_name_file_line_and_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "t.toml")
    assert message in str(raised.value)


def test_the_command_reports_config_errors_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[scan]\n\n[[scan.patterns]]\nrule = "x"\nregex = "no group"\n')
    done = palisade("scan", "--once", "--config", str(bad), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith(f"palisade: config error in {bad}:5: scan.patterns[1].regex")
    assert done.stderr.count("\n") == 1
    empty = tmp_path / "empty.toml"
    empty.write_text(f'[paths]\nstate = "{tmp_path}/state.sqlite"\n')
    done = palisade("scan", "--once", "--config", str(empty), cwd=tmp_path)
    assert done.returncode == 1
    assert "palisade scan: no files to read: set [scan] files" in done.stderr
    assert not (tmp_path / "state.sqlite").exists()


def test_config_check_prints_scan_as_toml_that_reads_back(tmp_path: Path) -> None:
    config = tmp_path / "scan.toml"
    config.write_text(
        f'[paths]\nstate = "{tmp_path}/state.sqlite"\n\n[scan]\nfiles = ["/var/log/mail.log"]\n'
        '\n[scan.weights]\ndovecot-auth = 2\n\n[[scan.patterns]]\nrule = "sshd"\n'
        "regex = 'sshd\\[\\d+\\]: Failed password for \\S+ from (?P<ip>[0-9a-fA-F:.]+) port'\n"
    )
    done = palisade("config", "check", "--no-dns", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "weights = { dovecot-auth = 2 }" in done.stdout
    printed = parse_config(done.stdout, "printed")
    assert printed.scan == parse_config(config.read_text(), "written").scan
