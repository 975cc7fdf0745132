"""Reasoning, prompt caching and documents through the Anthropic and Gemini conversions, both ways:
the chat extensions (``reasoning_effort``, ``thinking``, ``cache_control``, ``file`` parts,
``thinking_blocks``) in the provider's request, thinking and thought parts back as
``reasoning_content`` / ``thinking_blocks``, streams fed one byte at a time and in larger pieces."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from services.common.errors import InvalidRequest
from services.relay.providers.anthropic import ANTHROPIC
from services.relay.providers.base import StreamDecoder
from services.relay.providers.events import EventReader
from services.relay.providers.gemini import GEMINI

PDF_URL = "data:application/pdf;base64,JVBERi0xLjQK"
EPHEMERAL = {"type": "ephemeral"}
SIGNED = {"type": "thinking", "thinking": "let me see", "signature": "sig-1"}
REDACTED = {"type": "redacted_thinking", "data": "opaque"}


def anthropic_request(body: dict[str, Any], cap: int = 8000) -> dict[str, Any]:
    sent: dict[str, Any] = orjson.loads(
        ANTHROPIC.request(body, "claude", stream=False, max_output_tokens=cap)
    )
    return sent


def gemini_request(body: dict[str, Any]) -> dict[str, Any]:
    sent: dict[str, Any] = orjson.loads(GEMINI.request(body, "gemini", stream=False, max_output_tokens=0))
    return sent


def ask(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "think"}], **extra}


@pytest.mark.parametrize(
    ("extra", "cap", "thinking"),
    [
        ({"reasoning_effort": "minimal"}, 8000, {"type": "enabled", "budget_tokens": 1024}),
        ({"reasoning_effort": "low"}, 8000, {"type": "enabled", "budget_tokens": 1024}),
        ({"reasoning_effort": "medium"}, 8000, {"type": "enabled", "budget_tokens": 2048}),
        ({"reasoning_effort": "high"}, 8000, {"type": "enabled", "budget_tokens": 4096}),
        # The held cap covers thinking too: an effort's budget stays under it.
        ({"reasoning_effort": "high"}, 3000, {"type": "enabled", "budget_tokens": 2999}),
        ({"reasoning_effort": "high", "max_tokens": 2500}, 8000, {"type": "enabled", "budget_tokens": 2499}),
        ({"reasoning_effort": "none"}, 8000, None),
        # thinking wins over reasoning_effort, and goes as given (Anthropic judges it).
        ({"reasoning_effort": "high", "thinking": {"type": "adaptive"}}, 8000, {"type": "adaptive"}),
        (
            {"thinking": {"type": "enabled", "budget_tokens": 9000}},
            8000,
            {"type": "enabled", "budget_tokens": 9000},
        ),
        ({"thinking": {"type": "disabled"}}, 8000, {"type": "disabled"}),
        ({}, 8000, None),
    ],
)
def test_anthropic_thinking_from_the_chat_body(extra: dict[str, Any], cap: int, thinking: Any) -> None:
    sent = anthropic_request(ask(**extra), cap)
    assert sent.get("thinking") == thinking


def test_anthropic_thinking_refusals() -> None:
    with pytest.raises(InvalidRequest) as raised:
        anthropic_request(ask(reasoning_effort="low", max_tokens=1024))
    assert raised.value.param == "max_tokens"
    with pytest.raises(InvalidRequest):
        anthropic_request(ask(reasoning_effort="extreme"))
    with pytest.raises(InvalidRequest):
        anthropic_request(ask(thinking="on"))


def test_anthropic_cache_control_on_parts_messages_and_tools() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "be brief", "cache_control": EPHEMERAL},
            {
                "role": "user",
                "content": [
                    {
                        "type": "text",
                        "text": "long document",
                        "cache_control": {"type": "ephemeral", "ttl": "1h"},
                    },
                    {"type": "text", "text": "question"},
                ],
            },
            {"role": "assistant", "content": "answer", "cache_control": EPHEMERAL},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                "cache_control": EPHEMERAL,
            },
        ],
        "tools": [
            {"type": "function", "function": {"name": "weather"}, "cache_control": EPHEMERAL},
            {"type": "function", "function": {"name": "clock"}},
        ],
    }
    sent = anthropic_request(body)
    assert sent["system"] == [{"type": "text", "text": "be brief", "cache_control": EPHEMERAL}]
    first, answer, last = sent["messages"]
    assert first["content"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    assert "cache_control" not in first["content"][1]
    assert answer["content"] == [{"type": "text", "text": "answer", "cache_control": EPHEMERAL}]
    # A message's breakpoint is on its last block.
    assert ["cache_control" in block for block in last["content"]] == [False, True]
    assert sent["tools"][0]["cache_control"] == EPHEMERAL and "cache_control" not in sent["tools"][1]
    with pytest.raises(InvalidRequest):
        anthropic_request(
            {"messages": [{"role": "user", "content": "x", "cache_control": {"type": "forever"}}]}
        )


def test_files_become_documents_and_inline_data() -> None:
    part = {"type": "file", "file": {"file_data": PDF_URL, "filename": "report.pdf"}}
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "summarise"}, part]}]}
    sent = anthropic_request(body)
    assert sent["messages"][0]["content"][1] == {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQK"},
        "title": "report.pdf",
    }
    assert gemini_request(body)["contents"][0]["parts"][1] == {
        "inlineData": {"mimeType": "application/pdf", "data": "JVBERi0xLjQK"}
    }
    for refused in (
        {"type": "file", "file": {"file_id": "file-abc"}},
        {"type": "file", "file": {"file_data": "data:application/zip;base64,UEsDBA=="}},
    ):
        with pytest.raises(InvalidRequest):
            anthropic_request({"messages": [{"role": "user", "content": [refused]}]})
    with pytest.raises(InvalidRequest):
        gemini_request(
            {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]}]}
        )


def test_anthropic_thinking_blocks_open_the_assistant_turn() -> None:
    unsigned = {"type": "thinking", "thinking": "no signature"}
    body = {
        "messages": [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": "checking",
                "thinking_blocks": [SIGNED, REDACTED],
                "tool_calls": [
                    {"id": "toolu_1", "type": "function", "function": {"name": "w", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
            {"role": "assistant", "content": "ok", "thinking_blocks": [unsigned]},
        ],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }
    sent = anthropic_request(body)
    turn = sent["messages"][1]["content"]
    assert turn == [
        SIGNED,
        REDACTED,
        {"type": "text", "text": "checking"},
        {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {}},
    ]
    # A block without its signature goes without one: Anthropic refuses it, the relay invents nothing.
    assert sent["messages"][3]["content"][0] == unsigned
    with pytest.raises(InvalidRequest):
        anthropic_request(
            {"messages": [{"role": "assistant", "content": "x", "thinking_blocks": [{"type": "text"}]}]}
        )


def test_anthropic_answer_with_thinking() -> None:
    body, usage = ANTHROPIC.answer(
        orjson.dumps(
            {
                "id": "msg_1",
                "model": "claude-x",
                "content": [
                    {"type": "thinking", "thinking": "first ", "signature": "sig-a"},
                    {"type": "redacted_thinking", "data": "opaque"},
                    {"type": "thinking", "thinking": "second", "signature": "sig-b"},
                    {"type": "text", "text": "Paris"},
                    {"type": "tool_use", "id": "toolu_9", "name": "w", "input": {"city": "Paris"}},
                ],
                "stop_reason": "tool_use",
                "usage": {
                    "input_tokens": 3,
                    "output_tokens": 20,
                    "output_tokens_details": {"thinking_tokens": 12},
                },
            }
        ),
        "claude",
    )
    message = orjson.loads(body)["choices"][0]["message"]
    assert message["content"] == "Paris" and message["tool_calls"][0]["id"] == "toolu_9"
    assert message["reasoning_content"] == "first second"
    assert message["thinking_blocks"] == [
        {"type": "thinking", "thinking": "first ", "signature": "sig-a"},
        {"type": "redacted_thinking", "data": "opaque"},
        {"type": "thinking", "thinking": "second", "signature": "sig-b"},
    ]
    assert usage is not None and (usage.completion_tokens, usage.reasoning_tokens) == (20, 12)
    # No thinking, no new fields: the answer is what it always was.
    plain, _ = ANTHROPIC.answer(
        orjson.dumps({"id": "m", "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn"}), "c"
    )
    assert orjson.loads(plain)["choices"][0]["message"] == {"role": "assistant", "content": "hi"}


def _event(kind: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **payload}) + b"\n\n"


def _delta(index: int, delta: dict[str, Any]) -> bytes:
    return _event("content_block_delta", {"index": index, "delta": delta})


ANTHROPIC_THINKING_STREAM = b"".join(
    [
        _event(
            "message_start",
            {
                "message": {
                    "id": "msg_t",
                    "model": "claude-x",
                    "content": [],
                    "usage": {"input_tokens": 5, "output_tokens": 1},
                }
            },
        ),
        _event(
            "content_block_start",
            {"index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}},
        ),
        _delta(0, {"type": "thinking_delta", "thinking": "Pondér"}),
        _delta(0, {"type": "thinking_delta", "thinking": "ing…"}),
        _delta(0, {"type": "signature_delta", "signature": "EqQBsig=="}),
        _event("content_block_stop", {"index": 0}),
        _event(
            "content_block_start",
            {"index": 1, "content_block": {"type": "redacted_thinking", "data": "opaque=="}},
        ),
        _event("content_block_stop", {"index": 1}),
        _event("content_block_start", {"index": 2, "content_block": {"type": "text", "text": ""}}),
        _delta(2, {"type": "text_delta", "text": "Paris"}),
        _event("content_block_stop", {"index": 2}),
        _event(
            "message_delta",
            {
                "delta": {"stop_reason": "end_turn"},
                "usage": {"output_tokens": 9, "output_tokens_details": {"thinking_tokens": 7}},
            },
        ),
        _event("message_stop", {}),
    ]
)


def _decode(decoder: StreamDecoder, stream: bytes, step: int) -> list[dict[str, Any]]:
    out = [decoder.feed(stream[start : start + step]) for start in range(0, len(stream), step)]
    out.append(decoder.flush())
    events = EventReader().feed(b"".join(out))
    assert events[-1] == b"[DONE]"
    return [orjson.loads(event) for event in events[:-1]]


def _deltas(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [choice["delta"] for chunk in chunks for choice in chunk["choices"]]


@pytest.mark.parametrize("step", [1, 2, 5, 64, 100_000])
def test_anthropic_thinking_stream_in_pieces(step: int) -> None:
    decoder = ANTHROPIC.decoder("claude", include_usage=True)
    deltas = _deltas(_decode(decoder, ANTHROPIC_THINKING_STREAM, step))
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "Pondéring…"
    assert [block for d in deltas for block in d.get("thinking_blocks") or ()] == [
        {"type": "thinking", "thinking": "", "signature": "EqQBsig=="},
        {"type": "redacted_thinking", "data": "opaque=="},
    ]
    # Thinking comes first, as it arrived, then the answer.
    kinds = [next(iter(k for k in d if k != "role"), None) for d in deltas if d]
    assert kinds[: kinds.index("thinking_blocks")].count("reasoning_content") == 2
    assert kinds.index("thinking_blocks") < len(kinds) - 1 - kinds[::-1].index("content")
    assert "".join(d.get("content") or "" for d in deltas) == "Paris"
    assert decoder.done and decoder.usage is not None and decoder.usage.reasoning_tokens == 7


def test_gemini_thinking_config_from_the_chat_body() -> None:
    def config(**extra: Any) -> Any:
        return gemini_request(ask(**extra)).get("generationConfig", {}).get("thinkingConfig")

    assert config(reasoning_effort="low") == {"thinkingBudget": 1024, "includeThoughts": True}
    assert config(reasoning_effort="medium") == {"thinkingBudget": 2048, "includeThoughts": True}
    assert config(reasoning_effort="high") == {"thinkingBudget": 4096, "includeThoughts": True}
    assert config(reasoning_effort="none") == {"thinkingBudget": 0}
    assert config(thinking={"type": "enabled", "budget_tokens": 3000}, reasoning_effort="low") == {
        "thinkingBudget": 3000,
        "includeThoughts": True,
    }
    assert config(thinking={"type": "adaptive"}) == {"thinkingBudget": -1, "includeThoughts": True}
    assert config(thinking={"type": "disabled"}) == {"thinkingBudget": 0}
    assert config() is None
    with pytest.raises(InvalidRequest):
        config(thinking={"type": "enabled"})


GEMINI_ANSWER = {
    "candidates": [
        {
            "content": {
                "role": "model",
                "parts": [
                    {"text": "Thinking about ", "thought": True},
                    {"text": "Paris", "thought": True},
                    {"text": "Checking."},
                    {
                        "functionCall": {"name": "weather", "args": {"city": "Paris"}},
                        "thoughtSignature": "c2lnLTE=",
                    },
                ],
            },
            "finishReason": "STOP",
            "index": 0,
        }
    ],
    "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 3, "thoughtsTokenCount": 6},
    "responseId": "r-same",
}


def test_gemini_answer_thoughts_and_signed_call_round_trip() -> None:
    body, usage = GEMINI.answer(orjson.dumps(GEMINI_ANSWER), "gemini")
    message = orjson.loads(body)["choices"][0]["message"]
    assert message["content"] == "Checking." and message["reasoning_content"] == "Thinking about Paris"
    [call] = message["tool_calls"]
    assert call["id"].startswith("call_") and call["id"].endswith("__thought__c2lnLTE=")
    assert usage is not None and usage.reasoning_tokens == 6
    # The caller sends the call back with its id: the signature is restored on the functionCall part.
    turn = {
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "sunny"},
        ]
    }
    model, answer = gemini_request(turn)["contents"][1:]
    assert model["parts"] == [
        {"functionCall": {"name": "weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2lnLTE="}
    ]
    assert answer["parts"][0]["functionResponse"]["name"] == "weather"
    # Two answers with the same response id still get different call ids.
    again, _ = GEMINI.answer(orjson.dumps(GEMINI_ANSWER), "gemini")
    assert orjson.loads(again)["choices"][0]["message"]["tool_calls"][0]["id"] != call["id"]


def _gemini_chunk(parts: list[dict[str, Any]], finish: str | None = None) -> bytes:
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    payload = {
        "candidates": [candidate],
        "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 2, "thoughtsTokenCount": 6},
        "responseId": "r-same",
    }
    return b"data: " + orjson.dumps(payload) + b"\r\n\r\n"


GEMINI_THINKING_STREAM = b"".join(
    [
        _gemini_chunk([{"text": "Thinking ", "thought": True}]),
        _gemini_chunk([{"text": "hard", "thought": True}]),
        _gemini_chunk([{"text": "Héllo"}]),
        _gemini_chunk(
            [{"functionCall": {"name": "weather", "args": {}}, "thoughtSignature": "c2ln"}], "STOP"
        ),
    ]
)


@pytest.mark.parametrize("step", [1, 3, 100_000])
def test_gemini_thinking_stream_in_pieces(step: int) -> None:
    decoder = GEMINI.decoder("gemini", include_usage=False)
    deltas = _deltas(_decode(decoder, GEMINI_THINKING_STREAM, step))
    assert [d.get("reasoning_content") for d in deltas[:2]] == ["Thinking ", "hard"]
    assert deltas[0]["role"] == "assistant" and deltas[2] == {"content": "Héllo"}
    [call] = deltas[3]["tool_calls"]
    assert call["id"].endswith("__thought__c2ln") and call["function"]["name"] == "weather"
    assert decoder.done


def test_gemini_stream_call_ids_differ_across_requests() -> None:
    ids = []
    for _ in range(2):
        deltas = _deltas(
            _decode(GEMINI.decoder("gemini", include_usage=False), GEMINI_THINKING_STREAM, 100_000)
        )
        ids.append(deltas[3]["tool_calls"][0]["id"])
    # Both streams say the same responseId, yet a caller keeping calls by id must not mix them up.
    assert ids[0] != ids[1]
