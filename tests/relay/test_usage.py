"""Usage read from answers, token estimates, and the headers built from them."""

from __future__ import annotations

import orjson
import pytest

from services.common.pb.relaygate.quota.v1.quota_pb2 import RateLimitWindow, ReserveResponse
from services.relay.meter.facts import ratelimit_facts, reset_text
from services.relay.meter.usage import (
    estimate_answer,
    estimate_chat_prompt,
    estimate_text_prompt,
    from_body,
    requested_choices,
)


def test_usage_is_found_at_the_end_of_a_large_body_without_parsing_it() -> None:
    body = orjson.dumps(
        {
            "data": [{"embedding": [0.5] * 20_000}],
            # Text that spells a usage object must not be mistaken for it.
            "note": '"usage": {"prompt_tokens": 999}',
            "usage": {"prompt_tokens": 12, "total_tokens": 12, "prompt_tokens_details": {"cached_tokens": 4}},
        }
    )
    usage = from_body(body)
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_prompt_tokens) == (12, 0, 4)


@pytest.mark.parametrize("body", [b"{}", b'{"usage": null}', b"not json", b'{"usage": {"prompt_tokens": }'])
def test_missing_or_broken_usage_is_none(body: bytes) -> None:
    assert from_body(body) is None


def test_estimates_are_upper_bounds_of_the_text() -> None:
    messages = [{"role": "user", "content": "héllo"}, {"role": "assistant", "tool_calls": [{"id": "x"}]}]
    assert estimate_chat_prompt(messages) >= len("héllo".encode()) + len(b'[{"id":"x"}]')
    assert estimate_chat_prompt(messages, {"tools": [{"type": "function"}]}) > estimate_chat_prompt(messages)
    assert estimate_text_prompt([1, 2, 3]) == 4
    assert estimate_text_prompt("abc") == 4


@pytest.mark.parametrize(
    ("milliseconds", "text"),
    [(0, b"0ms"), (20, b"20ms"), (1000, b"1s"), (1500, b"1.5s"), (360_000, b"6m0s"), (3_723_000, b"1h2m3s")],
)
def test_reset_durations_look_like_openais(milliseconds: int, text: bytes) -> None:
    assert reset_text(milliseconds) == text


def test_ratelimit_facts_only_for_the_windows_quota_reported() -> None:
    assert ratelimit_facts(ReserveResponse()) == []
    reservation = ReserveResponse(requests=RateLimitWindow(limit=60, remaining=59, reset_ms=1000))
    assert ratelimit_facts(reservation) == [
        (b"x-ratelimit-limit-requests", b"60"),
        (b"x-ratelimit-remaining-requests", b"59"),
        (b"x-ratelimit-reset-requests", b"1s"),
    ]


def test_an_unreported_answer_gets_a_marked_estimate() -> None:
    body = orjson.dumps({"choices": [{"message": {"content": "héllo wörld"}}, {"text": "abc"}]})
    usage = estimate_answer(body, prompt_tokens=12)
    assert usage.estimated
    assert (usage.prompt_tokens, usage.completion_tokens) == (12, len("héllo wörld".encode()) + 3)
    assert estimate_answer(b"not json", prompt_tokens=5).completion_tokens == 0


@pytest.mark.parametrize(
    ("body", "choices"),
    [({}, 1), ({"n": 3}, 3), ({"n": 2, "best_of": 5}, 5), ({"n": True}, 1), ({"n": 0}, 1), ({"n": "4"}, 1)],
)
def test_choices_asked_for_are_n_or_best_of(body: dict[str, object], choices: int) -> None:
    assert requested_choices(body) == choices
