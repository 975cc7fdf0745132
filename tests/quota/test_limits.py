"""RPM, TPM and concurrency limits: one contract, checked on both implementations (Redis and in-process)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Literal

import pytest
from redis.asyncio import Redis

from devinfra.backing import BackingServices
from devinfra.processes import free_port
from services.common.clock import ManualClock
from services.common.errors import ConcurrencyLimited, RateLimited, ServiceUnavailable
from services.common.redis import redis_client
from services.common.telemetry import METRICS
from services.quota.limits import (
    EMPTY_TICKET,
    LEASE_KEY,
    LEASE_USER,
    NO_LIMITS,
    GuardedLimiter,
    Limiter,
    LimitRequest,
    Limits,
    LocalLimiter,
    lease_names,
)
from services.quota.redis_limits import PREFIX, RedisLimiter

Kind = Literal["redis", "local"]


@pytest.fixture(params=["redis", "local"])
def limiter(request: pytest.FixtureRequest, clock: ManualClock) -> Limiter:
    if request.param == "redis":
        client: Redis = request.getfixturevalue("redis")
        return RedisLimiter(client, clock=clock)
    return LocalLimiter(clock)


def ask(
    key: str,
    *,
    rid: str = "",
    key_limits: Limits = NO_LIMITS,
    user: str = "",
    user_limits: Limits = NO_LIMITS,
    tokens: int = 10,
    lease_until: float = 0,
) -> LimitRequest:
    return LimitRequest.build(
        reservation_id=rid or uuid.uuid4().hex,
        key_id=key,
        user_id=user,
        key_limits=key_limits,
        user_limits=user_limits,
        tokens=tokens,
        lease_until=lease_until or 1e12,
    )


def fresh(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:10]}"


async def test_rpm_admits_exactly_the_limit_then_slides(limiter: Limiter, clock: ManualClock) -> None:
    key = fresh("k")
    limits = Limits(rpm=3)
    clock.now = 1_700_000_000.25
    first = await limiter.acquire(ask(key, key_limits=limits))
    assert first.requests is not None
    assert (first.requests.limit, first.requests.remaining) == (3, 2)
    assert first.requests.reset_s == pytest.approx(60.75)
    clock.advance(30)
    await limiter.acquire(ask(key, key_limits=limits))
    third = await limiter.acquire(ask(key, key_limits=limits))
    assert third.requests is not None and third.requests.remaining == 0

    with pytest.raises(RateLimited) as refused:
        await limiter.acquire(ask(key, key_limits=limits))
    # The oldest request (second 1_700_000_000) leaves the window at +61 s: 30.75 s from now.
    assert refused.value.retry_after == pytest.approx(30.75)
    assert "the RPM limit of key" in refused.value.message

    clock.advance(30.75)
    after = await limiter.acquire(ask(key, key_limits=limits))
    assert after.requests is not None and after.requests.remaining == 0
    with pytest.raises(RateLimited):
        await limiter.acquire(ask(key, key_limits=limits))


async def test_tpm_counts_tokens_and_refuses_a_request_that_can_never_fit(
    limiter: Limiter, clock: ManualClock
) -> None:
    key = fresh("k")
    limits = Limits(tpm=1_000)
    taken = await limiter.acquire(ask(key, key_limits=limits, tokens=600))
    assert taken.tokens is not None and taken.tokens.remaining == 400
    assert taken.requests is None

    with pytest.raises(RateLimited) as waiting:
        await limiter.acquire(ask(key, key_limits=limits, tokens=500))
    assert waiting.value.retry_after is not None and 0 < waiting.value.retry_after <= 61
    with pytest.raises(RateLimited, match="request too large") as never:
        await limiter.acquire(ask(key, key_limits=limits, tokens=1_001))
    assert never.value.retry_after is None
    assert (await limiter.acquire(ask(key, key_limits=limits, tokens=400))).tokens is not None


async def test_a_refusal_takes_nothing_and_rollback_gives_everything_back(
    limiter: Limiter, clock: ManualClock
) -> None:
    key, user = fresh("k"), fresh("u")
    key_limits, user_limits = Limits(rpm=10, max_concurrency=5), Limits(rpm=1)
    await limiter.acquire(ask(key, key_limits=key_limits, user=user, user_limits=user_limits))
    # The user's RPM refuses: the key's counter and slot must be untouched.
    for _ in range(3):
        with pytest.raises(RateLimited, match="of user"):
            await limiter.acquire(ask(key, key_limits=key_limits, user=user, user_limits=user_limits))
    other_user = fresh("u")
    ticket = await limiter.acquire(ask(key, key_limits=key_limits, user=other_user))
    assert ticket.requests is not None and ticket.requests.remaining == 8

    await limiter.rollback(ticket)

    again = await limiter.acquire(ask(key, key_limits=key_limits, user=other_user))
    assert again.requests is not None and again.requests.remaining == 8


async def test_concurrency_slots_are_leases(limiter: Limiter, clock: ManualClock) -> None:
    key = fresh("k")
    limits = Limits(max_concurrency=2)
    until = clock.time() + 30
    a = await limiter.acquire(ask(key, rid="a", key_limits=limits, lease_until=until))
    assert (a.lease_bits, [lease.name for lease in a.leased]) == (LEASE_KEY, [f"key:{key}"])
    await limiter.acquire(ask(key, rid="b", key_limits=limits, lease_until=until + 5))
    # A repeated reserve finds its slot: it takes no second one, and its rollback frees nothing.
    repeat = await limiter.acquire(ask(key, rid="a", key_limits=limits, lease_until=until))
    assert (repeat.leased, repeat.lease_bits) == ((), LEASE_KEY)
    await limiter.rollback(repeat)

    with pytest.raises(ConcurrencyLimited) as refused:
        await limiter.acquire(ask(key, rid="c", key_limits=limits, lease_until=until))
    assert refused.value.retry_after is not None and 0 < refused.value.retry_after <= 1.0

    await limiter.release("a", lease_names(key, "", LEASE_KEY))
    await limiter.release("a", lease_names(key, "", LEASE_KEY))  # idempotent
    await limiter.acquire(ask(key, rid="c", key_limits=limits, lease_until=until))
    with pytest.raises(ConcurrencyLimited):
        await limiter.acquire(ask(key, rid="d", key_limits=limits, lease_until=until))

    # Slots nobody gives back lapse with their reservation: "c" at `until`, "b" 5 s later.
    clock.advance(30)
    await limiter.acquire(ask(key, rid="d", key_limits=limits, lease_until=clock.time() + 30))
    with pytest.raises(ConcurrencyLimited):
        await limiter.acquire(ask(key, rid="e", key_limits=limits, lease_until=clock.time() + 30))
    clock.advance(5)
    await limiter.acquire(ask(key, rid="e", key_limits=limits, lease_until=clock.time() + 30))


async def test_headers_show_the_most_constrained_scope(limiter: Limiter) -> None:
    key, user = fresh("k"), fresh("u")
    ticket = await limiter.acquire(
        ask(
            key,
            key_limits=Limits(rpm=100, tpm=50_000, max_concurrency=3),
            user=user,
            user_limits=Limits(rpm=5, tpm=90_000, max_concurrency=3),
            tokens=1_000,
        )
    )
    assert ticket.requests is not None and ticket.tokens is not None
    assert (ticket.requests.limit, ticket.requests.remaining) == (5, 4)
    assert (ticket.tokens.limit, ticket.tokens.remaining) == (50_000, 49_000)
    assert ticket.lease_bits == LEASE_KEY | LEASE_USER
    assert await limiter.acquire(ask(key)) == EMPTY_TICKET


async def test_redis_keys_expire_on_their_own(redis: Redis, clock: ManualClock) -> None:
    limiter = RedisLimiter(redis, clock=clock)
    key = fresh("k")
    await limiter.acquire(
        ask(key, key_limits=Limits(rpm=5, tpm=100, max_concurrency=2), lease_until=clock.time() + 900)
    )
    rpm_ttl = await redis.ttl(f"{PREFIX}rate:key:{key}:rpm")
    lease_ttl = await redis.pttl(f"{PREFIX}lease:key:{key}")
    assert 0 < rpm_ttl <= 62
    assert 899_000 < lease_ttl <= 901_000


async def test_redis_losing_its_scripts_costs_nothing(redis: Redis, clock: ManualClock) -> None:
    limiter = RedisLimiter(redis, clock=clock)
    key = fresh("k")
    await limiter.acquire(ask(key, key_limits=Limits(rpm=2)))
    await redis.script_flush()  # what a Redis restart does to loaded scripts

    results = await asyncio.gather(
        *(limiter.acquire(ask(key, key_limits=Limits(rpm=2))) for _ in range(3)), return_exceptions=True
    )

    assert sum(isinstance(r, RateLimited) for r in results) == 2, "each script ran exactly once"
    await limiter.close()


# -- the failure policy ----------------------------------------------------------------------------------


def _unreachable(clock: ManualClock) -> RedisLimiter:
    return RedisLimiter(redis_client(f"redis://127.0.0.1:{free_port()}/0"), clock=clock)


async def test_fail_open_admits_unchecked_and_logs_once(
    clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    guarded = GuardedLimiter(_unreachable(clock), clock=clock, fail_open=True, retry_interval_s=1.0)
    admitted = METRICS.quota_limits_unchecked.labels(result="admitted")
    before = admitted._value.get()
    limits = Limits(rpm=1, max_concurrency=1)

    with caplog.at_level(logging.WARNING, logger="services.quota.limits"):
        for _ in range(3):
            assert await guarded.acquire(ask(fresh("k"), key_limits=limits)) == EMPTY_TICKET
            clock.advance(2)  # past the retry interval: each call really tries Redis again

    assert guarded.degraded
    assert admitted._value.get() - before == 3
    assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1


async def test_fail_closed_refuses_with_503(clock: ManualClock) -> None:
    guarded = GuardedLimiter(_unreachable(clock), clock=clock, fail_open=False)
    with pytest.raises(ServiceUnavailable, match="cannot be checked"):
        await guarded.acquire(ask(fresh("k"), key_limits=Limits(rpm=1)))
    # A request without limits never needs Redis.
    assert await guarded.acquire(ask(fresh("k"))) == EMPTY_TICKET


class Partition:
    """A TCP forwarder to Redis that can be cut and healed: a partition that keeps Redis's data."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self._target = target_port
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def heal(self) -> None:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()
        self._writers.clear()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        self._writers += [writer, up_writer]

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


async def test_slots_freed_during_an_outage_are_freed_when_redis_returns(
    backing: BackingServices, redis: Redis, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    partition = Partition(backing.ports.redis)
    await partition.heal()
    client = redis_client(f"redis://127.0.0.1:{partition.port}/0")
    guarded = GuardedLimiter(
        RedisLimiter(client, clock=clock), clock=clock, fail_open=True, retry_interval_s=1.0
    )
    key = fresh("k")
    limits = Limits(max_concurrency=1)
    lease = f"{PREFIX}lease:key:{key}"
    try:
        ticket = await guarded.acquire(ask(key, rid="r1", key_limits=limits, lease_until=clock.time() + 900))
        assert ticket.lease_bits == LEASE_KEY

        await partition.cut()
        await guarded.release("r1", lease_names(key, "", LEASE_KEY))
        assert guarded.degraded is True
        assert await redis.zcard(lease) == 1, "the release could not reach Redis; the slot is still taken"
        await guarded.maintain()  # still cut: the release stays pending
        assert await redis.zcard(lease) == 1

        await partition.heal()
        clock.advance(2)
        with caplog.at_level(logging.INFO, logger="services.quota.limits"):
            await guarded.maintain()
        assert await redis.zcard(lease) == 0
        assert not bool(guarded.degraded), "recovered"
        assert any("reachable again" in r.getMessage() for r in caplog.records)
        await guarded.acquire(ask(key, rid="r2", key_limits=limits, lease_until=clock.time() + 900))
    finally:
        await client.aclose()
        with contextlib.suppress(AssertionError):
            await partition.cut()
