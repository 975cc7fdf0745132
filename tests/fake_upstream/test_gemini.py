"""The fake upstream's Gemini API, spoken to by the official ``google-genai`` SDK and raw HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from google import genai
from google.genai import errors, types

from services.fake_upstream import FakeUpstream

SYSTEM = "Answer briefly please"  # 3 words
CONTENTS: list[Any] = [
    {"role": "user", "parts": [{"text": "What is the weather"}]},  # 4 words
    {"role": "model", "parts": [{"text": "Which city?"}]},  # 2 words
    {"role": "user", "parts": [{"text": "Paris"}, {"inlineData": {"mimeType": "image/png", "data": ""}}]},
]
PROMPT_TOKENS = 3 + 4 + 2 + 1 + len(CONTENTS)

WEATHER = types.FunctionDeclaration(
    name="weather",
    parameters=types.Schema(
        type=types.Type.OBJECT,
        properties={
            "city": types.Schema(type=types.Type.STRING),
            "days": types.Schema(type=types.Type.INTEGER),
        },
    ),
)
CLOCK = types.FunctionDeclaration(name="clock")
NO_AUTOMATIC_CALLS = types.AutomaticFunctionCallingConfig(disable=True)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(chunks=4, deterministic=True) as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh(upstream: FakeUpstream) -> None:
    upstream.reset()


@pytest.fixture
def client(upstream: FakeUpstream) -> genai.Client:
    options = types.HttpOptions(base_url=upstream.url, retry_options=types.HttpRetryOptions(attempts=1))
    return genai.Client(api_key="AIza-test", http_options=options)


def config(**extra: Any) -> types.GenerateContentConfig:
    return types.GenerateContentConfig(
        system_instruction=SYSTEM, automatic_function_calling=NO_AUTOMATIC_CALLS, **extra
    )


def generate(client: genai.Client, **extra: Any) -> types.GenerateContentResponse:
    return client.models.generate_content(model="gemini-fake", contents=CONTENTS, config=config(**extra))


def stream(client: genai.Client, **extra: Any) -> list[types.GenerateContentResponse]:
    return list(
        client.models.generate_content_stream(model="gemini-fake", contents=CONTENTS, config=config(**extra))
    )


def parts_of(response: types.GenerateContentResponse) -> list[types.Part]:
    (candidate,) = response.candidates or []
    return (candidate.content.parts if candidate.content else None) or []


def post_raw(upstream: FakeUpstream, url: str, body: Any = None, **headers: str) -> httpx.Response:
    body = {"contents": CONTENTS} if body is None else body
    return httpx.post(f"{upstream.url}{url}", json=body, headers=headers, timeout=5)


def error_of(response: httpx.Response) -> tuple[int, str]:
    error = response.json()["error"]
    assert error["code"] == response.status_code
    assert isinstance(error["message"], str) and error["message"]
    return response.status_code, error["status"]


def test_generate_text(client: genai.Client, upstream: FakeUpstream) -> None:
    response = generate(client)
    assert response.text == "tok0 tok1 tok2 tok3 "
    (candidate,) = response.candidates or []
    assert candidate.finish_reason == types.FinishReason.STOP
    assert candidate.content is not None and candidate.content.role == "model"
    usage = response.usage_metadata
    assert usage is not None
    assert (usage.prompt_token_count, usage.candidates_token_count) == (PROMPT_TOKENS, 4)
    assert usage.total_token_count == PROMPT_TOKENS + 4
    assert usage.cached_content_token_count is None and usage.thoughts_token_count is None
    assert response.model_version == "gemini-fake" and response.response_id
    last = upstream.stats()["last_request"]
    assert last is not None and last["path"].endswith("/models/gemini-fake:generateContent")
    assert last["headers"]["x-goog-api-key"] == "AIza-test"


def test_output_cap(client: genai.Client) -> None:
    response = generate(client, max_output_tokens=2)
    assert response.text == "tok0 tok1 "
    assert response.candidates and response.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS


def test_cached_and_thought_counts(client: genai.Client, upstream: FakeUpstream) -> None:
    upstream.configure(cached_tokens=5, reasoning_tokens=7, cache_write_tokens=3)
    usage = generate(client).usage_metadata
    assert usage is not None
    assert usage.prompt_token_count == PROMPT_TOKENS  # includes the cached tokens
    assert usage.cached_content_token_count == 5
    assert usage.candidates_token_count == 4  # excludes the thoughts
    assert usage.thoughts_token_count == 7
    assert usage.total_token_count == PROMPT_TOKENS + 4 + 7


def test_function_call(client: genai.Client, upstream: FakeUpstream) -> None:
    tools = [types.Tool(function_declarations=[WEATHER, CLOCK])]
    assert generate(client, tools=tools).function_calls is None
    upstream.configure(tool_call=True)
    response = generate(client, tools=tools)
    assert response.function_calls is not None
    (call,) = response.function_calls
    assert (call.name, call.args) == ("weather", {"city": "tok0", "days": 1})
    assert response.usage_metadata is not None and response.usage_metadata.candidates_token_count == 4 + 3
    forced = generate(
        client,
        tools=tools,
        tool_config=types.ToolConfig(
            function_calling_config=types.FunctionCallingConfig(
                mode=types.FunctionCallingConfigMode.ANY, allowed_function_names=["clock"]
            )
        ),
    )
    assert forced.function_calls is not None and [c.name for c in forced.function_calls] == ["clock"]
    declined = generate(
        client,
        tools=tools,
        tool_config=types.ToolConfig(
            function_calling_config=types.FunctionCallingConfig(mode=types.FunctionCallingConfigMode.NONE)
        ),
    )
    assert declined.function_calls is None


@pytest.mark.parametrize("tool_call", [False, True])
def test_stream_adds_up_to_the_whole_reply(
    client: genai.Client, upstream: FakeUpstream, tool_call: bool
) -> None:
    upstream.configure(tool_call=tool_call, cached_tokens=2, reasoning_tokens=3)
    tools = [types.Tool(function_declarations=[WEATHER])]
    whole = generate(client, tools=tools)
    chunks = stream(client, tools=tools)
    assert len(chunks) == 4 + tool_call
    streamed_parts = [part for chunk in chunks for part in parts_of(chunk)]
    text = "".join(part.text for part in streamed_parts if part.text)
    calls = [part.function_call for part in streamed_parts if part.function_call]
    assert text == whole.text
    assert calls == (whole.function_calls or [])
    assert [(chunk.candidates or [])[0].finish_reason for chunk in chunks] == [None] * (len(chunks) - 1) + [
        types.FinishReason.STOP
    ]
    # Every chunk carries the usage so far; the last one equals the whole reply's.
    counts = [
        chunk.usage_metadata.candidates_token_count if chunk.usage_metadata else None for chunk in chunks
    ]
    assert counts == [1, 2, 3, 4] + ([4 + 3] if tool_call else [])
    assert chunks[-1].usage_metadata == whole.usage_metadata
    assert upstream.stats()["completed_streams"] == 1


def test_sse_and_json_array_streams(upstream: FakeUpstream) -> None:
    upstream.configure(chunks=3)
    sse = post_raw(upstream, "/v1beta/models/g:streamGenerateContent?alt=sse&key=k")
    assert sse.status_code == 200 and sse.headers["content-type"] == "text/event-stream"
    events = [block for block in sse.text.split("\r\n\r\n") if block]
    assert all(event.startswith("data: ") for event in events)
    from_sse = [orjson.loads(event[6:]) for event in events]
    array = post_raw(upstream, "/v1beta/models/g:streamGenerateContent", **{"x-goog-api-key": "k"})
    assert array.status_code == 200 and array.headers["content-type"].startswith("application/json")
    assert array.text.startswith("[{") and array.text.endswith("}]")
    from_array = orjson.loads(array.text)
    assert [chunk["candidates"][0]["content"]["parts"] for chunk in from_array] == [
        [{"text": "tok0 "}],
        [{"text": "tok1 "}],
        [{"text": "tok2 "}],
    ]
    assert [chunk["candidates"] for chunk in from_array] == [chunk["candidates"] for chunk in from_sse]
    assert from_array[-1]["usageMetadata"]["candidatesTokenCount"] == 3
    # The same methods answer under /v1.
    assert post_raw(upstream, "/v1/models/g:generateContent?key=k").status_code == 200


def test_stream_dropped_midway(upstream: FakeUpstream) -> None:
    upstream.configure(drop_after_chunks=2, fail_count=1)
    with pytest.raises(httpx.RemoteProtocolError):
        post_raw(upstream, "/v1beta/models/g:streamGenerateContent?alt=sse&key=k")
    assert upstream.stats()["aborted_streams"] == 1


# Refusals, in Google's error shape.


def test_api_keys(upstream: FakeUpstream) -> None:
    path = "/v1beta/models/g:generateContent"
    assert error_of(post_raw(upstream, path)) == (403, "PERMISSION_DENIED")
    upstream.configure(api_key="right")
    assert error_of(post_raw(upstream, f"{path}?key=wrong")) == (400, "INVALID_ARGUMENT")
    assert error_of(post_raw(upstream, path, **{"x-goog-api-key": "wrong"})) == (400, "INVALID_ARGUMENT")
    assert post_raw(upstream, f"{path}?key=right").status_code == 200
    assert post_raw(upstream, path, **{"x-goog-api-key": "right"}).status_code == 200


def test_sdk_errors(client: genai.Client, upstream: FakeUpstream) -> None:
    upstream.configure(api_key="another")
    with pytest.raises(errors.ClientError) as refused:
        generate(client)
    assert (refused.value.code, refused.value.status) == (400, "INVALID_ARGUMENT")
    upstream.configure(api_key=None, strict_models=True)
    with pytest.raises(errors.ClientError) as missing:
        generate(client)
    assert (missing.value.code, missing.value.status) == (404, "NOT_FOUND")
    upstream.configure(strict_models=False, fail_status=503, fail_count=1)
    with pytest.raises(errors.ServerError) as unavailable:
        generate(client)
    assert (unavailable.value.code, unavailable.value.status) == (503, "UNAVAILABLE")
    assert generate(client).text


def test_resource_exhausted(client: genai.Client, upstream: FakeUpstream) -> None:
    upstream.configure(fail_status=429, fail_count=1, retry_after=9)
    with pytest.raises(errors.ClientError) as limited:
        generate(client)
    assert (limited.value.code, limited.value.status) == (429, "RESOURCE_EXHAUSTED")
    (detail,) = limited.value.details["error"]["details"]
    assert detail == {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "9s"}


def test_invalid_requests(upstream: FakeUpstream) -> None:
    path = "/v1beta/models/g:generateContent?key=k"
    assert error_of(post_raw(upstream, path, {"contents": []})) == (400, "INVALID_ARGUMENT")
    capped = {"contents": CONTENTS, "generationConfig": {"maxOutputTokens": 0}}
    assert error_of(post_raw(upstream, path, capped)) == (400, "INVALID_ARGUMENT")
    response = httpx.post(f"{upstream.url}{path}", content=b"[", timeout=5)
    assert error_of(response) == (400, "INVALID_ARGUMENT")
