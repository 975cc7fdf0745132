"""The inbound format conversions on their own: request bodies to chat, chat answers and streams back,
each event checked against the official SDKs' own types (pydantic validation of the wire shapes), and
hostile bodies refused with a 400, never another exception."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from services.common.errors import (
    AuthenticationError,
    GatewayError,
    InsufficientQuota,
    InvalidRequest,
    ModelNotFound,
    NoUpstreamAvailable,
    PayloadTooLarge,
    PermissionDenied,
    UpstreamError,
)
from services.relay.formats import anthropic_messages, responses
from services.relay.formats.anthropic_errors import anthropic_error
from services.relay.formats.anthropic_stream import MessagesStream
from services.relay.formats.responses import ResponseShape
from services.relay.formats.responses_stream import ResponsesStream
from services.relay.settings import RelaySettings
from services.relay.upstream.proxy import UpstreamRejected

LIMITS = RelaySettings.model_construct(max_messages=16, max_tools=4, max_input_items=16, max_json_depth=64)
ANTHROPIC_EVENT: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
RESPONSES_EVENT: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


def sse(*chunks: dict[str, Any], done: bool = True) -> bytes:
    data = b"".join(b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in chunks)
    return data + (b"data: [DONE]\n\n" if done else b"")


def delta(**fields: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-abc", "choices": [{"index": 0, "delta": fields, "finish_reason": None}]}


def finish(reason: str) -> dict[str, Any]:
    return {"id": "chatcmpl-abc", "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}


def call_start(index: int, call_id: str, name: str) -> dict[str, Any]:
    return delta(
        tool_calls=[
            {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        ]
    )


def call_piece(index: int, piece: str) -> dict[str, Any]:
    return delta(tool_calls=[{"index": index, "function": {"arguments": piece}}])


USAGE = {
    "id": "chatcmpl-abc",
    "choices": [],
    "usage": {
        "prompt_tokens": 20,
        "completion_tokens": 9,
        "prompt_tokens_details": {"cached_tokens": 5, "cache_write_tokens": 3},
        "completion_tokens_details": {"reasoning_tokens": 2},
    },
}
# Text, then two tool calls one after the other, as OpenAI streams parallel calls.
TOOL_STREAM = sse(
    delta(role="assistant", content=""),
    delta(content="Let me "),
    delta(content="check."),
    call_start(0, "call_a", "weather"),
    call_piece(0, '{"city": '),
    call_piece(0, '"Oslo"}'),
    call_start(1, "call_b", "time"),
    call_piece(1, "{}"),
    finish("tool_calls"),
    USAGE,
)


def events(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for block in data.split(b"\n\n"):
        if block:
            name, payload = block.split(b"\n")
            assert name.startswith(b"event: ") and payload.startswith(b"data: ")
            found.append((name[7:].decode(), orjson.loads(payload[6:])))
    return found


def feed_in_pieces(convert: Any, data: bytes, seed: int) -> bytes:
    """``data`` fed at random event boundaries, as the relay forwards whatever complete events it has."""
    blocks = [b + b"\n\n" for b in data.split(b"\n\n") if b]
    rng = random.Random(seed)
    out = []
    while blocks:
        take = rng.randint(1, 3)
        out.append(convert(b"".join(blocks[:take])))
        blocks = blocks[take:]
    return b"".join(out)


# --- Anthropic Messages ---------------------------------------------------------------------------


def test_messages_request_to_chat() -> None:
    body = {
        "model": "claude-x",
        "max_tokens": 64,
        "system": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"},
                    },
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "s"},
                    {"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "Oslo"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "is_error": True,
                        "content": [
                            {"type": "text", "text": "down"},
                            {"type": "image", "source": {"type": "url", "url": "https://example.com/b.png"}},
                        ],
                    },
                    {"type": "text", "text": "and now?"},
                ],
            },
        ],
        "tools": [{"name": "weather", "description": "d", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stop_sequences": ["END"],
        "temperature": 0.2,
        "top_k": 5,
        "metadata": {"user_id": "u-1"},
        "stream": True,
    }
    chat = anthropic_messages.to_chat(body, LIMITS)
    assert chat["messages"] == [
        {"role": "system", "content": "one\ntwo"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "t1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
                }
            ],
            "thinking_blocks": [{"type": "thinking", "thinking": "hmm", "signature": "s"}],
        },
        {"role": "tool", "tool_call_id": "t1", "content": "Error: down"},
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "https://example.com/b.png"}}],
        },
        {"role": "user", "content": [{"type": "text", "text": "and now?"}]},
    ]
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {"name": "weather", "parameters": {"type": "object"}, "description": "d"},
        }
    ]
    assert chat["tool_choice"] == "required" and chat["parallel_tool_calls"] is False
    assert (chat["stop"], chat["temperature"], chat["user"], chat["max_tokens"]) == (["END"], 0.2, "u-1", 64)
    assert "top_k" not in chat
    assert chat["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "messages"),
        (
            {"messages": [{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t"}]}]},
            "messages",
        ),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools"),
        ({"tools": [{"name": "t"}] * 5}, "tools"),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice"),
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"mcp_servers": [{"url": "x"}]}, "mcp_servers"),
        ({"system": 5}, "system"),
        ({"messages": [{"role": "user", "content": "x"}] * 17}, "messages"),
    ],
)
def test_messages_refusals_name_the_field(change: dict[str, Any], param: str) -> None:
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], **change}
    with pytest.raises(InvalidRequest) as refused:
        anthropic_messages.to_chat(body, LIMITS)
    assert refused.value.param == param


def test_an_assistant_turn_of_thinking_only_stays_a_turn() -> None:
    turns = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "s"}]},
        {"role": "user", "content": "b"},
    ]
    chat = anthropic_messages.to_chat({"model": "m", "max_tokens": 1, "messages": turns}, LIMITS)
    # Chat refuses an assistant message with neither content nor tool calls: it gets empty text.
    assert chat["messages"][1] == {
        "role": "assistant",
        "content": "",
        "thinking_blocks": [{"type": "thinking", "thinking": "t", "signature": "s"}],
    }


def test_messages_answer_from_chat() -> None:
    answer = {
        "id": "chatcmpl-xyz",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "On it.",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"a": 1}'},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": USAGE["usage"],
    }
    message = Message.model_validate(
        orjson.loads(anthropic_messages.to_anthropic(orjson.dumps(answer), "claude-x"))
    )
    assert message.id == "msg_xyz" and message.model == "claude-x"
    assert [block.type for block in message.content] == ["text", "tool_use"]
    assert message.content[1].type == "tool_use" and message.content[1].input == {"a": 1}
    assert message.stop_reason == "tool_use"
    usage = message.usage
    # Anthropic's input_tokens leaves out what was read from and written to the cache.
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (
        12,
        5,
        3,
    )
    assert usage.output_tokens == 9 and usage.output_tokens_details is not None
    assert usage.output_tokens_details.thinking_tokens == 2


def test_messages_answer_that_is_not_json_is_an_upstream_error() -> None:
    with pytest.raises(UpstreamError):
        anthropic_messages.to_anthropic(b"<html>", "m")


@pytest.mark.parametrize("seed", range(4))
def test_messages_stream_events(seed: int) -> None:
    stream = MessagesStream("claude-x")
    out = feed_in_pieces(stream.convert, TOOL_STREAM, seed) + stream.finish()
    found = events(out)
    for _, payload in found:
        if payload["type"] != "ping":
            ANTHROPIC_EVENT.validate_python(payload)
    assert [name for name, _ in found] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    starts = [p["content_block"] for n, p in found if n == "content_block_start"]
    assert starts[1] == {"type": "tool_use", "id": "call_a", "name": "weather", "input": {}}
    assert starts[2]["id"] == "call_b"
    pieces = [
        p["delta"]["partial_json"] for n, p in found if p.get("delta", {}).get("type") == "input_json_delta"
    ]
    assert pieces == ['{"city": ', '"Oslo"}', "{}"]
    message_delta = found[-2][1]
    assert message_delta["delta"]["stop_reason"] == "tool_use"
    assert message_delta["usage"]["input_tokens"] == 12 and message_delta["usage"]["output_tokens"] == 9
    assert stream.ended


def test_messages_stream_keepalive_error_and_early_end() -> None:
    stream = MessagesStream("m")
    assert stream.keepalive() == b": keep-alive\n\n"
    assert events(stream.convert(sse(delta(content="hi"), done=False)))[0][0] == "message_start"
    assert events(stream.keepalive()) == [("ping", {"type": "ping"})]
    error = stream.convert(stream.error_event(UpstreamError("gone quiet")))
    assert events(error) == [
        ("error", {"type": "error", "error": {"type": "api_error", "message": "gone quiet"}})
    ]
    # Nothing comes after it.
    assert stream.convert(sse(delta(content="late"))) == b"" and stream.finish() == b""

    cut = MessagesStream("m")
    cut.convert(sse(delta(content="hi"), done=False))
    assert [name for name, _ in events(cut.finish())] == ["error"]

    # Finished but never saw [DONE]: the message still closes, with what is known.
    unfinished = MessagesStream("m")
    unfinished.convert(sse(delta(content="hi"), finish("length"), done=False))
    tail = events(unfinished.finish())
    assert [name for name, _ in tail] == ["message_delta", "message_stop"]
    assert tail[0][1]["delta"]["stop_reason"] == "max_tokens"


@pytest.mark.parametrize("kind", ["messages", "responses"])
def test_an_error_comes_after_the_chunks_queued_before_it(kind: str) -> None:
    """The pump queues the error while earlier chunks still wait for the writer: they are converted
    first, the error last (the error used to end the conversion at once, dropping them)."""
    shape = ResponseShape.of({"model": "m"}, "resp_5")
    stream: MessagesStream | ResponsesStream = (
        MessagesStream("m") if kind == "messages" else ResponsesStream(shape)
    )
    queued = sse(delta(content="one"), delta(content="two"), done=False)
    marker = stream.error_event(UpstreamError("cut"))
    found = events(stream.convert(queued + marker))
    deltas = [p["delta"] for _, p in found if "delta" in p]
    assert [d["text"] if isinstance(d, dict) else d for d in deltas] == ["one", "two"]
    assert found[-1][0] == "error"
    assert stream.finish() == b""


def test_messages_stream_upstream_error_chunk() -> None:
    stream = MessagesStream("m")
    chunk = {"error": {"message": "overloaded", "type": "server_error"}}
    assert events(stream.convert(sse(chunk, done=False))) == [
        ("error", {"type": "error", "error": {"type": "api_error", "message": "overloaded"}})
    ]
    assert stream.convert(sse(delta(content="late"))) == b""


@pytest.mark.parametrize(
    ("exc", "status", "kind"),
    [
        (InvalidRequest("x"), 400, "invalid_request_error"),
        (AuthenticationError(), 401, "authentication_error"),
        (PermissionDenied("x"), 403, "permission_error"),
        (ModelNotFound("x"), 404, "not_found_error"),
        (PayloadTooLarge("x"), 413, "request_too_large"),
        (InsufficientQuota(), 429, "rate_limit_error"),
        (UpstreamError(), 502, "api_error"),
        (NoUpstreamAvailable(), 503, "overloaded_error"),
        (GatewayError(), 500, "api_error"),
        (
            UpstreamRejected(status=422, body=b'{"error": {"message": "bad tool schema"}}'),
            422,
            "invalid_request_error",
        ),
    ],
)
def test_anthropic_error_mapping(exc: GatewayError, status: int, kind: str) -> None:
    got_status, body = anthropic_error(exc)
    assert got_status == status
    assert body["type"] == "error" and body["error"]["type"] == kind
    if isinstance(exc, UpstreamRejected):
        assert body["error"]["message"] == "bad tool schema"


# --- Responses API --------------------------------------------------------------------------------


def test_responses_request_to_chat() -> None:
    body = {
        "model": "m",
        "instructions": "be brief",
        "input": [
            {"role": "developer", "content": "rules"},
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "see"},
                    {"type": "input_image", "image_url": "https://example.com/c.png", "detail": "low"},
                ],
            },
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "g", "arguments": '{"x":1}'},
            {"type": "function_call_output", "call_id": "c1", "output": "one"},
            {
                "type": "function_call_output",
                "call_id": "c2",
                "output": [{"type": "input_text", "text": "two"}],
            },
        ],
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True}],
        "tool_choice": {"type": "function", "name": "f"},
        "max_output_tokens": 50,
        "text": {"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}}},
        "store": False,
        "stream": True,
    }
    chat = responses.to_chat(body, LIMITS)
    assert chat["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "system", "content": "rules"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "see"},
                {"type": "image_url", "image_url": {"url": "https://example.com/c.png", "detail": "low"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": '{"x":1}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
    ]
    assert chat["tools"] == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "strict": True}}
    ]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert chat["max_tokens"] == 50
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "out", "schema": {"type": "object"}},
    }
    assert chat["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"store": True}, "store"),
        ({"background": True}, "background"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}, "input"),
        ({"input": []}, "input"),
        ({"input": 5}, "input"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"tool_choice": {"type": "file_search"}}, "tool_choice"),
        ({"max_output_tokens": -1}, "max_output_tokens"),
        ({"text": {"format": {"type": "yaml"}}}, "text"),
        ({"input": [{"role": "user", "content": "x"}] * 17}, "input"),
    ],
)
def test_responses_refusals_name_the_field(change: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        responses.to_chat({"model": "m", "input": "hi", **change}, LIMITS)
    assert refused.value.param == param


def test_responses_answer_from_chat() -> None:
    answer = {
        "id": "chatcmpl-xyz",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Sure.",
                    "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": USAGE["usage"],
    }
    shape = ResponseShape.of({"model": "m", "tools": [{"type": "function", "name": "f"}]}, "resp_1")
    response = Response.model_validate(orjson.loads(responses.to_response(orjson.dumps(answer), shape)))
    assert response.status == "completed" and response.output_text == "Sure."
    assert [item.type for item in response.output] == ["message", "function_call"]
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.input_tokens_details.cached_tokens) == (20, 5)
    assert response.usage.output_tokens_details.reasoning_tokens == 2 and response.usage.total_tokens == 29


@pytest.mark.parametrize("seed", range(4))
def test_responses_stream_events(seed: int) -> None:
    stream = ResponsesStream(ResponseShape.of({"model": "m"}, "resp_1"))
    found = events(feed_in_pieces(stream.convert, TOOL_STREAM, seed) + stream.finish())
    for _, payload in found:
        RESPONSES_EVENT.validate_python(payload)
    assert [p["sequence_number"] for _, p in found] == list(range(len(found)))
    assert [name for name, _ in found] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    done = [p for n, p in found if n == "response.output_item.done"]
    assert [d["output_index"] for d in done] == [0, 1, 2]
    assert done[1]["item"]["arguments"] == '{"city": "Oslo"}' and done[2]["item"]["call_id"] == "call_b"
    final = Response.model_validate(found[-1][1]["response"])
    assert final.output_text == "Let me check." and len(final.output) == 3
    assert final.usage is not None and final.usage.input_tokens == 20 and final.usage.output_tokens == 9


def test_responses_stream_cut_by_the_output_cap_and_errors() -> None:
    capped = ResponsesStream(ResponseShape.of({"model": "m", "max_output_tokens": 1}, "resp_2"))
    found = events(capped.convert(sse(delta(content="a"), finish("length"), USAGE)))
    assert found[-1][0] == "response.incomplete"
    assert found[-1][1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}

    broken = ResponsesStream(ResponseShape.of({"model": "m"}, "resp_3"))
    broken.convert(sse(delta(content="a"), done=False))
    error = events(broken.convert(broken.error_event(UpstreamError("cut"))))
    assert error[0][0] == "error" and error[0][1]["message"] == "cut"
    RESPONSES_EVENT.validate_python(error[0][1])
    assert broken.finish() == b""


# --- hostile bodies -------------------------------------------------------------------------------

_VALUES: list[Any] = [None, True, 0, -1, 2**63, 1.5, "", "x", [], {}, [None], [{}], {"type": None}, [[[]]]]


def _mutations(body: dict[str, Any], rng: random.Random, count: int) -> list[dict[str, Any]]:
    """``body`` with one value somewhere inside replaced by a value of another type, ``count`` times."""
    found = []
    for _ in range(count):
        copy = orjson.loads(orjson.dumps(body))
        node: Any = copy
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = rng.choice(keys)
            child = node[key]
            if isinstance(child, dict | list) and child and rng.random() < 0.7:
                node = child
                continue
            node[key] = rng.choice(_VALUES)
            break
        found.append(copy)
    return found


ANTHROPIC_BODY = {
    "model": "m",
    "max_tokens": 5,
    "system": [{"type": "text", "text": "s"}],
    "messages": [
        {
            "role": "user",
            "content": [{"type": "image", "source": {"type": "base64", "media_type": "a", "data": "b"}}],
        },
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "n", "input": {}}]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": "r"}]}
            ],
        },
    ],
    "tools": [{"name": "n", "input_schema": {}}],
    "tool_choice": {"type": "tool", "name": "n"},
    "metadata": {"user_id": "u"},
    "output_config": {"format": {"type": "json_schema", "schema": {}}},
}
RESPONSES_BODY = {
    "model": "m",
    "instructions": "i",
    "input": [
        {
            "role": "user",
            "content": [{"type": "input_text", "text": "t"}, {"type": "input_image", "image_url": "u"}],
        },
        {"type": "function_call", "call_id": "c", "name": "n", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": "o"},
    ],
    "tools": [{"type": "function", "name": "n"}],
    "tool_choice": {"type": "function", "name": "n"},
    "text": {"format": {"type": "json_schema", "name": "x", "schema": {}}},
}


@pytest.mark.parametrize(
    ("convert", "body"),
    [(anthropic_messages.to_chat, ANTHROPIC_BODY), (responses.to_chat, RESPONSES_BODY)],
    ids=["messages", "responses"],
)
def test_a_mangled_body_is_converted_or_refused_never_crashes(convert: Any, body: dict[str, Any]) -> None:
    convert(body, LIMITS)
    for mangled in _mutations(body, random.Random(16), 2000):
        try:
            chat = convert(mangled, LIMITS)
        except InvalidRequest:
            continue
        orjson.dumps(chat)


def test_mangled_chat_chunks_and_answers_never_crash_a_conversion() -> None:
    rng = random.Random(17)
    chunks = [
        orjson.loads(block[6:]) for block in TOOL_STREAM.split(b"\n\n") if block and block != b"data: [DONE]"
    ]
    answer = {
        "id": "x",
        "choices": [
            {
                "message": {
                    "content": "a",
                    "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}],
                },
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE["usage"],
    }
    shape = ResponseShape.of({"model": "m"}, "resp_4")
    for _ in range(300):
        mangled = [rng.choice(_mutations(chunk, rng, 1)) if rng.random() < 0.3 else chunk for chunk in chunks]
        data = sse(*mangled)
        for stream in (MessagesStream("m"), ResponsesStream(shape)):
            stream.convert(data)
            stream.finish()
        body = orjson.dumps(_mutations(answer, rng, 1)[0])
        anthropic_messages.to_anthropic(body, "m")
        responses.to_response(body, shape)
