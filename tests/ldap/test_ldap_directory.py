"""LdapDirectory against a real slapd (tests/ldap/slapd.py): lookups, filters, escaping, the
positive and negative cache, failover, TLS, and every way the directory can fail to answer --
which must be a ServiceTempError without the bind password, never False."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import ldap3
import pytest

from palisade.adapters.ldap_directory import LdapSettings, address_of
from palisade.ports import RecipientDirectory, ServiceTempError
from tests.adapters.conftest import SettableClock
from tests.conftest import free_port
from tests.ldap.slapd import (
    BIND_PASSWORD,
    MAIL_ADDRESSES,
    PEOPLE,
    PROXY_ADDRESSES,
    ROOT_DN,
    ROOT_PASSWORD,
    SlapdServer,
    person,
)

PROXY = {"filter": "(proxyAddresses=smtp:%s)", "attributes": ("proxyAddresses",)}


def exists(directory: Any, address: str) -> bool:
    return bool(asyncio.run(directory.exists(address)))


def failure(directory: Any, address: str) -> ServiceTempError:
    with pytest.raises(ServiceTempError) as info:
        exists(directory, address)
    return info.value


def admin(slapd: SlapdServer) -> ldap3.Connection:
    return ldap3.Connection(slapd.uri, ROOT_DN, ROOT_PASSWORD, auto_bind=True)


def delete(slapd: SlapdServer, uid: str) -> None:
    with admin(slapd) as conn:
        assert conn.delete(f"uid={uid},{PEOPLE}"), conn.result


def add(slapd: SlapdServer, uid: str, mail: str) -> None:
    with admin(slapd) as conn:
        attrs = {"uid": uid, "cn": uid, "sn": "Test", "mail": mail}
        assert conn.add(f"uid={uid},{PEOPLE}", ["inetOrgPerson"], attrs), conn.result


def test_implements_the_port(make_directory: Any) -> None:
    assert isinstance(make_directory(), RecipientDirectory)


def test_known_and_unknown_addresses(make_directory: Any) -> None:
    directory = make_directory()
    assert exists(directory, "ann@example.test")
    assert exists(directory, "bob.builder@example.test")  # stored as Bob.Builder@Example.TEST
    assert exists(directory, "Carol@Example.NET")
    assert not exists(directory, "nobody@example.test")
    assert not exists(directory, "a.example@example.test")  # only a proxyAddresses alias


def test_one_connection_is_reused(make_directory: Any) -> None:
    directory = make_directory(positive_ttl=0, negative_ttl=0)
    assert exists(directory, "ann@example.test")
    connection = directory._connection
    for _ in range(3):
        assert exists(directory, "ann@example.test")
        assert not exists(directory, "nobody@example.test")
    assert directory.queries == 7
    assert directory._connection is connection


def test_proxy_addresses_filter(make_directory: Any) -> None:
    directory = make_directory(**PROXY)
    assert exists(directory, "a.example@example.test")  # smtp:a.example@...
    assert exists(directory, "ann@example.test")  # SMTP:ann@... (caseIgnoreMatch)
    assert exists(directory, "only.proxy@example.test")  # no mail attribute at all
    assert not exists(directory, "carol@example.org")
    # the X500 and sip values are not smtp: addresses
    assert not exists(directory, "/o=example/ou=people/cn=ann")
    assert exists(directory, "carol@example.net")  # smtp:carol@..., beside sip:carol@...


@pytest.mark.parametrize(
    "address",
    [
        "*",
        "s*@example.test",  # would match st*r@ if * were a wildcard
        "*@example.test",
        "ann@example.test)(mail=*",
        "*)(|(mail=*",
        "x\\2a@example.test",
        "back\\slash@example.test",
        "nul\x00@example.test",
        "(ann@example.test)",
    ],
)
def test_filter_metacharacters_match_only_themselves(make_directory: Any, address: str) -> None:
    directory = make_directory()
    assert not exists(directory, address)


def test_an_address_with_a_star_is_found_literally(make_directory: Any) -> None:
    assert exists(make_directory(), "st*r@example.test")


def test_positive_answers_are_cached_until_their_ttl(
    make_directory: Any, slapd: SlapdServer, clock: SettableClock
) -> None:
    directory = make_directory(positive_ttl=60.0, negative_ttl=30.0)
    assert exists(directory, "ann@example.test")
    delete(slapd, "ann")
    clock.advance(59)
    assert exists(directory, "ann@example.test")  # the cache answers: the entry is gone
    assert directory.queries == 1
    clock.advance(2)
    assert not exists(directory, "ann@example.test")
    assert directory.queries == 2


def test_negative_answers_are_cached_until_their_ttl(
    make_directory: Any, slapd: SlapdServer, clock: SettableClock
) -> None:
    directory = make_directory(positive_ttl=60.0, negative_ttl=30.0)
    assert not exists(directory, "new@example.test")
    add(slapd, "new", "new@example.test")
    clock.advance(29)
    assert not exists(directory, "new@example.test")
    assert directory.queries == 1
    clock.advance(2)
    assert exists(directory, "new@example.test")


def test_failover_to_the_next_server(make_directory: Any, slapd: SlapdServer) -> None:
    dead = f"ldap://127.0.0.1:{free_port()}"
    directory = make_directory(servers=(dead, slapd.uri))
    assert exists(directory, "ann@example.test")
    assert not exists(directory, "nobody@example.test")


def test_all_servers_down(make_directory: Any) -> None:
    dead = [f"ldap://127.0.0.1:{free_port()}" for _ in range(2)]
    error = failure(make_directory(servers=tuple(dead)), "ann@example.test")
    assert "no LDAP server answered" in error.reason
    assert dead[0] in error.reason and dead[1] in error.reason


def test_wrong_password_is_a_temporary_error_without_the_password(
    make_directory: Any,
) -> None:
    secret = "Wrong-Secret-Pw-4711"
    directory = make_directory(bind_password=secret)
    error = failure(directory, "ann@example.test")
    assert "invalidCredentials" in error.reason
    for text in (str(error), error.reason, repr(error), repr(directory), repr(directory.settings)):
        assert secret not in text
        assert BIND_PASSWORD not in text


def test_password_from_a_file(make_directory: Any, tmp_path: Path) -> None:
    secret = tmp_path / "bind.pw"
    secret.write_text(BIND_PASSWORD + "\n")
    directory = make_directory(bind_password="", bind_password_file=secret)
    assert exists(directory, "ann@example.test")
    secret.write_text("Rotated-Wrong-Pw-99\n")
    directory.close()
    directory = make_directory(bind_password="", bind_password_file=secret)
    error = failure(directory, "bob.builder@example.test")
    assert "Rotated-Wrong-Pw-99" not in str(error)
    assert "invalidCredentials" in error.reason


def test_missing_password_file(make_directory: Any, tmp_path: Path) -> None:
    directory = make_directory(bind_password="", bind_password_file=tmp_path / "none")
    assert "bind password file" in failure(directory, "ann@example.test").reason


def test_anonymous_bind(make_directory: Any) -> None:
    assert exists(make_directory(bind_dn="", bind_password=""), "ann@example.test")


def test_server_stopped_is_a_temporary_error(make_directory: Any, slapd: SlapdServer) -> None:
    directory = make_directory()
    assert exists(directory, "ann@example.test")  # a bound connection exists
    slapd.stop()
    error = failure(directory, "bob.builder@example.test")
    assert slapd.uri in error.reason
    assert BIND_PASSWORD not in str(error)
    assert exists(directory, "ann@example.test")  # still cached


def test_server_hanging_answers_within_the_timeout(make_directory: Any, slapd: SlapdServer) -> None:
    directory = make_directory(timeout=1.0)
    assert exists(directory, "ann@example.test")
    slapd.pause()
    try:
        started = time.monotonic()
        error = failure(directory, "bob.builder@example.test")
        assert time.monotonic() - started < 1.8
        assert "timed out after 1s" in error.reason
        fresh = make_directory(timeout=1.0)
        started = time.monotonic()
        failure(fresh, "carol@example.net")  # connect works (kernel backlog), bind hangs
        assert time.monotonic() - started < 1.8
    finally:
        slapd.resume()


def test_a_broken_connection_is_replaced(make_directory: Any, slapd: SlapdServer) -> None:
    directory = make_directory(positive_ttl=0, negative_ttl=0)
    assert exists(directory, "ann@example.test")
    slapd.restart()  # same port, new process: the old connection is dead
    assert exists(directory, "ann@example.test")


def test_start_tls(make_directory: Any, slapd: SlapdServer) -> None:
    assert slapd.tls is not None
    directory = make_directory(start_tls=True, ca_file=slapd.tls.ca)
    assert exists(directory, "ann@example.test")


def test_ldaps(make_directory: Any, slapd: SlapdServer) -> None:
    assert slapd.tls is not None
    directory = make_directory(servers=(slapd.ldaps_uri,), ca_file=slapd.tls.ca)
    assert exists(directory, "ann@example.test")
    assert sorted(asyncio.run(directory.all_addresses())) == MAIL_ADDRESSES


def test_tls_with_an_untrusted_certificate_fails(make_directory: Any, slapd: SlapdServer) -> None:
    # no ca_file: the system trust store does not know the test CA
    error = failure(make_directory(servers=(slapd.ldaps_uri,)), "ann@example.test")
    assert "CERTIFICATE_VERIFY_FAILED" in error.reason or "certificate" in error.reason.lower()
    error = failure(make_directory(start_tls=True), "ann@example.test")
    assert "certificate" in error.reason.lower()


def test_tls_checks_the_host_name(
    make_directory: Any, slapd: SlapdServer
) -> None:  # the certificate names 127.0.0.1 and localhost, not ::1-less aliases
    assert slapd.tls is not None
    uri = slapd.ldaps_uri.replace("127.0.0.1", "127.0.0.2")
    error = failure(make_directory(servers=(uri,), ca_file=slapd.tls.ca), "ann@example.test")
    assert "127.0.0.2" in error.reason


def test_all_addresses(make_directory: Any) -> None:
    assert asyncio.run(make_directory().all_addresses()) == MAIL_ADDRESSES
    assert asyncio.run(make_directory(**PROXY).all_addresses()) == PROXY_ADDRESSES


def test_all_addresses_pages(make_directory: Any, slapd: SlapdServer) -> None:
    with admin(slapd) as conn:
        for n in range(1200):
            attrs = {"uid": f"u{n}", "cn": "u", "sn": "u", "mail": f"u{n}@bulk.test"}
            conn.add(f"uid=u{n},{PEOPLE}", ["inetOrgPerson"], attrs)
    directory = make_directory()
    found = directory.all_addresses_sync()
    assert len(found) == 1200 + len(MAIL_ADDRESSES)
    assert directory.queries >= 3  # pages of 500


def test_address_of() -> None:
    assert address_of("SMTP:Ann@Example.TEST") == "ann@example.test"
    assert address_of("smtp:a@b") == "a@b"
    assert address_of("X500:/o=Example/cn=ann") is None
    assert address_of("sip:carol@example.net") is None
    assert address_of("not an address") is None
    assert address_of("@example.test") is None


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="no %s"):
        LdapSettings(servers=("ldap://x",), base_dn="", filter="(mail=x)")
    with pytest.raises(ValueError, match="not an ldap"):
        LdapSettings(servers=("http://x",), base_dn="")
    with pytest.raises(ValueError, match="no servers"):
        LdapSettings(servers=(), base_dn="")


def test_person_helper_shape() -> None:  # the tree helper used by other LDAP tests
    assert "mail: x@y" in person("x", "x@y")
