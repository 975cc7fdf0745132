"""The inference service's messages to and from OpenAI's JSON.

Requests become the JSON body the HTTP front would have received, so the pipeline checks, prices and
sends them exactly as it does for HTTP (a gRPC request is refused for the same reasons, with the same
``param``). Answers are the upstream's JSON read into the mirrored messages, losslessly: keys without a
field are kept in the level's ``extra_json``. A request's ``extra_json`` (and a message's) is merged
into it after its own fields, and may not repeat one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
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


Request = pb.ChatCompletionRequest | pb.CompletionRequest | pb.EmbeddingRequest | pb.ChatMessage


def _extra(
    body: dict[str, Any], message: Request, reserved: frozenset[str] = frozenset(), where: str = ""
) -> None:
    """Merge the ``extra_json`` (a JSON object) of ``message`` (at ``where``: the request itself, or
    one of its messages) into ``body``."""
    extra_json = message.extra_json
    if not extra_json:
        return
    param = f"{where}.extra_json" if where else "extra_json"
    try:
        extra = orjson.loads(extra_json)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"'{param}' is not valid JSON: {exc}.", param=param) from None
    if not isinstance(extra, dict):
        raise InvalidRequest(f"'{param}' must be a JSON object.", param=param)
    covered = {field.name for field in message.DESCRIPTOR.fields} | reserved
    taken = sorted(covered.intersection(extra))
    if taken:
        raise InvalidRequest(
            f"'{param}' sets {', '.join(repr(k) for k in taken)}, which the message has a field "
            "for (or the RPC decides); set it there.",
            param=param,
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
    if message.HasField("reasoning_content"):
        out["reasoning_content"] = message.reasoning_content
    # content_parts is the array form of content.
    _extra(out, message, frozenset({"content"}), where)
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
    _extra(body, request, _RESERVED)
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
    _extra(body, request, _RESERVED)
    return orjson.dumps(body)


def embedding_body(request: pb.EmbeddingRequest) -> bytes:
    body: dict[str, Any] = {"model": request.model, "input": _texts(request.input)}
    _optional(body, request, ("dimensions",))
    if request.user:
        body["user"] = request.user
    _extra(body, request, _RESERVED | _EMBEDDING_RESERVED)
    return orjson.dumps(body)


# --- answers ----------------------------------------------------------------------------------------
#
# Replies are lossless: at each level (reply, choice, message or delta) the keys with a field fill it,
# ``logprobs`` goes as JSON text in ``logprobs_json``, and the others (null ones aside) go together
# in ``extra_json``. json_format reads any message but costs ~100 us per chunk (pure Python), so the
# shapes every chat answer, chunk and embedding has are built directly (~10 us). A shape they do not
# expect (a value of another type, a float where an integer goes) raises, and json_format then reads
# the same answer moved into the messages' layout by :func:`_layout`, or says why it does not fit.

_PROMPT_DETAILS = ("cached_tokens", "audio_tokens")
_COMPLETION_DETAILS = (
    "reasoning_tokens",
    "audio_tokens",
    "accepted_prediction_tokens",
    "rejected_prediction_tokens",
)
_HEAD = ("id", "object", "created", "model", "system_fingerprint", "service_tier")
_MESSAGE = ("role", "content", "name", "tool_call_id", "refusal", "reasoning_content")
_SHAPE_ERRORS = (TypeError, ValueError, AttributeError)


@dataclass(frozen=True, slots=True)
class _Level:
    """One level of a reply: the keys its message has a field for, those holding a nested level (an
    object, or an array of them), and whether ``logprobs`` is kept as JSON."""

    fields: frozenset[str]
    nested: dict[str, _Level] = dataclass_field(default_factory=dict)
    logprobs: bool = False
    known: frozenset[str] = dataclass_field(init=False)

    def __post_init__(self) -> None:
        known = self.fields | {"logprobs"} if self.logprobs else self.fields
        object.__setattr__(self, "known", known)


_TOOL_CALL = _Level(frozenset({"index", "id", "type", "function"}))
_CHAT_MESSAGE = _Level(frozenset({*_MESSAGE, "tool_calls"}), {"tool_calls": _TOOL_CALL})
_CHAT_CHOICE = _Level(frozenset({"index", "finish_reason", "message"}), {"message": _CHAT_MESSAGE}, True)
_CHUNK_CHOICE = _Level(frozenset({"index", "finish_reason", "delta"}), {"delta": _CHAT_MESSAGE}, True)
_CHAT = _Level(frozenset({*_HEAD, "usage", "choices"}), {"choices": _CHAT_CHOICE})
_CHUNK = _Level(frozenset({*_HEAD, "usage", "choices"}), {"choices": _CHUNK_CHOICE})
_TEXT_CHOICE = _Level(frozenset({"index", "text", "finish_reason"}), logprobs=True)
_TEXT = _Level(frozenset({*_HEAD, "usage", "choices"}), {"choices": _TEXT_CHOICE})
_EMBEDDINGS = _Level(frozenset({"object", "model", "usage", "data"}))


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _extra_of(data: dict[str, Any], level: _Level) -> str | None:
    """The JSON object of ``data``'s keys without a field at ``level`` (None when there are none)."""
    known = level.known
    # Most levels have only known keys: one set comparison (in C) settles it.
    if data.keys() <= known:
        return None
    extra = {key: value for key, value in data.items() if value is not None and key not in known}
    return _json(extra) if extra else None


def _layout(data: Any, level: _Level) -> Any:
    """``data`` moved into the messages' layout at ``level`` (json_format's input): logprobs and the
    keys without a field become the ``logprobs_json`` and ``extra_json`` strings."""
    if not isinstance(data, dict):
        return data
    out: dict[str, Any] = {}
    for key, value in data.items():
        nested = level.nested.get(key)
        if nested is not None:
            out[key] = (
                [_layout(item, nested) for item in value]
                if isinstance(value, list)
                else _layout(value, nested)
            )
        elif key in level.fields:
            out[key] = value
    if level.logprobs and data.get("logprobs") is not None:
        out["logprobs_json"] = _json(data["logprobs"])
    extra = _extra_of(data, level)
    if extra is not None:
        out["extra_json"] = extra
    return out


def _pick(data: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """The keys of ``data`` among ``names`` whose value is not null (JSON null leaves a field unset)."""
    return {name: value for name in names if (value := data.get(name)) is not None}


def _usage(data: dict[str, Any]) -> pb.Usage:
    fields = _pick(data, ("prompt_tokens", "completion_tokens", "total_tokens"))
    prompt, completion = data.get("prompt_tokens_details"), data.get("completion_tokens_details")
    if isinstance(prompt, dict):
        fields["prompt_tokens_details"] = pb.PromptTokensDetails(**_pick(prompt, _PROMPT_DETAILS))
    if isinstance(completion, dict):
        fields["completion_tokens_details"] = pb.CompletionTokensDetails(
            **_pick(completion, _COMPLETION_DETAILS)
        )
    return pb.Usage(**fields)


def _tool_call_of(data: dict[str, Any]) -> pb.ToolCall:
    fields = _pick(data, ("index", "id", "type"))
    function = data.get("function")
    if isinstance(function, dict):
        fields["function"] = pb.FunctionCall(**_pick(function, ("name", "arguments")))
    return pb.ToolCall(**fields)


def _chat_message_of(data: dict[str, Any]) -> pb.ChatMessage:
    fields = _pick(data, _MESSAGE)
    calls = data.get("tool_calls")
    if calls is not None:
        fields["tool_calls"] = [_tool_call_of(call) for call in calls]
    extra = _extra_of(data, _CHAT_MESSAGE)
    if extra is not None:
        fields["extra_json"] = extra
    return pb.ChatMessage(**fields)


def _choices(data: dict[str, Any], kind: type[M], message_key: str, level: _Level) -> list[M]:
    built = []
    for choice in data.get("choices") or ():
        fields = _pick(choice, ("index", "finish_reason"))
        message = choice.get(message_key)
        if isinstance(message, dict):
            fields[message_key] = _chat_message_of(message)
        logprobs = choice.get("logprobs")
        if logprobs is not None:
            fields["logprobs_json"] = _json(logprobs)
        extra = _extra_of(choice, level)
        if extra is not None:
            fields["extra_json"] = extra
        built.append(kind(**fields))
    return built


def _head(data: dict[str, Any], level: _Level) -> dict[str, Any]:
    fields = _pick(data, _HEAD)
    usage = data.get("usage")
    if isinstance(usage, dict):
        fields["usage"] = _usage(usage)
    extra = _extra_of(data, level)
    if extra is not None:
        fields["extra_json"] = extra
    return fields


def _chat_completion(data: dict[str, Any]) -> pb.ChatCompletion:
    return pb.ChatCompletion(
        **_head(data, _CHAT), choices=_choices(data, pb.ChatChoice, "message", _CHAT_CHOICE)
    )


def _chunk(data: dict[str, Any]) -> pb.ChatCompletionChunk:
    return pb.ChatCompletionChunk(
        **_head(data, _CHUNK), choices=_choices(data, pb.ChatChunkChoice, "delta", _CHUNK_CHOICE)
    )


def _embeddings(data: dict[str, Any]) -> pb.EmbeddingResponse:
    fields = _pick(data, ("object", "model"))
    usage = data.get("usage")
    if isinstance(usage, dict):
        fields["usage"] = _usage(usage)
    extra = _extra_of(data, _EMBEDDINGS)
    if extra is not None:
        fields["extra_json"] = extra
    items = data.get("data") or ()
    vectors = [pb.Embedding(**_pick(item, ("object", "index", "embedding"))) for item in items]
    return pb.EmbeddingResponse(**fields, data=vectors)


_DIRECT: dict[str, Any] = {
    pb.ChatCompletion.DESCRIPTOR.full_name: _chat_completion,
    pb.EmbeddingResponse.DESCRIPTOR.full_name: _embeddings,
}
_LEVELS: dict[str, _Level] = {
    pb.ChatCompletion.DESCRIPTOR.full_name: _CHAT,
    pb.ChatCompletionChunk.DESCRIPTOR.full_name: _CHUNK,
    pb.Completion.DESCRIPTOR.full_name: _TEXT,
    pb.EmbeddingResponse.DESCRIPTOR.full_name: _EMBEDDINGS,
}


def laid_out(data: Any, message: Message) -> Any:
    """``data`` in ``message``'s layout, as json_format reads it (what the direct readers match)."""
    level = _LEVELS.get(message.DESCRIPTOR.full_name)
    return data if level is None else _layout(data, level)


def _read(data: Any, message: M, direct: Any) -> M:
    if direct is not None and isinstance(data, dict):
        try:
            built: M = direct(data)
        except _SHAPE_ERRORS:
            pass
        else:
            return built
    try:
        return json_format.ParseDict(laid_out(data, message), message, ignore_unknown_fields=True)
    except (json_format.ParseError, TypeError, ValueError, AttributeError) as exc:
        raise UpstreamError(f"The upstream's answer does not fit {message.DESCRIPTOR.name}: {exc}") from None


def read_answer(body: bytes, message: M) -> M:
    """``message`` filled from an upstream's JSON answer (keys without a field in ``extra_json``)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise UpstreamError(f"The upstream's answer to {message.DESCRIPTOR.name} is not JSON.") from None
    return _read(data, message, _DIRECT.get(message.DESCRIPTOR.full_name))


def read_chunk(chunk: dict[str, Any]) -> pb.ChatCompletionChunk:
    """One decoded event of OpenAI's chat completion stream as a message."""
    return _read(chunk, pb.ChatCompletionChunk(), _chunk)
