"""The fake upstream's reasoning, prompt caching and documents, read by the official SDKs: Anthropic's
signed thinking blocks (answer and stream) and what the API refuses with thinking on, Gemini's thought
parts and function-call thought signatures, PDFs for both."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import Message, ToolParam
from google import genai
from google.genai import errors, types

from services.fake_upstream import FakeUpstream

PDF = base64.b64encode(b"%PDF-1.4\n%fake\n").decode()
QUESTION: list[Any] = [{"role": "user", "content": "What is the weather in Paris"}]
WEATHER: ToolParam = {
    "name": "weather",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
THINKING: dict[str, Any] = {"type": "enabled", "budget_tokens": 1024}
THOUGHTS = "thought0 thought1 thought2 "


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(chunks=2, deterministic=True) as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh(upstream: FakeUpstream) -> None:
    upstream.reset()
    upstream.configure(reasoning_tokens=3)


@pytest.fixture
def claude(upstream: FakeUpstream) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=upstream.url, api_key="sk-ant-test", max_retries=0, timeout=5) as sdk:
        yield sdk


@pytest.fixture
def gemini(upstream: FakeUpstream) -> genai.Client:
    options = types.HttpOptions(base_url=upstream.url, retry_options=types.HttpRetryOptions(attempts=1))
    return genai.Client(api_key="AIza-test", http_options=options)


def create(client: anthropic.Anthropic, messages: list[Any] = QUESTION, **extra: Any) -> Message:
    message: Message = client.messages.create(
        model="claude-fake", max_tokens=2000, messages=messages, **extra
    )
    return message


def streamed(client: anthropic.Anthropic, **extra: Any) -> tuple[Message, list[str]]:
    """The message the SDK assembles from the stream, and the SDK's event types."""
    with client.messages.stream(model="claude-fake", max_tokens=2000, messages=QUESTION, **extra) as stream:
        events: list[str] = [event.type for event in stream]
        final = stream.get_final_message()
    return Message.model_validate(final.model_dump(exclude_none=True)), events


def test_anthropic_thinking_block_answer_and_stream(claude: anthropic.Anthropic) -> None:
    message = create(claude, thinking=THINKING)
    assert [block.type for block in message.content] == ["thinking", "text"]
    block = message.content[0]
    assert block.type == "thinking" and block.thinking == THOUGHTS and block.signature
    assert message.usage.output_tokens == 2 + 3
    # The SDK assembles the same blocks from thinking_delta and signature_delta events.
    assembled, events = streamed(claude, thinking=THINKING)
    assert assembled.content == message.content
    assert events.count("thinking") == 3 and events.count("signature") == 1
    # Adaptive thinking thinks too; disabled thinking and no thinking do not.
    assert create(claude, thinking={"type": "adaptive"}).content[0].type == "thinking"
    assert [b.type for b in create(claude, thinking={"type": "disabled"}).content] == ["text"]
    assert [b.type for b in create(claude).content] == ["text"]


def test_anthropic_redacted_thinking(claude: anthropic.Anthropic, upstream: FakeUpstream) -> None:
    upstream.configure(redacted_thinking=True)
    message = create(claude, thinking=THINKING)
    block = message.content[0]
    assert block.type == "redacted_thinking" and block.data
    assert streamed(claude, thinking=THINKING)[0].content == message.content


@pytest.mark.parametrize(
    ("extra", "refusal"),
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 1000}}, "greater than or equal to 1024"),
        ({"thinking": {"type": "enabled", "budget_tokens": 2000}}, "`max_tokens` must be greater"),
        # The SDK no longer has the sampling parameters (newer models refuse them outright): sent raw.
        ({"thinking": THINKING, "extra_body": {"temperature": 0.5}}, "`temperature` may only be set to 1"),
        ({"thinking": THINKING, "extra_body": {"top_k": 5}}, "`top_k` must be unset"),
        ({"thinking": THINKING, "extra_body": {"top_p": 0.5}}, "`top_p` must be >= 0.95"),
        ({"thinking": THINKING, "tools": [WEATHER], "tool_choice": {"type": "any"}}, "forces tool use"),
        ({"thinking": {"type": "sometimes"}}, "does not match any of the expected tags"),
    ],
)
def test_anthropic_refuses_what_thinking_cannot_take(
    claude: anthropic.Anthropic, extra: dict[str, Any], refusal: str
) -> None:
    with pytest.raises(anthropic.BadRequestError, match=refusal) as raised:
        create(claude, **extra)
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["error"]["type"] == "invalid_request_error"


def test_anthropic_takes_what_thinking_allows(claude: anthropic.Anthropic) -> None:
    message = create(claude, thinking=THINKING, tools=[WEATHER], extra_body={"temperature": 1, "top_p": 0.95})
    assert message.content[0].type == "thinking"


def test_anthropic_tool_turn_continued_with_its_thinking_block(
    claude: anthropic.Anthropic, upstream: FakeUpstream
) -> None:
    upstream.configure(tool_call=True)
    first = create(claude, thinking=THINKING, tools=[WEATHER])
    assert [block.type for block in first.content] == ["thinking", "text", "tool_use"]
    thinking, text, call = (block.model_dump(exclude_none=True) for block in first.content)
    result: dict[str, Any] = {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "sunny"}],
    }

    def continued(*blocks: dict[str, Any]) -> Message:
        turn: list[Any] = [*QUESTION, {"role": "assistant", "content": list(blocks)}, result]
        return create(claude, turn, thinking=THINKING, tools=[WEATHER])

    assert continued(thinking, text, call).content[0].type == "thinking"
    with pytest.raises(anthropic.BadRequestError, match="must start with a thinking block"):
        continued(text, call)
    unsigned = {key: value for key, value in thinking.items() if key != "signature"}
    with pytest.raises(anthropic.BadRequestError, match="signature: Field required"):
        continued(unsigned, text, call)
    with pytest.raises(anthropic.BadRequestError, match="Invalid `signature`"):
        continued({**thinking, "thinking": "something else"}, text, call)
    # Without thinking the turn needs no thinking block.
    turn: list[Any] = [*QUESTION, {"role": "assistant", "content": [call]}, result]
    assert create(claude, turn, tools=[WEATHER]).content[0].type == "text"


def test_anthropic_cache_breakpoints_and_documents(
    claude: anthropic.Anthropic, upstream: FakeUpstream
) -> None:
    upstream.configure(cached_tokens=2, cache_write_tokens=3)
    marked = {"type": "ephemeral"}
    messages: list[Any] = [
        {
            "role": "user",
            "content": [
                {
                    "type": "document",
                    "source": {"type": "base64", "media_type": "application/pdf", "data": PDF},
                },
                {
                    "type": "text",
                    "text": "summarise this",
                    "cache_control": {"type": "ephemeral", "ttl": "1h"},
                },
            ],
        }
    ]
    message = create(
        claude,
        messages,
        system=[{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
        tools=[{**WEATHER, "cache_control": {"type": "ephemeral"}}],
    )
    # The counts are the behaviour's whatever the breakpoints (see the dialect's docstring).
    assert (message.usage.cache_read_input_tokens, message.usage.cache_creation_input_tokens) == (2, 3)
    five = [{"type": "text", "text": f"part {n}", "cache_control": marked} for n in range(5)]
    with pytest.raises(anthropic.BadRequestError, match="A maximum of 4 blocks"):
        create(claude, [{"role": "user", "content": five}])
    with pytest.raises(anthropic.BadRequestError, match=r"cache_control\.ttl"):
        create(
            claude,
            [{"role": "user", "content": [{**five[0], "cache_control": {"type": "ephemeral", "ttl": "2h"}}]}],
        )
    html = {"type": "document", "source": {"type": "base64", "media_type": "text/html", "data": PDF}}
    with pytest.raises(anthropic.BadRequestError, match="media_type"):
        create(claude, [{"role": "user", "content": [html]}])


GEMINI_TOOL = types.Tool(
    function_declarations=[
        types.FunctionDeclaration(
            name="weather",
            parameters=types.Schema(
                type=types.Type.OBJECT, properties={"city": types.Schema(type=types.Type.STRING)}
            ),
        )
    ]
)
QUESTION_CONTENT = types.Content(role="user", parts=[types.Part(text="What is the weather in Paris")])


def gemini_config(include: bool = True, **extra: Any) -> types.GenerateContentConfig:
    return types.GenerateContentConfig(
        thinking_config=types.ThinkingConfig(thinking_budget=1024, include_thoughts=include),
        automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
        **extra,
    )


def test_gemini_thought_parts_answer_and_stream(gemini: genai.Client) -> None:
    response = gemini.models.generate_content(model="g", contents=[QUESTION_CONTENT], config=gemini_config())
    (candidate,) = response.candidates or []
    assert candidate.content is not None
    parts = candidate.content.parts or []
    assert [(part.thought, part.text) for part in parts] == [(True, THOUGHTS), (None, "tok0 tok1 ")]
    # The SDK's text leaves the thoughts out; their tokens are counted apart.
    assert response.text == "tok0 tok1 "
    assert response.usage_metadata is not None and response.usage_metadata.thoughts_token_count == 3
    chunks = list(
        gemini.models.generate_content_stream(model="g", contents=[QUESTION_CONTENT], config=gemini_config())
    )
    streamed = [
        part
        for chunk in chunks
        for part in ((chunk.candidates or [])[0].content or types.Content()).parts or []
    ]
    assert "".join(p.text or "" for p in streamed if p.thought) == THOUGHTS
    assert "".join(p.text or "" for p in streamed if not p.thought) == "tok0 tok1 "
    assert streamed[0].thought
    # Without includeThoughts the model thinks (and bills) but shows nothing.
    hidden = gemini.models.generate_content(
        model="g", contents=[QUESTION_CONTENT], config=gemini_config(False)
    )
    assert not any(
        part.thought for part in ((hidden.candidates or [])[0].content or types.Content()).parts or []
    )


def test_gemini_function_call_thought_signature(gemini: genai.Client, upstream: FakeUpstream) -> None:
    upstream.configure(tool_call=True)
    config = gemini_config(tools=[GEMINI_TOOL])
    response = gemini.models.generate_content(model="g", contents=[QUESTION_CONTENT], config=config)
    (candidate,) = response.candidates or []
    assert candidate.content is not None
    (call,) = [part for part in candidate.content.parts or [] if part.function_call]
    assert isinstance(call.thought_signature, bytes) and call.thought_signature
    answer = types.Content(
        role="user",
        parts=[
            types.Part(
                function_response=types.FunctionResponse(name="weather", response={"content": "sunny"})
            )
        ],
    )
    # The SDK sends the model's content back as it came: the signature goes with the call.
    assert gemini.models.generate_content(
        model="g", contents=[QUESTION_CONTENT, candidate.content, answer], config=config
    ).candidates
    unsigned = types.Content(role="model", parts=[types.Part(function_call=call.function_call)])
    with pytest.raises(errors.ClientError, match="thought_signature") as raised:
        gemini.models.generate_content(
            model="g", contents=[QUESTION_CONTENT, unsigned, answer], config=config
        )
    assert raised.value.code == 400
    # Without thinking Gemini asks for no signature.
    plain = types.GenerateContentConfig(
        tools=[GEMINI_TOOL], automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True)
    )
    assert gemini.models.generate_content(
        model="g", contents=[QUESTION_CONTENT, unsigned, answer], config=plain
    ).candidates


def test_gemini_pdf_inline_data(upstream: FakeUpstream) -> None:
    def send(mime: str) -> httpx.Response:
        part = {"inlineData": {"mimeType": mime, "data": PDF}}
        body = {"contents": [{"role": "user", "parts": [{"text": "summarise"}, part]}]}
        return httpx.post(f"{upstream.url}/v1beta/models/g:generateContent?key=k", json=body, timeout=5)

    assert send("application/pdf").status_code == 200
    refused = send("application/zip")
    assert refused.status_code == 400 and "Unsupported MIME type" in refused.json()["error"]["message"]
