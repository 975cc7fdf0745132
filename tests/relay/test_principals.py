"""The relay's verified-key cache against a real auth server (PostgreSQL primary + replica, Redis): how long
it trusts a key with and without auth's invalidations, its bound, and that a key changed while the Redis
subscription was down is not served once it is back. A loopback TCP proxy stands between the listener and
Redis so a test can make that connection deaf, cut it, or refuse it, like a network would.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import pytest

from devinfra.backing import BackingServices
from services.common.clock import Clock, ManualClock, SystemClock
from services.common.errors import AuthenticationError, PermissionDenied
from services.common.grpc import call
from services.common.pb.relaygate.auth.v1 import auth_pb2 as pb
from services.common.redis import redis_client
from services.relay.pipeline.principals import Authenticator, InvalidationListener
from tests.auth.harness import TIMEOUT, RunningAuth, auth_settings, serving
from tests.db_fixtures import DbUrls

if TYPE_CHECKING:
    from services.common.pb.relaygate.auth.v1.auth_pb2_grpc import AuthServiceAsyncStub

MODEL = "gpt-4o-mini"
IP = "127.0.0.1"


class CountingAuth:
    """auth's real stub, counting the VerifyKey calls that reach it (cache misses)."""

    def __init__(self, stub: AuthServiceAsyncStub) -> None:
        self._stub = stub
        self.calls = 0

    async def VerifyKey(self, request: pb.VerifyKeyRequest, *, timeout: float) -> pb.VerifyKeyResponse:
        self.calls += 1
        return await self._stub.VerifyKey(request, timeout=timeout)


class RedisProxy:
    """A TCP proxy to Redis on a free loopback port. ``deaf`` drops what Redis sends through existing
    connections; :meth:`cut` closes them; ``refuse`` closes new ones at once."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._pumps: set[asyncio.Task[None]] = set()
        self.deaf = False
        self.refuse = False
        self.accepted = 0

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.close()
            return
        self.accepted += 1
        upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        self._open.update((writer, upstream_writer))
        for task in (
            asyncio.create_task(self._pump(reader, upstream_writer, to_client=False)),
            asyncio.create_task(self._pump(upstream_reader, writer, to_client=True)),
        ):
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, to_client: bool
    ) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                if to_client and self.deaf:
                    continue
                writer.write(data)
                await writer.drain()
        writer.close()
        self._open.discard(writer)

    def cut(self) -> None:
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._pumps):
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)


@pytest.fixture(scope="module")
async def auth(migrated_db: DbUrls, backing: BackingServices) -> AsyncIterator[RunningAuth]:
    """One auth server for the module, on the real PostgreSQL primary + replica and Redis."""
    async with serving(auth_settings(migrated_db, redis_url=backing.redis_url)) as running:
        yield running


@pytest.fixture
async def proxy(backing: BackingServices) -> AsyncIterator[tuple[RedisProxy, str]]:
    running = RedisProxy("127.0.0.1", backing.ports.redis)
    url = await running.start()
    try:
        yield running, url
    finally:
        await running.close()


def authenticator(
    counting: CountingAuth,
    *,
    ttl_s: float = 300.0,
    fallback_ttl_s: float = 5.0,
    max_entries: int = 1000,
    clock: Clock | None = None,
) -> Authenticator:
    stub = cast("AuthServiceAsyncStub", counting)
    return Authenticator(
        stub,
        ttl_s=ttl_s,
        fallback_ttl_s=fallback_ttl_s,
        max_entries=max_entries,
        rpc_timeout_s=TIMEOUT,
        clock=clock or SystemClock(),
    )


@contextlib.asynccontextmanager
async def listening(cache: Authenticator, redis_url: str) -> AsyncIterator[InvalidationListener]:
    """The listener on ``redis_url``, once its subscription is confirmed."""
    client = redis_client(redis_url)
    listener = InvalidationListener(client, cache)
    await listener.start()
    try:
        await eventually(lambda: cache.following, "the listener never confirmed its subscription")
        yield listener
    finally:
        await listener.close()
        await client.aclose()


async def eventually(condition: Callable[[], bool], failure: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, failure
        await asyncio.sleep(0.01)


async def refused_within(
    attempt: Callable[[], Awaitable[Any]], error: type[Exception], timeout: float
) -> float:
    """Seconds until ``attempt`` raises ``error``; fails when it still succeeds after ``timeout``."""
    started = time.monotonic()
    while True:
        try:
            await attempt()
        except error:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"still accepted after {timeout:g} s"
        await asyncio.sleep(0.02)


async def new_key(running: RunningAuth, name: str) -> tuple[str, str]:
    user = await running.create_user(name)
    created = await running.create_key(user.user_id, name=name)
    return created.key.key_id, created.api_key


async def restrict_models(running: RunningAuth, key_id: str, models: list[str]) -> None:
    request = pb.UpdateKeyRequest(key_id=key_id, key=pb.ApiKey(allowed_models=models))
    request.update_mask.paths.append("allowed_models")
    await call(running.stub.UpdateKey, request, timeout=TIMEOUT)


async def test_a_followed_cache_trusts_a_key_for_minutes_and_drops_it_when_auth_changes_it(
    auth: RunningAuth, backing: BackingServices
) -> None:
    counting = CountingAuth(auth.stub)
    clock = ManualClock()
    cache = authenticator(counting, clock=clock)
    key_id, api_key = await new_key(auth, "followed")
    async with listening(cache, backing.redis_url):
        clock.advance(0.01)
        await cache.authenticate(api_key, model=MODEL, client_ip=IP)
        clock.advance(240)  # far beyond the fallback TTL, within the followed one
        await cache.authenticate(api_key, model=MODEL, client_ip=IP)
        assert counting.calls == 1

        await restrict_models(auth, key_id, ["claude-*"])

        seconds = await refused_within(
            lambda: cache.authenticate(api_key, model=MODEL, client_ip=IP), PermissionDenied, 1.0
        )
    assert seconds < 1.0
    assert counting.calls == 2


async def test_without_invalidations_a_key_is_trusted_only_for_the_fallback_ttl(auth: RunningAuth) -> None:
    counting = CountingAuth(auth.stub)
    clock = ManualClock()
    cache = authenticator(counting, clock=clock)  # no listener: auth's announcements cannot arrive
    key_id, api_key = await new_key(auth, "unfollowed")
    await cache.authenticate(api_key, model=MODEL, client_ip=IP)
    await call(auth.stub.RevokeKey, pb.RevokeKeyRequest(key_id=key_id), timeout=TIMEOUT)

    clock.advance(4.9)
    await cache.authenticate(api_key, model=MODEL, client_ip=IP)  # the documented bound of staleness
    clock.advance(0.1)
    with pytest.raises(AuthenticationError):
        await cache.authenticate(api_key, model=MODEL, client_ip=IP)
    assert counting.calls == 2


async def test_a_lost_subscription_falls_back_to_the_short_ttl(
    auth: RunningAuth, proxy: tuple[RedisProxy, str]
) -> None:
    redis_proxy, url = proxy
    counting = CountingAuth(auth.stub)
    clock = ManualClock()
    cache = authenticator(counting, clock=clock)
    _, api_key = await new_key(auth, "fallback")
    async with listening(cache, url):
        clock.advance(0.01)
        await cache.authenticate(api_key, model=MODEL, client_ip=IP)
        clock.advance(60)
        await cache.authenticate(api_key, model=MODEL, client_ip=IP)
        assert counting.calls == 1

        redis_proxy.refuse = True
        redis_proxy.cut()
        await eventually(lambda: not cache.following, "the lost subscription went unnoticed")

        # Verified 60 s ago: beyond the fallback TTL, so auth is asked again.
        await cache.authenticate(api_key, model=MODEL, client_ip=IP)
        assert counting.calls == 2
        clock.advance(1)
        await cache.authenticate(api_key, model=MODEL, client_ip=IP)
        assert counting.calls == 2


async def test_a_key_revoked_while_the_subscription_was_down_is_refused_once_it_is_back(
    auth: RunningAuth, proxy: tuple[RedisProxy, str]
) -> None:
    redis_proxy, url = proxy
    counting = CountingAuth(auth.stub)
    # A fallback TTL longer than the test: only the resubscription can make the relay ask auth again.
    cache = authenticator(counting, ttl_s=600, fallback_ttl_s=600)
    key_id, api_key = await new_key(auth, "missed")
    async with listening(cache, url):
        await cache.authenticate(api_key, model=MODEL, client_ip=IP)
        connections = redis_proxy.accepted

        # Auth's announcement is published while nothing reaches the relay, then the connection drops
        # and the client reconnects and resubscribes on its own.
        redis_proxy.deaf = True
        await call(auth.stub.RevokeKey, pb.RevokeKeyRequest(key_id=key_id), timeout=TIMEOUT)
        redis_proxy.deaf = False
        redis_proxy.cut()
        await eventually(lambda: redis_proxy.accepted > connections, "the listener did not reconnect")

        await refused_within(
            lambda: cache.authenticate(api_key, model=MODEL, client_ip=IP), AuthenticationError, 3.0
        )


async def test_the_cache_holds_at_most_max_entries_and_evicts_the_least_recently_used(
    auth: RunningAuth,
) -> None:
    counting = CountingAuth(auth.stub)
    cache = authenticator(counting, max_entries=2, fallback_ttl_s=300)
    keys = [(await new_key(auth, f"bounded-{i}"))[1] for i in range(3)]

    for key in (keys[0], keys[1], keys[0], keys[2]):  # keys[1] is then the least recently used
        await cache.authenticate(key, model=MODEL, client_ip=IP)
    assert (len(cache), counting.calls) == (2, 3)

    await cache.authenticate(keys[0], model=MODEL, client_ip=IP)
    await cache.authenticate(keys[2], model=MODEL, client_ip=IP)
    assert counting.calls == 3
    await cache.authenticate(keys[1], model=MODEL, client_ip=IP)
    assert (len(cache), counting.calls) == (2, 4)


async def test_refusals_are_not_cached_so_every_attempt_asks_auth(auth: RunningAuth) -> None:
    counting = CountingAuth(auth.stub)
    cache = authenticator(counting)
    unknown = "rg-" + "A" * 12 + "-" + "b" * 32
    for attempt in (1, 2):
        with pytest.raises(AuthenticationError):
            await cache.authenticate(unknown, model=MODEL, client_ip=IP)
        assert counting.calls == attempt
    assert len(cache) == 0
