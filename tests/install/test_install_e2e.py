"""Issue 13's "Done when", on this machine as root: ``make install`` into a fresh venv, the
unit's ``ExecStart`` run by hand (no systemd runs here), a message over SMTP lands in a Maildir
owned by ``palisade``, SIGTERM stops it, ``make uninstall`` leaves config, spool, state and logs.

It uses the real paths (/etc/palisade, /var/spool/palisade, /var/lib/palisade,
/var/log/palisade, the unit in /etc/systemd/system and the ``palisade`` user): CI is a
throw-away root machine. On a developer's machine the teardown removes what this test created
and keeps what existed before (a real install's config is put back as it was). Not root: a
skip, and with ``CI=true`` a failure.

One ``make install`` per session (the pip install into a new venv takes a while): the module
fixture runs it; each step of the issue is a function below, called in order by the one test, so
that each step (``palisade status``, log rotation by SIGUSR1, ...) is one function and one
line in the test.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shlex
import shutil
import signal
import smtplib
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loopback.dnsserver import ZoneServer, start_zone_server
from tests.conftest import ROOT, child_pids, free_port, wait_for
from tests.services import need_program, need_root

pytestmark = [pytest.mark.install, pytest.mark.timeout(900)]

USER = "palisade"
ETC = Path("/etc/palisade")
CONFIG = ETC / "palisade.toml"
SPOOL, STATE, LOG = (
    Path("/var/spool/palisade"),
    Path("/var/lib/palisade"),
    Path("/var/log/palisade"),
)
MAIL = STATE / "mail"
RUN = Path("/run/palisade")  # made by the daemon (systemd's RuntimeDirectory under systemd)
UNIT = Path("/etc/systemd/system/palisade.service")
FIREWALL_UNIT = Path("/etc/systemd/system/palisade-firewall.service")
REPORTS_UNIT = Path("/etc/systemd/system/palisade-reports.service")
REPORTS_TIMER = Path("/etc/systemd/system/palisade-reports.timer")
LOGROTATE = Path("/etc/logrotate.d/palisade")
CREATED_BY_INSTALL = (
    ETC,
    SPOOL,
    STATE,
    LOG,
    UNIT,
    FIREWALL_UNIT,
    REPORTS_UNIT,
    REPORTS_TIMER,
    LOGROTATE,
    RUN,
)


@dataclass
class Installed:
    """A finished ``make install``: the checkout's copy it ran in and the venv's prefix."""

    checkout: Path
    prefix: Path
    output: str
    uid: int
    gid: int
    port: int = 0
    dns: ZoneServer | None = None
    proc: subprocess.Popen[bytes] | None = None
    notes: list[str] = field(default_factory=list)


def make(checkout: Path, target: str, prefix: Path) -> str:
    result = subprocess.run(
        ["make", "--no-print-directory", "-C", str(checkout), target, f"PREFIX={prefix}"],
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert result.returncode == 0, f"make {target}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def copy_checkout(destination: Path) -> Path:
    """The checkout as it is now (tracked and new files, not .venv or caches), as an operator's
    clone would be."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        source = ROOT / os.fsdecode(name)
        if source.is_file():
            target = destination / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


@contextlib.contextmanager
def system_left_as_found() -> Iterator[None]:
    """Afterwards: what the install created is removed (and the user, if it did not exist);
    what existed before is kept, a real config put back byte for byte."""
    existed = {path: path.exists() for path in CREATED_BY_INSTALL}
    try:
        pwd.getpwnam(USER)
        user_existed = True
    except KeyError:
        user_existed = False
    saved_config = CONFIG.read_bytes() if CONFIG.exists() else None
    try:
        yield
    finally:
        if saved_config is not None:
            CONFIG.write_bytes(saved_config)
        for path, was in existed.items():
            if not was and path.is_dir():
                shutil.rmtree(path)
            elif not was and path.exists():
                path.unlink()
        if not user_existed:
            subprocess.run(["userdel", USER], capture_output=True)
            with contextlib.suppress(KeyError):
                grp.getgrnam(USER)
                subprocess.run(["groupdel", USER], capture_output=True)


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    need_root("make install creates a system user and /etc/palisade")
    need_program("make", "make")
    # 0755 all the way down: the palisade user must reach the venv's files after the drop
    base = Path(tempfile.mkdtemp(prefix="palisade-install-", dir="/tmp"))
    base.chmod(0o755)
    try:
        with system_left_as_found():
            checkout = copy_checkout(base / "checkout")
            prefix = base / "opt"
            output = make(checkout, "install", prefix)
            entry = pwd.getpwnam(USER)
            yield Installed(checkout, prefix, output, entry.pw_uid, entry.pw_gid)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def mode_owner(path: Path) -> tuple[str, str, str]:
    st = path.stat()
    return (
        f"{st.st_mode & 0o7777:04o}",
        pwd.getpwuid(st.st_uid).pw_name,
        grp.getgrgid(st.st_gid).gr_name,
    )


# -- the steps --------------------------------------------------------------------------------


def check_the_layout(inst: Installed) -> None:
    """Modes and owners as README "Install and uninstall" promises; the program in the venv."""
    assert (inst.prefix / "bin" / "palisade").exists()
    assert mode_owner(ETC) == ("0750", "root", USER)
    if "palisade.toml: copied" in inst.output:  # a real config that existed is not ours
        assert mode_owner(CONFIG) == ("0640", "root", USER)
    assert mode_owner(ETC / "keys") == ("0750", "root", USER)
    for path in (SPOOL, STATE, LOG):
        assert mode_owner(path) == ("0750", USER, USER), path
    for unit in (UNIT, FIREWALL_UNIT, REPORTS_UNIT):
        assert mode_owner(unit) == ("0644", "root", "root")
        assert f"ExecStart={inst.prefix}/bin/palisade " in unit.read_text(), unit
    assert REPORTS_UNIT.read_text().count(f"ExecStart={inst.prefix}/bin/palisade ") == 2
    assert mode_owner(REPORTS_TIMER) == ("0644", "root", "root")
    assert "OnCalendar=" in REPORTS_TIMER.read_text()
    assert "install-system:" in inst.output


def check_a_second_install_changes_nothing(inst: Installed) -> None:
    again = make(inst.checkout, "install", inst.prefix)
    assert again.rstrip().endswith("install-system: nothing changed (already installed)"), again


def configure(inst: Installed) -> None:
    """A test config in /etc/palisade/palisade.toml, as an operator would edit it: loopback
    port, the palisade user, Maildir for example.test, the loopback DNS server."""
    inst.dns = start_zone_server(
        {"example.test": {"SOA": ["ns.example.test. hostmaster.example.test. 1 3600 600 86400 60"]}}
    )
    inst.port = free_port()
    CONFIG.write_text(
        "[server]\n"
        'hostname = "mx.example.test"\n'
        f'listen = ["127.0.0.1:{inst.port}"]\n'
        "workers = 2\n"
        f'user = "{USER}"\n'
        f'control_socket = "{RUN}/control.sock"\n'
        "[domains]\n"
        'local = ["example.test"]\n'
        "[dns]\n"
        f'nameservers = ["127.0.0.1:{inst.dns.port}"]\n'
        "[paths]\n"
        f'spool = "{SPOOL}"\n'
        f'state = "{STATE}/state.sqlite"\n'
        f'log = "{LOG}"\n'
        f'mail = "{MAIL}"\n'
    )
    os.chown(CONFIG, 0, inst.gid)
    CONFIG.chmod(0o640)


def start_as_the_unit_would(inst: Installed) -> None:
    """The unit's ExecStart line, run by hand (no systemd here), from /."""
    lines = [line for line in UNIT.read_text().splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 1, lines
    command = shlex.split(lines[0].removeprefix("ExecStart="))
    assert command[0] == str(inst.prefix / "bin" / "palisade")
    inst.proc = subprocess.Popen(
        command, cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    mainlog = LOG / "mainlog"

    def started() -> bool:
        assert inst.proc is not None
        if inst.proc.poll() is not None:
            raise AssertionError(f"exited at start-up: {inst.proc.stderr.read()!r}")  # type: ignore[union-attr]
        return mainlog.exists() and f"config {CONFIG}" in mainlog.read_text()

    wait_for(started, timeout=30)
    uid = pwd.getpwnam(USER).pw_uid
    status = Path(f"/proc/{inst.proc.pid}/status").read_text()
    assert f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}" in status


def send_mail(inst: Installed) -> None:
    """One message with smtplib, one with swaks; both land in Maildir, owned by palisade."""
    with smtplib.SMTP("127.0.0.1", inst.port, timeout=15) as client:
        client.sendmail(
            "someone@outside.test",
            ["postmaster@example.test"],
            "From: someone@outside.test\r\nSubject: via smtplib\r\n\r\nhello\r\n",
        )
    swaks = need_program("swaks", "swaks")
    result = subprocess.run(
        [
            swaks, "--server", f"127.0.0.1:{inst.port}", "--from", "other@outside.test",
            "--to", "postmaster@example.test", "--header", "Subject: via swaks",
            "--body", "hello", "--helo", "client.outside.test",
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    new = MAIL / "postmaster" / "new"
    wait_for(lambda: new.is_dir() and len(list(new.iterdir())) == 2, timeout=30)
    bodies = b"".join(p.read_bytes() for p in new.iterdir())
    assert b"Subject: via smtplib" in bodies and b"Subject: via swaks" in bodies
    for path in [MAIL, *MAIL.rglob("*"), *SPOOL.rglob("*")]:
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (inst.uid, inst.gid), path


def check_status(inst: Installed) -> None:
    """``palisade status`` as the operator types it (no --config: /etc/palisade/palisade.toml)
    asks the running daemon: its pid, both workers, the generation, an empty queue; and the
    deliveries are in mainlog."""
    mainlog = LOG / "mainlog"
    delivered = "=> postmaster@example.test R=local_maildir"
    # the line is written just after the Maildir file: wait for it, not for a fixed time
    wait_for(lambda: mainlog.read_text().count(delivered) == 2, timeout=15)
    assert f"2 workers listening on 127.0.0.1:{inst.port}" in mainlog.read_text()
    assert inst.proc is not None
    socket_file = RUN / "control.sock"
    assert mode_owner(socket_file) == ("0600", USER, USER)
    env = {k: v for k, v in os.environ.items() if k != "PALISADE_CONFIG"}
    palisade = str(inst.prefix / "bin" / "palisade")
    result = subprocess.run(
        [palisade, "status", "--json"], capture_output=True, text=True, timeout=30, env=env
    )
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["pid"] == inst.proc.pid
    assert status["config"] == str(CONFIG)
    assert status["generation"] == 1
    children = set(child_pids(inst.proc.pid))
    assert {w["pid"] for w in status["workers"]} == children and len(children) == 2
    assert status["queue"] == {"size": 0, "oldest_age": None}
    text = subprocess.run([palisade, "status"], capture_output=True, text=True, env=env, timeout=30)
    assert text.returncode == 0 and str(inst.proc.pid) in text.stdout, text.stderr


def log_files_held(pid: int) -> set[str]:
    """The files under /var/log/palisade that process ``pid`` holds open."""
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith(f"{LOG}/"):
                held.add(target)
    return held


def check_logs(inst: Installed) -> None:
    """The log files are the user's, 0640; after a rename (as logrotate does) SIGUSR1 makes
    every process let go of the old file, and the next line lands in a new mainlog, the
    user's, 0640."""
    for name in ("mainlog", "rejectlog", "paniclog"):
        assert mode_owner(LOG / name) == ("0640", USER, USER), name
    assert inst.proc is not None
    processes = [inst.proc.pid, *child_pids(inst.proc.pid)]
    rotated = LOG / "mainlog.1"
    (LOG / "mainlog").rename(rotated)
    os.kill(inst.proc.pid, signal.SIGUSR1)
    wait_for(lambda: all(str(rotated) not in log_files_held(pid) for pid in processes), timeout=15)
    with smtplib.SMTP("127.0.0.1", inst.port, timeout=15) as client:
        client.sendmail(
            "third@outside.test",
            ["postmaster@example.test"],
            "From: third@outside.test\r\nSubject: after rotation\r\n\r\nhello\r\n",
        )
    mainlog = LOG / "mainlog"
    wait_for(
        lambda: mainlog.exists() and "<= third@outside.test" in mainlog.read_text(), timeout=15
    )
    assert "<= third@outside.test" not in rotated.read_text()
    assert mode_owner(mainlog) == ("0640", USER, USER)


def stop(inst: Installed) -> None:
    """SIGTERM: the daemon stops, status 0."""
    assert inst.proc is not None
    inst.proc.send_signal(signal.SIGTERM)
    assert inst.proc.wait(timeout=30) == 0
    assert "palisade daemon stopped" in (LOG / "mainlog").read_text()


def uninstall_keeps_the_data(inst: Installed) -> None:
    output = make(inst.checkout, "uninstall", inst.prefix)
    assert not inst.prefix.exists()
    for path in (UNIT, FIREWALL_UNIT, REPORTS_UNIT, REPORTS_TIMER, LOGROTATE):
        assert not path.exists(), path
    assert CONFIG.exists() and (ETC / "lists").is_dir()
    assert len(list((MAIL / "postmaster" / "new").iterdir())) == 3
    assert (STATE / "state.sqlite").exists() and (LOG / "mainlog").exists() and SPOOL.is_dir()
    assert pwd.getpwnam(USER)
    assert "uninstall-system: kept /etc/palisade, /var/spool/palisade" in output


def test_make_install_run_the_unit_by_hand_send_mail_make_uninstall(installed: Installed) -> None:
    try:
        check_the_layout(installed)
        check_a_second_install_changes_nothing(installed)
        configure(installed)
        start_as_the_unit_would(installed)
        send_mail(installed)
        check_status(installed)
        check_logs(installed)
        stop(installed)
        uninstall_keeps_the_data(installed)
    finally:
        if installed.proc is not None and installed.proc.poll() is None:
            installed.proc.kill()
            installed.proc.wait()
        if installed.dns is not None:
            installed.dns.stop()
