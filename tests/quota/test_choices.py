"""A request asking for n completions holds the output cap n times (the prompt once), and is charged
what the provider reports for all of them."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidRequest
from services.quota.ledger import SETTLED, Ledger
from services.quota.pricing import PriceBook, Usage
from tests.quota.factories import funded_user, priced_model, reservation_id

# 1 unit per input token, 2 per output token, 100 per request (per million tokens: micro-units).
RATES = {"input_per_mtok": 1_000_000, "output_per_mtok": 2_000_000, "per_request": 100}


async def test_n_multiplies_the_output_cap_and_the_charge_follows_reported_usage(
    ledger: Ledger, prices: PriceBook
) -> None:
    model = await priced_model(prices, **RATES, default_max_output_tokens=500)
    user = await funded_user(ledger, 100_000)

    three = await ledger.reserve(
        reservation_id=(rid := reservation_id()),
        user_id=user,
        model=model.model,
        prompt_tokens=1000,
        max_output_tokens=1000,
        choices=3,
    )
    assert three.reserved_micros == 100 + 1000 + 3 * 1000 * 2
    # Without a cap of its own, the model's default cap is held once per choice too.
    default_cap = await ledger.reserve(
        reservation_id=reservation_id(), user_id=user, model=model.model, prompt_tokens=10, choices=4
    )
    assert default_cap.reserved_micros == 100 + 10 + 4 * 500 * 2

    # The provider reports the completions of all three choices: charged in full, not capped at one.
    outcome = await ledger.settle(rid, Usage(prompt_tokens=1000, completion_tokens=2500))
    assert (outcome.state, outcome.charged_micros, outcome.flags) == (SETTLED, 100 + 1000 + 5000, ())


async def test_choices_beyond_the_bound_are_refused(ledger: Ledger, prices: PriceBook) -> None:
    model = await priced_model(prices, **RATES)
    user = await funded_user(ledger, 100_000)
    with pytest.raises(InvalidRequest, match="choices"):
        await ledger.reserve(
            reservation_id=reservation_id(), user_id=user, model=model.model, prompt_tokens=1, choices=129
        )
