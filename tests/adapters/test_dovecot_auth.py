"""DovecotAuthenticator against a real Dovecot (dovecot-core, ``tests/dovecot.py``) started on
loopback: passwd-file passdb with SHA512-CRYPT hashes, the auth client socket in a private
base_dir and a TCP ``inet_listener``.

"Stopped" is Dovecot halted (its socket file gone or refusing), "hung" is the real Dovecot under
SIGSTOP. The tab-escaping helpers are pure functions and tested as such; the one fault that
cannot be provoked with a real Dovecot (a reply that is not the protocol) uses a scripted
Unix-socket server, said so in its test.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from palisade.adapters.dovecot_auth import DovecotAuthenticator, tab_escape, tab_unescape
from palisade.ports import AuthAttempt, Authenticator, ServiceTempError
from tests.conftest import wait_for
from tests.dovecot import PASSWORD, Dovecot

T = TypeVar("T")


def run(coroutine: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coroutine()

    return asyncio.run(main())


def attempt(
    user: str = "alice",
    password: str = PASSWORD,
    *,
    mechanism: str = "PLAIN",
    authzid: str = "",
    client_ip: str = "192.0.2.7",
) -> AuthAttempt:
    return AuthAttempt(
        mechanism=mechanism,
        authcid=user,
        password=password,
        authzid=authzid,
        client_ip=client_ip,
        local_ip="127.0.0.1",
        secured=True,
    )


def _start(**kwargs: object) -> Dovecot:
    server = Dovecot(imap=False, scheme="SHA512-CRYPT", **kwargs)  # type: ignore[arg-type]
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    """One Dovecot for the tests that do not stop it."""
    server = _start(users={"alice": PASSWORD, "bob@example.org": "bobs-password"})
    yield server
    server.stop()


@pytest.fixture
def own_dovecot() -> Iterator[Dovecot]:
    """A Dovecot of the test's own, to stop, pause or restart."""
    server = _start()
    yield server
    server.stop()


@pytest.fixture(params=["unix", "inet"])
def address(request: pytest.FixtureRequest, dovecot: Dovecot) -> str:
    return str(dovecot.auth_socket) if request.param == "unix" else dovecot.auth_address


def test_right_password_gives_the_user_name(address: str) -> None:
    authenticator = DovecotAuthenticator(address, timeout=10)
    assert isinstance(authenticator, Authenticator)
    assert run(lambda: authenticator.authenticate(attempt())) == "alice"


def test_wrong_password_and_unknown_user_give_none(address: str, dovecot: Dovecot) -> None:
    authenticator = DovecotAuthenticator(address, timeout=10)

    async def both() -> tuple[str | None, str | None, str | None]:
        wrong = await authenticator.authenticate(attempt(password="wrong-password"))
        unknown = await authenticator.authenticate(attempt("nobody", "whatever"))
        right = await authenticator.authenticate(attempt())  # the connection still works
        await authenticator.close()
        return wrong, unknown, right

    assert run(both) == (None, None, "alice")
    wait_for(lambda: "passwd-file(nobody,192.0.2.7): unknown user" in dovecot.log_text())
    assert "passwd-file(alice,192.0.2.7): Password mismatch" in dovecot.log_text()


def test_user_name_as_dovecot_knows_it(dovecot: Dovecot) -> None:
    """Dovecot looks user names up case-insensitively and answers with its own spelling."""
    authenticator = DovecotAuthenticator(str(dovecot.auth_socket))
    got = run(lambda: authenticator.authenticate(attempt("BOB@Example.org", "bobs-password")))
    assert got == "bob@example.org"


def test_login_mechanism_is_sent_as_plain(dovecot: Dovecot) -> None:
    authenticator = DovecotAuthenticator(dovecot.auth_address)

    async def both() -> tuple[str | None, str | None]:
        right = await authenticator.authenticate(attempt(mechanism="LOGIN"))
        wrong = await authenticator.authenticate(attempt(mechanism="LOGIN", password="x"))
        await authenticator.close()
        return right, wrong

    assert run(both) == ("alice", None)


def test_authzid_other_than_the_user_is_refused(dovecot: Dovecot) -> None:
    """PLAIN's authorization identity reaches Dovecot; without master users it fails."""
    authenticator = DovecotAuthenticator(dovecot.auth_address)
    assert run(lambda: authenticator.authenticate(attempt(authzid="bob@example.org"))) is None


def test_concurrent_attempts_share_one_connection(dovecot: Dovecot) -> None:
    authenticator = DovecotAuthenticator(str(dovecot.auth_socket))

    async def many() -> list[str | None]:
        attempts = [attempt() if n % 2 else attempt(password=f"bad-{n}") for n in range(20)]
        results = await asyncio.gather(*(authenticator.authenticate(a) for a in attempts))
        connection = authenticator._connection
        assert connection is not None and connection.next_id == 20  # all on one connection
        await authenticator.close()
        return list(results)

    assert run(many) == [("alice" if n % 2 else None) for n in range(20)]


@pytest.mark.parametrize(
    "user",
    ["al\tice", "alice\n", "alice\r\nAUTH\t9\tPLAIN\tservice=smtp", "al\x01ice"],
)
def test_user_name_with_tab_or_newline_cannot_break_the_protocol(
    dovecot: Dovecot, user: str
) -> None:
    """The user name travels only inside the base64 ``resp=``: Dovecot refuses the name by its
    ``auth_username_chars`` and the connection stays in step (the next attempt succeeds)."""
    authenticator = DovecotAuthenticator(str(dovecot.auth_socket))

    async def both() -> tuple[str | None, str | None]:
        bad = await authenticator.authenticate(attempt(user, PASSWORD))
        good = await authenticator.authenticate(attempt())
        await authenticator.close()
        return bad, good

    assert run(both) == (None, "alice")
    wait_for(lambda: "Username character disallowed" in dovecot.log_text())


@pytest.mark.parametrize(
    "fields",
    [{"user": "alice\0"}, {"user": "ali\0ce"}, {"authzid": "x\0alice"}, {"password": "pw\0x"}],
)
def test_nul_is_refused_before_dovecot_is_asked(
    own_dovecot: Dovecot, fields: dict[str, str]
) -> None:
    """NUL is PLAIN's separator: such an attempt is refused without a request (Dovecot logs
    nothing), the next one works."""
    authenticator = DovecotAuthenticator(str(own_dovecot.auth_socket))
    bad = attempt(
        fields.get("user", "alice"),
        fields.get("password", PASSWORD),
        authzid=fields.get("authzid", ""),
    )

    async def both() -> tuple[str | None, str | None]:
        first = await authenticator.authenticate(bad)
        second = await authenticator.authenticate(attempt(password="wrong"))
        await authenticator.close()
        return first, second

    assert run(both) == (None, None)
    wait_for(lambda: "Password mismatch" in own_dovecot.log_text())
    assert own_dovecot.log_text().count("passwd-file(") == 1


def test_dovecot_stopped_is_a_temporary_failure(own_dovecot: Dovecot) -> None:
    unix = DovecotAuthenticator(str(own_dovecot.auth_socket), timeout=5)
    inet = DovecotAuthenticator(own_dovecot.auth_address, timeout=5)
    own_dovecot.halt()
    for authenticator in (unix, inet):
        with pytest.raises(ServiceTempError) as caught:
            run(lambda a=authenticator: a.authenticate(attempt()))  # type: ignore[misc]
        assert caught.value.reason.startswith("dovecot auth ")
        assert (
            "No such file or directory" in caught.value.reason or "refused" in caught.value.reason
        )
        assert PASSWORD not in caught.value.reason


def test_hung_dovecot_is_a_temporary_failure_within_the_timeout(own_dovecot: Dovecot) -> None:
    """SIGSTOP: the kernel accepts the connection, nobody answers. Also a connection that was
    open and answering before Dovecot hung."""
    fresh = DovecotAuthenticator(own_dovecot.auth_address, timeout=0.5)
    reused = DovecotAuthenticator(str(own_dovecot.auth_socket), timeout=0.5)

    async def scenario() -> list[str]:
        assert await reused.authenticate(attempt()) == "alice"
        reasons = []
        with own_dovecot.paused():
            for authenticator in (fresh, reused):
                try:
                    await authenticator.authenticate(attempt())
                except ServiceTempError as exc:
                    reasons.append(exc.reason)
        # awake again: the reused connection still serves (the late reply is ignored)
        assert await reused.authenticate(attempt()) == "alice"
        await fresh.close()
        await reused.close()
        return reasons

    reasons = run(scenario)
    assert reasons == [
        f"dovecot auth {own_dovecot.auth_address}: no answer within 0.5s",
        f"dovecot auth {own_dovecot.auth_socket}: no answer within 0.5s",
    ]


def test_reconnects_after_dovecot_restarts(own_dovecot: Dovecot) -> None:
    """The connection Dovecot closed on its restart is replaced on the next attempt; an
    attempt while it is down is a temporary failure, the next after it is back succeeds."""
    authenticator = DovecotAuthenticator(str(own_dovecot.auth_socket), timeout=5)

    async def scenario() -> tuple[str | None, str | None, str | None]:
        first = await authenticator.authenticate(attempt())
        await asyncio.to_thread(own_dovecot.restart)
        second = await authenticator.authenticate(attempt())
        await asyncio.to_thread(own_dovecot.halt)
        try:
            await authenticator.authenticate(attempt())
        except ServiceTempError:
            pass
        else:
            raise AssertionError("a stopped Dovecot authenticated")
        await asyncio.to_thread(own_dovecot.start)
        third = await authenticator.authenticate(attempt())
        await authenticator.close()
        return first, second, third

    assert run(scenario) == ("alice", "alice", "alice")


def test_temporary_failure_from_dovecot(tmp_path: Path) -> None:
    """Dovecot's passdb failing: a checkpassword program exiting 111 ("temporary problem", as
    with a database down) makes Dovecot answer FAIL with code=temp_fail."""
    script = tmp_path / "checkpassword"
    script.write_text("#!/bin/sh\nexit 111\n")
    script.chmod(0o755)
    tmp_path.chmod(0o755)
    passdb = f"passdb {{\n  driver = checkpassword\n  args = {script}\n}}"
    server = _start(passdb=passdb)
    try:
        authenticator = DovecotAuthenticator(str(server.auth_socket), timeout=10)
        with pytest.raises(ServiceTempError) as caught:
            run(lambda: authenticator.authenticate(attempt()))
        assert caught.value.reason.startswith(f"dovecot auth {server.auth_socket}: ")
    finally:
        server.stop()


async def _scripted(path: Path, lines: bytes) -> asyncio.AbstractServer:
    """Writes ``lines`` to each client, then waits for it to go; closes at once when ``lines``
    ends in the middle of a line."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert (await reader.readline()).startswith(b"VERSION\t1\t")
        assert (await reader.readline()).startswith(b"CPID\t")
        writer.write(lines)
        await writer.drain()
        if lines.endswith(b"\n"):
            with contextlib.suppress(asyncio.CancelledError):  # the loop ends before the client
                await reader.read()
        writer.close()

    return await asyncio.start_unix_server(serve, str(path))


HANDSHAKE = b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nSPID\t1\nCUID\t1\nCOOKIE\tab\nDONE\n"


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        (b"VERSION\t2\t0\nDONE\n", "unsupported protocol version: 2 0"),
        (b"VERSION\t1\t2\nMECH\tLOGIN\tplaintext\nDONE\n", "PLAIN is not offered"),
        (b"VERSION\t1\t2\nMECH\tPLAIN", "connection closed during the handshake"),
        (HANDSHAKE + b"OK\tnot-a-number\n", "bad OK line"),
        (HANDSHAKE + b"CONT\t1\t\n", "unexpected CONT"),
        (HANDSHAKE + b"FAIL\t1\ttemp\n", "temporary failure"),
        (HANDSHAKE + b"OK\t1\tuser=ali\x01nce\n", "control characters"),
        (HANDSHAKE + b"X" * 70000 + b"\n", "reply line too long"),
    ],
)
def test_protocol_errors_are_temporary_failures(tmp_path: Path, lines: bytes, reason: str) -> None:
    """Replies a real Dovecot does not send (a scripted server: the fault cannot be provoked
    with Dovecot itself); Dovecot 2.2's bare ``temp`` flag included."""

    async def scenario() -> ServiceTempError:
        server = await _scripted(tmp_path / "auth", lines)
        authenticator = DovecotAuthenticator(str(tmp_path / "auth"), timeout=5)
        try:
            await authenticator.authenticate(attempt())
        except ServiceTempError as exc:
            return exc
        finally:
            await authenticator.close()
            server.close()
        raise AssertionError("no error")

    error = run(scenario)
    assert reason in error.reason
    assert "resp=" not in error.reason and PASSWORD not in error.reason


def test_tab_escaping_as_dovecot_does() -> None:
    assert tab_escape("plain") == "plain"
    assert tab_escape("a\tb\nc\rd\x01e\0f") == "a\x01tb\x01nc\x01rd\x011e\x010f"
    for value in ["", "x", "\t\t", "\x01t", "a\x01\tb\n\0", "é\tü"]:
        assert tab_unescape(tab_escape(value)) == value
    assert tab_unescape("al\x01tice") == "al\tice"  # as Dovecot sent it in our test
    assert tab_unescape("a\x01zb") == "azb"  # anything else: the character itself
    assert tab_unescape("ab\x01") == "ab"  # truncated escape


def test_bad_addresses_are_refused() -> None:
    for bad in ["", "127.0.0.1", "host:", "host:99999"]:
        with pytest.raises(ValueError):
            DovecotAuthenticator(bad)
    assert DovecotAuthenticator("unix:/run/dovecot/auth-client").address == (
        "/run/dovecot/auth-client"
    )


def test_repeated_wrong_passwords_stay_wrong_not_temporary(own_dovecot: Dovecot) -> None:
    """``no-penalty``: with anvil's penalty each further failure from one address would wait 2,
    4, 8 s..., past the timeout, and become a temporary failure (454, no ``authenticator
    failed`` line) instead of a wrong password (535). The per-address cost is Palisade's own."""
    authenticator = DovecotAuthenticator(str(own_dovecot.auth_socket), timeout=1.5)

    async def failures() -> list[str | None]:
        results = [await authenticator.authenticate(attempt(password=f"bad-{n}")) for n in range(4)]
        await authenticator.close()
        return results

    assert run(failures) == [None] * 4


def test_request_on_a_connection_closed_under_it_is_sent_again(tmp_path: Path) -> None:
    """Dovecot closing a reused connection just as a request is written (a restart at that
    moment: a race a real Dovecot cannot be made to hit on demand, so a scripted server):
    the request is sent once more on a new connection, as Postfix does."""
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        await reader.readline()
        await reader.readline()
        writer.write(HANDSHAKE)
        answered = 0
        while line := await reader.readline():
            request_id = line.split(b"\t")[1]
            if len(connections) == 1 and answered == 1:
                break  # the second request on the first connection: close without a reply
            writer.write(b"OK\t" + request_id + b"\tuser=alice\n")
            answered += 1
        writer.close()

    async def scenario() -> list[str | None]:
        server = await asyncio.start_unix_server(serve, str(tmp_path / "auth"))
        authenticator = DovecotAuthenticator(str(tmp_path / "auth"), timeout=5)
        try:
            return [await authenticator.authenticate(attempt()) for _ in range(3)]
        finally:
            await authenticator.close()
            server.close()

    assert run(scenario) == ["alice", "alice", "alice"]
    assert len(connections) == 2
