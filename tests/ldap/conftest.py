"""Fixtures for the LDAP tests: a private slapd per test (``tests/ldap/slapd.py``), with an
ldaps:// listener and a StartTLS-capable ldap:// listener whose certificate a trustme CA signs.

With ``CI=true`` a missing slapd fails the test instead of skipping it (``tests/services.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from palisade.adapters.ldap_directory import LdapDirectory, LdapSettings
from tests.adapters.conftest import SettableClock
from tests.ldap.slapd import BIND_DN, BIND_PASSWORD, SUFFIX, SlapdServer, TlsFiles


@pytest.fixture(scope="session")
def ldap_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def slapd(tmp_path: Path, ldap_ca: trustme.CA) -> Iterator[SlapdServer]:
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    leaf = ldap_ca.issue_cert("127.0.0.1", "localhost")
    files = TlsFiles(tls_dir / "ca.pem", tls_dir / "cert.pem", tls_dir / "key.pem")
    ldap_ca.cert_pem.write_to_path(str(files.ca))
    leaf.cert_chain_pems[0].write_to_path(str(files.certificate))
    leaf.private_key_pem.write_to_path(str(files.key))
    server = SlapdServer(tmp_path / "slapd", tls=files).start()
    yield server
    server.stop()


@pytest.fixture
def clock() -> SettableClock:
    return SettableClock()


@pytest.fixture
def make_directory(slapd: SlapdServer, clock: SettableClock) -> Iterator[Any]:
    """``make_directory(**settings)``: an LdapDirectory on the test slapd (closed at the end)."""
    made: list[LdapDirectory] = []

    def factory(**overrides: Any) -> LdapDirectory:
        values: dict[str, Any] = {
            "servers": (slapd.uri,),
            "base_dn": SUFFIX,
            "bind_dn": BIND_DN,
            "bind_password": BIND_PASSWORD,
            "timeout": 2.0,
            "positive_ttl": 60.0,
            "negative_ttl": 30.0,
        }
        values.update(overrides)
        directory = LdapDirectory(LdapSettings(**values), clock=clock)
        made.append(directory)
        return directory

    yield factory
    for directory in made:
        directory.close()
