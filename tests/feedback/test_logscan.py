"""The log line parsers of ``palisade scan`` on real lines: Dovecot and Postfix lines captured
from the real servers the scan tests start, fail2ban's sample logs (lines from many real
installations), every syslog prefix Debian writes, lines a client shaped to frame another
address, overlong and hostile lines, and the operator's patterns."""

from __future__ import annotations

import collections
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from palisade.feedback.logscan import (
    BUILTIN_RULES,
    Hit,
    LineParser,
    PatternError,
    compile_pattern,
    parse_address,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "scan"
NOW = time.mktime((2026, 12, 2, 8, 0, 0, 0, 0, -1))


def _weights(path: Path, parser: LineParser | None = None) -> dict[str, int]:
    parser = parser or LineParser()
    found: collections.Counter[str] = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        if line and not line.startswith("#"):  # fail2ban's annotations
            hit = parser.parse(line, NOW)
            if hit is not None:
                found[hit.rule] += hit.weight
    return dict(found)


def test_real_servers_lines_with_the_default_weights() -> None:
    # Dovecot: two "(auth failed, 2 attempts)" lines; the temporary failure counts nothing.
    assert _weights(DATA / "dovecot-2.3.19.1.log") == {"dovecot-auth": 4}
    # Postfix: three refused RCPT/HELO, two pipelining; connects and disconnects nothing.
    assert _weights(DATA / "postfix-3.7.11.log") == {
        "postfix-pipelining": 2,
        "postfix-reject": 3,
    }


def test_fail2ban_sample_logs_with_the_default_weights() -> None:
    assert _weights(DATA / "fail2ban" / "dovecot") == {"dovecot-auth": 17}
    assert _weights(DATA / "fail2ban" / "postfix") == {
        "postfix-errors": 2,
        "postfix-pipelining": 5,
        "postfix-pregreet": 1,
        "postfix-reject": 15,
        "postfix-sasl": 13,
    }
    assert _weights(DATA / "fail2ban" / "exim") == {
        "exim-auth": 10,
        "exim-dropped": 2,
        "exim-reject": 4,
        "exim-sync": 1,
    }
    assert _weights(DATA / "fail2ban" / "exim-spam") == {"exim-reject": 3}


def test_rules_off_by_default_count_when_given_a_weight() -> None:
    parser = LineParser({"dovecot-no-auth": 1, "postfix-reject-temp": 2, "postfix-lost-auth": 1})
    dovecot = _weights(DATA / "fail2ban" / "dovecot", parser)
    assert dovecot["dovecot-no-auth"] == 16
    postfix = _weights(DATA / "fail2ban" / "postfix", parser)
    assert postfix["postfix-reject-temp"] == 2 * 8
    assert postfix["postfix-lost-auth"] == 2
    assert "postfix-reject-temp" not in _weights(DATA / "fail2ban" / "postfix")
    off = LineParser({"postfix-reject": 0})
    assert "postfix-reject" not in _weights(DATA / "fail2ban" / "postfix", off)


@pytest.mark.parametrize(
    ("line", "hit"),
    [
        # Dovecot's own log_path (RFC 3164 stamp without host): 3 attempts weigh 3.
        (
            "Dec 02 07:13:54 imap-login: Info: Disconnected: Aborted login by logging out "
            "(auth failed, 3 attempts in 5 secs): user=<bob>, method=PLAIN, rip=192.0.2.7, "
            "lip=127.0.0.1, secured, session=<5Cl1YqFhtL9/AAAB>",
            Hit("192.0.2.7", "dovecot-auth", 3, time.mktime((2026, 12, 2, 7, 13, 54, 0, 0, -1))),
        ),
        # Through rsyslog, traditional format (Debian 12), a space-padded day, IPv6.
        (
            "Dec  2 07:13:54 mx dovecot: pop3-login: Aborted login (auth failed, 1 attempts in "
            "17 secs): user=<test>, method=PLAIN, rip=2001:db8::7, lip=2001:db8::1",
            Hit("2001:db8::7", "dovecot-auth", 1, time.mktime((2026, 12, 2, 7, 13, 54, 0, 0, -1))),
        ),
        # rsyslog's RFC 3339 format (Debian 13), UTC offset.
        (
            "2026-12-02T07:13:54.123456+01:00 mx dovecot[442]: imap-login: Disconnected: "
            "Connection closed (auth failed, 2 attempts in 6 secs): user=<a>, method=PLAIN, "
            "rip=::ffff:192.0.2.8, lip=192.0.2.1",
            Hit("192.0.2.8", "dovecot-auth", 2, 1796192034.0),
        ),
        # RFC 5424 as rsyslog writes it with RSYSLOG_SyslogProtocol23Format.
        (
            "<22>1 2026-12-02T06:13:54.000Z mx postfix/smtpd 1234 - - NOQUEUE: reject: RCPT "
            "from unknown[192.0.2.9]: 554 5.7.1 <x@y.example>: Relay access denied; from=<a@b> "
            "to=<x@y.example> proto=ESMTP helo=<z>",
            Hit("192.0.2.9", "postfix-reject", 1, 1796192034.0),
        ),
        (
            '<22>1 2026-12-02T06:13:54Z mx postfix/smtpd 1234 - [meta sequenceId="1" x="a\\]"] '
            "warning: unknown[192.0.2.10]: SASL LOGIN authentication failed: UGFzc3dvcmQ6",
            Hit("192.0.2.10", "postfix-sasl", 1, 1796192034.0),
        ),
        # exim's main log: local time, pid, message id.
        (
            "2026-12-02 07:13:54 [7513] 1ahr79-0006jK-G9 H=mail.example (helo.example) "
            "[192.0.2.11]:4192 I=[192.0.2.1]:25 F=<a@b.example> rejected RCPT <c@d.example>: "
            "relay not permitted",
            Hit("192.0.2.11", "exim-reject", 1, time.mktime((2026, 12, 2, 7, 13, 54, 0, 0, -1))),
        ),
        (
            "2026-12-02 07:13:54 dovecot_login authenticator failed for (User) [192.0.2.12]: "
            "535 Incorrect authentication data (set_id=test@example.com)",
            Hit("192.0.2.12", "exim-auth", 1, time.mktime((2026, 12, 2, 7, 13, 54, 0, 0, -1))),
        ),
        # No time stamp at all (journalctl -o cat): the scan uses its own clock.
        (
            "postfix/postscreen[1148]: PREGREET 14 after 0.08 from [192.0.2.13]:59415: EHLO x",
            Hit("192.0.2.13", "postfix-pregreet", 1, None),
        ),
    ],
)
def test_formats_and_prefixes(line: str, hit: Hit) -> None:
    assert LineParser().parse(line, NOW) == hit


@pytest.mark.parametrize(
    ("line", "ip"),
    [
        # A user name that imitates the fields: the real rip= comes last.
        (
            "Dec  2 07:13:54 mx dovecot: imap-login: Disconnected (auth failed, 1 attempts): "
            "user=<x>, method=PLAIN, rip=198.51.100.1, lip=1.2.3.4>, method=PLAIN, "
            "rip=192.0.2.20, lip=192.0.2.1, session=<abc>",
            "192.0.2.20",
        ),
        # Client text after Postfix's client field.
        (
            "Dec  2 07:13:54 mx postfix/smtpd[1]: improper command pipelining after HELO from "
            "unknown[192.0.2.21]: MAIL FROM:<a from unknown[198.51.100.1]: x>\\r\\n",
            "192.0.2.21",
        ),
        # A client command that imitates a reject line inside another Postfix line.
        (
            "Dec  2 07:13:54 mx postfix/smtpd[1]: warning: Illegal address syntax from "
            "unknown[192.0.2.22] in MAIL command: <NOQUEUE: reject: RCPT from x[198.51.100.1]: "
            "554 >",
            None,
        ),
        # exim writes the client's command before the address: not counted at all.
        (
            '2017-11-28 14:14:32 SMTP protocol error in "aUtH lOgIn" H=(test) [198.51.100.1]" '
            "H=(roxzgj) [192.0.2.6] AUTH command used when not advertised",
            None,
        ),
        (
            "2013-06-02 09:05:48 [18505] SMTP protocol synchronization error (next input sent too"
            ' soon: pipelining was not advertised): rejected "RSET" H=[198.51.100.1]:1 x" '
            'H=ba77.mx83.fr [192.0.2.23]:58302 I=[1.2.3.4]:25 next input="QUIT\\r\\n"',
            None,
        ),
        # Another program's line in Postfix's shape: not Postfix's.
        (
            "Dec  2 07:13:54 mx sshd[1]: NOQUEUE: reject: RCPT from x[198.51.100.1]: 554 5.7.1 x",
            None,
        ),
        # A Dovecot line without a client field.
        (
            "Dec  2 07:13:54 mx dovecot: imap-login: Disconnected (auth failed, 1 attempts)",
            None,
        ),
        # Not an address.
        (
            "Dec  2 07:13:54 mx postfix/smtpd[1]: NOQUEUE: reject: RCPT from x[999.1.1.1]: 554 x",
            None,
        ),
    ],
)
def test_client_text_cannot_frame_another_address(line: str, ip: str | None) -> None:
    hit = LineParser({"postfix-reject-temp": 1}).parse(line, NOW)
    assert (hit.ip if hit else None) == ip


def test_overlong_and_hostile_lines() -> None:
    parser = LineParser(max_line=1000)
    real = (
        "Dec  2 07:13:54 mx postfix/smtpd[1]: NOQUEUE: reject: RCPT from x[192.0.2.30]: 554 5.7.1 "
    )
    assert parser.parse(real + "a" * 100, NOW) is not None
    assert parser.parse(real + "a" * 1000, NOW) is None  # longer than max_line: not parsed
    default = LineParser()
    for hostile in (
        "(" * 8000,
        "Dec  2 07:13:54 mx dovecot: imap-login: Disconnected " + "(" * 8000,
        "Dec  2 07:13:54 mx postfix/smtpd[1]: NOQUEUE: reject: RCPT from " + "[" * 8000,
        "2026-12-02 07:13:54 H=" + "(" * 4000 + ")" * 4000,
        "2026-12-02 07:13:54 x authenticator failed for " + "a " * 4000,
        "<" + "1" * 8000,
        "\x00\udcff\u2028" * 2000,
    ):
        assert default.parse(hostile, NOW) is None


@given(st.text(max_size=300))
def test_any_line_gives_nothing_or_a_valid_hit(line: str) -> None:
    for prefix in ("", "Dec  2 07:13:54 mx dovecot: imap-login: ", "2026-12-02 07:13:54 H="):
        hit = LineParser().parse(prefix + line, NOW)
        assert hit is None or (parse_address(hit.ip) == hit.ip and hit.weight >= 1)


def test_operator_patterns_first_weight_zero_is_an_exception() -> None:
    sshd = compile_pattern(
        "sshd", r"sshd\[\d+\]: Failed password for \S+ from (?P<ip>[0-9a-fA-F:.]+) port", 2
    )
    quiet = compile_pattern("monitoring", r"rip=(?P<ip>192\.0\.2\.99),", 0)
    parser = LineParser(patterns=[quiet, sshd])
    line = "Dec  2 07:13:54 mx sshd[77]: Failed password for root from 192.0.2.40 port 2222 ssh2"
    assert parser.parse(line, NOW) == Hit(
        "192.0.2.40", "sshd", 2, time.mktime((2026, 12, 2, 7, 13, 54, 0, 0, -1))
    )
    monitored = (
        "Dec  2 07:13:54 mx dovecot: imap-login: Disconnected (auth failed, 1 attempts): "
        "user=<x>, method=PLAIN, rip=192.0.2.99, lip=192.0.2.1"
    )
    assert parser.parse(monitored, NOW) is None
    assert LineParser().parse(monitored, NOW) is not None


@pytest.mark.parametrize(
    ("rule", "regex", "weight", "key", "problem"),
    [
        ("ssh", r"from (\S+)", 1, "regex", "named group (?P<ip>...)"),
        ("ssh", r"from (?P<ip>\S+", 1, "regex", "not a valid regular expression"),
        ("ssh", r"(?P<ip>(\d+\.?)+)", 1, "regex", "nested repetition"),
        ("ssh", r"(?:\w+\s?)*from (?P<ip>\S+)", 1, "regex", "nested repetition"),
        ("ssh", r"from (?P<ip>\S+)", -1, "weight", "from 0 to 1000"),
        ("dovecot-auth", r"from (?P<ip>\S+)", 1, "rule", "built-in"),
        ("two words", r"from (?P<ip>\S+)", 1, "rule", "a name of letters"),
    ],
)
def test_bad_patterns_are_refused(
    rule: str, regex: str, weight: int, key: str, problem: str
) -> None:
    with pytest.raises(PatternError) as raised:
        compile_pattern(rule, regex, weight)
    assert raised.value.key == key
    assert problem in str(raised.value)


def test_bounded_and_possessive_repeats_are_allowed() -> None:
    compile_pattern("a", r"(?:\d{1,3}\.){3}\d{1,3} (?P<ip>\S+)", 1)
    compile_pattern("b", r"(?:\w+\s?)*+from (?P<ip>\S+)", 1)
    compile_pattern("c", r"(?>(?:\w+\s?)*)from (?P<ip>\S+)", 1)


def test_every_builtin_rule_is_documented_and_reachable() -> None:
    readme = (Path(__file__).resolve().parent.parent.parent / "README.md").read_text()
    for name in BUILTIN_RULES:
        assert f"`{name}`" in readme, name
