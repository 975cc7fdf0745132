"""The provider conversions on recorded, real-shaped payloads: requests built from OpenAI chat bodies,
answers and streams turned back into OpenAI's shapes, streams fed in awkward pieces."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from services.common.errors import InvalidRequest
from services.common.pb.relaygate.catalog.v1.catalog_pb2 import Channel as ChannelMessage
from services.relay.providers import provider_for
from services.relay.providers.anthropic import ANTHROPIC
from services.relay.providers.base import StreamDecoder
from services.relay.providers.content import parse_data_url
from services.relay.providers.events import EventReader
from services.relay.providers.gemini import GEMINI
from services.relay.upstream.channels import Channel


def _event(kind: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


# An Anthropic stream as the Messages API sends it (thinking, text, a tool call, usage at both ends).
ANTHROPIC_STREAM = b"".join(
    [
        _event(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_01",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-x",
                    "content": [],
                    "stop_reason": None,
                    "usage": {
                        "input_tokens": 10,
                        "cache_creation_input_tokens": 20,
                        "cache_read_input_tokens": 30,
                        "output_tokens": 1,
                    },
                },
            },
        ),
        _event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "thinking", "thinking": ""},
            },
        ),
        _event(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "thinking_delta", "thinking": "hm"},
            },
        ),
        _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _event("ping", {"type": "ping"}),
        _event(
            "content_block_start",
            {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        ),
        _event(
            "content_block_delta",
            {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Héllo "}},
        ),
        _event(
            "content_block_delta",
            {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "world"}},
        ),
        _event("content_block_stop", {"type": "content_block_stop", "index": 1}),
        _event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 2,
                "content_block": {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}},
            },
        ),
        _event(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 2,
                "delta": {"type": "input_json_delta", "partial_json": '{"city": '},
            },
        ),
        _event(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 2,
                "delta": {"type": "input_json_delta", "partial_json": '"Paris"}'},
            },
        ),
        _event("content_block_stop", {"type": "content_block_stop", "index": 2}),
        _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": {"output_tokens": 42, "output_tokens_details": {"thinking_tokens": 7}},
            },
        ),
        _event("message_stop", {"type": "message_stop"}),
    ]
)


def _gemini_chunk(parts: list[dict[str, Any]], finish: str | None, candidates: int, thoughts: int) -> bytes:
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    usage = {
        "promptTokenCount": 50,
        "cachedContentTokenCount": 40,
        "candidatesTokenCount": candidates,
        "thoughtsTokenCount": thoughts,
        "totalTokenCount": 50 + candidates + thoughts,
    }
    payload = {
        "candidates": [candidate],
        "usageMetadata": usage,
        "modelVersion": "gemini-x",
        "responseId": "r1",
    }
    return b"data: " + orjson.dumps(payload) + b"\r\n\r\n"


# Gemini's ?alt=sse framing (CRLF), with the cumulative usage in every chunk.
GEMINI_STREAM = b"".join(
    [
        _gemini_chunk([{"text": "Héllo "}], None, 1, 3),
        _gemini_chunk([{"text": "world"}], None, 2, 3),
        _gemini_chunk([{"functionCall": {"name": "weather", "args": {"city": "Paris"}}}], "STOP", 5, 3),
    ]
)


def _decode(decoder: StreamDecoder, stream: bytes, cuts: list[int]) -> bytes:
    out = []
    start = 0
    for cut in [*cuts, len(stream)]:
        out.append(decoder.feed(stream[start:cut]))
        start = cut
    out.append(decoder.flush())
    return b"".join(out)


def _chunks(sse: bytes) -> list[Any]:
    events = EventReader().feed(sse)
    assert events[-1] == b"[DONE]"
    return [orjson.loads(event) for event in events[:-1]]


def _read(chunks: list[Any]) -> tuple[str, str, list[str], dict[str, Any] | None]:
    """(text, tool arguments, finish reasons, usage) of OpenAI chunks."""
    text, arguments, finishes, usage = "", "", [], None
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk["choices"]:
            delta = choice["delta"]
            text += delta.get("content") or ""
            for call in delta.get("tool_calls") or ():
                arguments += call["function"].get("arguments") or ""
            if choice["finish_reason"]:
                finishes.append(choice["finish_reason"])
    return text, arguments, finishes, usage


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 10_000])
def test_anthropic_stream_in_pieces(step: int) -> None:
    decoder = ANTHROPIC.decoder("claude", include_usage=True)
    sse = _decode(decoder, ANTHROPIC_STREAM, list(range(step, len(ANTHROPIC_STREAM), step)))
    chunks = _chunks(sse)
    text, arguments, finishes, usage = _read(chunks)
    assert (text, orjson.loads(arguments), finishes) == ("Héllo world", {"city": "Paris"}, ["tool_calls"])
    first_call = next(
        c["choices"][0]["delta"]["tool_calls"][0]
        for c in chunks
        if c["choices"] and c["choices"][0]["delta"].get("tool_calls")
    )
    assert first_call == {
        "index": 0,
        "id": "toolu_1",
        "type": "function",
        "function": {"name": "weather", "arguments": ""},
    }
    assert decoder.done
    assert decoder.usage is not None
    record = decoder.usage
    assert (record.prompt_tokens, record.cached_prompt_tokens, record.cache_write_tokens) == (40, 30, 20)
    assert (record.completion_tokens, record.reasoning_tokens) == (42, 7)
    assert usage is not None and usage["prompt_tokens"] == 60 and usage["completion_tokens"] == 42
    assert chunks[0]["id"] == "msg_01" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"


def test_anthropic_stream_without_its_end_is_not_done() -> None:
    decoder = ANTHROPIC.decoder("claude", include_usage=False)
    cut = ANTHROPIC_STREAM.index(b"event: message_delta")
    sse = _decode(decoder, ANTHROPIC_STREAM[:cut], [])
    assert b"[DONE]" not in sse and not decoder.done
    # No final usage came: the relay bills its marked estimate instead (the thinking delta counts).
    assert decoder.usage is None and decoder.events == 5


@pytest.mark.parametrize("step", [1, 5, 13, 10_000])
def test_gemini_stream_in_pieces(step: int) -> None:
    decoder = GEMINI.decoder("gemini", include_usage=True)
    sse = _decode(decoder, GEMINI_STREAM, list(range(step, len(GEMINI_STREAM), step)))
    text, arguments, finishes, usage = _read(_chunks(sse))
    assert (text, orjson.loads(arguments), finishes) == ("Héllo world", {"city": "Paris"}, ["tool_calls"])
    assert decoder.done
    record = decoder.usage
    assert record is not None
    assert (
        record.prompt_tokens,
        record.cached_prompt_tokens,
        record.completion_tokens,
        record.reasoning_tokens,
    ) == (
        50,
        40,
        8,
        3,
    )
    assert usage is not None and usage["completion_tokens_details"] == {"reasoning_tokens": 3}


def test_gemini_stream_cut_before_its_finish_is_not_done() -> None:
    decoder = GEMINI.decoder("gemini", include_usage=False)
    cut = GEMINI_STREAM.index(b"data:", 10)
    assert b"[DONE]" not in _decode(decoder, GEMINI_STREAM[:cut], [])
    assert not decoder.done


def test_event_reader_joins_a_crlf_split_between_reads() -> None:
    reader = EventReader()
    assert reader.feed(b"data: 1\r\n\r") == []
    assert reader.feed(b"\ndata: 2\n") == [b"1"]
    assert reader.feed(b"\n") == [b"2"]


BODY: dict[str, Any] = {
    "model": "m",
    "messages": [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.webp"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                },
                {"id": "c2", "type": "function", "function": {"name": "clock", "arguments": ""}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "noon"}]},
    ],
    "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
    "tool_choice": {"type": "function", "function": {"name": "weather"}},
    "parallel_tool_calls": False,
    "temperature": 1.5,
    "stop": "END",
}


def test_anthropic_request() -> None:
    sent = orjson.loads(ANTHROPIC.request(BODY, "claude-x", stream=True, max_output_tokens=64))
    assert sent["model"] == "claude-x" and sent["max_tokens"] == 64 and sent["stream"] is True
    assert sent["system"] == [{"type": "text", "text": "be brief"}]
    user, assistant, results = sent["messages"]
    assert [block["type"] for block in user["content"]] == ["text", "image", "image"]
    assert user["content"][1]["source"] == {
        "type": "base64",
        "media_type": "image/png",
        "data": "iVBORw0KGgo=",
    }
    assert user["content"][2]["source"] == {"type": "url", "url": "https://example.com/cat.webp"}
    assert assistant["content"][0] == {
        "type": "tool_use",
        "id": "c1",
        "name": "weather",
        "input": {"city": "Paris"},
    }
    # Both tool results in one user turn, as Anthropic wants them.
    assert results["role"] == "user"
    assert [(b["tool_use_id"], b["content"]) for b in results["content"]] == [("c1", "sunny"), ("c2", "noon")]
    assert sent["tool_choice"] == {"type": "tool", "name": "weather", "disable_parallel_tool_use": True}
    assert sent["tools"] == [{"name": "weather", "input_schema": {"type": "object"}}]
    assert (sent["temperature"], sent["stop_sequences"]) == (1.0, ["END"])


def test_gemini_request() -> None:
    sent = orjson.loads(
        GEMINI.request({**BODY, "max_tokens": 9}, "gemini-x", stream=False, max_output_tokens=64)
    )
    assert sent["systemInstruction"] == {"parts": [{"text": "be brief"}]}
    user, model, results = sent["contents"]
    assert user["parts"][1] == {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}
    assert user["parts"][2] == {
        "fileData": {"mimeType": "image/webp", "fileUri": "https://example.com/cat.webp"}
    }
    assert model["role"] == "model" and model["parts"][0] == {
        "functionCall": {"name": "weather", "args": {"city": "Paris"}}
    }
    assert [p["functionResponse"]["name"] for p in results["parts"]] == ["weather", "clock"]
    assert sent["generationConfig"] == {"maxOutputTokens": 9, "temperature": 1.5, "stopSequences": ["END"]}
    assert sent["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["weather"]}
    }
    assert GEMINI.target(
        b"/v1beta", b"/chat/completions", "models/gemini-x", stream=True, api_version=""
    ) == (b"/v1beta/models/gemini-x:streamGenerateContent?alt=sse")


def test_answers() -> None:
    body, usage = ANTHROPIC.answer(
        orjson.dumps(
            {
                "id": "msg_2",
                "model": "claude-x",
                "content": [{"type": "text", "text": "hi"}],
                "stop_reason": "max_tokens",
                "usage": {"input_tokens": 3, "output_tokens": 2, "cache_read_input_tokens": 1},
            }
        ),
        "claude",
    )
    answer = orjson.loads(body)
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert answer["choices"][0]["finish_reason"] == "length"
    assert usage is not None and (usage.prompt_tokens, usage.cached_prompt_tokens) == (4, 1)

    body, usage = GEMINI.answer(
        orjson.dumps(
            {
                "candidates": [
                    {"content": {"parts": [{"text": "no"}]}, "finishReason": "SAFETY", "index": 0}
                ],
                "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 1},
            }
        ),
        "gemini",
    )
    assert orjson.loads(body)["choices"][0]["finish_reason"] == "content_filter"
    assert usage is not None and usage.completion_tokens == 1


def test_provider_errors_in_openai_shape() -> None:
    status, body = GEMINI.error(
        400, b'{"error": {"code": 400, "message": "API key not valid.", "status": "INVALID_ARGUMENT"}}'
    )
    # A wrong key is the channel's credentials, not the caller's mistake.
    assert status == 401
    assert orjson.loads(body)["error"]["message"] == "API key not valid."
    status, body = ANTHROPIC.error(
        529, b'{"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}'
    )
    assert (status, orjson.loads(body)["error"]["type"]) == (529, "overloaded_error")
    assert orjson.loads(ANTHROPIC.error(502, b"<html>")[1])["error"]["type"] == "upstream_error"


def test_what_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        ANTHROPIC.request({**BODY, "n": 2}, "claude", stream=False, max_output_tokens=0)
    with pytest.raises(InvalidRequest):
        parse_data_url("data:image/png,rawbytes")
    with pytest.raises(InvalidRequest):
        GEMINI.request(
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
            "g",
            stream=False,
            max_output_tokens=0,
        )
    with pytest.raises(ValueError):
        provider_for("cohere")
    assert provider_for("openai") is None and provider_for("") is None


def test_a_channel_types_target_and_headers() -> None:
    def channel(kind: str, base_url: str, **fields: Any) -> Channel:
        return Channel.from_message(
            ChannelMessage(
                channel_id="ch_1", name="c", base_url=base_url, api_key="k", models=["m"], type=kind, **fields
            )
        )

    openai = channel("", "https://api.example.com/v1")
    assert openai.target(b"/chat/completions", "m", stream=True) == b"/v1/chat/completions"
    assert (b"authorization", b"Bearer k") in openai.raw_headers

    azure = channel(
        "azure-openai", "https://r.openai.azure.com", api_version="2024-10-21", model_map={"m": "dep 1"}
    )
    assert azure.target(b"/embeddings", "m", stream=False) == (
        b"/openai/deployments/dep%201/embeddings?api-version=2024-10-21"
    )
    assert (b"api-key", b"k") in azure.raw_headers and azure.serves(b"/embeddings")

    claude = channel("anthropic", "https://api.anthropic.com/v1", headers={"anthropic-version": "2026-01-01"})
    assert claude.target(b"/chat/completions", "m", stream=True) == b"/v1/messages"
    # The channel's own headers win (a newer API version), the key goes where Anthropic reads it.
    assert (b"anthropic-version", b"2026-01-01") in claude.raw_headers
    assert (b"x-api-key", b"k") in claude.raw_headers
    assert not any(name == b"authorization" for name, _ in claude.raw_headers)
    assert not claude.serves(b"/embeddings")
