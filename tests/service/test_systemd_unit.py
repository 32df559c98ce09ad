"""contrib/palisade.service: what it says, ``systemd-analyze verify`` and ``security`` on it, and
the sandbox settings it relies on tried for real on a gateway process.

There is no running systemd on the test machine (no PID 1 systemd), so the unit is never
started. What can be checked for real is checked: systemd's own parser and verifier on the file
(its ``ExecStart`` pointed at this checkout's ``palisade``, the only line that differs; the
shipped path is asserted separately), the security score with ``--offline=true``, and, by the
kernel mechanisms systemd would use, the two settings that could break the program:
``AmbientCapabilities=CAP_NET_BIND_SERVICE`` for an unprivileged user on a port below 1024
(``setpriv``), and ``MemoryDenyWriteExecute=yes`` (``PR_SET_MDWE``, which, like systemd's
seccomp filter, refuses writable+executable mappings and making a mapping executable).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, child_pids, gateway_sections, search, wait_for, write_config
from tests.services import code_for_other_users

UNIT = ROOT / "contrib" / "palisade.service"
EXEC_START = "/opt/palisade/bin/palisade serve --config /etc/palisade/palisade.toml"
# `systemd-analyze security --offline=true palisade.service` (systemd 252, Debian 12): the
# exposure recorded in README ("systemd"); lower is better. The test fails if it gets worse.
RECORDED_EXPOSURE = 2.6
RECORDED_EXPOSURE_USER = 1.6  # with the README's drop-in: User=palisade, only the ambient cap
CI = os.environ.get("CI") == "true"


def need(condition: bool, reason: str) -> None:
    """Skips without the tool or privilege, but fails under CI=true."""
    if condition:
        return
    if CI:
        pytest.fail(reason)
    pytest.skip(reason)


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    need(tool is not None, "systemd-analyze is not installed (Debian package systemd)")
    assert tool is not None
    return tool


def directives(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit (comments skipped), every value of a repeated key."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def user_drop_in() -> str:
    """The drop-in for the unprivileged mode, as the unit's header comment gives it (the lines
    indented by five spaces after ``#``)."""
    lines = [line[6:] for line in UNIT.read_text().splitlines() if line.startswith("#     ")]
    assert lines[0] == "[Service]" and "User=palisade" in lines, lines
    return "\n".join(lines) + "\n"


def unit_copy(directory: Path, *, drop_in: str = "") -> Path:
    """The shipped unit with only ExecStart's program replaced by this checkout's ``palisade``
    (verify checks that it exists and is executable), and ``drop_in`` as
    ``palisade.service.d/override.conf`` beside it (``systemctl edit``'s file)."""
    program = Path(sys.executable).parent / "palisade"
    assert program.exists(), program
    text = UNIT.read_text()
    assert text.count(f"ExecStart={EXEC_START}\n") == 1
    text = text.replace(f"ExecStart={EXEC_START}", f"ExecStart={program} serve --config x.toml")
    directory.mkdir(exist_ok=True)
    copy = directory / "palisade.service"
    copy.write_text(text)
    if drop_in:
        (directory / "palisade.service.d").mkdir()
        (directory / "palisade.service.d" / "override.conf").write_text(drop_in)
    return copy


def test_the_shipped_unit_says_what_the_readme_says() -> None:
    unit = directives(UNIT.read_text())
    assert unit["ExecStart"] == [EXEC_START]
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]  # the parent alone speaks
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["KillMode"] == ["mixed"]  # SIGTERM to the parent, which stops its workers
    assert unit["RuntimeDirectory"] == ["palisade"]
    assert unit["RuntimeDirectoryMode"] == ["0750"]
    assert unit["ReadWritePaths"] == ["/var/spool/palisade /var/lib/palisade /var/log/palisade"]
    assert unit["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert unit["LimitNOFILE"] == ["65536"]  # 10,000 clients and their next-hop connections
    assert unit["SystemCallFilter"] == ["@system-service"]
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "MemoryDenyWriteExecute",
        "LockPersonality",
        "RestrictRealtime",
        "RestrictNamespaces",
    ):
        assert unit[key] == ["yes"], key
    assert unit["ProtectSystem"] == ["strict"]
    assert "User" not in unit  # it starts as root and drops to [server] user itself


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = systemd_analyze()
    for name, drop_in in (("root", ""), ("user", user_drop_in())):
        copy = unit_copy(tmp_path / name, drop_in=drop_in)
        done = subprocess.run(
            [tool, "verify", str(copy)], capture_output=True, text=True, timeout=60, cwd=copy.parent
        )
        assert done.returncode == 0, done.stderr
        assert done.stderr == "", done.stderr  # no warning either (unknown keys, bad values)


def exposure(tool: str, unit: Path) -> float:
    done = subprocess.run(
        [tool, "security", "--offline=true", "--no-pager", unit.name],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=unit.parent,
    )
    found = search(r"Overall exposure level for palisade\.service: (\d+\.\d+)", done.stdout)
    return float(found[1])


def test_systemd_analyze_security_score_is_no_worse_than_recorded(tmp_path: Path) -> None:
    tool = systemd_analyze()
    score = exposure(tool, unit_copy(tmp_path / "root"))
    user = exposure(tool, unit_copy(tmp_path / "user", drop_in=user_drop_in()))
    assert score <= RECORDED_EXPOSURE, score
    assert user <= RECORDED_EXPOSURE_USER, user
    readme = (ROOT / "README.md").read_text()
    assert f"exposure level for palisade.service: {RECORDED_EXPOSURE}" in readme
    assert f"{RECORDED_EXPOSURE_USER} with `User=palisade`" in readme


NOBODY = 65534
CAP_NET_BIND_SERVICE = 10


def free_low_port() -> int:
    """A free port below 1024 on 127.0.0.1 (as root, bound and released)."""
    for port in range(700, 1000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port between 700 and 999 on 127.0.0.1")


RUN_PALISADE = (
    "import sys, runpy; sys.argv[0] = 'palisade'; runpy.run_module('palisade', run_name='__main__')"
)


def python_for(uid: int) -> list[str]:
    """A command that runs ``palisade`` as ``uid``: this interpreter when that user may run it,
    else the system's Python of the same version with this venv's packages (the test's
    interpreter may live under /root, 0700)."""
    system_python = f"/usr/bin/python3.{sys.version_info.minor}"
    src, site = code_for_other_users()
    with_venv = (
        f"import site, sys; site.addsitedir({str(site)!r}); sys.path.insert(0, {str(src)!r}); "
    )
    as_user = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
    # -S: not Debian's dist-packages (an older cryptography there would shadow the venv's)
    for python, prelude in (([sys.executable], ""), ([system_python, "-S"], with_venv)):
        tried = subprocess.run(
            [*as_user, *python, "-c", prelude + "import palisade, uvloop"],
            capture_output=True,
            cwd="/",
            timeout=60,
        )
        if tried.returncode == 0:
            return [*python, "-c", prelude + RUN_PALISADE]
    raise AssertionError(f"no Python that uid {uid} may run palisade with")


@pytest.fixture
def unprivileged_dir() -> Iterator[Path]:
    """A directory the unprivileged user owns (pytest's tmp_path is root's, 0700)."""
    base = Path(tempfile.mkdtemp(prefix="palisade-ambient-"))
    os.chown(base, NOBODY, NOBODY)
    try:
        yield base
    finally:
        shutil.rmtree(base)


def capabilities(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {
        key: int(value, 16) for key, value in re.findall(r"^(Cap\w+):\s+([0-9a-f]+)$", status, re.M)
    } | {"NoNewPrivs": int(search(r"NoNewPrivs:\s+(\d)", status)[1])}


def test_unprivileged_user_binds_port_below_1024_with_the_ambient_capability(
    unprivileged_dir: Path,
) -> None:
    """The README's User= mode: a non-root user, no new privileges, the bounding set and the
    ambient set holding only CAP_NET_BIND_SERVICE (what systemd does for User= with
    AmbientCapabilities=): the gateway binds a port below 1024 and serves, holding that one
    capability and nothing else."""
    need(os.geteuid() == 0, "needs root (to switch to an unprivileged user)")
    need(shutil.which("setpriv") is not None, "setpriv is not installed (util-linux)")
    port = free_low_port()
    sections = gateway_sections(port)
    config = write_config(unprivileged_dir / "palisade.toml", sections)
    os.chown(config, NOBODY, NOBODY)
    command = [
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        "--bounding-set=-all,+net_bind_service",
        "--inh-caps=-all,+net_bind_service",
        "--ambient-caps=+net_bind_service",
        "--no-new-privs",
        "--",
        *python_for(NOBODY),
        "serve",
        "--config",
        str(config),
    ]
    proc = subprocess.Popen(
        command, cwd=unprivileged_dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:

        def greets() -> bytes:
            if proc.poll() is not None:
                assert proc.stderr is not None
                raise AssertionError(proc.stderr.read().decode())
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                    return client.recv(512)
            except ConnectionRefusedError:
                return b""

        assert wait_for(greets, timeout=20).startswith(b"220 ")
        status = Path(f"/proc/{proc.pid}/status").read_text()
        assert (
            search(r"Uid:\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", status).groups() == (str(NOBODY),) * 4
        )
        caps = capabilities(proc.pid)
        one = 1 << CAP_NET_BIND_SERVICE
        assert (caps["CapEff"], caps["CapPrm"], caps["CapBnd"], caps["CapAmb"]) == (one,) * 4
        assert caps["NoNewPrivs"] == 1
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("s@outside.test", ["amy@example.test"], b"Subject: x\r\n\r\nhi\r\n")
        mail = unprivileged_dir / "var" / "mail" / "amy" / "new"
        wait_for(lambda: mail.is_dir() and any(mail.iterdir()), timeout=20)
        assert os.stat(next(mail.iterdir())).st_uid == NOBODY
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# Sets PR_SET_MDWE (65) on itself, then execs this Python with the arguments given: the flag
# stays across exec and is inherited by every process forked after.
MDWE = ["-c", "import ctypes, os, sys; "
        "assert ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) == 0, 'PR_SET_MDWE'; "
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"]  # fmt: skip
WRITE_EXECUTE = (
    "import mmap\n"
    "try:\n"
    "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
    "except PermissionError:\n"
    "    print('refused')\n"
)


def test_memory_deny_write_execute_breaks_nothing(
    make_gateway: Any, tls_files: dict[str, Path]
) -> None:
    """The gateway under PR_SET_MDWE (Linux 6.3+; kept across exec, inherited by the workers):
    uvloop, the STARTTLS handshake (OpenSSL through the ssl module), ctypes' prctl in each
    worker, SPF/DKIM/DMARC on a message, delivery; nothing needs memory both writable and
    executable. (ctypes callbacks would work too: libffi's trampolines are static.)"""
    probe = subprocess.run(
        [sys.executable, *MDWE, "-c", WRITE_EXECUTE], capture_output=True, text=True, timeout=30
    )
    need(
        probe.returncode == 0 and probe.stdout == "refused\n",
        f"the kernel has no PR_SET_MDWE (Linux 6.3 and later): {probe.stderr}",
    )
    gw = make_gateway(
        start=False,
        server={"workers": 2},
        tls={
            "certificate": str(tls_files["certificate"]),
            "private_key": str(tls_files["private_key"]),
        },
        authentication={"enabled": True},
    )
    assert gw.proc is None  # the same gateway, started through the wrapper
    gw.proc = subprocess.Popen(
        [sys.executable, *MDWE, "-m", "palisade", "serve", "--config", str(gw.config_path)],
        cwd=gw.base,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: "palisade daemon started" in gw.mainlog(), timeout=20)
    wait_for(lambda: len(child_pids(gw.proc.pid)) == 2)
    context = ssl.create_default_context(cafile=str(tls_files["ca"]))
    message = (
        b"From: a@outside.test\r\nTo: amy@example.test\r\nSubject: mdwe\r\n"
        b"Message-ID: <m1@outside.test>\r\n\r\nhello\r\n"
    )
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=20) as client:
        client.starttls(context=context)
        client.sendmail("a@outside.test", ["amy@example.test"], message)
    wait_for(lambda: gw.maildir_messages("amy"), timeout=30)
    assert b"Authentication-Results:" in gw.maildir_messages("amy")[0]
    assert gw.stop() == 0
    assert "worker" not in gw.paniclog()  # no worker died
