"""The inference service's conversions, without a stack: requests become the OpenAI JSON the HTTP
front would receive, answers read directly are exactly what protobuf's own JSON reader makes of
them (the direct path is a speed-up, never a different reading), and nothing an upstream sends is
lost (keys without a field come back in ``extra_json``)."""

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
    {
        "id": "c",
        "obfuscation": "Zx",
        "choices": [
            {
                "index": 0,
                "delta": {"reasoning_content": "hm"},
                "logprobs": {
                    "content": [{"token": "hm", "logprob": -0.5, "bytes": [104, 109], "top_logprobs": []}]
                },
                "matched_stop": None,
                "stop_reason": 12,
            }
        ],
    },
    # Shapes the direct reader does not expect: protobuf's reader decides.
    {"id": "c", "created": 7.0, "choices": [{"index": 0, "delta": {"content": "x"}}]},
    {
        "id": "c",
        "created": 7.0,
        "obfuscation": "Q",
        "choices": [
            {"index": 0, "logprobs": {"content": []}, "delta": {"content": "x", "audio": {"id": "a"}}, "x": 1}
        ],
    },
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
    (
        {"id": "t", "object": "text_completion", "warning": "deprecated", "choices": [{"index": 0,
         "text": "x", "logprobs": {"tokens": ["x"], "token_logprobs": [-0.1], "text_offset": [0]}}]},
        pb.Completion,
    ),
]  # fmt: skip


def parsed(data: dict[str, Any], kind: Any) -> Any:
    return json_format.ParseDict(convert.laid_out(data, kind()), kind(), ignore_unknown_fields=True)


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


LOGPROBS = {
    "content": [
        {"token": "No", "logprob": -0.25, "bytes": [78, 111],
         "top_logprobs": [{"token": "No", "logprob": -0.25, "bytes": [78, 111]}]}
    ],
    "refusal": None,
}  # fmt: skip
THINKING = [{"type": "thinking", "thinking": "The user asks...", "signature": "sig=="}]


def test_an_answer_keeps_every_key_the_upstream_sent() -> None:
    answer = {
        "id": "a", "object": "chat.completion", "created": 7, "model": "m",
        "system_fingerprint": "fp_1", "service_tier": "scale", "provider_note": {"region": "eu"},
        "choices": [{
            "index": 0, "finish_reason": "stop", "logprobs": LOGPROBS, "content_filter_results": {"hate": 0},
            "message": {
                "role": "assistant", "content": None, "refusal": "I can't help with that.",
                "reasoning_content": "The user asks...", "thinking_blocks": THINKING,
                "annotations": [{"type": "url_citation", "url_citation": {"url": "https://x"}}],
                "audio": None,
            },
        }],
        "usage": USAGE,
    }  # fmt: skip
    read = convert.read_answer(orjson.dumps(answer), pb.ChatCompletion())
    assert (read.system_fingerprint, read.service_tier) == ("fp_1", "scale")
    assert orjson.loads(read.extra_json) == {"provider_note": {"region": "eu"}}
    choice = read.choices[0]
    assert orjson.loads(choice.logprobs_json) == LOGPROBS
    assert orjson.loads(choice.extra_json) == {"content_filter_results": {"hate": 0}}
    message = choice.message
    assert message.refusal == "I can't help with that." and not message.HasField("content")
    assert message.reasoning_content == "The user asks..."
    # A null value leaves its key out, as it leaves a field unset.
    assert orjson.loads(message.extra_json) == {
        "thinking_blocks": THINKING,
        "annotations": answer["choices"][0]["message"]["annotations"],  # type: ignore[index]
    }


def test_a_chunk_keeps_its_logprobs_reasoning_refusal_and_unknown_keys() -> None:
    chunk = {
        "id": "c", "object": "chat.completion.chunk", "created": 7, "model": "m", "obfuscation": "a1",
        "choices": [{"index": 0, "finish_reason": None, "logprobs": LOGPROBS,
                     "delta": {"refusal": "No", "reasoning_content": "Hm", "thinking_blocks": THINKING}}],
    }  # fmt: skip
    read = convert.read_chunk(chunk)
    assert orjson.loads(read.extra_json) == {"obfuscation": "a1"}
    choice = read.choices[0]
    assert orjson.loads(choice.logprobs_json) == LOGPROBS and not choice.extra_json
    assert (choice.delta.refusal, choice.delta.reasoning_content) == ("No", "Hm")
    assert orjson.loads(choice.delta.extra_json) == {"thinking_blocks": THINKING}
    # Nothing to keep: no extra_json, as before.
    plain = convert.read_chunk(CHUNKS[1])
    assert not plain.extra_json and not plain.choices[0].extra_json and not plain.choices[0].logprobs_json


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


def test_a_message_sends_back_its_reasoning_and_extra_keys() -> None:
    turn = pb.ChatMessage(
        role="assistant",
        content="4",
        reasoning_content="2+2",
        extra_json=orjson.dumps({"thinking_blocks": THINKING}).decode(),
    )
    request = pb.ChatCompletionRequest(
        model="m", messages=[pb.ChatMessage(role="user", content="2+2?"), turn]
    )
    assert orjson.loads(convert.chat_body(request, stream=False))["messages"][1] == {
        "role": "assistant",
        "content": "4",
        "reasoning_content": "2+2",
        "thinking_blocks": THINKING,
    }
    request.messages[1].extra_json = '{"content": "5"}'
    with pytest.raises(InvalidRequest) as refused:
        convert.chat_body(request, stream=False)
    assert refused.value.param == "messages[1].extra_json"


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
