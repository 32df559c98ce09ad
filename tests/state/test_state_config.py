"""``[state]``: what the loader accepts and refuses (file, key and reason in the message), what
``config check`` shows (never a password), and the composition root's choice of store."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from palisade.adapters.redis_state import RedisStateStore
from palisade.adapters.sqlite_state import SqliteStateStore
from palisade.adapters.state_fallback import FallbackStateStore
from palisade.config import ConfigError
from palisade.config.loader import parse_config
from palisade.server.generation import build_shared_store, build_state, redis_settings
from tests.conftest import palisade
from tests.redisserver import RedisServer


def state_config(body: str, tmp_path: Path) -> str:
    return f'[paths]\nstate = "{tmp_path}/state.sqlite"\n[state]\n{body}\n'


def test_defaults_are_sqlite() -> None:
    config = parse_config("", "<t>")
    assert config.state.backend == "sqlite"
    store = build_state(config.__class__(paths=config.paths.__class__(state=Path(":memory:"))))
    assert isinstance(store, SqliteStateStore)
    store.close()


@pytest.mark.parametrize(
    ("body", "key", "reason"),
    [
        ('backend = "memcached"', "state.backend", "expected one of 'sqlite', 'redis'"),
        ('url = "http://127.0.0.1:6379"', "state.url", "expected redis://host[:port][/db]"),
        ('url = "redis://:hunter2@127.0.0.1"', "state.url", "put it in password_file"),
        ('url = "redis://127.0.0.1:99999"', "state.url", "from 1 to 65535"),
        ('ca_file = "/etc/hostname"', "state.ca_file", "for rediss://"),
        ('url = "rediss://h"\nca_file = "/nonexistent/ca.pem"', "state.ca_file", "no such file"),
        ('password_file = "/nonexistent/pw"', "state.password_file", "cannot be read"),
        ('sentinels = ["127.0.0.1:26379"]', "state.service", "name the master"),
        ('service = "mymaster"', "state.sentinels", "needs the sentinels"),
        ('sentinels = ["127.0.0.1:0"]', "state.sentinels", "from 1 to 65535"),
        ('prefix = "a b"', "state.prefix", "without spaces"),
        ("timeout = 0", "state.timeout", "at least 0.01"),
    ],
)
def test_refused_with_the_key_and_the_reason(
    body: str, key: str, reason: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(state_config(body, tmp_path), "/etc/palisade/palisade.toml")
    text = str(info.value)
    assert "/etc/palisade/palisade.toml" in text and key in text and reason in text, text
    assert "hunter2" not in text


def test_redis_settings_read_the_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "redis.pass"
    secret.write_text("correct horse\nignored second line\n")
    config = parse_config(
        state_config(
            f'backend = "redis"\nurl = "redis://127.0.0.1:6380/2"\npassword_file = "{secret}"\n'
            'sentinels = ["127.0.0.1", "[::1]:26380"]\nservice = "mx"',
            tmp_path,
        ),
        "<t>",
    )
    settings = redis_settings(config)
    assert settings.password == "correct horse"
    assert settings.sentinels == (("127.0.0.1", 26379), ("::1", 26380))
    assert "correct horse" not in repr(settings) and "correct horse" not in settings.where
    store = build_state(config)
    assert isinstance(store, FallbackStateStore)
    assert isinstance(store.primary, RedisStateStore)
    assert isinstance(store.local, SqliteStateStore)
    store.close()
    assert isinstance(build_shared_store(config), RedisStateStore)
    secret.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        redis_settings(config)


def test_config_check_shows_the_section_never_the_password(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        secret = tmp_path / "redis.pass"
        secret.write_text("not-shown-anywhere\n")
        config = tmp_path / "palisade.toml"
        config.write_text(
            state_config(
                f'backend = "redis"\nurl = "{server.url}"\npassword_file = "{secret}"', tmp_path
            )
        )
        # a password for a Redis without requirepass: redis-py ignores the refusal of AUTH
        check = palisade("config", "check", "--config", str(config), cwd=tmp_path)
        assert "[state]" in check.stdout and 'backend = "redis"' in check.stdout
        assert check.returncode == 0, check.stderr
        assert 'password_file = "' in check.stdout  # the file's name is shown, not its content
        assert "not-shown-anywhere" not in check.stdout + check.stderr
        config.write_text(state_config(f'backend = "redis"\nurl = "{server.url}"', tmp_path))
        check = palisade("config", "check", "--config", str(config), cwd=tmp_path)
        assert f"ok: [state] Redis {server.url} answers" in check.stderr
        server.kill()
        check = palisade("config", "check", "--config", str(config), cwd=tmp_path)
        assert "warning: [state] Redis" in check.stderr and "until Redis answers" in check.stderr
    finally:
        server.stop()


def test_history_says_when_redis_is_unreachable(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    config = tmp_path / "palisade.toml"
    config.write_text(state_config(f'backend = "redis"\nurl = "{server.url}"', tmp_path))
    added = palisade("history", "add", "192.0.2.5", "--count", "3", "--config", str(config),
                     cwd=tmp_path)  # fmt: skip
    assert added.returncode == 0, added.stderr
    listed = palisade("history", "list", "--config", str(config), cwd=tmp_path)
    assert "192.0.2.5" in listed.stdout
    store = RedisStateStore(redis_settings(parse_config(config.read_text(), "<t>")))
    got = asyncio.run(store.get_incident("192.0.2.5"))
    assert got is not None and got.count == 3
    server.stop()
    listed = palisade("history", "list", "--config", str(config), cwd=tmp_path)
    assert listed.returncode == 1
    assert "state store unavailable" in listed.stderr and server.url in listed.stderr
