"""Reaching Redis over TLS (``rediss://``, verified against a test CA's ``ca_file``) and through
Sentinel (``sentinels`` + ``service``): real redis-server and redis-sentinel processes on
loopback, the store's own calls, and a fail-over: the master is killed, a replica promoted by
Sentinel, and the store follows it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from palisade.adapters.redis_state import RedisSettings, RedisStateStore
from palisade.ports import StateTempError
from tests.conftest import free_port, wait_for
from tests.redisserver import RedisServer, SentinelServer

T0 = 1_700_000_000.0


def test_rediss_with_a_test_ca(tmp_path: Path, test_ca: Any) -> None:
    cert = test_ca.issue_cert("localhost", "127.0.0.1")
    chain, key, ca = tmp_path / "chain.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key.write_bytes(cert.private_key_pem.bytes())
    test_ca.cert_pem.write_to_path(str(ca))
    tls_port = free_port()
    server = RedisServer(
        tmp_path / "redis",
        port=tls_port,
        extra=(
            "--port", "0", "--tls-port", str(tls_port), "--tls-cert-file", str(chain),
            "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
            "--tls-auth-clients", "no",
        ),
    )  # fmt: skip
    server.start()
    try:
        url = f"rediss://127.0.0.1:{tls_port}/0"
        store = RedisStateStore(RedisSettings(url=url, ca_file=str(ca), prefix="tls:"))

        async def go() -> list[int]:
            try:
                return [await store.rate_hit("k", 60, T0 + i) for i in range(3)]
            finally:
                await store.aclose()

        assert asyncio.run(go()) == [1, 2, 3]
        # without the CA the certificate is not trusted: a StateTempError, not a plain connect
        untrusted = RedisStateStore(RedisSettings(url=url, prefix="tls:"))

        async def refused() -> None:
            try:
                await untrusted.ping()
            finally:
                await untrusted.aclose()

        with pytest.raises(StateTempError, match="certificate verify failed"):
            asyncio.run(refused())
    finally:
        server.stop()


@pytest.mark.timeout(90)
def test_sentinel_finds_the_master_and_follows_a_fail_over(tmp_path: Path) -> None:
    master = RedisServer(tmp_path / "master").start()
    replica = RedisServer(
        tmp_path / "replica", extra=("--replicaof", "127.0.0.1", str(master.port))
    ).start()
    sentinel = SentinelServer(tmp_path / "sentinel", master.port).start()
    try:
        settings = RedisSettings(
            url="redis://ignored/0",
            sentinels=(("127.0.0.1", sentinel.port),),
            service="mymaster",
            prefix="sent:",
            timeout=0.5,
        )
        store = RedisStateStore(settings)
        assert "mymaster" in settings.where and str(sentinel.port) in settings.where

        async def hits(start: float, n: int) -> list[int]:
            return [await store.rate_hit("k", 3600, start + i) for i in range(n)]

        async def before() -> list[int]:
            counts = await hits(T0, 3)
            await store.aclose()
            return counts

        assert asyncio.run(before()) == [1, 2, 3]
        wait_for(lambda: "sent:r:k" in replica.cli("KEYS", "*"), timeout=10)  # replicated
        master.kill()

        store = RedisStateStore(settings)

        async def after() -> int:
            deadline = time.monotonic() + 30
            try:
                while True:
                    try:
                        return await store.rate_hit("k", 3600, T0 + 10)
                    except StateTempError:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.5)
            finally:
                await store.aclose()

        assert asyncio.run(after()) == 4  # the promoted replica had the first three
        assert "role:master" in replica.cli("INFO", "replication")
    finally:
        sentinel.stop()
        replica.stop()
        master.stop()
