"""Thinking, prompt-cache marks and documents through the inbound formats: Messages and Responses
requests to the chat contract's extensions, chat answers and streams with ``reasoning_content`` and
``thinking_blocks`` back to Anthropic's thinking blocks and the Responses API's reasoning items (each
event checked against the official SDKs' types, and accumulated the way the SDKs accumulate them), a
turn's thinking sent back the way it came, and the extensions kept from channels that pass bodies
through."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, ParsedMessage, RawMessageStreamEvent
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from services.common.errors import InvalidRequest
from services.common.pb.relaygate.catalog.v1.catalog_pb2 import Channel as ChannelMessage
from services.fake_upstream.behaviour import Behaviour
from services.fake_upstream.endpoints import RequestError
from services.fake_upstream.openai_api import openai_chat
from services.relay.formats import anthropic_messages, responses
from services.relay.formats.anthropic_stream import MessagesStream
from services.relay.formats.responses import ResponseShape
from services.relay.formats.responses_stream import ResponsesStream
from services.relay.pipeline.relay import payload_for, plan_chat
from services.relay.providers import extensions
from services.relay.settings import RelaySettings
from services.relay.stream.streaming import stream_payload
from services.relay.upstream.channels import Channel
from tests.relay.test_formats import USAGE, call_piece, call_start, delta, events, feed_in_pieces, finish, sse

LIMITS = RelaySettings.model_construct(max_messages=16, max_tools=4, max_input_items=16, max_json_depth=64)
ANTHROPIC_EVENT: TypeAdapter[RawMessageStreamEvent] = TypeAdapter(RawMessageStreamEvent)
RESPONSES_EVENT: TypeAdapter[ResponseStreamEvent] = TypeAdapter(ResponseStreamEvent)
EPHEMERAL = {"type": "ephemeral"}
HOUR = {"type": "ephemeral", "ttl": "1h"}
PDF = "JVBERi0xLjQK"
THINKING_BLOCKS = [
    {"type": "thinking", "thinking": "Let me think.", "signature": "sig-1"},
    {"type": "redacted_thinking", "data": "opaque"},
]
# What a converting channel streams for one thinking block, one redacted block, text and a call.
THINKING_STREAM = sse(
    delta(role="assistant", content=""),
    delta(reasoning_content="Let me "),
    delta(reasoning_content="think."),
    delta(thinking_blocks=[{"type": "thinking", "thinking": "", "signature": "sig-1"}]),
    delta(thinking_blocks=[{"type": "redacted_thinking", "data": "opaque"}]),
    delta(content="Sunny."),
    call_start(0, "call_a", "weather"),
    call_piece(0, '{"city": "Oslo"}'),
    finish("tool_calls"),
    USAGE,
)
ANSWER: dict[str, Any] = {
    "id": "chatcmpl-xyz",
    "object": "chat.completion",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Sunny.",
                "reasoning_content": "Let me think.",
                "thinking_blocks": THINKING_BLOCKS,
                "tool_calls": [
                    {"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
                ],
            },
            "finish_reason": "tool_calls",
        }
    ],
    "usage": USAGE["usage"],
}


def messages_body(**fields: Any) -> dict[str, Any]:
    return {"model": "claude-x", "max_tokens": 4096, "messages": [{"role": "user", "content": "x"}], **fields}


# --- Messages → chat ------------------------------------------------------------------------------


def test_messages_thinking_cache_marks_and_documents_to_chat() -> None:
    body = messages_body(
        system=[{"type": "text", "text": "rules"}, {"type": "text", "text": "more", "cache_control": HOUR}],
        thinking={"type": "enabled", "budget_tokens": 2048},
        output_config={"effort": "max"},
        tools=[{"name": "weather", "input_schema": {"type": "object"}, "cache_control": EPHEMERAL}],
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "document",
                        "title": "report.pdf",
                        "source": {"type": "base64", "media_type": "application/pdf", "data": PDF},
                        "cache_control": EPHEMERAL,
                    },
                    {
                        "type": "document",
                        "source": {"type": "text", "media_type": "text/plain", "data": "notes"},
                    },
                    {"type": "text", "text": "summarise", "cache_control": EPHEMERAL},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    *THINKING_BLOCKS,
                    {"type": "text", "text": "Checking."},
                    {
                        "type": "tool_use",
                        "id": "t1",
                        "name": "weather",
                        "input": {},
                        "cache_control": EPHEMERAL,
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "content": "sunny",
                        "cache_control": EPHEMERAL,
                    }
                ],
            },
        ],
    )
    chat = anthropic_messages.to_chat(body, LIMITS)
    assert chat["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    # max is past chat's scale: its top.
    assert chat["reasoning_effort"] == "high"
    assert chat["tools"][0]["cache_control"] == EPHEMERAL
    assert chat["messages"] == [
        {
            "role": "system",
            "content": [
                {"type": "text", "text": "rules"},
                {"type": "text", "text": "more", "cache_control": HOUR},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "file",
                    "file": {"filename": "report.pdf", "file_data": f"data:application/pdf;base64,{PDF}"},
                    "cache_control": EPHEMERAL,
                },
                {"type": "text", "text": "notes"},
                {"type": "text", "text": "summarise", "cache_control": EPHEMERAL},
            ],
        },
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
            ],
            "thinking_blocks": THINKING_BLOCKS,
            # The tool call's mark, on the message (whose last block the call is).
            "cache_control": EPHEMERAL,
        },
        {"role": "tool", "tool_call_id": "t1", "content": "sunny", "cache_control": EPHEMERAL},
    ]
    assert chat[extensions.MARK] is True


def test_a_messages_body_without_extensions_is_not_marked() -> None:
    chat = anthropic_messages.to_chat(
        messages_body(system=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]), LIMITS
    )
    assert extensions.MARK not in chat and chat["messages"][0] == {"role": "system", "content": "a\nb"}


@pytest.mark.parametrize(
    ("thinking", "effort"),
    [(None, "low"), ({"type": "disabled"}, "high"), ({"type": "adaptive"}, "medium")],
)
def test_effort_goes_only_with_thinking_on(thinking: dict[str, Any] | None, effort: str) -> None:
    fields: dict[str, Any] = {"output_config": {"effort": effort}}
    if thinking is not None:
        fields["thinking"] = thinking
    chat = anthropic_messages.to_chat(messages_body(**fields), LIMITS)
    # Effort alone would switch thinking on at an Anthropic or Gemini channel.
    expected = effort if thinking is not None and thinking["type"] != "disabled" else None
    assert chat.get("reasoning_effort") == expected


@pytest.mark.parametrize(
    "change",
    [
        {"thinking": {"type": "sometimes"}},
        {"thinking": {"type": "enabled"}},
        {"thinking": "on"},
        {"output_config": {"effort": "extreme"}},
        {"output_config": {"effort": ["low"]}},
    ],
)
def test_bad_thinking_or_effort_is_refused(change: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as refused:
        anthropic_messages.to_chat(messages_body(**change), LIMITS)
    assert refused.value.param in ("thinking", "output_config")


@pytest.mark.parametrize(
    "block",
    [
        {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}},
        {"type": "document", "source": {"type": "base64", "media_type": "image/png", "data": "x"}},
        {"type": "document", "source": {"type": "file", "file_id": "file_1"}},
        {
            "type": "document",
            "source": {"type": "text", "media_type": "text/plain", "data": "x"},
            "citations": {"enabled": True},
        },
        {"type": "text", "text": "x", "cache_control": {"type": "forever"}},
        {"type": "text", "text": "x", "cache_control": "ephemeral"},
    ],
)
def test_documents_and_marks_the_gateway_cannot_send_are_refused(block: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as refused:
        anthropic_messages.to_chat(messages_body(messages=[{"role": "user", "content": [block]}]), LIMITS)
    assert refused.value.param == "messages"


def test_a_thinking_block_without_its_signature_is_refused() -> None:
    turn = {"role": "assistant", "content": [{"type": "thinking", "thinking": "t"}]}
    with pytest.raises(InvalidRequest):
        anthropic_messages.to_chat(messages_body(messages=[{"role": "user", "content": "a"}, turn]), LIMITS)


# --- chat → Messages ------------------------------------------------------------------------------


def test_messages_answer_opens_with_the_thinking_blocks() -> None:
    message = Message.model_validate(orjson.loads(anthropic_messages.to_anthropic(orjson.dumps(ANSWER), "m")))
    assert [block.type for block in message.content] == ["thinking", "redacted_thinking", "text", "tool_use"]
    first = message.content[0]
    assert first.type == "thinking" and (first.thinking, first.signature) == ("Let me think.", "sig-1")
    # The turn sent back as it came gives the channel the same signed blocks.
    turn = {"role": "assistant", "content": message.model_dump(exclude_none=True)["content"]}
    chat = anthropic_messages.to_chat(
        messages_body(messages=[{"role": "user", "content": "a"}, turn]), LIMITS
    )
    assert chat["messages"][1]["thinking_blocks"] == THINKING_BLOCKS


def test_reasoning_without_signed_blocks_is_one_unsigned_thinking_block() -> None:
    answer = {
        **ANSWER,
        "choices": [{**ANSWER["choices"][0], "message": {"content": "ok", "reasoning_content": "r"}}],
    }
    message = Message.model_validate(orjson.loads(anthropic_messages.to_anthropic(orjson.dumps(answer), "m")))
    assert [
        (b.type, getattr(b, "thinking", None), getattr(b, "signature", None)) for b in message.content
    ] == [
        ("thinking", "r", ""),
        ("text", None, None),
    ]


def accumulated(data: bytes) -> ParsedMessage[None]:
    """The message the Anthropic SDK builds from the events in ``data``."""
    snapshot: ParsedMessage[None] | None = None
    buffers: dict[int, bytes] = {}
    for _, payload in events(data):
        found = ANTHROPIC_EVENT.validate_python(payload) if payload["type"] != "ping" else None
        if found is not None:
            snapshot = accumulate_event(event=found, current_snapshot=snapshot, json_bufs=buffers)
    assert snapshot is not None
    return snapshot


@pytest.mark.parametrize("seed", range(4))
def test_messages_stream_of_thinking(seed: int) -> None:
    stream = MessagesStream("claude-x")
    out = feed_in_pieces(stream.convert, THINKING_STREAM, seed) + stream.finish()
    found = events(out)
    assert [(name, p.get("delta", p.get("content_block", {})).get("type")) for name, p in found][2:-2] == [
        ("content_block_start", "thinking"),
        ("content_block_delta", "thinking_delta"),
        ("content_block_delta", "thinking_delta"),
        ("content_block_delta", "signature_delta"),
        ("content_block_stop", None),
        ("content_block_start", "redacted_thinking"),
        ("content_block_stop", None),
        ("content_block_start", "text"),
        ("content_block_delta", "text_delta"),
        ("content_block_stop", None),
        ("content_block_start", "tool_use"),
        ("content_block_delta", "input_json_delta"),
        ("content_block_stop", None),
    ]
    message = accumulated(out)
    assert [block.model_dump(exclude_none=True) for block in message.content[:2]] == THINKING_BLOCKS
    assert message.content[2].type == "text" and message.content[3].type == "tool_use"
    assert message.usage.output_tokens == 9


def test_messages_stream_of_unsigned_thinking_closes_it_at_the_text() -> None:
    stream = MessagesStream("m")
    out = (
        stream.convert(sse(delta(reasoning_content="hmm"), delta(content="ok"), finish("stop"), USAGE))
        + stream.finish()
    )
    message = accumulated(out)
    assert [(b.type, getattr(b, "signature", None)) for b in message.content] == [
        ("thinking", ""),
        ("text", None),
    ]


# --- Responses ------------------------------------------------------------------------------------


def shape() -> ResponseShape:
    return ResponseShape(response_id="resp_abc", model="m")


def test_responses_reasoning_effort_and_items_to_chat() -> None:
    body = {
        "model": "m",
        "reasoning": {"effort": "minimal", "summary": "auto"},
        "input": [
            {"role": "user", "content": "weather?"},
            {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [{"type": "summary_text", "text": "Let me think."}],
                "encrypted_content": "sig-1",
            },
            {
                "type": "reasoning",
                "id": "rs_2",
                "summary": [],
                "encrypted_content": "redacted_thinking:opaque",
            },
            # OpenAI's own reasoning item without encrypted content: nothing a channel could check.
            {"type": "reasoning", "id": "rs_3", "summary": [{"type": "summary_text", "text": "x"}]},
            {"type": "function_call", "call_id": "call_a", "name": "weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_a", "output": "sunny"},
        ],
    }
    chat = responses.to_chat(body, LIMITS)
    assert chat["reasoning_effort"] == "minimal"
    assert chat["messages"][1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
        ],
        "thinking_blocks": THINKING_BLOCKS,
    }
    assert chat[extensions.MARK] is True
    plain = responses.to_chat({"model": "m", "input": "hi", "reasoning": {"effort": "high"}}, LIMITS)
    assert plain["reasoning_effort"] == "high" and extensions.MARK not in plain
    with pytest.raises(InvalidRequest) as refused:
        responses.to_chat({"model": "m", "input": "hi", "reasoning": {"effort": "huge"}}, LIMITS)
    assert refused.value.param == "reasoning"


def test_responses_answer_has_a_reasoning_item_per_thinking_block() -> None:
    response = Response.model_validate(orjson.loads(responses.to_response(orjson.dumps(ANSWER), shape())))
    kinds = [(item.type, getattr(item, "encrypted_content", None)) for item in response.output]
    assert kinds == [
        ("reasoning", "sig-1"),
        ("reasoning", "redacted_thinking:opaque"),
        ("message", None),
        ("function_call", None),
    ]
    first = response.output[0]
    assert first.type == "reasoning" and [s.text for s in first.summary] == ["Let me think."]
    # The output sent back as input gives the channel the same signed blocks.
    given = [item.model_dump(exclude_none=True) for item in response.output]
    chat = responses.to_chat({"model": "m", "input": [{"role": "user", "content": "a"}, *given]}, LIMITS)
    assert chat["messages"][1]["thinking_blocks"] == THINKING_BLOCKS


def test_responses_answer_of_unsigned_reasoning() -> None:
    answer = {
        **ANSWER,
        "choices": [{**ANSWER["choices"][0], "message": {"content": "ok", "reasoning_content": "r"}}],
    }
    response = Response.model_validate(orjson.loads(responses.to_response(orjson.dumps(answer), shape())))
    first = response.output[0]
    assert first.type == "reasoning" and first.encrypted_content is None
    assert [s.text for s in first.summary] == ["r"] and response.output_text == "ok"


@pytest.mark.parametrize("seed", range(4))
def test_responses_stream_of_reasoning(seed: int) -> None:
    stream = ResponsesStream(shape())
    out = feed_in_pieces(stream.convert, THINKING_STREAM, seed) + stream.finish()
    found = events(out)
    for _, payload in found:
        RESPONSES_EVENT.validate_python(payload)
    assert [p["sequence_number"] for _, p in found] == list(range(len(found)))
    names = [name for name, _ in found]
    assert names[:12] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.output_item.done",
        "response.output_item.added",
    ]
    done = [p["item"] for name, p in found if name == "response.output_item.done"]
    assert done[0]["summary"] == [{"type": "summary_text", "text": "Let me think."}]
    assert (done[0]["encrypted_content"], done[1]["encrypted_content"]) == (
        "sig-1",
        "redacted_thinking:opaque",
    )
    assert [p["output_index"] for name, p in found if name == "response.output_item.added"] == [0, 1, 2, 3]
    final = Response.model_validate(found[-1][1]["response"])
    assert [item.type for item in final.output] == ["reasoning", "reasoning", "message", "function_call"]
    # The stream's reasoning items are the answer's.
    answer = Response.model_validate(orjson.loads(responses.to_response(orjson.dumps(ANSWER), shape())))
    assert [item.model_dump() for item in final.output[:2]] == [
        item.model_dump() for item in answer.output[:2]
    ]


# --- the extensions and the channels that pass bodies through ------------------------------------


def channel(kind: str) -> Channel:
    return Channel.from_message(
        ChannelMessage(
            channel_id=kind or "openai", name="c", base_url="http://127.0.0.1:9/v1", models=["m"], type=kind
        )
    )


def converted_body(*, stream: bool) -> dict[str, Any]:
    body = messages_body(
        model="m",
        stream=stream,
        thinking={"type": "enabled", "budget_tokens": 1024},
        tools=[{"name": "t", "input_schema": {"type": "object"}, "cache_control": EPHEMERAL}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "a", "cache_control": EPHEMERAL}]},
            {"role": "assistant", "content": [THINKING_BLOCKS[0], {"type": "text", "text": "b"}]},
            {"role": "user", "content": "c"},
        ],
    )
    return anthropic_messages.to_chat(body, LIMITS)


@pytest.mark.parametrize("stream", [False, True])
def test_passing_channels_get_a_converted_body_without_the_extensions(stream: bool) -> None:
    chat = converted_body(stream=stream)
    raw = orjson.dumps(chat)
    build = stream_payload(chat, raw)[0] if stream else payload_for(chat, raw, "m")
    for kind in ("", "azure-openai"):
        sent = orjson.loads(build(channel(kind)))
        text = orjson.dumps(sent)
        for name in (b"thinking", b"cache_control", extensions.MARK.encode()):
            assert name not in text
        assert sent["messages"][1] == {"role": "assistant", "content": "b"}
        assert sent["tools"] == [
            {"type": "function", "function": {"name": "t", "parameters": {"type": "object"}}}
        ]
    # The converting channel is built from the body as it is; the body itself is untouched.
    anthropic = orjson.loads(build(channel("anthropic")))
    assert extensions.MARK not in anthropic and chat[extensions.MARK] is True
    assert chat["messages"][1]["thinking_blocks"] == [THINKING_BLOCKS[0]]


@pytest.mark.parametrize("stream", [False, True])
def test_a_chat_callers_body_goes_out_as_its_bytes(stream: bool) -> None:
    chat = {
        "model": "m",
        "messages": [{"role": "user", "content": "a"}],
        "thinking": {"type": "enabled"},
        "stream": stream,
        "stream_options": {"include_usage": True},
    }
    raw = orjson.dumps(chat)
    build = stream_payload(chat, raw)[0] if stream else payload_for(chat, raw, "m")
    # The caller chose its fields: the very same bytes.
    assert build(channel("")) is raw


@pytest.mark.parametrize(
    "change",
    [
        {"thinking": {"type": "enabled", "budget_tokens": 1024}},
        {"messages": [{"role": "assistant", "content": "a", "thinking_blocks": THINKING_BLOCKS[:1]}]},
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a", "cache_control": EPHEMERAL}]}
            ]
        },
        {"tools": [{"type": "function", "function": {"name": "t"}, "cache_control": EPHEMERAL}]},
    ],
)
def test_the_fake_openai_upstream_refuses_other_providers_fields(change: dict[str, Any]) -> None:
    # As OpenAI does: the e2e tests of converted bodies to OpenAI channels rely on it.
    body = {"model": "m", "messages": [{"role": "user", "content": "a"}], **change}
    with pytest.raises(RequestError) as refused:
        openai_chat(body, Behaviour())
    assert refused.value.status == 400
    assert openai_chat({"model": "m", "messages": [{"role": "user", "content": "a"}]}, Behaviour())


def test_documents_and_thinking_sent_back_are_held_for() -> None:
    # The hold caps the charge: a prompt estimate that left out a PDF or the thinking blocks sent back
    # would let the provider's count of them go unpaid.
    pdf = "JVBERi0" * 2000
    turns = [
        {
            "role": "user",
            "content": [
                {
                    "type": "document",
                    "source": {"type": "base64", "media_type": "application/pdf", "data": pdf},
                }
            ],
        },
        {"role": "assistant", "content": [{**THINKING_BLOCKS[0], "thinking": "step " * 2000}]},
        {"role": "user", "content": "go on"},
    ]
    chat = anthropic_messages.to_chat(messages_body(messages=turns), LIMITS)
    plan = plan_chat(chat, LIMITS)
    assert plan.prompt_tokens > len(pdf) + len("step " * 2000)


def test_reasoning_no_assistant_item_followed_goes_with_no_turn() -> None:
    signed = {"type": "reasoning", "summary": [], "encrypted_content": "sig-1"}
    body = {
        "model": "m",
        "input": [
            {"role": "user", "content": "a"},
            signed,
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "c"},
        ],
    }
    chat = responses.to_chat(body, LIMITS)
    assert chat["messages"][2] == {"role": "assistant", "content": "c"}
    assert extensions.MARK not in chat
