"""Anthropic's Messages API and OpenAI's Responses API on the relay, through the official SDKs and the
whole stack, routed to an OpenAI-type channel (the fake upstream's chat endpoint): content, tool calls,
stop reasons, usage, and the exact charge in the request log and the balance. Errors in each format's
own shape, and nothing charged for a refused request."""

from __future__ import annotations

import time
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from services.common.pricing import Price, Usage, cost
from services.fake_upstream.thinking import redacted_data, signature_of
from tests.e2e.stack import PRICE, Deployment, balance, fund_user, ok, only_log_row

pytestmark = pytest.mark.shared_stack

# The module's own model on an OpenAI-type channel to the fake upstream (the shared deployment's model
# keeps its price), with cached and reasoning tokens priced apart, so a charge that ignored them would
# differ.
MODEL = "gpt-formats"
PRICES = {**PRICE, "cached_input_per_mtok": 500_000, "reasoning_per_mtok": 16_000_000}
# Any: the SDKs type their parameters as TypedDicts, which a plain dict literal does not match.
WEATHER: Any = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
}
WEATHER_FUNCTION: Any = {
    "type": "function",
    "name": WEATHER["name"],
    "description": WEATHER["description"],
    "parameters": WEATHER["input_schema"],
}


@pytest.fixture(scope="module")
def relay_env() -> dict[str, str]:
    # Each test reads its request's charge once nothing is held: exact reservations only.
    return {"RELAYGATE_CREDIT_LEASES": "false"}


@pytest.fixture(scope="module", autouse=True)
def _model(deployment: Deployment) -> None:
    with deployment.admin() as admin:
        channel = {"name": MODEL, "base_url": deployment.upstream.base_url, "models": [MODEL]}
        ok(admin.post("/admin/v1/channels", json={**channel, "enabled": True}))
        ok(admin.put(f"/admin/v1/prices/{MODEL}", json=PRICES))


@pytest.fixture(autouse=True)
def _fresh_upstream(deployment: Deployment) -> None:
    deployment.upstream.reset()


def claude(deployment: Deployment, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=deployment.relay_url, api_key=key, max_retries=0, timeout=10)


def responses_sdk(deployment: Deployment, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{deployment.relay_url}/v1", api_key=key, max_retries=0, timeout=10)


def expected_cost(prompt: int, completion: int, *, cached: int = 0, reasoning: int = 0) -> int:
    price = Price(
        model=MODEL,
        input_per_mtok=PRICES["input_per_mtok"],
        output_per_mtok=PRICES["output_per_mtok"],
        cached_input_per_mtok=PRICES["cached_input_per_mtok"],
        reasoning_per_mtok=PRICES["reasoning_per_mtok"],
    )
    usage = Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_prompt_tokens=cached,
        reasoning_tokens=reasoning,
    )
    return cost(price, usage)


def charged(deployment: Deployment, user_id: str, funded: int, timeout: float = 15.0) -> int:
    """What the user was charged once nothing is held any more."""
    deadline = time.monotonic() + timeout
    while (now := balance(deployment, user_id))["reserved_micros"]:
        assert time.monotonic() < deadline, f"still held: {now}"
        time.sleep(0.1)
    return funded - now["balance_micros"]


def assert_billed(deployment: Deployment, user_id: str, funded: int, endpoint: str, micros: int) -> None:
    row = only_log_row(deployment, user_id)
    assert row["endpoint"] == endpoint
    assert int(row["cost_micros"]) == micros
    assert charged(deployment, user_id, funded) == micros


FUNDS = 10_000_000


# --- Anthropic Messages ---------------------------------------------------------------------------


def test_messages_create_text_and_usage(deployment: Deployment) -> None:
    deployment.upstream.configure(chunks=6, cached_tokens=2, reasoning_tokens=3)
    user_id, key = fund_user(deployment, FUNDS)
    message = claude(deployment, key).messages.create(
        model=MODEL,
        max_tokens=100,
        system="You are terse.",
        messages=[{"role": "user", "content": [{"type": "text", "text": "say six words"}]}],
        stop_sequences=["never"],
        # SDK 2.x no longer offers the sampling parameters; older callers still send them.
        extra_body={"temperature": 0.5},
    )
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].type == "text"
    assert message.content[0].text.split() == [f"tok{i}" for i in range(6)]
    assert message.stop_reason == "end_turn"
    # The fake's chat prompt: 2 messages (system, user) + 3 + 3 words = 8 tokens, 2 of them cached,
    # which Anthropic reports apart from input_tokens; 6 words + 3 reasoning tokens of output.
    assert message.usage.input_tokens == 6
    assert message.usage.cache_read_input_tokens == 2
    assert message.usage.output_tokens == 9
    assert message.usage.output_tokens_details is not None
    assert message.usage.output_tokens_details.thinking_tokens == 3
    # The chat body the channel got: system first, the stop sequence and the sampling kept.
    sent = deployment.upstream.stats()["last_request"]["body"]  # type: ignore[index]
    assert sent["messages"][0] == {"role": "system", "content": "You are terse."}
    assert sent["stop"] == ["never"] and sent["temperature"] == 0.5 and sent["max_tokens"] == 100
    assert_billed(deployment, user_id, FUNDS, "messages", expected_cost(8, 9, cached=2, reasoning=3))


def test_messages_with_the_x_api_key_header_only(deployment: Deployment) -> None:
    # What a client without the SDK sends: the key as x-api-key, no bearer and no anthropic-version.
    deployment.upstream.configure(chunks=2)
    user_id, key = fund_user(deployment, FUNDS)
    response = httpx.post(
        f"{deployment.relay_url}/v1/messages",
        headers={"x-api-key": key},
        json={"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "hi there"}]},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    message = anthropic.types.Message.model_validate(response.json())
    assert message.content[0].type == "text" and message.content[0].text.split() == ["tok0", "tok1"]
    # 1 message + 2 words in, 2 words out.
    assert (message.usage.input_tokens, message.usage.output_tokens) == (3, 2)
    assert_billed(deployment, user_id, FUNDS, "messages", expected_cost(3, 2))


def test_messages_max_tokens_stop_reason(deployment: Deployment) -> None:
    _, key = fund_user(deployment, FUNDS)
    message = claude(deployment, key).messages.create(
        model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "go on"}]
    )
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 3


def test_messages_tool_use_round_trip(deployment: Deployment) -> None:
    user_id, key = fund_user(deployment, FUNDS)
    client = claude(deployment, key)
    question: anthropic.types.MessageParam = {"role": "user", "content": "weather in Paris?"}
    first = client.messages.create(
        model=MODEL,
        max_tokens=50,
        messages=[question],
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    assert first.stop_reason == "tool_use"
    call = first.content[-1]
    assert call.type == "tool_use" and call.name == "get_weather"
    assert isinstance(call.input, dict) and isinstance(call.input["city"], str)
    sent = deployment.upstream.stats()["last_request"]["body"]  # type: ignore[index]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent["tools"][0]["function"]["parameters"] == WEATHER["input_schema"]

    second = client.messages.create(
        model=MODEL,
        max_tokens=4,
        messages=[
            question,
            {"role": "assistant", "content": first.content},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}],
            },
        ],
        tools=[WEATHER],
    )
    assert second.stop_reason == "max_tokens"
    assert second.content[0].type == "text" and second.content[0].text.split() == [
        "tok0",
        "tok1",
        "tok2",
        "tok3",
    ]
    sent = deployment.upstream.stats()["last_request"]["body"]  # type: ignore[index]
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool"]
    assert sent["messages"][1]["tool_calls"][0]["id"] == call.id
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": call.id, "content": "sunny"}
    # By the fake's counts: 1 message + 3 words in, 20 words + the call (1 + 2 arguments) out; then
    # 3 messages of 3, 20 (the first answer's text) and 1 words in, 4 words out (the cap).
    assert (first.usage.input_tokens, first.usage.output_tokens) == (4, 23)
    assert (second.usage.input_tokens, second.usage.output_tokens) == (27, 4)
    with deployment.admin() as admin:
        deadline = time.monotonic() + 15
        while len(rows := admin.get("/admin/v1/logs", params={"user_id": user_id}).json()["logs"]) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    first_cost = expected_cost(4, 23)
    second_cost = expected_cost(27, 4)
    assert sorted(int(r["cost_micros"]) for r in rows) == sorted([first_cost, second_cost])
    assert charged(deployment, user_id, FUNDS) == first_cost + second_cost


def test_messages_stream_text_and_tool_use(deployment: Deployment) -> None:
    deployment.upstream.configure(chunks=5, tool_call=True, cached_tokens=1, reasoning_tokens=2)
    user_id, key = fund_user(deployment, FUNDS)
    with claude(deployment, key).messages.stream(
        model=MODEL,
        max_tokens=50,
        messages=[{"role": "user", "content": "think, then call"}],
        tools=[WEATHER],
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "input_json" in kinds and "text" in kinds
    assert [block.type for block in final.content] == ["text", "tool_use"]
    assert final.content[0].type == "text" and final.content[0].text.split() == [f"tok{i}" for i in range(5)]
    tool = final.content[1]
    assert tool.type == "tool_use" and tool.name == "get_weather" and isinstance(tool.input["city"], str)
    assert final.stop_reason == "tool_use"
    # 1 message + 3 words of prompt, 1 of them cached (Anthropic's input_tokens leaves it out); the
    # output is the 5 words, the call (1 + 2 arguments) and the 2 reasoning tokens.
    assert (final.usage.input_tokens, final.usage.cache_read_input_tokens) == (3, 1)
    assert final.usage.output_tokens == 10
    sent = deployment.upstream.stats()["last_request"]["body"]  # type: ignore[index]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert_billed(deployment, user_id, FUNDS, "messages", expected_cost(4, 10, cached=1, reasoning=2))


def test_messages_stream_events_arrive_as_chunks_do(deployment: Deployment) -> None:
    # Chunks 300 ms apart: each text delta reaches the caller long before the stream ends.
    deployment.upstream.configure(chunks=3, chunk_interval_ms=300)
    _, key = fund_user(deployment, FUNDS)
    arrivals: list[float] = []
    with claude(deployment, key).messages.stream(
        model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "slowly"}]
    ) as stream:
        for event in stream:
            if event.type == "content_block_delta":
                arrivals.append(time.monotonic())
        end = time.monotonic()
    assert len(arrivals) == 3
    assert end - arrivals[0] > 0.4


def test_stream_cut_mid_answer_ends_with_an_error_event(deployment: Deployment) -> None:
    # The role chunk and two words, then the connection drops: the words arrive, then the error.
    deployment.upstream.configure(chunks=6, drop_after_chunks=3)
    user_id, key = fund_user(deployment, FUNDS)
    texts: list[str] = []
    with (
        pytest.raises(anthropic.APIStatusError) as cut,
        claude(deployment, key).messages.stream(
            model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "then drop"}]
        ) as stream,
    ):
        texts.extend(stream.text_stream)
    assert "".join(texts).split() == ["tok0", "tok1"]
    assert cut.value.body == {
        "type": "error",
        "error": {"type": "api_error", "message": cut.value.body["error"]["message"]},  # type: ignore[index]
    }

    deployment.upstream.configure(chunks=6, drop_after_chunks=3)
    with responses_sdk(deployment, key).responses.stream(model=MODEL, input="then drop") as events:
        found = list(events)
    assert [e.delta for e in found if e.type == "response.output_text.delta"] == ["tok0 ", "tok1 "]
    assert found[-1].type == "error"
    assert [e.sequence_number for e in found] == list(range(len(found)))
    # Both settled, nothing held: what was delivered before the cut is billed (a marked estimate).
    assert charged(deployment, user_id, FUNDS) > 0


# --- Responses API --------------------------------------------------------------------------------


def test_responses_create_text_and_usage(deployment: Deployment) -> None:
    deployment.upstream.configure(chunks=4, cached_tokens=1, reasoning_tokens=2)
    user_id, key = fund_user(deployment, FUNDS)
    response = responses_sdk(deployment, key).responses.create(
        model=MODEL, instructions="Be brief.", input="four words please", max_output_tokens=20, store=False
    )
    assert response.status == "completed" and response.model == MODEL
    assert response.output_text.split() == ["tok0", "tok1", "tok2", "tok3"]
    assert response.id.startswith("resp_")
    usage = response.usage
    assert usage is not None
    # system + user messages: 2 + 2 + 3 words.
    assert (usage.input_tokens, usage.input_tokens_details.cached_tokens) == (7, 1)
    assert (usage.output_tokens, usage.output_tokens_details.reasoning_tokens) == (6, 2)
    assert_billed(deployment, user_id, FUNDS, "responses", expected_cost(7, 6, cached=1, reasoning=2))


def test_responses_function_calling_round_trip(deployment: Deployment) -> None:
    _, key = fund_user(deployment, FUNDS)
    client = responses_sdk(deployment, key)
    first = client.responses.create(
        model=MODEL,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "weather in Oslo"}]}],
        tools=[WEATHER_FUNCTION],
        tool_choice="required",
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    second = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "weather in Oslo"},
            {
                "type": "function_call",
                "call_id": calls[0].call_id,
                "name": "get_weather",
                "arguments": calls[0].arguments,
            },
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "rain"},
        ],
        tools=[WEATHER_FUNCTION],
        max_output_tokens=2,
    )
    assert second.status == "incomplete" and second.incomplete_details is not None
    assert second.incomplete_details.reason == "max_output_tokens"
    assert second.output_text.split() == ["tok0", "tok1"]
    sent = deployment.upstream.stats()["last_request"]["body"]  # type: ignore[index]
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool"]
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": calls[0].call_id, "content": "rain"}


def test_responses_stream_with_function_call(deployment: Deployment) -> None:
    deployment.upstream.configure(chunks=3, tool_call=True, cached_tokens=1, reasoning_tokens=2)
    user_id, key = fund_user(deployment, FUNDS)
    with responses_sdk(deployment, key).responses.stream(
        model=MODEL,
        input="call it",
        tools=[WEATHER_FUNCTION],
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds and "response.function_call_arguments.delta" in kinds
    assert final.output_text.split() == ["tok0", "tok1", "tok2"]
    call = final.output[-1]
    assert call.type == "function_call" and call.name == "get_weather" and '"city"' in call.arguments
    # 1 message + 2 words in, 1 cached; 3 words, the call (1 + 2 arguments) and 2 reasoning tokens out.
    usage = final.usage
    assert usage is not None
    assert (usage.input_tokens, usage.input_tokens_details.cached_tokens) == (3, 1)
    assert (usage.output_tokens, usage.output_tokens_details.reasoning_tokens) == (8, 2)
    assert_billed(deployment, user_id, FUNDS, "responses", expected_cost(3, 8, cached=1, reasoning=2))


# --- errors in each format's shape, nothing charged -----------------------------------------------


# A document without its source, which the SDK's types would not let through.
NO_SOURCE: Any = {}


def test_anthropic_error_shapes(deployment: Deployment) -> None:
    with pytest.raises(anthropic.AuthenticationError) as bad_key:
        claude(deployment, "rg-" + "A" * 40).messages.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert bad_key.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": bad_key.value.body["error"]["message"]},  # type: ignore[index]
    }
    user_id, key = fund_user(deployment, FUNDS)
    with pytest.raises(anthropic.BadRequestError) as bad_body:
        claude(deployment, key).messages.create(
            model=MODEL,
            max_tokens=5,
            messages=[{"role": "user", "content": [{"type": "document", "source": NO_SOURCE}]}],
        )
    assert bad_body.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    response = httpx.post(
        f"{deployment.relay_url}/v1/messages",
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "no cap"}]},
    )
    assert response.status_code == 400
    assert response.json()["error"] == {
        "type": "invalid_request_error",
        "message": "'max_tokens' is required.",
    }
    for hostile in (
        b"[",
        b"\xff\xfe",
        b"{" * 200 + b"}" * 200,
        b'{"model": "x", "max_tokens": 1, "messages": 5}',
    ):
        response = httpx.post(
            f"{deployment.relay_url}/v1/messages", headers={"x-api-key": key}, content=hostile
        )
        assert response.status_code == 400, hostile
        assert response.json()["type"] == "error"
    poor_id, poor = fund_user(deployment, 1)
    with pytest.raises(anthropic.RateLimitError) as spent:
        claude(deployment, poor).messages.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert spent.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert charged(deployment, user_id, FUNDS) == 0
    assert charged(deployment, poor_id, 1) == 0
    assert deployment.upstream.stats()["requests_total"] == 0


def test_responses_error_shapes(deployment: Deployment) -> None:
    with pytest.raises(openai.AuthenticationError) as bad_key:
        responses_sdk(deployment, "rg-" + "A" * 40).responses.create(model=MODEL, input="x")
    assert bad_key.value.code == "invalid_api_key"
    user_id, key = fund_user(deployment, FUNDS)
    client = responses_sdk(deployment, key)
    with pytest.raises(openai.BadRequestError) as stateful:
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_123")
    assert stateful.value.param == "previous_response_id" and "store=false" in stateful.value.message
    with pytest.raises(openai.BadRequestError) as stored:
        client.responses.create(model=MODEL, input="x", store=True)
    assert stored.value.param == "store"
    with pytest.raises(openai.BadRequestError) as builtin:
        client.responses.create(model=MODEL, input="x", tools=[{"type": "web_search"}])
    assert builtin.value.param == "tools"
    poor_id, poor = fund_user(deployment, 1)
    with pytest.raises(openai.RateLimitError) as spent:
        responses_sdk(deployment, poor).responses.create(model=MODEL, input="x")
    assert spent.value.code == "insufficient_quota"
    assert charged(deployment, user_id, FUNDS) == 0
    assert charged(deployment, poor_id, 1) == 0
    assert deployment.upstream.stats()["requests_total"] == 0


# --- routed to an Anthropic-type channel ----------------------------------------------------------

CLAUDE = "claude-inbound"
CLAUDE_KEY = "anthropic-channel-key"
CLAUDE_PRICE = {
    "input_per_mtok": 3_000_000,
    "cached_input_per_mtok": 300_000,
    "cache_write_per_mtok": 3_750_000,
    "output_per_mtok": 15_000_000,
    "reasoning_per_mtok": 20_000_000,
    "default_max_output_tokens": 64,
}
# "please tell me what the weather is like": 8 words + 1 message = 9 prompt tokens by the fake's
# Anthropic rule, of which 2 are read from the cache and 3 written to it; 4 are neither.
QUESTION = "please tell me what the weather is like"
UNCACHED, CACHED, WRITTEN, REASONING = 4, 2, 3, 5
# 4 words, then the call of WEATHER (1 token for the name, 1 per argument), plus the thinking tokens.
OUTPUT = 4 + 3 + REASONING


def claude_charge() -> int:
    price = Price(
        model=CLAUDE,
        input_per_mtok=CLAUDE_PRICE["input_per_mtok"],
        cached_input_per_mtok=CLAUDE_PRICE["cached_input_per_mtok"],
        cache_write_per_mtok=CLAUDE_PRICE["cache_write_per_mtok"],
        output_per_mtok=CLAUDE_PRICE["output_per_mtok"],
        reasoning_per_mtok=CLAUDE_PRICE["reasoning_per_mtok"],
    )
    # The record keeps cache writes apart from the prompt (see the channel types in README).
    usage = Usage(
        prompt_tokens=UNCACHED + CACHED,
        cached_prompt_tokens=CACHED,
        cache_write_tokens=WRITTEN,
        completion_tokens=OUTPUT,
        reasoning_tokens=REASONING,
    )
    return cost(price, usage)


@pytest.fixture(scope="module")
def anthropic_channel(deployment: Deployment) -> str:
    with deployment.admin() as admin:
        ok(
            admin.post(
                "/admin/v1/channels",
                json={
                    "name": CLAUDE,
                    "type": "anthropic",
                    "base_url": f"{deployment.upstream.url}/v1",
                    "api_key": CLAUDE_KEY,
                    "models": [CLAUDE],
                    "enabled": True,
                },
            )
        )
        ok(admin.put(f"/admin/v1/prices/{CLAUDE}", json=CLAUDE_PRICE))
    return CLAUDE


def configure_claude(deployment: Deployment) -> None:
    deployment.upstream.configure(
        chunks=4,
        tool_call=True,
        cached_tokens=CACHED,
        cache_write_tokens=WRITTEN,
        reasoning_tokens=REASONING,
        api_key=CLAUDE_KEY,
    )


def anthropic_request_seen(deployment: Deployment) -> dict[str, Any]:
    last = deployment.upstream.stats()["last_request"]
    assert last is not None and last["path"].endswith("/messages"), last
    body: dict[str, Any] = last["body"]
    return body


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_messages_routed_to_an_anthropic_channel(
    deployment: Deployment, anthropic_channel: str, stream: bool
) -> None:
    configure_claude(deployment)
    user_id, key = fund_user(deployment, FUNDS)
    request: dict[str, Any] = {
        "model": anthropic_channel,
        "max_tokens": 40,
        "messages": [{"role": "user", "content": QUESTION}],
        "tools": [WEATHER],
    }
    client = claude(deployment, key)
    if stream:
        with client.messages.stream(**request) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(**request)
    assert [block.type for block in message.content] == ["text", "tool_use"]
    assert message.content[0].type == "text" and message.content[0].text.split() == [
        "tok0",
        "tok1",
        "tok2",
        "tok3",
    ]
    call = message.content[1]
    assert (
        call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "tok0", "days": 1}
    )
    assert message.stop_reason == "tool_use"
    usage = message.usage
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (
        UNCACHED,
        CACHED,
        WRITTEN,
    )
    assert usage.output_tokens == OUTPUT
    # The channel got the Messages API from the chat body in between: the same turn and tool.
    seen = anthropic_request_seen(deployment)
    assert seen["messages"] == [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    assert seen["tools"][0]["name"] == "get_weather" and seen["max_tokens"] == 40
    assert_billed(deployment, user_id, FUNDS, "messages", claude_charge())


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_responses_routed_to_an_anthropic_channel(
    deployment: Deployment, anthropic_channel: str, stream: bool
) -> None:
    configure_claude(deployment)
    user_id, key = fund_user(deployment, FUNDS)
    client = responses_sdk(deployment, key)
    request: dict[str, Any] = {"model": anthropic_channel, "input": QUESTION, "tools": [WEATHER_FUNCTION]}
    if stream:
        with client.responses.stream(**request) as events:
            kinds = [event.type for event in events]
            response = events.get_final_response()
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        assert "response.function_call_arguments.delta" in kinds
    else:
        response = client.responses.create(**request)
    assert response.status == "completed"
    assert response.output_text.split() == ["tok0", "tok1", "tok2", "tok3"]
    call = response.output[-1]
    assert call.type == "function_call" and call.name == "get_weather"
    assert orjson.loads(call.arguments) == {"city": "tok0", "days": 1}
    usage = response.usage
    assert usage is not None
    # The Responses API counts cache reads and writes inside input_tokens.
    assert usage.input_tokens == UNCACHED + CACHED + WRITTEN
    assert usage.input_tokens_details.cached_tokens == CACHED
    assert (usage.output_tokens, usage.output_tokens_details.reasoning_tokens) == (OUTPUT, REASONING)
    assert anthropic_request_seen(deployment)["tools"][0]["name"] == "get_weather"
    assert_billed(deployment, user_id, FUNDS, "responses", claude_charge())


# --- thinking, cache marks and documents ----------------------------------------------------------

THINKING: Any = {"type": "enabled", "budget_tokens": 1024}
# What the fake thinks for REASONING tokens (one word per token), and signs.
THOUGHT = "".join(f"thought{i} " for i in range(REASONING))
PDF = "JVBERi0xLjQKJcOkw7zDtsOfCg=="


def thinking_request(model: str) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 2048,
        "thinking": THINKING,
        "system": [{"type": "text", "text": "You forecast.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": QUESTION}],
        "tools": [WEATHER],
    }


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_messages_thinking_through_an_anthropic_channel_and_back(
    deployment: Deployment, anthropic_channel: str, stream: bool
) -> None:
    configure_claude(deployment)
    user_id, key = fund_user(deployment, FUNDS)
    client = claude(deployment, key)
    request = thinking_request(anthropic_channel)
    if stream:
        with client.messages.stream(**request) as events:
            kinds = [(event.type, getattr(event, "delta", None)) for event in events]
            message = events.get_final_message()
        deltas = [delta.type for kind, delta in kinds if kind == "content_block_delta" and delta is not None]
        # Thinking, then its signature, before any text.
        assert deltas[: REASONING + 2] == [*["thinking_delta"] * REASONING, "signature_delta", "text_delta"]
    else:
        message = client.messages.create(**request)
    assert [block.type for block in message.content] == ["thinking", "text", "tool_use"]
    thought = message.content[0]
    assert thought.type == "thinking" and thought.thinking == THOUGHT
    assert thought.signature == signature_of(THOUGHT)
    seen = anthropic_request_seen(deployment)
    assert seen["thinking"] == THINKING
    assert seen["system"] == [
        {"type": "text", "text": "You forecast.", "cache_control": {"type": "ephemeral"}}
    ]
    # The system prompt's 2 words join the 9 of the question; the charge is the fake's counts.
    assert message.usage.input_tokens == UNCACHED + 2 and message.usage.output_tokens == OUTPUT
    call = message.content[2]
    assert call.type == "tool_use"

    # The tool turn continued: the fake, as Anthropic, refuses it unless the signed block comes back.
    turns: Any = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": message.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]},
    ]
    follow_up = client.messages.create(
        model=anthropic_channel, max_tokens=2048, thinking=THINKING, messages=turns, tools=[WEATHER]
    )
    assert follow_up.content[0].type == "thinking"
    turn = anthropic_request_seen(deployment)["messages"][1]
    assert turn["content"][0] == {"type": "thinking", "thinking": THOUGHT, "signature": thought.signature}
    with deployment.admin() as admin:
        deadline = time.monotonic() + 15
        while len(admin.get("/admin/v1/logs", params={"user_id": user_id}).json()["logs"]) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_messages_thinking_to_an_openai_channel(deployment: Deployment, stream: bool) -> None:
    # OpenAI refuses thinking, cache_control and thinking_blocks (so does the fake): none is sent.
    deployment.upstream.configure(chunks=3)
    user_id, key = fund_user(deployment, FUNDS)
    client = claude(deployment, key)
    request = thinking_request(MODEL)
    request["messages"] = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "t", "signature": "s"},
                {"type": "text", "text": "hello", "cache_control": {"type": "ephemeral"}},
            ],
        },
        {"role": "user", "content": "weather?"},
    ]
    if stream:
        with client.messages.stream(**request) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(**request)
    assert [block.type for block in message.content] == ["text"]
    sent = deployment.upstream.stats()["last_request"]["body"]  # type: ignore[index]
    assert "thinking" not in sent and b"cache_control" not in orjson.dumps(sent)
    assert sent["messages"][0] == {"role": "system", "content": [{"type": "text", "text": "You forecast."}]}
    assert sent["messages"][2] == {"role": "assistant", "content": [{"type": "text", "text": "hello"}]}
    # 4 messages of 2, 1, 1 and 1 words in, 3 words out.
    assert_billed(deployment, user_id, FUNDS, "messages", expected_cost(9, 3))


def test_a_pdf_document_to_an_anthropic_channel(deployment: Deployment, anthropic_channel: str) -> None:
    configure_claude(deployment)
    _, key = fund_user(deployment, FUNDS)
    message = claude(deployment, key).messages.create(
        model=anthropic_channel,
        max_tokens=40,
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "document",
                        "source": {"type": "base64", "media_type": "application/pdf", "data": PDF},
                        "cache_control": {"type": "ephemeral"},
                    },
                    {"type": "text", "text": QUESTION},
                ],
            }
        ],
    )
    assert message.content[0].type == "text"
    block = anthropic_request_seen(deployment)["messages"][0]["content"][0]
    assert block["type"] == "document" and block["cache_control"] == {"type": "ephemeral"}
    assert block["source"] == {"type": "base64", "media_type": "application/pdf", "data": PDF}


def reasoning_request(model: str) -> dict[str, Any]:
    return {
        "model": model,
        "input": QUESTION,
        "tools": [WEATHER_FUNCTION],
        "reasoning": {"effort": "low"},
        "max_output_tokens": 2048,
    }


def sent_back(response: openai.types.responses.Response, call_id: str) -> Any:
    """The next turn's input: the question, the output sent back (as a caller without stored
    responses does), and the call's result."""
    return [
        {"role": "user", "content": QUESTION},
        *[item.model_dump(exclude_none=True) for item in response.output],
        {"type": "function_call_output", "call_id": call_id, "output": "sunny"},
    ]


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_responses_reasoning_through_an_anthropic_channel_and_back(
    deployment: Deployment, anthropic_channel: str, stream: bool
) -> None:
    configure_claude(deployment)
    user_id, key = fund_user(deployment, FUNDS)
    client = responses_sdk(deployment, key)
    request = reasoning_request(anthropic_channel)
    if stream:
        with client.responses.stream(**request) as events:
            kinds = [event.type for event in events]
            response = events.get_final_response()
        assert kinds[2:4] == ["response.output_item.added", "response.reasoning_summary_part.added"]
        assert "response.reasoning_summary_text.done" in kinds
    else:
        response = client.responses.create(**request)
    assert [item.type for item in response.output] == ["reasoning", "message", "function_call"]
    reasoning = response.output[0]
    assert reasoning.type == "reasoning" and [part.text for part in reasoning.summary] == [THOUGHT]
    assert reasoning.encrypted_content == signature_of(THOUGHT)
    # low effort: Anthropic's smallest budget.
    assert anthropic_request_seen(deployment)["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert_billed(deployment, user_id, FUNDS, "responses", claude_charge())

    call = response.output[2]
    assert call.type == "function_call"
    follow_up = client.responses.create(
        model=anthropic_channel,
        input=sent_back(response, call.call_id),
        tools=[WEATHER_FUNCTION],
        reasoning={"effort": "low"},
        max_output_tokens=2048,
    )
    assert follow_up.status == "completed"
    turn = anthropic_request_seen(deployment)["messages"][1]
    assert turn["content"][0] == {"type": "thinking", "thinking": THOUGHT, "signature": signature_of(THOUGHT)}


# --- /v1/messages/count_tokens --------------------------------------------------------------------


def test_count_tokens_is_the_anthropic_channels_count(deployment: Deployment, anthropic_channel: str) -> None:
    configure_claude(deployment)
    user_id, key = fund_user(deployment, FUNDS)
    system: Any = [{"type": "text", "text": "You forecast.", "cache_control": {"type": "ephemeral"}}]
    question: Any = [{"role": "user", "content": QUESTION}]
    counted = claude(deployment, key).messages.count_tokens(
        model=anthropic_channel, system=system, messages=question, thinking=THINKING, tools=[WEATHER]
    )
    # The fake's count: the system prompt's 2 words, the question's 8 and 1 for its message.
    assert counted.input_tokens == 11
    last = deployment.upstream.stats()["last_request"]
    assert last is not None and last["path"].endswith("/messages/count_tokens"), last
    # What the channel would get for the message, less what counting refuses.
    assert set(last["body"]) == {"model", "system", "messages", "tools", "thinking"}
    assert last["body"]["system"] == system
    # Not held, not charged, not logged.
    assert charged(deployment, user_id, FUNDS) == 0
    with deployment.admin() as admin:
        assert admin.get("/admin/v1/logs", params={"user_id": user_id}).json()["logs"] == []


def test_count_tokens_without_an_anthropic_channel_says_why(deployment: Deployment) -> None:
    _, key = fund_user(deployment, FUNDS)
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude(deployment, key).messages.count_tokens(
            model=MODEL, messages=[{"role": "user", "content": "x"}]
        )
    assert refused.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": refused.value.body["error"]["message"]},  # type: ignore[index]
    }
    assert "no tokenizer" in refused.value.message
    with pytest.raises(anthropic.AuthenticationError):
        claude(deployment, "rg-" + "A" * 40).messages.count_tokens(
            model=MODEL, messages=[{"role": "user", "content": "x"}]
        )
    assert deployment.upstream.stats()["requests_total"] == 0


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_redacted_thinking_through_both_formats_and_back(
    deployment: Deployment, anthropic_channel: str, stream: bool
) -> None:
    deployment.upstream.configure(
        chunks=2, tool_call=True, reasoning_tokens=REASONING, redacted_thinking=True
    )
    _, key = fund_user(deployment, FUNDS)
    sealed = redacted_data(THOUGHT)
    request = thinking_request(anthropic_channel)
    if stream:
        with claude(deployment, key).messages.stream(**request) as events:
            message = events.get_final_message()
    else:
        message = claude(deployment, key).messages.create(**request)
    assert [block.type for block in message.content] == ["redacted_thinking", "text", "tool_use"]
    assert message.content[0].type == "redacted_thinking" and message.content[0].data == sealed

    client = responses_sdk(deployment, key)
    asked = reasoning_request(anthropic_channel)
    if stream:
        with client.responses.stream(**asked) as events:
            response = events.get_final_response()
    else:
        response = client.responses.create(**asked)
    reasoning = response.output[0]
    assert reasoning.type == "reasoning" and reasoning.summary == []
    assert reasoning.encrypted_content == "redacted_thinking:" + sealed
    call = response.output[-1]
    assert call.type == "function_call"
    client.responses.create(
        model=anthropic_channel,
        input=sent_back(response, call.call_id),
        tools=[WEATHER_FUNCTION],
        max_output_tokens=2048,
    )
    turn = anthropic_request_seen(deployment)["messages"][1]
    assert turn["content"][0] == {"type": "redacted_thinking", "data": sealed}
