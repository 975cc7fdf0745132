"""Cost arithmetic (integer micro-units, one ceiling) and the versioned price book."""

from __future__ import annotations

import pytest

from services.common.clock import ManualClock
from services.common.db import Database
from services.common.errors import InvalidRequest, ModelNotFound
from services.quota.pricing import DEFAULT_MAX_OUTPUT_TOKENS, Price, PriceBook, Usage, cost, worst_case
from tests.quota.factories import priced_model

GPT = Price(model="m", input_per_mtok=2_500_000, output_per_mtok=10_000_000)


@pytest.mark.parametrize(
    ("price", "usage", "expected"),
    [
        pytest.param(GPT, Usage(), 0, id="zero usage, no per-request price: free"),
        pytest.param(Price("m", per_request=50), Usage(), 50, id="zero usage still pays per_request"),
        pytest.param(
            GPT, Usage(prompt_tokens=1000, completion_tokens=500), 7_500, id="exact: 2.5/Mtok in, 10/Mtok out"
        ),
        pytest.param(Price("m", input_per_mtok=1), Usage(prompt_tokens=1), 1, id="a fraction rounds up to 1"),
        pytest.param(
            Price("m", input_per_mtok=333_333), Usage(prompt_tokens=3), 1, id="999,999 / 1M rounds up to 1"
        ),
        pytest.param(
            Price("m", input_per_mtok=333_334), Usage(prompt_tokens=3), 2, id="1,000,002 / 1M rounds up to 2"
        ),
        pytest.param(
            Price("m", input_per_mtok=1, output_per_mtok=1),
            Usage(prompt_tokens=1, completion_tokens=1),
            1,
            id="one ceiling over the sum, not one per component",
        ),
        pytest.param(
            Price("m", input_per_mtok=2_000_000, cached_input_per_mtok=500_000),
            Usage(prompt_tokens=1000, cached_prompt_tokens=400),
            1_400,
            id="cached tokens at the cached price",
        ),
        pytest.param(
            Price("m", input_per_mtok=2_000_000),
            Usage(prompt_tokens=1000, cached_prompt_tokens=400),
            2_000,
            id="no cached price: cached tokens at the input price",
        ),
        pytest.param(
            Price("m", input_per_mtok=3, cached_input_per_mtok=1),
            Usage(prompt_tokens=1_000_001, cached_prompt_tokens=1),
            4,
            id="cached tokens share the one ceiling: 3,000,001 / 1M -> 4",
        ),
        pytest.param(
            Price("m", per_request=10, per_image=40_000),
            Usage(images=3),
            120_010,
            id="per image + per request",
        ),
        pytest.param(
            Price("m", input_per_mtok=3_000_000, cache_write_per_mtok=3_750_000),
            Usage(prompt_tokens=100, cache_write_tokens=1000),
            300 + 3_750,
            id="cache writes (outside the prompt count) at the cache-write price",
        ),
        pytest.param(
            Price("m", input_per_mtok=3_000_000),
            Usage(prompt_tokens=100, cache_write_tokens=1000),
            3_300,
            id="no cache-write price: cache writes at the input price",
        ),
        pytest.param(
            Price("m", output_per_mtok=10_000_000, reasoning_per_mtok=20_000_000),
            Usage(completion_tokens=1000, reasoning_tokens=400),
            6_000 + 8_000,
            id="reasoning (inside the output count) at the reasoning price",
        ),
        pytest.param(
            Price("m", output_per_mtok=10_000_000),
            Usage(completion_tokens=1000, reasoning_tokens=400),
            10_000,
            id="no reasoning price: reasoning at the output price",
        ),
        pytest.param(
            Price(
                "m",
                input_per_mtok=1,
                cached_input_per_mtok=1,
                cache_write_per_mtok=1,
                output_per_mtok=1,
                reasoning_per_mtok=1,
            ),
            Usage(
                prompt_tokens=2,
                cached_prompt_tokens=1,
                cache_write_tokens=1,
                completion_tokens=2,
                reasoning_tokens=1,
            ),
            1,
            id="every kind shares the one ceiling",
        ),
        pytest.param(
            Price("m", input_per_mtok=10**12, output_per_mtok=10**12),
            Usage(prompt_tokens=10**10, completion_tokens=10**10),
            2 * 10**16,
            id="largest accepted inputs stay exact",
        ),
    ],
)
def test_cost(price: Price, usage: Usage, expected: int) -> None:
    usage.validate()
    assert cost(price, usage) == expected
    assert isinstance(cost(price, usage), int)


def test_worst_case_uses_default_output_cap_when_max_output_is_zero() -> None:
    price = Price("m", input_per_mtok=1_000_000, output_per_mtok=2_000_000, default_max_output_tokens=100)
    assert worst_case(price, prompt_tokens=10, max_output_tokens=0, images=0) == 10 + 200
    assert worst_case(price, prompt_tokens=10, max_output_tokens=7, images=0) == 10 + 14


def test_worst_case_prices_each_kind_at_its_dearest_rate() -> None:
    """The split of the prompt (uncached, cached, written) and of the output (reasoning or not) is
    unknown when the hold is taken: a dearer cache write or reasoning price must not exceed it."""
    price = Price(
        "m",
        input_per_mtok=1_000_000,
        cache_write_per_mtok=1_250_000,
        output_per_mtok=2_000_000,
        reasoning_per_mtok=3_000_000,
    )
    bound = worst_case(price, prompt_tokens=1000, max_output_tokens=100, images=0)
    assert bound == 1_250 + 300
    # The dearest usage those estimates allow (every prompt token written, every output one reasoning).
    dearest = Usage(cache_write_tokens=1000, completion_tokens=100, reasoning_tokens=100)
    assert cost(price, dearest) == bound


def test_reported_usage_keeps_reasoning_within_the_output() -> None:
    usage = Usage.reported(10, 5, 0, 0, False, cache_write_tokens=-3, reasoning_tokens=9)
    usage.validate()
    assert (usage.cache_write_tokens, usage.reasoning_tokens) == (0, 5)


@pytest.mark.parametrize(
    "usage",
    [
        pytest.param(Usage(completion_tokens=1, reasoning_tokens=2), id="more reasoning than output"),
        pytest.param(Usage(cache_write_tokens=-1), id="negative cache writes"),
        pytest.param(Usage(prompt_tokens=-1), id="negative prompt"),
        pytest.param(Usage(completion_tokens=-5), id="negative completion"),
        pytest.param(Usage(prompt_tokens=5, cached_prompt_tokens=6), id="more cached than prompt"),
        pytest.param(Usage(images=10**7), id="absurd image count"),
    ],
)
def test_impossible_usage_is_refused(usage: Usage) -> None:
    with pytest.raises(InvalidRequest):
        usage.validate()


async def test_set_price_versions_rows_and_keeps_old_ones(prices: PriceBook) -> None:
    first = await priced_model(prices, per_request=7, default_max_output_tokens=0)
    assert first.price_id > 0
    assert first.default_max_output_tokens == DEFAULT_MAX_OUTPUT_TOKENS

    second = await prices.set_price(
        Price(first.model, input_per_mtok=5, output_per_mtok=6, cache_write_per_mtok=7, reasoning_per_mtok=8)
    )
    assert (second.cache_write_per_mtok, second.reasoning_per_mtok) == (7, 8)

    assert second.price_id > first.price_id
    assert await prices.current(first.model) == second
    # The old version is still there for charges that reserved at it.
    assert await prices.by_id(first.price_id) == first
    listed = {p.model: p for p in await prices.list_current()}
    assert listed[first.model] == second
    # The history has every version, newest first, each with when it was set.
    assert await prices.history(first.model) == [second, first]
    assert first.created_at > 0
    assert await prices.history("never-priced-model") == []


async def test_unpriced_model_is_model_not_found(prices: PriceBook) -> None:
    with pytest.raises(ModelNotFound, match="no price is configured for model 'nope-model'"):
        await prices.current("nope-model")


@pytest.mark.parametrize(
    "price",
    [
        pytest.param(Price(""), id="no model"),
        pytest.param(Price("m", input_per_mtok=-1), id="negative price"),
        pytest.param(Price("m", cache_write_per_mtok=-1), id="negative cache-write price"),
        pytest.param(Price("m", default_max_output_tokens=-1), id="negative output cap"),
    ],
)
async def test_invalid_price_is_refused(prices: PriceBook, price: Price) -> None:
    with pytest.raises(InvalidRequest):
        await prices.set_price(price)


async def test_other_processes_see_a_new_price_after_the_cache_ttl(database: Database) -> None:
    clock = ManualClock()
    writer = PriceBook(database, clock=clock, cache_ttl_s=2.0)
    other = PriceBook(database, clock=clock, cache_ttl_s=2.0)
    old = await priced_model(writer)
    assert await other.current(old.model) == old

    new = await writer.set_price(Price(old.model, input_per_mtok=9))

    assert await writer.current(old.model) == new
    assert await other.current(old.model) == old, "inside the TTL the other book answers from its cache"
    clock.advance(2.01)
    assert await other.current(old.model) == new


async def test_a_model_priced_by_another_process_is_served_at_once(database: Database) -> None:
    clock = ManualClock()
    writer = PriceBook(database, clock=clock, cache_ttl_s=60.0)
    other = PriceBook(database, clock=clock, cache_ttl_s=60.0)
    await other.list_current()  # the other book is loaded and fresh for a minute

    new = await priced_model(writer)
    assert await other.current(new.model) == new, "a miss reloads the book instead of refusing the model"
    newer = await priced_model(writer)
    assert await other.current(newer.model) == newer
    with pytest.raises(ModelNotFound):
        await other.current("never-priced")
