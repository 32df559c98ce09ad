"""A private OpenLDAP server for the tests: Debian's ``slapd`` in a temporary directory.

``SlapdServer(base).start()`` writes a ``slapd.conf`` (core, cosine and inetorgperson schemas,
plus a tiny test schema giving ``proxyAddresses`` to an auxiliary object class), loads the test
tree below with ``slapadd`` and runs ``slapd -d 0`` in the foreground, listening on
``ldap://127.0.0.1:PORT`` and, with TLS files, ``ldaps://127.0.0.1:PORT``.
``stop()`` ends it (the port then refuses connections), ``pause()``/``resume()`` send
SIGSTOP/SIGCONT (the port still accepts TCP connections but nothing answers: a hanging server).

Nothing is mocked: the directory under test talks LDAP to this process over loopback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import free_port
from tests.services import need_file, need_program

SUFFIX = "dc=example,dc=test"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PASSWORD = "Root-Pw-7d1e"
BIND_DN = f"cn=mailcheck,{SUFFIX}"
BIND_PASSWORD = "Bind-Secret-93f2a"  # grepped for in exception texts and logs
PEOPLE = f"ou=people,{SUFFIX}"
SCHEMA_DIR = Path("/etc/ldap/schema")

TEST_SCHEMA = """\
attributetype ( 1.3.6.1.4.1.32473.7.1.1 NAME 'proxyAddresses'
    DESC 'Exchange-style addresses: SMTP:primary, smtp:alias, X500:...'
    EQUALITY caseIgnoreMatch
    SUBSTR caseIgnoreSubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )

objectclass ( 1.3.6.1.4.1.32473.7.2.1 NAME 'palisadeMailRecipient'
    DESC 'test only: an entry with proxyAddresses'
    SUP top AUXILIARY
    MAY proxyAddresses )
"""


def person(uid: str, mail: str | None, *proxies: str) -> str:
    lines = [
        f"dn: uid={uid},{PEOPLE}",
        "objectClass: inetOrgPerson",
        "objectClass: palisadeMailRecipient",
        f"uid: {uid}",
        f"cn: {uid}",
        "sn: Test",
    ]
    if mail:
        lines.append(f"mail: {mail}")
    lines.extend(f"proxyAddresses: {p}" for p in proxies)
    return "\n".join(lines) + "\n"


TREE = "\n".join(
    [
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\n"
        "o: Example\n",
        f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n",
        f"dn: {BIND_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
        f"cn: mailcheck\nuserPassword: {BIND_PASSWORD}\n",
        person(
            "ann",
            "ann@example.test",
            "SMTP:ann@example.test",
            "smtp:a.example@example.test",
            "X500:/o=Example/ou=people/cn=ann",
        ),
        person("bob", "Bob.Builder@Example.TEST", "SMTP:Bob.Builder@example.test"),
        person("star", "st*r@example.test"),
        person("carol", "carol@example.net", "smtp:carol@example.net", "sip:carol@example.net"),
        person("nomail", None, "smtp:only.proxy@example.test"),
    ]
)
# every address the tree holds in mail (lower-cased), and in proxyAddresses (smtp: only)
MAIL_ADDRESSES = [
    "ann@example.test",
    "bob.builder@example.test",
    "carol@example.net",
    "st*r@example.test",
]
PROXY_ADDRESSES = [
    "a.example@example.test",
    "ann@example.test",
    "bob.builder@example.test",
    "carol@example.net",
    "only.proxy@example.test",
]


@dataclass
class TlsFiles:
    ca: Path
    certificate: Path
    key: Path


@dataclass
class SlapdServer:
    base: Path
    tls: TlsFiles | None = None
    port: int = 0
    tls_port: int = 0
    process: subprocess.Popen[bytes] | None = None
    extra_ldif: list[str] = field(default_factory=list)

    @property
    def uri(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_uri(self) -> str:
        return f"ldaps://127.0.0.1:{self.tls_port}"

    @property
    def log(self) -> str:
        path = self.base / "slapd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _write_config(self) -> Path:
        for name in ("core", "cosine", "inetorgperson"):
            need_file(SCHEMA_DIR / f"{name}.schema", "slapd")
        (self.base / "db").mkdir(parents=True, exist_ok=True)
        schema = self.base / "palisade-test.schema"
        schema.write_text(TEST_SCHEMA)
        lines = [f"include {SCHEMA_DIR / n}.schema" for n in ("core", "cosine", "inetorgperson")]
        lines += [
            f"include {schema}",
            f"pidfile {self.base / 'slapd.pid'}",
            f"argsfile {self.base / 'slapd.args'}",
            "modulepath /usr/lib/ldap",
            "moduleload back_mdb",
        ]
        if self.tls is not None:
            lines += [
                f"TLSCACertificateFile {self.tls.ca}",
                f"TLSCertificateFile {self.tls.certificate}",
                f"TLSCertificateKeyFile {self.tls.key}",
            ]
        lines += [
            "database mdb",
            "maxsize 10485760",
            f'suffix "{SUFFIX}"',
            f'rootdn "{ROOT_DN}"',
            f"rootpw {ROOT_PASSWORD}",
            f"directory {self.base / 'db'}",
            # what the operator docs recommend for the sync user: paged searches past 500
            f'limits dn.exact="{BIND_DN}" size.prtotal=unlimited',
            "index objectClass eq",
            "index mail,proxyAddresses eq,sub",
        ]
        config = self.base / "slapd.conf"
        config.write_text("\n".join(lines) + "\n")
        return config

    def start(self) -> SlapdServer:
        slapd = need_program("slapd", "slapd")
        slapadd = need_program("slapadd", "slapd")
        self.base.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        tree = self.base / "tree.ldif"
        tree.write_text("\n".join([TREE, *self.extra_ldif]))
        if not (self.base / "db" / "data.mdb").exists():  # a restart keeps the data
            subprocess.run(
                [slapadd, "-q", "-f", str(config), "-l", str(tree)],
                check=True,
                capture_output=True,
            )
        self.port = self.port or free_port()
        urls = [self.uri + "/"]
        if self.tls is not None:
            self.tls_port = self.tls_port or free_port()
            urls.append(self.ldaps_uri + "/")
        with open(self.base / "slapd.log", "ab") as log:
            self.process = subprocess.Popen(
                [slapd, "-d", "0", "-f", str(config), "-h", " ".join(urls)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while not _accepts(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"slapd exited ({self.process.returncode}):\n{self.log}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"slapd did not listen on {self.port}:\n{self.log}")
            time.sleep(0.02)
        return self

    def restart(self) -> SlapdServer:
        """A new process on the same ports and data (old connections are dead)."""
        self.stop()
        self.process = None
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: connections are still accepted by the kernel, but nothing answers."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGCONT)
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        try:
            sock.connect(("127.0.0.1", port))
        except OSError:
            return False
        return True
