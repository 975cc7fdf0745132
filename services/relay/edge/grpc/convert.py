"""The inference service's messages to and from OpenAI's JSON.

Requests become the JSON body the HTTP front would have received, so the pipeline checks, prices and
sends them exactly as it does for HTTP (a gRPC request is refused for the same reasons, with the same
``param``). Answers are the upstream's JSON read into the mirrored messages; keys without a field are
dropped. ``extra_json`` is merged into the request after its own fields, and may not repeat one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

import orjson
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct

from services.common.errors import InvalidRequest, UpstreamError
from services.common.pb.relaygate.relay.v1 import inference_pb2 as pb

__all__ = ["chat_body", "completion_body", "embedding_body", "read_answer", "read_chunk"]

M = TypeVar("M", bound=Message)

# Keys the RPC itself decides: a stream is asked for by calling StreamChatCompletion.
_RESERVED = frozenset({"stream", "stream_options"})
# Vectors are repeated floats: the base64 form would not fit the message.
_EMBEDDING_RESERVED = frozenset({"encoding_format"})


def _optional(body: dict[str, Any], message: Message, names: Iterable[str]) -> None:
    for name in names:
        if message.HasField(name):
            body[name] = getattr(message, name)


Request = pb.ChatCompletionRequest | pb.CompletionRequest | pb.EmbeddingRequest


def _extra(body: dict[str, Any], message: Request, reserved: frozenset[str] = frozenset()) -> None:
    """Merge the request's ``extra_json`` (a JSON object) into ``body``."""
    extra_json = message.extra_json
    if not extra_json:
        return
    try:
        extra = orjson.loads(extra_json)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"'extra_json' is not valid JSON: {exc}.", param="extra_json") from None
    if not isinstance(extra, dict):
        raise InvalidRequest("'extra_json' must be a JSON object.", param="extra_json")
    covered = {field.name for field in message.DESCRIPTOR.fields} | _RESERVED | reserved
    taken = sorted(covered.intersection(extra))
    if taken:
        raise InvalidRequest(
            f"'extra_json' sets {', '.join(repr(k) for k in taken)}, which the request has a field "
            "for (or the RPC decides); set it there.",
            param="extra_json",
        )
    body.update(extra)


def _integral(value: Any) -> Any:
    """A Struct's numbers are doubles: the integral ones go out as integers (JSON Schema's
    ``minItems: 1``, not ``1.0``)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def _struct(value: Struct) -> dict[str, Any]:
    data: dict[str, Any] = _integral(json_format.MessageToDict(value))
    return data


def _part(part: pb.ContentPart, where: str) -> dict[str, Any]:
    if part.type == "text":
        return {"type": "text", "text": part.text}
    if part.type == "image_url":
        image: dict[str, Any] = {"url": part.image_url.url}
        if part.image_url.detail:
            image["detail"] = part.image_url.detail
        return {"type": "image_url", "image_url": image}
    raise InvalidRequest(f"{where}.type must be 'text' or 'image_url'.", param=f"{where}.type")


def _tool_call(call: pb.ToolCall) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": call.type or "function",
        "function": {"name": call.function.name, "arguments": call.function.arguments},
    }


def _message(message: pb.ChatMessage, index: int) -> dict[str, Any]:
    where = f"messages[{index}]"
    out: dict[str, Any] = {"role": message.role}
    if message.HasField("content") and message.content_parts:
        raise InvalidRequest(f"{where} has both content and content_parts.", param=f"{where}.content")
    if message.HasField("content"):
        out["content"] = message.content
    elif message.content_parts:
        out["content"] = [
            _part(part, f"{where}.content_parts[{i}]") for i, part in enumerate(message.content_parts)
        ]
    if message.name:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [_tool_call(call) for call in message.tool_calls]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.HasField("refusal"):
        out["refusal"] = message.refusal
    return out


def _tool(tool: pb.Tool) -> dict[str, Any]:
    function = tool.function
    out: dict[str, Any] = {"name": function.name}
    if function.description:
        out["description"] = function.description
    if function.HasField("parameters"):
        out["parameters"] = _struct(function.parameters)
    if function.HasField("strict"):
        out["strict"] = function.strict
    return {"type": tool.type or "function", "function": out}


def _tool_choice(choice: pb.ToolChoice) -> str | dict[str, Any] | None:
    which = choice.WhichOneof("choice")
    if which == "mode":
        return choice.mode
    if which == "function_name":
        return {"type": "function", "function": {"name": choice.function_name}}
    return None


def chat_body(request: pb.ChatCompletionRequest, *, stream: bool) -> bytes:
    """The OpenAI JSON of a chat completion request (``stream``: for StreamChatCompletion)."""
    body: dict[str, Any] = {
        "model": request.model,
        "messages": [_message(m, i) for i, m in enumerate(request.messages)],
    }
    _optional(
        body,
        request,
        (
            "max_tokens",
            "max_completion_tokens",
            "temperature",
            "top_p",
            "n",
            "presence_penalty",
            "frequency_penalty",
            "seed",
            "parallel_tool_calls",
        ),
    )
    if request.stop:
        body["stop"] = list(request.stop)
    if request.user:
        body["user"] = request.user
    if request.tools:
        body["tools"] = [_tool(tool) for tool in request.tools]
    choice = _tool_choice(request.tool_choice)
    if choice is not None:
        body["tool_choice"] = choice
    if stream:
        body["stream"] = True
        if request.stream_options.include_usage:
            body["stream_options"] = {"include_usage": True}
    elif request.HasField("stream_options"):
        raise InvalidRequest("stream_options applies to StreamChatCompletion only.", param="stream_options")
    _extra(body, request)
    return orjson.dumps(body)


def _texts(values: Iterable[str]) -> str | list[str]:
    """One text as itself, several as an array (OpenAI's two forms)."""
    texts = list(values)
    return texts[0] if len(texts) == 1 else texts


def completion_body(request: pb.CompletionRequest) -> bytes:
    body: dict[str, Any] = {"model": request.model, "prompt": _texts(request.prompt)}
    _optional(
        body,
        request,
        (
            "max_tokens",
            "temperature",
            "top_p",
            "n",
            "presence_penalty",
            "frequency_penalty",
            "seed",
            "echo",
            "best_of",
        ),
    )
    if request.stop:
        body["stop"] = list(request.stop)
    if request.user:
        body["user"] = request.user
    if request.suffix:
        body["suffix"] = request.suffix
    _extra(body, request)
    return orjson.dumps(body)


def embedding_body(request: pb.EmbeddingRequest) -> bytes:
    body: dict[str, Any] = {"model": request.model, "input": _texts(request.input)}
    _optional(body, request, ("dimensions",))
    if request.user:
        body["user"] = request.user
    _extra(body, request, _EMBEDDING_RESERVED)
    return orjson.dumps(body)


def read_answer(body: bytes, message: M) -> M:
    """``message`` filled from an upstream's JSON answer (keys without a field are dropped)."""
    try:
        json_format.Parse(body, message, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise UpstreamError(f"The upstream's answer does not fit {message.DESCRIPTOR.name}: {exc}") from None
    return message


def read_chunk(chunk: dict[str, Any]) -> pb.ChatCompletionChunk:
    """One decoded event of OpenAI's chat completion stream as a message."""
    try:
        return json_format.ParseDict(chunk, pb.ChatCompletionChunk(), ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise UpstreamError(f"The upstream sent a chunk that does not fit the stream: {exc}") from None
