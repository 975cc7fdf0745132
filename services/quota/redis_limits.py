"""The limits of :mod:`services.quota.limits`, kept in Redis and shared by every quota replica.

Each Reserve costs one ``EVALSHA``: the script checks every window and slot of the request and takes
them all only when all pass. Redis runs a script atomically, so concurrent Reserves on any number of
replicas see each other's counts exactly (no read-then-write race, no per-process counters). Calls
made at the same moment travel together in one pipeline (one round trip), each still its own atomic
script.

Keys (``relaygate:quota:`` prefix):

* ``rate:<scope>:<id>:rpm|tpm`` - a hash of one-second buckets (field = Unix second, value = requests
  or tokens), expiring a little after its newest bucket leaves the window;
* ``lease:<scope>:<id>`` - a sorted set of reservation ids scored by when the slot lapses (ms).

A script touches the keys of one key and one user, so they must live on one Redis (a Redis Cluster
would need them in one hash slot). Time is the quota process's clock, passed in, so replicas need
synchronized clocks (NTP); a skew of a few milliseconds only shifts window edges by as much.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from services.common.clock import Clock
from services.quota.group_commit import GroupCommit
from services.quota.limits import (
    EMPTY_TICKET,
    WINDOW_S,
    LimiterUnavailable,
    LimitRequest,
    Ticket,
    Window,
    concurrency_refusal,
    most_constrained,
    rate_refusal,
)

__all__ = ["PREFIX", "RedisLimiter"]

PREFIX = "relaygate:quota:"

# KEYS: the rate hashes (ARGV[3] of them), then the lease sets.
# ARGV: now_ms, window_s, number of rate hashes, reservation id, lease expiry (ms),
#       then limit and cost of each rate hash, then the limit of each lease set.
# Returns {0, used_1 .. used_n, added_1 .. added_m} when everything was taken,
#         {1, i, retry_ms (-1: can never fit), used} when rate hash i refused,
#         {2, j, ms until its earliest slot lapses} when lease set j refused.
_ACQUIRE = """
local now_ms = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local nc = tonumber(ARGV[3])
local rid = ARGV[4]
local lease_until = tonumber(ARGV[5])
local second = math.floor(now_ms / 1000)
local oldest = second - window
local used = {}
for i = 1, nc do
  local limit = tonumber(ARGV[4 + 2 * i])
  local cost = tonumber(ARGV[5 + 2 * i])
  local flat = redis.call('HGETALL', KEYS[i])
  local total = 0
  local stale = {}
  local live = {}
  for j = 1, #flat, 2 do
    local b = tonumber(flat[j])
    if b < oldest then
      stale[#stale + 1] = flat[j]
    else
      local v = tonumber(flat[j + 1])
      total = total + v
      live[#live + 1] = {b, v}
    end
  end
  if #stale > 0 then redis.call('HDEL', KEYS[i], unpack(stale)) end
  if cost > limit then return {1, i, -1, total} end
  if total + cost > limit then
    table.sort(live, function(a, b) return a[1] < b[1] end)
    local excess = total + cost - limit
    local freed = 0
    for _, bv in ipairs(live) do
      freed = freed + bv[2]
      if freed >= excess then return {1, i, (bv[1] + window + 1) * 1000 - now_ms, total} end
    end
    return {1, i, (window + 1) * 1000, total}
  end
  used[i] = total
end
local nl = #KEYS - nc
local fresh = {}
for j = 1, nl do
  local key = KEYS[nc + j]
  local limit = tonumber(ARGV[5 + 2 * nc + j])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now_ms)
  if redis.call('ZSCORE', key, rid) then
    fresh[j] = 0
  else
    if redis.call('ZCARD', key) >= limit then
      local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
      return {2, j, tonumber(first[2]) - now_ms}
    end
    fresh[j] = 1
  end
end
local reply = {0}
for i = 1, nc do
  local cost = tonumber(ARGV[5 + 2 * i])
  if cost > 0 then redis.call('HINCRBY', KEYS[i], second, cost) end
  redis.call('EXPIRE', KEYS[i], window + 2)
  reply[#reply + 1] = used[i] + cost
end
for j = 1, nl do
  local key = KEYS[nc + j]
  if fresh[j] == 1 then
    redis.call('ZADD', key, lease_until, rid)
    local keep = lease_until - now_ms + 1000
    if redis.call('PTTL', key) < keep then redis.call('PEXPIRE', key, keep) end
  end
  reply[#reply + 1] = fresh[j]
end
return reply
"""

# KEYS: rate hashes (#ARGV - 2 of them), then lease sets. ARGV: bucket second, reservation id, then
# the cost to give back to each rate hash.
_GIVE_BACK = """
local nc = #ARGV - 2
for i = 1, nc do
  local left = redis.call('HINCRBY', KEYS[i], ARGV[1], -tonumber(ARGV[2 + i]))
  if left <= 0 then redis.call('HDEL', KEYS[i], ARGV[1]) end
end
for j = nc + 1, #KEYS do redis.call('ZREM', KEYS[j], ARGV[2]) end
return 1
"""


# (script, keys, args)
_Call = tuple[str, list[str], list[int | str]]
_SHA = {script: hashlib.sha1(script.encode()).hexdigest() for script in (_ACQUIRE, _GIVE_BACK)}


def _rate_key(name: str) -> str:
    return f"{PREFIX}rate:{name}"


def _lease_key(name: str) -> str:
    return f"{PREFIX}lease:{name}"


class RedisLimiter:
    """:class:`~services.quota.limits.Limiter` on Redis; failures raise :class:`LimiterUnavailable`."""

    def __init__(self, redis: Redis, *, clock: Clock, max_batch: int = 64) -> None:
        self._redis = redis
        self._clock = clock
        self._calls = GroupCommit[_Call, Any]("limits", self._send, max_batch=max_batch, concurrency=1)

    async def _eval(self, script: str, keys: list[str], args: list[int | str]) -> Any:
        try:
            reply = await self._calls.submit((script, keys, args))
        except (RedisError, OSError) as exc:
            raise LimiterUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return reply

    async def close(self) -> None:
        """Wait for the calls in flight; call before closing the Redis client."""
        await self._calls.close()

    async def _send(self, batch: Sequence[_Call]) -> list[Any]:
        """One pipeline for every waiting call. A script Redis does not know (it restarted) did not run,
        so only those calls are sent again once the scripts are loaded."""
        replies: list[Any] = [None] * len(batch)
        pending = list(range(len(batch)))
        for _ in range(2):
            async with self._redis.pipeline(transaction=False) as pipe:
                for i in pending:
                    script, keys, args = batch[i]
                    pipe.execute_command("EVALSHA", _SHA[script], len(keys), *keys, *args)
                answers = await pipe.execute(raise_on_error=False)
            for i, answer in zip(pending, answers, strict=True):
                replies[i] = answer
            pending = [i for i in pending if isinstance(replies[i], NoScriptError)]
            if not pending:
                break
            for script in {batch[i][0] for i in pending}:
                await self._redis.script_load(script)
        return replies

    async def acquire(self, request: LimitRequest) -> Ticket:
        if request.empty:
            return EMPTY_TICKET
        now = self._clock.time()
        now_ms = int(now * 1000)
        counters, leases = request.counters, request.leases
        keys = [_rate_key(c.name) for c in counters] + [_lease_key(lease.name) for lease in leases]
        args: list[int | str] = [
            now_ms,
            WINDOW_S,
            len(counters),
            request.reservation_id,
            int(request.lease_until * 1000),
        ]
        for counter in counters:
            args += [counter.limit, counter.cost]
        args += [lease.limit for lease in leases]
        try:
            reply = [int(value) for value in await self._eval(_ACQUIRE, keys, args)]
        except (TypeError, ValueError) as exc:
            raise LimiterUnavailable(f"unexpected reply from the limit script: {exc}") from exc
        status = reply[0]
        if status == 1:
            counter, wait_ms = counters[reply[1] - 1], reply[2]
            raise rate_refusal(counter, reply[3], None if wait_ms < 0 else wait_ms / 1000)
        if status == 2:
            raise concurrency_refusal(leases[reply[1] - 1], reply[2] / 1000)
        used, fresh = reply[1 : 1 + len(counters)], reply[1 + len(counters) :]
        second = now_ms // 1000
        reset_s = second + WINDOW_S + 1 - now
        windows = [
            (counter.kind, Window(counter.limit, max(0, counter.limit - after), reset_s))
            for counter, after in zip(counters, used, strict=True)
        ]
        return Ticket(
            request.reservation_id,
            second,
            counters,
            tuple(lease for lease, added in zip(leases, fresh, strict=True) if added),
            sum(lease.bit for lease in leases),
            most_constrained(windows, "requests"),
            most_constrained(windows, "tokens"),
        )

    async def rollback(self, ticket: Ticket) -> None:
        keys = [_rate_key(c.name) for c in ticket.charged] + [
            _lease_key(lease.name) for lease in ticket.leased
        ]
        args: list[int | str] = [ticket.bucket, ticket.reservation_id, *(c.cost for c in ticket.charged)]
        await self._call_give_back(keys, args)

    async def release(self, reservation_id: str, leases: Sequence[str]) -> None:
        if leases:
            await self._call_give_back([_lease_key(name) for name in leases], [0, reservation_id])

    async def maintain(self) -> None:
        """Nothing to do: every key expires on its own."""

    async def _call_give_back(self, keys: list[str], args: list[int | str]) -> None:
        await self._eval(_GIVE_BACK, keys, args)
