"""The inference service's conversions, without a stack: requests become the OpenAI JSON the HTTP
front would receive, and answers read directly are exactly what protobuf's own JSON reader makes of
them (the direct path is a speed-up, never a different reading)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from services.common.errors import InvalidRequest, UpstreamError
from services.common.pb.relaygate.relay.v1 import inference_pb2 as pb
from services.relay.edge.grpc import convert

USAGE = {
    "prompt_tokens": 12,
    "completion_tokens": 5,
    "total_tokens": 17,
    "prompt_tokens_details": {"cached_tokens": 4, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 2, "unknown_kind": 9},
}
CALL = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}

CHUNKS: list[dict[str, Any]] = [
    {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "m",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
    },
    {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "m",
        "usage": None,
        "choices": [{"index": 0, "delta": {"content": "tok "}, "logprobs": None, "finish_reason": None}],
    },
    {"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [CALL]}}], "system_fingerprint": "fp"},
    {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    {"id": "c", "choices": [{"index": 1}]},
    {"id": "c", "choices": [], "usage": USAGE},
    # Shapes the direct reader does not expect: protobuf's reader decides.
    {"id": "c", "created": 7.0, "choices": [{"index": 0, "delta": {"content": "x"}}]},
]
ANSWERS: list[tuple[dict[str, Any], Any]] = [
    (
        {"id": "a", "object": "chat.completion", "created": 7, "model": "m", "service_tier": "default",
         "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                      "message": {"role": "assistant", "content": "hi", "refusal": None, "annotations": []}}],
         "usage": USAGE},
        pb.ChatCompletion,
    ),
    (
        {"choices": [{"index": 0, "finish_reason": "tool_calls",
                      "message": {"role": "assistant", "content": None, "tool_calls": [CALL]}}]},
        pb.ChatCompletion,
    ),
    (
        {"object": "list", "model": "m", "usage": {"prompt_tokens": 2, "total_tokens": 2},
         "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -1, 0.25]}]},
        pb.EmbeddingResponse,
    ),
    ({"id": "t", "object": "text_completion", "choices": [{"index": 0, "text": "x"}]}, pb.Completion),
]  # fmt: skip


def parsed(data: dict[str, Any], kind: Any) -> Any:
    return json_format.ParseDict(data, kind(), ignore_unknown_fields=True)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_a_chunk_read_directly_is_protobufs_reading(chunk: dict[str, Any]) -> None:
    read = convert.read_chunk(chunk)
    expected = parsed(chunk, pb.ChatCompletionChunk)
    assert read == expected
    # Presence too: an empty delta or usage is not the same as none.
    assert read.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)


@pytest.mark.parametrize(("answer", "kind"), ANSWERS)
def test_an_answer_read_directly_is_protobufs_reading(answer: dict[str, Any], kind: Any) -> None:
    read = convert.read_answer(orjson.dumps(answer), kind())
    expected = parsed(answer, kind)
    assert read.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)


@pytest.mark.parametrize(
    "body",
    [b"not json", b'{"choices": [{"message": {"content": ["a", "part"]}}]}', b'{"created": "yesterday"}'],
)
def test_an_answer_that_fits_no_message_is_an_upstream_error(body: bytes) -> None:
    with pytest.raises(UpstreamError):
        convert.read_answer(body, pb.ChatCompletion())


FUNCTION = pb.FunctionCall(name="f", arguments="{}")


def test_a_chat_request_is_the_json_the_http_front_would_get() -> None:
    parameters = Struct()
    parameters.update({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}})
    request = pb.ChatCompletionRequest(
        model="m",
        messages=[
            pb.ChatMessage(role="system", content=""),
            pb.ChatMessage(
                role="user",
                content_parts=[
                    pb.ContentPart(type="text", text="look"),
                    pb.ContentPart(type="image_url", image_url=pb.ImageUrl(url="https://x/y.png")),
                ],
            ),
            pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(id="call_1", function=FUNCTION)]),
            pb.ChatMessage(role="tool", content="1", tool_call_id="call_1"),
        ],
        max_tokens=5,
        temperature=0,
        seed=2**62 + 1,
        stop=["\n"],
        tools=[pb.Tool(function=pb.FunctionDefinition(name="f", parameters=parameters, strict=True))],
        tool_choice=pb.ToolChoice(function_name="f"),
        stream_options=pb.StreamOptions(include_usage=True),
        extra_json='{"logit_bias": {"50256": -100}, "seed_note": 18446744073709551615}',
    )  # fmt: skip
    assert orjson.loads(convert.chat_body(request, stream=True)) == {
        "model": "m",
        "messages": [
            {"role": "system", "content": ""},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                ],
            },
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "content": "1", "tool_call_id": "call_1"},
        ],
        "max_tokens": 5,
        "temperature": 0.0,
        "seed": 2**62 + 1,
        "stop": ["\n"],
        # Integral numbers of a schema go out as integers.
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "f",
                    "parameters": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}},
                    "strict": True,
                },
            }
        ],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": {"50256": -100},
        "seed_note": 18446744073709551615,
    }
    # Unary: no stream keys, and stream_options is refused rather than ignored.
    with pytest.raises(InvalidRequest) as refused:
        convert.chat_body(request, stream=False)
    assert refused.value.param == "stream_options"


@pytest.mark.parametrize(
    ("extra", "named"),
    [('{"stream": true}', "'stream'"), ('{"model": "other", "n": 2}', "'model', 'n'"), ('"text"', "object")],
)
def test_extra_json_may_not_repeat_a_field_or_decide_streaming(extra: str, named: str) -> None:
    request = pb.ChatCompletionRequest(model="m", messages=[pb.ChatMessage(role="user", content="x")])
    request.extra_json = extra
    with pytest.raises(InvalidRequest) as refused:
        convert.chat_body(request, stream=False)
    assert refused.value.param == "extra_json"
    assert named in refused.value.message


def test_embeddings_and_completions_take_one_text_or_several() -> None:
    one = pb.EmbeddingRequest(model="m", input=["a"], dimensions=3)
    assert orjson.loads(convert.embedding_body(one)) == {"model": "m", "input": "a", "dimensions": 3}
    several = pb.CompletionRequest(model="m", prompt=["a", "b"], echo=False)
    assert orjson.loads(convert.completion_body(several)) == {
        "model": "m",
        "prompt": ["a", "b"],
        "echo": False,
    }
    base64 = pb.EmbeddingRequest(model="m", input=["a"], extra_json='{"encoding_format": "base64"}')
    with pytest.raises(InvalidRequest):
        convert.embedding_body(base64)
