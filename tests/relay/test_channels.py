"""The channel table (selection order, de-duplication) and the pools that follow it."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import TypedDict, Unpack

import httpx
import pytest

from services.common.pb.relaygate.catalog.v1.catalog_pb2 import Channel as ChannelMessage
from services.fake_upstream import FakeUpstream
from services.relay.upstream.breaker import BreakerPolicy, Breakers, Outcome
from services.relay.upstream.channels import Channel, ChannelTable
from services.relay.upstream.pools import ChannelPools, PoolLimits
from services.relay.upstream.proxy import Upstreams


class ChannelFields(TypedDict, total=False):
    """The catalog's channel fields a test may set besides those :func:`channel` names."""

    api_key: str
    headers: dict[str, str]
    model_map: dict[str, str]
    max_connections: int


def channel(
    channel_id: str,
    *,
    priority: int = 0,
    weight: int = 1,
    base_url: str = "http://127.0.0.1:9/v1",
    models: Sequence[str] = ("m",),
    **fields: Unpack[ChannelFields],
) -> Channel:
    message = ChannelMessage(
        channel_id=channel_id,
        name=channel_id,
        base_url=base_url,
        models=list(models),
        priority=priority,
        weight=weight,
        **fields,
    )
    return Channel.from_message(message)


def test_priority_first_then_weight() -> None:
    channels = [channel("low", priority=0), channel("high", priority=5), channel("mid", priority=1)]
    table = ChannelTable(channels)
    assert [c.id for c in table.candidates("m")] == ["high", "mid", "low"]
    assert table.candidates("other") == []


def test_weights_spread_the_first_choice() -> None:
    table = ChannelTable([channel("heavy", weight=9), channel("light", weight=1)])
    firsts = collections.Counter(table.candidates("m")[0].id for _ in range(4000))
    assert 0.85 < firsts["heavy"] / 4000 < 0.95
    # Every candidate is still there, once, as a fallback.
    assert sorted(c.id for c in table.candidates("m")) == ["heavy", "light"]


def test_a_channel_is_a_candidate_once_however_it_is_listed() -> None:
    twice = channel("a", models=["m", "m"])
    table = ChannelTable([twice, channel("a"), channel("b")])
    ids = [c.id for c in table.candidates("m")]
    assert sorted(ids) == ["a", "b"]


def test_request_pieces_are_prebuilt() -> None:
    built = channel(
        "a",
        base_url="https://api.example.com:8443/openai/v1/",
        api_key="sk-secret",
        headers={"X-Org": "team", "Host": "spoofed"},
        model_map={"public": "private"},
    )
    assert built.path_prefix == b"/openai/v1"
    headers = dict(built.raw_headers)
    assert headers[b"host"] == b"api.example.com:8443"
    assert headers[b"authorization"] == b"Bearer sk-secret"
    assert headers[b"x-org"] == b"team"
    assert built.upstream_model("public") == "private"
    assert built.timeouts() == {"connect": 5.0, "read": 60.0, "write": 5.0, "pool": 5.0}


async def test_pools_are_kept_per_channel_and_retired_when_it_changes() -> None:
    with FakeUpstream() as upstream:
        pools = ChannelPools(PoolLimits(max_connections=50, max_keepalive=10))
        first = channel("a", base_url=upstream.base_url, max_connections=10)
        kept = pools.get(first)
        assert pools.get(first) is kept
        other = pools.get(channel("b", base_url=upstream.base_url))

        # "a" changes its connection limit, "b" leaves the table.
        pools.sync(ChannelTable([channel("a", base_url=upstream.base_url, max_connections=20)]))
        replaced = pools.get(channel("a", base_url=upstream.base_url, max_connections=20))
        assert replaced is not kept
        await asyncio.sleep(0.05)  # retiring pools with nothing in flight close at once
        for retired in (kept, other):
            async with httpx.AsyncClient(transport=retired) as client:
                with pytest.raises(httpx.ConnectError, match="closed"):
                    await client.get(f"{upstream.base_url}/models")
        async with httpx.AsyncClient(transport=replaced) as client:
            assert (await client.get(f"{upstream.base_url}/models")).status_code == 200
        await pools.aclose()


async def test_the_status_view_reports_breakers_and_pools() -> None:
    with FakeUpstream() as upstream:
        pools = ChannelPools(PoolLimits())
        breakers = Breakers(BreakerPolicy(min_requests=1, failure_ratio=1.0))
        upstreams = Upstreams(pools, breakers, max_attempts=2)
        used, unused = channel("used", base_url=upstream.base_url), channel("unused")
        async with httpx.AsyncClient(transport=pools.get(used)) as client:
            assert (await client.get(f"{upstream.base_url}/models")).status_code == 200
            breaker = breakers.get("used", "used")
            assert breaker.allow()
            breaker.record(Outcome.FAILURE)
            status = {s["channel_id"]: s for s in upstreams.status([used, unused])}
        assert status["used"]["breaker"] == "open" and status["used"]["connections"] == 1
        assert status["unused"] == {**status["unused"], "breaker": "closed", "connections": 0}
        await pools.aclose()
