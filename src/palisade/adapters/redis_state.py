"""Redis state store: the ``StateStore`` of several MX hosts sharing one Redis (or Valkey).

Owns: the key layout under the configured ``prefix``, the server-side Lua scripts that give each
port method the same answers as :class:`~palisade.adapters.sqlite_state.SqliteStateStore` (read
its docstring: the semantics are defined there, this module only re-states them on Redis), the
client pool of this process, and turning every Redis failure into
:class:`palisade.ports.StateTempError`.

Keys (``P`` is the prefix, ``K`` an incident key from :func:`incident_key`, ``R`` a rate key
chosen by the checks):

- ``P r:R``  sorted set, one member per rate event (score: its time; the member is unique:
  ``time:token:counter``). ``rate_hit`` is one script, one round trip: drop the members at or
  before ``now - window``, add this one, ``ZCARD`` (the answer), set the key's TTL to when its
  newest event leaves the window. Exact sliding window; a key that stops coming back expires.
- ``P i:K``  sorted set of incident events (score: time; member ``seq|weight|rule``, ``seq``
  from ``P m:K`` keeps the order of events stamped alike); ``P m:K`` hash ``total`` (the sum of
  the stored weights) and ``seq``. As in SQLite, a write prunes the key's expired events and
  adjusts ``total``, so a count never sums a flood's events.
- ``P b:K``  hash ``since until times reason``: the key's last block, kept a window after it
  ended (the memory of a repeat offender; older is treated as forgotten even before its TTL).
- ``P ik`` / ``P bk``  sorted sets indexing the keys with incidents (score: newest incident)
  and with blocks (score: until), for ``list_incidents`` and ``active_blocks``; every write
  trims the entries that left the window.
- ``P p:R``  string: a pass's end time, expiring with it.

Every key carries a TTL (the newest thing in it plus its window, from the caller's ``now``), so
Redis never holds more than the windows do, whatever happens to the gateways. TTLs are relative
(``PEXPIRE``), so a gateway's clock that is off changes nothing but how long garbage lives; the
answers depend only on the times the callers pass, as in SQLite.

The scripts name keys beyond their ``KEYS`` (the indexes, the keys ``list_incidents`` reads):
that is fine on a single Redis and its replicas (Sentinel), not on Redis Cluster, which is not
supported. All times cross the wire as ``repr`` strings and come back formatted ``%.17g``, so no
float is rounded on the way (Lua's ``tostring`` would keep 14 digits).

Clients: redis-py's asyncio client with its connection pool, one per process and event loop
(made lazily at the first call, after a fork; the CLI's ``asyncio.run`` per command gets its
own). No retries inside redis-py: every command is bounded by ``timeout`` (a hung Redis costs a
caller that long, once; the fall-back wrapper, :mod:`.state_fallback`, then stops asking it).

Trust: the password comes from the composition root (read from ``password_file``) and is only
given to redis-py; it never appears in a message of this module: errors are re-raised as
``StateTempError`` with redis-py's text, which names host and port, never credentials. Data read
back is ours; a malformed value (another program writing under our prefix) becomes a
``StateTempError``, never a crash.

Must not touch: policy, logging, configuration files; imports ``palisade.ports`` and the shared
key helper only (import-linter).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import AuthenticationError, RedisError, ResponseError

from palisade.adapters.state_keys import incident_key
from palisade.clock import SYSTEM_CLOCK
from palisade.ports import (
    Block,
    BlockPolicy,
    Clock,
    Incident,
    IncidentEvent,
    IncidentOutcome,
    StateTempError,
)

__all__ = ["RedisSettings", "RedisStateStore", "StateAuthError"]

_T = TypeVar("_T")

# --------------------------------------------------------------------------------- the scripts

_LIB = """
local function num(x) return string.format('%.17g', x) end
local function keep(k, ms)
  ms = math.max(math.ceil(ms), 1000)
  local cur = redis.call('PTTL', k)
  if cur < ms then redis.call('PEXPIRE', k, ms) end
end
local function weight_of(m)
  return tonumber(string.match(m, '^[^|]*|(%d+)|'))
end
local function expired_weight(ev, horizon)
  local s = 0
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', ev, '-inf', horizon)) do
    s = s + weight_of(m)
  end
  return s
end
local function describe(ev, meta, blk, horizon, now)
  local total = tonumber(redis.call('HGET', meta, 'total') or '0')
  local count = total - expired_weight(ev, horizon)
  local out = {tostring(count), '', ''}
  if count > 0 then
    local after = '(' .. horizon
    local first = redis.call('ZRANGEBYSCORE', ev, after, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    local last = redis.call('ZREVRANGEBYSCORE', ev, '+inf', after, 'WITHSCORES', 'LIMIT', 0, 1)
    out[2] = first[2]
    out[3] = last[2]
  end
  local b = redis.call('HMGET', blk, 'since', 'until', 'times', 'reason')
  if b[2] and tonumber(b[2]) > tonumber(now) then
    for i = 1, 4 do table.insert(out, b[i]) end
  end
  return out
end
"""

# KEYS: r:R   ARGV: now, window, member -> the count within the window, this event included
_RATE_HIT = """
local k = KEYS[1]
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', k, '-inf', string.format('%.17g', now - window))
redis.call('ZADD', k, ARGV[1], ARGV[3])
local n = redis.call('ZCARD', k)
local top = redis.call('ZRANGE', k, -1, -1, 'WITHSCORES')
local ms = math.max(math.ceil((tonumber(top[2]) + window - now) * 1000), 1000)
redis.call('PEXPIRE', k, ms)
return n
"""

# KEYS: i:K m:K b:K ik bk
# ARGV: key at weight rule window block_at block_for growth block_max may_block(1/0)
# -> {count, state(0 none, 1 kept, 2 new), since, until, times, reason}
_RECORD = (
    _LIB
    + """
local ev, meta, blk, ik, bk = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local key, at_s, rule = ARGV[1], ARGV[2], ARGV[4]
local at, weight, window = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[5])
local block_at, block_for = tonumber(ARGV[6]), tonumber(ARGV[7])
local growth, block_max = tonumber(ARGV[8]), tonumber(ARGV[9])
local horizon = num(at - window)
local gone = expired_weight(ev, horizon)
if gone > 0 then redis.call('ZREMRANGEBYSCORE', ev, '-inf', horizon) end
local total = tonumber(redis.call('HGET', meta, 'total') or '0') - gone + weight
local seq = redis.call('HINCRBY', meta, 'seq', 1)
redis.call('HSET', meta, 'total', total)
redis.call('ZADD', ev, at_s, string.format('%012d|%d|%s', seq, weight, rule))
local newest = tonumber(redis.call('ZRANGE', ev, -1, -1, 'WITHSCORES')[2])
keep(ev, (newest + window - at) * 1000)
keep(meta, (newest + window - at) * 1000)
redis.call('ZREMRANGEBYSCORE', ik, '-inf', horizon)
redis.call('ZADD', ik, 'GT', at_s, key)
keep(ik, window * 1000)
redis.call('ZREMRANGEBYSCORE', bk, '-inf', horizon)
local prev = redis.call('HMGET', blk, 'since', 'until', 'times', 'reason')
local prev_times = 0
if prev[2] then
  local prev_until = tonumber(prev[2])
  if prev_until > at then
    return {tostring(total), '1', prev[1], prev[2], prev[3], prev[4]}
  end
  if prev_until > at - window then prev_times = tonumber(prev[3]) end
end
if ARGV[10] ~= '1' or total < block_at then
  return {tostring(total), '0'}
end
local times = prev_times + 1
local length = math.min(block_for * growth ^ (times - 1), block_max)
local sums, rules = {}, {}
for _, m in ipairs(redis.call('ZRANGEBYSCORE', ev, '(' .. horizon, '+inf')) do
  local w, r = string.match(m, '^[^|]*|(%d+)|(.*)$')
  if sums[r] == nil then sums[r] = 0; table.insert(rules, r) end
  sums[r] = sums[r] + tonumber(w)
end
table.sort(rules, function(a, b)
  if sums[a] ~= sums[b] then return sums[a] > sums[b] end
  return a < b
end)
local parts = {}
for _, r in ipairs(rules) do table.insert(parts, r .. ' x' .. sums[r]) end
local reason = table.concat(parts, ', ')
local until_s = num(at + length)
redis.call('DEL', blk)
redis.call('HSET', blk, 'since', at_s, 'until', until_s, 'times', times, 'reason', reason)
keep(blk, (length + window) * 1000)
redis.call('ZADD', bk, until_s, key)
keep(bk, (length + window) * 1000)
return {tostring(total), '2', at_s, until_s, tostring(times), reason}
"""
)

# KEYS: i:K m:K b:K   ARGV: horizon now -> {count, first, last[, since, until, times, reason]}
_GET = _LIB + "return describe(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2])"

# ARGV: prefix horizon now -> {key, count, first, last, nfields, [block fields]} * n
_LIST = (
    _LIB
    + """
local p, horizon, now = ARGV[1], ARGV[2], ARGV[3]
local seen, out = {}, {}
local keys = redis.call('ZRANGEBYSCORE', p .. 'ik', '(' .. horizon, '+inf')
for _, k in ipairs(redis.call('ZRANGEBYSCORE', p .. 'bk', '(' .. now, '+inf')) do
  table.insert(keys, k)
end
for _, k in ipairs(keys) do
  if not seen[k] then
    seen[k] = true
    local d = describe(p .. 'i:' .. k, p .. 'm:' .. k, p .. 'b:' .. k, horizon, now)
    table.insert(out, k)
    table.insert(out, tostring(#d))
    for _, x in ipairs(d) do table.insert(out, x) end
  end
end
return out
"""
)

# ARGV: prefix now -> {key, since, until, times, reason} * n
_BLOCKS = """
local p, now = ARGV[1], ARGV[2]
local out = {}
for _, k in ipairs(redis.call('ZRANGEBYSCORE', p .. 'bk', '(' .. now, '+inf')) do
  local b = redis.call('HMGET', p .. 'b:' .. k, 'since', 'until', 'times', 'reason')
  if b[2] and tonumber(b[2]) > tonumber(now) then
    table.insert(out, k)
    for i = 1, 4 do table.insert(out, b[i]) end
  end
end
return out
"""

# KEYS: i:K m:K b:K ik bk   ARGV: key now -> {anything known (0/1), block was active (0/1)}
_FORGET = """
local events = redis.call('ZCARD', KEYS[1])
local u = redis.call('HGET', KEYS[3], 'until')
local active = (u and tonumber(u) > tonumber(ARGV[2])) and 1 or 0
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
local known = (events > 0 or active == 1) and 1 or 0
return {known, active}
"""


class StateAuthError(StateTempError):
    """Redis refused our credentials (a wrong or missing password file): a configuration error,
    not a passing outage, but it is handled like one by the callers (mail keeps flowing)."""


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """How to reach Redis; built by the composition root from ``[state]``. ``password`` is the
    secret itself (read from ``password_file``): never printed (``repr`` hides it)."""

    url: str = "redis://127.0.0.1:6379/0"
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""
    prefix: str = "palisade:"
    timeout: float = 0.5
    connect_timeout: float = 1.0
    max_connections: int = 64

    def __repr__(self) -> str:
        where = f"sentinels {self.sentinels} service {self.service}" if self.sentinels else self.url
        return f"RedisSettings({where}, prefix {self.prefix!r})"

    @property
    def where(self) -> str:
        """What to name in a message: the url or the Sentinel service, never credentials."""
        if self.sentinels:
            hosts = ", ".join(f"{h}:{p}" for h, p in self.sentinels)
            return f"Redis master {self.service!r} (sentinels {hosts})"
        return f"Redis {self.url}"


def _f(value: bytes | str | None) -> float:
    if value is None:
        raise StateTempError("malformed value in Redis (a key under our prefix was changed)")
    return float(value)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _positive_weight(weight: int, what: str = "incident weight") -> int:
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
        raise ValueError(f"{what} must be a positive integer, got {weight!r}")
    return weight


def _rule_name(rule: str) -> str:
    if not isinstance(rule, str) or not rule.strip():
        raise ValueError(f"incident rule must be a non-empty name, got {rule!r}")
    return rule.strip()


class RedisStateStore:
    """``StateStore`` on Redis (see the module docstring for the layout and the guarantees)."""

    def __init__(
        self,
        settings: RedisSettings,
        *,
        clock: Clock | None = None,
        policy: BlockPolicy | None = None,
    ) -> None:
        self.settings = settings
        self.prefix = settings.prefix
        self.clock: Clock = clock if clock is not None else SYSTEM_CLOCK
        self.policy = policy if policy is not None else BlockPolicy()
        self._pid = os.getpid()
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )
        self._token = os.urandom(4).hex()
        self._counter = 0
        self._closed = False
        # scripts are sent by SHA (EVALSHA) and loaded again when Redis forgot them (a restart)
        self._rate_hit = _script(_RATE_HIT)
        self._record = _script(_RECORD)
        self._get = _script(_GET)
        self._list = _script(_LIST)
        self._blocks = _script(_BLOCKS)
        self._forget = _script(_FORGET)

    # ------------------------------------------------------------------------------ plumbing

    def _make_client(self) -> Any:
        s = self.settings
        common: dict[str, Any] = {
            "socket_timeout": s.timeout,
            "socket_connect_timeout": s.connect_timeout,
            "retry": Retry(NoBackoff(), 0),  # no hidden retries: a hang costs one timeout
            "username": s.username or None,
            "password": s.password,
            "max_connections": s.max_connections,
            "client_name": "palisade",
        }
        tls = s.url.lower().startswith("rediss://")
        if tls:
            common["ssl_ca_certs"] = s.ca_file
        if s.sentinels:
            db = s.url.rstrip("/").rpartition("/")[2]
            sentinel = aioredis.Sentinel(  # type: ignore[no-untyped-call]
                list(s.sentinels),
                socket_timeout=s.timeout,
                socket_connect_timeout=s.connect_timeout,
                retry=Retry(NoBackoff(), 0),
            )
            del common["max_connections"]
            if tls:
                common["ssl"] = True
            return sentinel.master_for(s.service, db=int(db) if db.isdigit() else 0, **common)
        # a blocking pool: a burst beyond max_connections waits (up to the timeout) for a
        # connection instead of failing at once with "Too many connections"
        pool = aioredis.BlockingConnectionPool.from_url(s.url, timeout=s.timeout, **common)
        return aioredis.Redis(connection_pool=pool)

    def _client(self) -> Any:
        if self._closed:
            raise StateTempError("state store is closed")
        if os.getpid() != self._pid:  # a fork: the parent's connections are not ours
            self._pid = os.getpid()
            self._clients = weakref.WeakKeyDictionary()
            self._token = os.urandom(4).hex()
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = self._make_client()
        return client

    async def _call(self, what: str, work: Callable[[Any], Awaitable[_T]]) -> _T:
        """Runs ``work(client)``; any Redis failure becomes ``StateTempError`` naming ``what``
        and where Redis is (never the password)."""
        try:
            return await work(self._client())
        except StateTempError:
            raise
        except AuthenticationError as exc:
            raise StateAuthError(
                f"{self.settings.where}: {what}: authentication failed ({_reason(exc)}):"
                " check [state] password_file and username"
            ) from None
        except ResponseError as exc:
            text = _reason(exc)
            if text.startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
                raise StateAuthError(
                    f"{self.settings.where}: {what}: authentication failed ({text}):"
                    " check [state] password_file and username"
                ) from None
            raise StateTempError(f"{self.settings.where}: {what}: {text}") from None
        except (TimeoutError, RedisError, OSError) as exc:
            raise StateTempError(f"{self.settings.where}: {what}: {_reason(exc)}") from None

    def _k(self, kind: str, name: str) -> str:
        return f"{self.prefix}{kind}:{name}"

    def _incident_keys(self, key: str) -> list[str]:
        return [self._k("i", key), self._k("m", key), self._k("b", key)]

    async def ping(self) -> None:
        """One PING (the fall-back wrapper's probe, the self-check's)."""
        await self._call("ping", lambda c: c.ping())

    # ------------------------------------------------------------------------------ rates

    async def rate_hit(self, key: str, window: float, now: float) -> int:
        """One event for ``key`` at ``now``; the events within ``window``, this one included.
        One script call: one round trip."""
        if not window > 0:
            raise ValueError(f"rate window must be positive, got {window!r}")
        self._counter += 1
        member = f"{float(now)!r}:{self._token}:{self._counter}"
        args = [repr(float(now)), repr(float(window)), member]

        async def work(c: Any) -> int:
            return int(await self._rate_hit(keys=[self._k("r", key)], args=args, client=c))

        return await self._call("rate update", work)

    async def rate_batch(self, hits: Sequence[tuple[str, float, float]]) -> None:
        """Many ``(key, window, at)`` hits in one pipeline (the fall-back's replay)."""
        if not hits:
            return

        async def work(c: Any) -> None:
            async with c.pipeline(transaction=False) as pipe:
                for key, window, at in hits:
                    self._counter += 1
                    member = f"{float(at)!r}:{self._token}:{self._counter}"
                    args = [repr(float(at)), repr(float(window)), member]
                    await self._rate_hit(keys=[self._k("r", key)], args=args, client=pipe)
                await pipe.execute()

        await self._call("rate update", work)

    async def rate_events(self, key: str, horizon: float) -> list[float]:
        """The times of ``key``'s events after ``horizon``, oldest first."""

        async def work(c: Any) -> list[float]:
            rows = await c.zrangebyscore(
                self._k("r", key), f"({float(horizon)!r}", "+inf", withscores=True
            )
            return [float(score) for _m, score in rows]

        return await self._call("read", work)

    # ------------------------------------------------------------------------------ passes

    async def pass_until(self, key: str, now: float) -> float | None:
        """When the pass remembered for ``key`` runs out, or None (absent or expired)."""
        raw = await self._call("pass lookup", lambda c: c.get(self._k("p", key)))
        if raw is None:
            return None
        until = _f(raw)
        return until if until > now else None

    async def remember_pass(self, key: str, until: float, now: float) -> None:
        """Remembers a pass for ``key`` until ``until``; it expires in Redis at its end."""
        ms = int((float(until) - float(now)) * 1000)

        async def work(c: Any) -> None:
            if ms <= 0:
                await c.delete(self._k("p", key))
            else:
                await c.set(self._k("p", key), repr(float(until)), px=ms)

        await self._call("pass update", work)

    # ------------------------------------------------------------------------------ incidents

    def _record_call(
        self, ip: str, weight: int, rule: str, now: float, policy: BlockPolicy, may_block: bool
    ) -> tuple[str, list[str], list[str]]:
        key = incident_key(ip)
        _positive_weight(weight)
        name = _rule_name(rule)
        keys = [*self._incident_keys(key), self.prefix + "ik", self.prefix + "bk"]
        args = [
            key,
            repr(float(now)),
            str(weight),
            name,
            repr(float(policy.window)),
            str(policy.block_at),
            repr(float(policy.block_for)),
            repr(float(policy.growth)),
            repr(float(policy.block_max)),
            "1" if may_block else "0",
        ]
        return key, keys, args

    @staticmethod
    def _outcome(key: str, reply: Sequence[Any]) -> IncidentOutcome:
        count = int(_s(reply[0]))
        state = _s(reply[1])
        if state == "0":
            return IncidentOutcome(key, count, None, False)
        block = Block(
            key=key,
            since=_f(reply[2]),
            until=_f(reply[3]),
            times=int(_s(reply[4])),
            reason=_s(reply[5]),
        )
        return IncidentOutcome(key, count, block, state == "2")

    async def record_incident(
        self,
        ip: str,
        weight: int,
        rule: str,
        now: float,
        policy: BlockPolicy,
        may_block: bool = True,
    ) -> IncidentOutcome:
        """As ``SqliteStateStore.record_incident``: one script, atomic, one round trip."""
        key, keys, args = self._record_call(ip, weight, rule, now, policy, may_block)

        async def work(c: Any) -> IncidentOutcome:
            return self._outcome(key, await self._record(keys=keys, args=args, client=c))

        return await self._call("incident update", work)

    async def record_incidents(
        self, incidents: Sequence[tuple[str, int, str, float, BlockPolicy, bool]]
    ) -> list[IncidentOutcome]:
        """Many ``record_incident`` calls in one pipeline (one round trip), in order. Every
        argument is checked before anything is sent (``ValueError``: nothing is written)."""
        calls = [self._record_call(*incident) for incident in incidents]
        if not calls:
            return []

        async def work(c: Any) -> list[IncidentOutcome]:
            async with c.pipeline(transaction=False) as pipe:
                for _key, keys, args in calls:
                    await self._record(keys=keys, args=args, client=pipe)
                replies = await pipe.execute()
            return [self._outcome(key, r) for (key, _k, _a), r in zip(calls, replies, strict=True)]

        return await self._call("incident update", work)

    @staticmethod
    def _incident(key: str, d: Sequence[Any]) -> Incident | None:
        count = int(_s(d[0]))
        block = None
        if len(d) >= 7:
            block = Block(key, _f(d[3]), _f(d[4]), int(_s(d[5])), _s(d[6]))
        if count <= 0:
            if block is None:
                return None
            return Incident(key, 0, block.since, block.since, block)
        return Incident(key, count, _f(d[1]), _f(d[2]), block)

    async def _incident_at(self, key: str, now: float) -> Incident | None:
        args = [repr(now - self.policy.window), repr(now)]

        async def work(c: Any) -> Incident | None:
            reply = await self._get(keys=self._incident_keys(key), args=args, client=c)
            return self._incident(key, reply)

        return await self._call("read", work)

    async def get_incident(self, ip: str) -> Incident | None:
        """The record for ``ip`` (an IPv6 address is looked up by its /64), or None."""
        return await self._incident_at(incident_key(ip), self.clock.now())

    async def add_incident(self, ip: str, count: int = 1, now: float | None = None) -> Incident:
        """Records ``count`` incidents of rule ``manual`` under the store's policy (it may
        block) and returns the key's record."""
        _positive_weight(count, "incident count")
        at = self.clock.now() if now is None else float(now)
        outcome = await self.record_incident(ip, count, "manual", at, self.policy, True)
        found = await self._incident_at(outcome.key, max(at, self.clock.now()))
        return found if found is not None else Incident(outcome.key, 0, at, at)

    async def _forget_key(self, ip: str) -> tuple[bool, bool]:
        key = incident_key(ip)
        keys = [*self._incident_keys(key), self.prefix + "ik", self.prefix + "bk"]
        args = [key, repr(self.clock.now())]

        async def work(c: Any) -> tuple[bool, bool]:
            known, active = await self._forget(keys=keys, args=args, client=c)
            return bool(int(known)), bool(int(active))

        return await self._call("write", work)

    async def remove_incident(self, ip: str) -> bool:
        """Forgets ``ip``'s incidents and lifts its block; False when nothing was known."""
        return (await self._forget_key(ip))[0]

    async def unblock(self, ip: str) -> bool:
        """Lifts the active block of ``ip``'s key and forgets its incidents and block history;
        False when the key was not blocked."""
        return (await self._forget_key(ip))[1]

    async def list_incidents(self) -> list[Incident]:
        """Every key with incidents in the window or an active block: blocked first, then
        highest count, then most recently seen."""
        now = self.clock.now()
        args = [self.prefix, repr(now - self.policy.window), repr(now)]

        async def work(c: Any) -> list[Any]:
            return list(await self._list(keys=[], args=args, client=c))

        flat = await self._call("read", work)
        found: list[Incident] = []
        i = 0
        while i < len(flat):
            key, size = _s(flat[i]), int(_s(flat[i + 1]))
            incident = self._incident(key, flat[i + 2 : i + 2 + size])
            if incident is not None:
                found.append(incident)
            i += 2 + size
        return sorted(found, key=lambda x: (x.block is None, -x.count, -x.last_seen, x.key))

    async def active_blocks(self, now: float) -> list[Block]:
        """Every block still in force at ``now``, newest first."""
        args = [self.prefix, repr(float(now))]

        async def work(c: Any) -> list[Any]:
            return list(await self._blocks(keys=[], args=args, client=c))

        flat = await self._call("read", work)
        blocks = [
            Block(
                _s(flat[i]), _f(flat[i + 1]), _f(flat[i + 2]), int(_s(flat[i + 3])), _s(flat[i + 4])
            )
            for i in range(0, len(flat), 5)
        ]
        return sorted(blocks, key=lambda b: (-b.since, b.key))

    async def incident_events(self, ip: str, since: float) -> list[IncidentEvent]:
        """The incidents of ``ip``'s key stamped after ``since``, oldest first."""
        key = incident_key(ip)

        async def work(c: Any) -> list[Any]:
            return list(
                await c.zrangebyscore(
                    self._k("i", key), f"({float(since)!r}", "+inf", withscores=True
                )
            )

        rows = await self._call("read", work)
        events = []
        for member, score in rows:
            _seq, weight, rule = _s(member).split("|", 2)
            events.append(IncidentEvent(key, float(score), int(weight), rule))
        return events

    # ------------------------------------------------------------------------------ lifecycle

    async def aclose(self) -> None:
        """Closes this loop's client (the others are closed by ``close``)."""
        self._closed = True
        clients, self._clients = list(self._clients.items()), weakref.WeakKeyDictionary()
        for loop, client in clients:
            if loop is asyncio.get_running_loop():
                with contextlib.suppress(RedisError, OSError):
                    await client.aclose()

    def close(self) -> None:
        """Forgets the clients; on a running loop its client is closed in a task. Later calls
        raise ``StateTempError``. Idempotent."""
        if self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            loop.create_task(self.aclose())
        else:
            self._closed = True
            self._clients = weakref.WeakKeyDictionary()


def _script(text: str) -> AsyncScript:
    """A script sent by SHA with the client given at each call (none registered)."""
    return AsyncScript(None, text.encode())  # type: ignore[arg-type]


def _reason(exc: BaseException) -> str:
    """redis-py's text, or the exception's type (a timeout has none)."""
    text = str(exc).strip()
    return text or type(exc).__name__
