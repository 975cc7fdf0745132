"""The fake upstream's OpenAI chat tool calls and cached / reasoning token details, through the
official ``openai`` SDK."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam, ChatCompletionToolParam

from services.fake_upstream import FakeUpstream

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "Be terse."},  # 2 words
    {"role": "user", "content": "Weather in Paris"},  # 3 words
]
PROMPT_TOKENS = 2 + 3 + len(MESSAGES)

WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "metric": {"type": "boolean"}},
        },
    },
}
CLOCK: ChatCompletionToolParam = {"type": "function", "function": {"name": "clock"}}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(chunks=3, deterministic=True) as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh(upstream: FakeUpstream) -> None:
    upstream.reset()


@pytest.fixture
def client(upstream: FakeUpstream) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=upstream.base_url, api_key="sk-test", max_retries=0, timeout=5) as sdk:
        yield sdk


def create(client: openai.OpenAI, **extra: Any) -> ChatCompletion:
    completion: ChatCompletion = client.chat.completions.create(model="gpt-fake", messages=MESSAGES, **extra)
    return completion


def functions_of(completion: ChatCompletion) -> list[tuple[str, str]]:
    """(name, arguments) of each function call in the reply."""
    calls = []
    for call in completion.choices[0].message.tool_calls or []:
        assert call.type == "function"
        calls.append((call.function.name, call.function.arguments))
    return calls


def test_tool_call(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    assert create(client, tools=[WEATHER]).choices[0].message.tool_calls is None
    upstream.configure(tool_call=True)
    choice = create(client, tools=[WEATHER, CLOCK]).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "tok0 tok1 tok2 "
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "weather"
    assert orjson.loads(call.function.arguments) == {"city": "tok0", "metric": True}
    usage = create(client, tools=[WEATHER]).usage
    assert usage is not None and usage.completion_tokens == 3 + 1 + 2


def test_tool_choice(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    upstream.configure(chunks=0)
    forced = create(
        client, tools=[WEATHER, CLOCK], tool_choice={"type": "function", "function": {"name": "clock"}}
    )
    message = forced.choices[0].message
    assert message.content is None  # no words before the call
    assert functions_of(forced) == [("clock", "{}")]
    required = create(client, tools=[WEATHER], tool_choice="required")
    assert required.choices[0].finish_reason == "tool_calls"
    upstream.configure(tool_call=True)
    assert create(client, tools=[WEATHER], tool_choice="none").choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError):
        create(client, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "missing"}})


@pytest.mark.parametrize("tool_call", [False, True])
def test_stream_matches_the_whole_reply(
    client: openai.OpenAI, upstream: FakeUpstream, tool_call: bool
) -> None:
    upstream.configure(tool_call=tool_call, cached_tokens=4, reasoning_tokens=5)
    whole = create(client, tools=[WEATHER])
    text = ""
    names: list[str] = []
    arguments = ""
    finishes: list[str | None] = []
    usage = None
    stream = client.chat.completions.create(
        model="gpt-fake",
        messages=MESSAGES,
        tools=[WEATHER],
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            finishes.append(choice.finish_reason)
            text += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                if delta.function and delta.function.name:
                    names.append(delta.function.name)
                arguments += (delta.function.arguments or "") if delta.function else ""
    message = whole.choices[0].message
    assert text == message.content
    whole_calls = functions_of(whole)
    assert names == [name for name, _ in whole_calls]
    assert arguments == "".join(json for _, json in whole_calls)
    assert len(names) == tool_call
    assert [reason for reason in finishes if reason] == [whole.choices[0].finish_reason]
    assert usage == whole.usage


def test_cached_and_reasoning_details(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    usage = create(client).usage
    assert usage is not None
    assert usage.prompt_tokens_details is None and usage.completion_tokens_details is None
    upstream.configure(cached_tokens=4, reasoning_tokens=5)
    usage = create(client).usage
    assert usage is not None
    assert usage.prompt_tokens == PROMPT_TOKENS  # includes the cached tokens
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 4
    assert usage.completion_tokens == 3 + 5  # includes the reasoning tokens
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 5
    assert usage.total_tokens == PROMPT_TOKENS + 8
    upstream.configure(cached_tokens=1000)
    usage = create(client).usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == PROMPT_TOKENS
