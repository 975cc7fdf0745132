"""The OpenAI inference endpoints: request validation and the reply each one produces.

Handlers are pure functions of (parsed JSON body, behaviour): they never touch the transport, sleep
or count anything, which keeps them trivially testable and lets :mod:`.app` own timing and failures.
Token arithmetic follows :mod:`.tokens`; the ``n`` parameter is ignored (always one choice).
"""

from __future__ import annotations

import hashlib
import itertools
import secrets
import time
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Any

import orjson

from . import generation, payloads, tokens
from .behaviour import Behaviour

MAX_EMBEDDING_DIMENSIONS = 8192
MAX_IMAGES = 10

JSON_HEADERS: tuple[tuple[bytes, bytes], ...] = ((b"content-type", b"application/json"),)
SSE_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
)


@dataclass(slots=True)
class JsonReply:
    """A complete JSON response."""

    body: bytes
    status: int = 200
    headers: tuple[tuple[bytes, bytes], ...] = JSON_HEADERS


@dataclass(slots=True)
class StreamReply:
    """A streamed response: ``events`` in order, the ``content`` ones paced by ``chunk_interval_ms``.

    Server-sent events unless ``headers`` say otherwise (Gemini's JSON-array stream).
    """

    events: list[bytes]
    content: Container[int] = field(default_factory=frozenset)
    headers: tuple[tuple[bytes, bytes], ...] = SSE_HEADERS


Reply = JsonReply | StreamReply
Handler = Callable[[Any, Behaviour], Reply]


class RequestError(Exception):
    """A request the fake upstream refuses with ``status``: an OpenAI error here, each dialect
    rendering it in its own provider's shape."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def reply(self) -> JsonReply:
        return JsonReply(
            payloads.error_body(self.message, "invalid_request_error", self.param, self.code), self.status
        )


# A per-process random prefix keeps ids unique across restarts; the counter keeps them cheap.
_ID_PREFIX = secrets.token_hex(4)
_ids = itertools.count(1)


# The fixed ``created`` of deterministic replies (2023-11-14T22:13:20Z).
FIXED_CREATED = 1_700_000_000


def identity(kind: str, body: dict[str, Any], behaviour: Behaviour) -> tuple[str, int]:
    """A reply's id and ``created``: fresh ones, or derived from model and prompt when deterministic."""
    prompt = [body.get("model"), body.get("messages"), body.get("prompt"), body.get("n")]
    return identity_of(kind, prompt, behaviour)


def identity_of(kind: str, seed: Any, behaviour: Behaviour, separator: str = "-") -> tuple[str, int]:
    """An id (``kind`` + ``separator`` + suffix) and ``created``: fresh ones, or derived from
    ``seed`` (JSON-serialisable) when the behaviour is deterministic."""
    if not behaviour.deterministic:
        return f"{kind}{separator}fake{_ID_PREFIX}{next(_ids):08x}", int(time.time())
    digest = hashlib.sha256(orjson.dumps(seed, option=orjson.OPT_SORT_KEYS)).hexdigest()[:24]
    return f"{kind}{separator}{digest}", FIXED_CREATED


def _model(body: dict[str, Any], behaviour: Behaviour) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "You must provide a model parameter.", param="model", code="missing_model")
    if behaviour.strict_models and model not in behaviour.models:
        raise RequestError(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
    return model


def _optional_int(body: dict[str, Any], name: str, minimum: int, maximum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RequestError(400, f"{name} must be an integer >= {minimum}.", param=name, code="invalid_value")
    if maximum is not None and value > maximum:
        raise RequestError(400, f"{name} must be <= {maximum}.", param=name, code="invalid_value")
    return value


def _completion_cap(body: dict[str, Any]) -> int | None:
    """The smaller of ``max_tokens`` and ``max_completion_tokens``, if either is given."""
    caps = [cap for name in ("max_tokens", "max_completion_tokens") if (cap := _optional_int(body, name, 1))]
    return min(caps) if caps else None


def _chat_tools(body: dict[str, Any]) -> tuple[list[tuple[str, Any]], str | None, bool]:
    """The offered functions (name, parameters schema), the one ``tool_choice`` forces, and whether
    some call is required; ``tool_choice: "none"`` offers nothing."""
    tools: list[tuple[str, Any]] = []
    for tool in body.get("tools") or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestError(400, "Each tool needs a function name.", param="tools", code="invalid_value")
        tools.append((function["name"], function.get("parameters")))
    choice = body.get("tool_choice")
    if choice == "none":
        return [], None, False
    if choice == "required":
        return tools, None, True
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if name not in dict(tools):
            raise RequestError(
                400, f"tool_choice names {name!r}, which is not among the tools.", param="tool_choice"
            )
        return tools, name, True
    return tools, None, False


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _generate(
    body: dict[str, Any], behaviour: Behaviour, *, chat: bool, model: str, prompt_tokens: int
) -> Reply:
    tools, chosen, required = _chat_tools(body) if chat else ([], None, False)
    reply = generation.plan(behaviour, _completion_cap(body), tools, chosen=chosen, required=required)
    finish_reason = "length" if reply.capped else "tool_calls" if reply.tool is not None else "stop"
    reply_id, created = identity("chatcmpl" if chat else "cmpl", body, behaviour)
    call = None
    if reply.tool is not None:
        call = payloads.FunctionCall(
            "call_" + reply_id.removeprefix("chatcmpl-"),
            reply.tool.name,
            reply.tool.pieces,
            reply.tool.tokens,
        )
    counts = payloads.TokenCounts(
        prompt_tokens, min(behaviour.cached_tokens, prompt_tokens), behaviour.reasoning_tokens
    )
    report = not behaviour.omit_usage
    if body.get("stream") is True:
        asked = _include_usage(body)
        events, content = payloads.stream_events(
            chat=chat,
            reply_id=reply_id,
            created=created,
            model=model,
            words=reply.words,
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            call=call,
            cached_tokens=counts.cached,
            reasoning_tokens=counts.reasoning,
            usage_chunk=report and (asked or behaviour.include_usage_always),
            usage_null=report and asked,
            usage_every_chunk=report and behaviour.usage_in_every_chunk,
        )
        return StreamReply(events, content)
    token_usage = counts.usage(reply.visible_tokens) if report else None
    if chat:
        return JsonReply(
            payloads.chat_completion(reply_id, created, model, reply.text, finish_reason, token_usage, call)
        )
    return JsonReply(
        payloads.text_completion(reply_id, created, model, reply.text, finish_reason, token_usage)
    )


def chat_completions(body: Any, behaviour: Behaviour) -> Reply:
    """``POST /v1/chat/completions``, streaming or not."""
    model = _model(body, behaviour)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty array.", param="messages", code="invalid_value")
    return _generate(
        body, behaviour, chat=True, model=model, prompt_tokens=tokens.count_chat_prompt(messages)
    )


def completions(body: Any, behaviour: Behaviour) -> Reply:
    """``POST /v1/completions`` (legacy text completions), streaming or not."""
    model = _model(body, behaviour)
    prompt = body.get("prompt")
    if not isinstance(prompt, str | list):
        raise RequestError(400, "prompt must be a string or an array.", param="prompt", code="invalid_value")
    return _generate(
        body, behaviour, chat=False, model=model, prompt_tokens=tokens.count_prompt_input(prompt)
    )


def _embedding_inputs(value: Any) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
            return [value]  # a single token-id array
        if all(isinstance(item, str | list) for item in value):
            return value
    raise RequestError(
        400, "input must be a string or a non-empty array of strings.", param="input", code="invalid_value"
    )


def embeddings(body: Any, behaviour: Behaviour) -> Reply:
    """``POST /v1/embeddings``: one deterministic vector per input (``float`` or ``base64``)."""
    model = _model(body, behaviour)
    inputs = _embedding_inputs(body.get("input"))
    dimensions = _optional_int(body, "dimensions", 1, MAX_EMBEDDING_DIMENSIONS) or behaviour.embedding_dim
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise RequestError(
            400, "encoding_format must be 'float' or 'base64'.", param="encoding_format", code="invalid_value"
        )
    prompt_tokens = None if behaviour.omit_usage else tokens.count_prompt_input(inputs)
    return JsonReply(payloads.embeddings(model, inputs, dimensions, encoding, prompt_tokens))


def image_generations(body: Any, behaviour: Behaviour) -> Reply:
    """``POST /v1/images/generations``: ``n`` stand-in images as ``url`` or ``b64_json``; no usage."""
    if "model" in body:
        _model(body, behaviour)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise RequestError(400, "prompt must be a non-empty string.", param="prompt", code="invalid_value")
    count = _optional_int(body, "n", 1, MAX_IMAGES) or 1
    response_format = body.get("response_format") or "url"
    if response_format not in ("url", "b64_json"):
        raise RequestError(
            400, "response_format must be 'url' or 'b64_json'.", param="response_format", code="invalid_value"
        )
    image_id, created = identity("img", body, behaviour)
    return JsonReply(payloads.images(image_id, created, count, response_format))


def list_models(_body: Any, behaviour: Behaviour) -> Reply:
    """``GET /v1/models``: the configured ``models``."""
    return JsonReply(payloads.model_list(tuple(behaviour.models)))
