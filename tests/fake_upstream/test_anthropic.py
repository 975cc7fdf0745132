"""The fake upstream's Anthropic Messages API, spoken to by the official ``anthropic`` SDK."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import orjson
import pytest
from anthropic.types import Message, ToolParam

from services.fake_upstream import FakeUpstream

SYSTEM = "You are terse."  # 3 words
MESSAGES: list[Any] = [
    {"role": "user", "content": "What is the weather"},  # 4 words
    {"role": "assistant", "content": [{"type": "text", "text": "Which city?"}]},  # 2 words
    {"role": "user", "content": [{"type": "text", "text": "Paris"}]},  # 1 word
]
PROMPT_TOKENS = 3 + 4 + 2 + 1 + len(MESSAGES)

WEATHER_TOOL: ToolParam = {
    "name": "weather",
    "description": "Current weather of a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
}
CLOCK_TOOL: ToolParam = {"name": "clock", "input_schema": {"type": "object", "properties": {}}}

HEADERS = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(chunks=4, deterministic=True) as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh(upstream: FakeUpstream) -> None:
    upstream.reset()


@pytest.fixture
def client(upstream: FakeUpstream) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=upstream.url, api_key="sk-ant-test", max_retries=0, timeout=5) as sdk:
        yield sdk


def create(client: anthropic.Anthropic, **extra: Any) -> Message:
    message: Message = client.messages.create(
        model="claude-fake", max_tokens=1000, system=SYSTEM, messages=MESSAGES, **extra
    )
    return message


def streamed(client: anthropic.Anthropic, **extra: Any) -> Message:
    """The message the SDK assembles from the stream, as a plain ``Message``."""
    with client.messages.stream(
        model="claude-fake", max_tokens=1000, system=SYSTEM, messages=MESSAGES, **extra
    ) as stream:
        for _event in stream:
            pass
        final = stream.get_final_message()
    return Message.model_validate(final.model_dump(exclude_none=True))


def raw_events(upstream: FakeUpstream, body: dict[str, Any]) -> list[tuple[str, Any]]:
    response = httpx.post(f"{upstream.url}/v1/messages", json=body, headers=HEADERS, timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    events = []
    for block in response.text.split("\n\n"):
        if block:
            name_line, data_line = block.split("\n")
            assert name_line.startswith("event: ") and data_line.startswith("data: ")
            payload = orjson.loads(data_line[6:])
            assert payload["type"] == name_line[7:]
            events.append((payload["type"], payload))
    return events


def test_create_text(client: anthropic.Anthropic, upstream: FakeUpstream) -> None:
    message = create(client)
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    assert message.model == "claude-fake"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].type == "text" and message.content[0].text == "tok0 tok1 tok2 tok3 "
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    usage = message.usage
    assert (usage.input_tokens, usage.output_tokens) == (PROMPT_TOKENS, 4)
    assert (usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (0, 0)
    assert usage.output_tokens_details is None
    last = upstream.stats()["last_request"]
    assert last is not None and last["path"] == "/v1/messages"
    # SDK 2.x sends its API key as a bearer token; x-api-key is covered by the raw requests below.
    assert last["headers"]["authorization"] == "Bearer sk-ant-test"


def test_max_tokens_cuts_the_reply(client: anthropic.Anthropic, upstream: FakeUpstream) -> None:
    upstream.configure(tool_call=True)
    message = client.messages.create(model="m", max_tokens=2, messages=MESSAGES, tools=[WEATHER_TOOL])
    assert message.stop_reason == "max_tokens"
    assert [block.type for block in message.content] == ["text"]  # no room left for the call
    assert message.usage.output_tokens == 2


def test_cache_and_thinking_counts(client: anthropic.Anthropic, upstream: FakeUpstream) -> None:
    upstream.configure(cached_tokens=5, cache_write_tokens=4, reasoning_tokens=7)
    usage = create(client).usage
    assert usage.cache_read_input_tokens == 5
    assert usage.cache_creation_input_tokens == 4
    assert usage.input_tokens == PROMPT_TOKENS - 9  # the API's input_tokens excludes both
    assert usage.output_tokens == 4 + 7  # thinking is billed as output
    assert usage.output_tokens_details is not None and usage.output_tokens_details.thinking_tokens == 7
    # Caps: the cache cannot hold more than the prompt.
    upstream.configure(cached_tokens=PROMPT_TOKENS - 1, cache_write_tokens=100)
    usage = create(client).usage
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (
        0,
        PROMPT_TOKENS - 1,
        1,
    )


def test_tool_use(client: anthropic.Anthropic, upstream: FakeUpstream) -> None:
    assert [block.type for block in create(client, tools=[WEATHER_TOOL]).content] == ["text"]
    upstream.configure(tool_call=True)
    message = create(client, tools=[WEATHER_TOOL, CLOCK_TOOL])
    assert message.stop_reason == "tool_use"
    text, call = message.content
    assert text.type == "text" and text.text == "tok0 tok1 tok2 tok3 "
    assert call.type == "tool_use" and call.id.startswith("toolu_")
    assert (call.name, call.input) == ("weather", {"city": "tok0", "days": 1})
    assert message.usage.output_tokens == 4 + 1 + 2  # words, the call's name, its two arguments
    # A request without tools gets text even when tool calls are on.
    assert create(client).stop_reason == "end_turn"


def test_tool_choice(client: anthropic.Anthropic, upstream: FakeUpstream) -> None:
    forced = create(client, tools=[WEATHER_TOOL, CLOCK_TOOL], tool_choice={"type": "tool", "name": "clock"})
    assert forced.stop_reason == "tool_use"
    assert forced.content[-1].type == "tool_use" and forced.content[-1].name == "clock"
    assert forced.content[-1].input == {}
    any_tool = create(client, tools=[WEATHER_TOOL], tool_choice={"type": "any"})
    assert any_tool.content[-1].type == "tool_use" and any_tool.content[-1].name == "weather"
    upstream.configure(tool_call=True)
    declined = create(client, tools=[WEATHER_TOOL], tool_choice={"type": "none"})
    assert declined.stop_reason == "end_turn"
    with pytest.raises(anthropic.BadRequestError):
        create(client, tools=[WEATHER_TOOL], tool_choice={"type": "tool", "name": "missing"})


@pytest.mark.parametrize("tool_call", [False, True])
def test_stream_assembles_the_same_message(
    client: anthropic.Anthropic, upstream: FakeUpstream, tool_call: bool
) -> None:
    upstream.configure(tool_call=tool_call, cached_tokens=2, cache_write_tokens=1, reasoning_tokens=3)
    created = create(client, tools=[WEATHER_TOOL])
    assert streamed(client, tools=[WEATHER_TOOL]) == created
    assert created.stop_reason == ("tool_use" if tool_call else "end_turn")
    stats = upstream.stats()
    assert (stats["completed_streams"], stats["aborted_streams"]) == (1, 0)


def test_stream_event_sequence(upstream: FakeUpstream) -> None:
    upstream.configure(chunks=2, tool_call=True)
    body = {"model": "m", "max_tokens": 50, "messages": MESSAGES, "tools": [WEATHER_TOOL], "stream": True}
    events = raw_events(upstream, body)
    assert [kind for kind, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == PROMPT_TOKENS - 3  # no system prompt here
    assert events[1][1]["content_block"] == {"type": "text", "text": ""}
    assert [payload["delta"] for _, payload in events[3:5]] == [
        {"type": "text_delta", "text": "tok0 "},
        {"type": "text_delta", "text": "tok1 "},
    ]
    tool_block = events[6][1]
    assert tool_block["index"] == 1
    assert tool_block["content_block"]["type"] == "tool_use" and tool_block["content_block"]["input"] == {}
    pieces = [payload["delta"] for _, payload in events[7:10]]
    assert all(piece["type"] == "input_json_delta" for piece in pieces)
    assert orjson.loads("".join(piece["partial_json"] for piece in pieces)) == {"city": "tok0", "days": 1}
    delta = events[11][1]
    assert delta["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 2 + 3


def test_stream_is_paced_per_delta(client: anthropic.Anthropic, upstream: FakeUpstream) -> None:
    # 2 text deltas + 3 input_json deltas, 60 ms each: at least 0.3 s; the other events are not paced.
    upstream.configure(chunks=2, tool_call=True, chunk_interval_ms=60)
    began = time.monotonic()
    message = streamed(client, tools=[WEATHER_TOOL])
    assert time.monotonic() - began >= 0.25  # timers may fire a little early; unpaced it takes ~10 ms
    assert message.stop_reason == "tool_use"


def test_stream_dropped_midway(upstream: FakeUpstream) -> None:
    upstream.configure(drop_after_chunks=4, fail_count=1)
    body = {"model": "m", "max_tokens": 50, "messages": MESSAGES, "stream": True}
    with pytest.raises(httpx.RemoteProtocolError):
        raw_events(upstream, body)
    assert upstream.stats()["aborted_streams"] == 1
    assert raw_events(upstream, body)[-1][0] == "message_stop"


def test_count_tokens(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(model="claude-fake", system=SYSTEM, messages=MESSAGES)
    assert counted.input_tokens == PROMPT_TOKENS


# Refusals, in Anthropic's error shape.


def post_raw(upstream: FakeUpstream, headers: dict[str, str], body: Any = None) -> httpx.Response:
    body = {"model": "m", "max_tokens": 5, "messages": MESSAGES} if body is None else body
    return httpx.post(f"{upstream.url}/v1/messages", json=body, headers=headers, timeout=5)


def error_of(response: httpx.Response) -> tuple[int, str]:
    body = response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    return response.status_code, body["error"]["type"]


def test_credentials_and_version(upstream: FakeUpstream) -> None:
    assert error_of(post_raw(upstream, {"anthropic-version": "2023-06-01"})) == (401, "authentication_error")
    assert error_of(post_raw(upstream, {"x-api-key": "k"})) == (400, "invalid_request_error")
    assert error_of(post_raw(upstream, {"x-api-key": "k", "anthropic-version": "v1"})) == (
        400,
        "invalid_request_error",
    )
    assert (
        post_raw(upstream, {"authorization": "Bearer k", "anthropic-version": "2023-06-01"}).status_code
        == 200
    )
    upstream.configure(api_key="right")
    assert error_of(post_raw(upstream, HEADERS)) == (401, "authentication_error")
    assert post_raw(upstream, {**HEADERS, "x-api-key": "right"}).status_code == 200


def test_sdk_raises_typed_errors(client: anthropic.Anthropic, upstream: FakeUpstream) -> None:
    upstream.configure(api_key="another")
    with pytest.raises(anthropic.AuthenticationError) as refused:
        create(client)
    assert refused.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid x-api-key"},
    }
    upstream.configure(api_key=None, strict_models=True)
    with pytest.raises(anthropic.NotFoundError):
        create(client)
    upstream.configure(strict_models=False, fail_status=529, fail_count=1)
    with pytest.raises(anthropic.OverloadedError) as overloaded:
        create(client)
    assert overloaded.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert create(client).stop_reason == "end_turn"


def test_rate_limit_headers(client: anthropic.Anthropic, upstream: FakeUpstream) -> None:
    upstream.configure(fail_status=429, fail_count=1, retry_after=7)
    with pytest.raises(anthropic.RateLimitError) as limited:
        create(client)
    headers = limited.value.response.headers
    assert headers["retry-after"] == "7"
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert int(headers["anthropic-ratelimit-requests-limit"]) > 0
    assert headers["anthropic-ratelimit-requests-reset"].endswith("Z")
    assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


def test_invalid_requests(upstream: FakeUpstream) -> None:
    no_max_tokens = {"model": "m", "messages": MESSAGES}
    assert error_of(post_raw(upstream, HEADERS, no_max_tokens)) == (400, "invalid_request_error")
    assert error_of(post_raw(upstream, HEADERS, {"model": "m", "max_tokens": 5, "messages": []})) == (
        400,
        "invalid_request_error",
    )
    response = httpx.post(f"{upstream.url}/v1/messages", content=b"{", headers=HEADERS, timeout=5)
    assert error_of(response) == (400, "invalid_request_error")
    response = httpx.get(f"{upstream.url}/v1/messages", headers=HEADERS, timeout=5)
    assert error_of(response) == (405, "invalid_request_error")
    assert response.headers["allow"] == "POST"
