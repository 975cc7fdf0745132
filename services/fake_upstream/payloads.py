"""OpenAI wire shapes produced by the fake upstream, already serialised to bytes.

Streams are lists of complete SSE events (``data: {json}\\n\\n``), so the transport layer only decides
when to send them, never what they contain.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

DONE_EVENT = b"data: [DONE]\n\n"

# A valid 1x1 transparent PNG: small, and decodes as a real image if a test looks at it.
_PIXEL_PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """A chat/completions ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(frozen=True, slots=True)
class TokenCounts:
    """What a reply's ``usage`` is made of besides its visible output."""

    prompt: int
    cached: int
    """Prompt tokens read from the cache (``prompt_tokens_details.cached_tokens``), within ``prompt``."""
    reasoning: int
    """Output tokens spent reasoning (``completion_tokens_details.reasoning_tokens``), counted in
    ``completion_tokens`` as OpenAI does."""

    def usage(self, visible: int) -> dict[str, Any]:
        """The ``usage`` object after ``visible`` output tokens; the details objects appear only when
        their count is set, so replies without them are what they always were."""
        body: dict[str, Any] = usage(self.prompt, visible + self.reasoning)
        if self.cached:
            body["prompt_tokens_details"] = {"cached_tokens": self.cached}
        if self.reasoning:
            body["completion_tokens_details"] = {"reasoning_tokens": self.reasoning}
        return body


@dataclass(frozen=True, slots=True)
class FunctionCall:
    """A tool call of a chat reply: its id, function name, arguments as streamed JSON pieces, and
    the output tokens it costs (see :func:`.tokens.tool_call_tokens`)."""

    call_id: str
    name: str
    pieces: list[str]
    tokens: int

    def whole(self) -> dict[str, Any]:
        arguments = "".join(self.pieces)
        return {
            "id": self.call_id,
            "type": "function",
            "function": {"name": self.name, "arguments": arguments},
        }


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> bytes:
    """The OpenAI error envelope ``{"error": {"message", "type", "param", "code"}}``."""
    return orjson.dumps({"error": {"message": message, "type": error_type, "param": param, "code": code}})


# Injected failures mimic what OpenAI answers for each status.
_INJECTED: dict[int, tuple[str, str, str]] = {
    400: ("invalid_request_error", "invalid_request", "Injected bad request."),
    401: ("invalid_request_error", "invalid_api_key", "Injected authentication failure."),
    403: ("invalid_request_error", "permission_denied", "Injected permission failure."),
    404: ("invalid_request_error", "model_not_found", "Injected not-found failure."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached (injected)."),
    500: (
        "server_error",
        "internal_error",
        "The server had an error while processing your request (injected).",
    ),
    502: ("server_error", "bad_gateway", "Bad gateway (injected)."),
    503: ("server_error", "service_unavailable", "The engine is currently overloaded (injected)."),
    504: ("server_error", "gateway_timeout", "Gateway timeout (injected)."),
}


@lru_cache(maxsize=32)
def injected_error(status: int) -> bytes:
    """The error body of an injected ``fail_status`` response."""
    error_type, code, message = _INJECTED.get(
        status,
        (
            "server_error" if status >= 500 else "invalid_request_error",
            "injected_failure",
            "Injected failure.",
        ),
    )
    return error_body(message, error_type, None, code)


def chat_completion(
    reply_id: str,
    created: int,
    model: str,
    content: str,
    finish_reason: str,
    token_usage: dict[str, Any] | None,
    call: FunctionCall | None = None,
) -> bytes:
    """A non-streaming ``chat.completion`` body; ``usage`` is omitted when ``token_usage`` is None.

    With a ``call``, the message carries ``tool_calls`` and its content is null unless there are
    words before the call."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if call is not None:
        message["content"] = content or None
        message["tool_calls"] = [call.whole()]
    body: dict[str, Any] = {
        "id": reply_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
    }
    if token_usage is not None:
        body["usage"] = token_usage
    return orjson.dumps(body)


def text_completion(
    reply_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str,
    token_usage: dict[str, Any] | None,
) -> bytes:
    """A non-streaming legacy ``text_completion`` body."""
    body: dict[str, Any] = {
        "id": reply_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}],
    }
    if token_usage is not None:
        body["usage"] = token_usage
    return orjson.dumps(body)


def event(payload: dict[str, Any]) -> bytes:
    """One SSE event carrying ``payload`` as JSON."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def stream_events(
    *,
    chat: bool,
    reply_id: str,
    created: int,
    model: str,
    words: Sequence[str],
    finish_reason: str,
    prompt_tokens: int,
    usage_chunk: bool,
    usage_null: bool,
    usage_every_chunk: bool,
    call: FunctionCall | None = None,
    cached_tokens: int = 0,
    reasoning_tokens: int = 0,
) -> tuple[list[bytes], range]:
    """All SSE events of a stream and the index range of its content chunks.

    Chat streams open with a role chunk (``delta: {"role": "assistant", "content": ""}``); legacy
    completion streams do not. One content chunk per word; the last one carries ``finish_reason``
    (a reply of zero words gets a closing chunk with an empty delta instead). ``usage_chunk`` adds
    OpenAI's final ``"choices": []`` chunk with the usage; ``usage_null`` puts ``"usage": null`` in the
    other chunks, as OpenAI does when usage was requested; ``usage_every_chunk`` puts the cumulative
    usage in every chunk instead. ``[DONE]`` always ends the list.

    A ``call`` follows the words as OpenAI streams tool calls: a chunk with its id, type and name
    (``arguments: ""``), then one chunk per argument piece; these are content chunks too, and the
    last one carries ``finish_reason``. Cumulative usage counts the name with the first and one
    argument per piece after it. ``cached_tokens`` and ``reasoning_tokens`` go into the usage as
    :class:`TokenCounts` puts them.
    """
    counts = TokenCounts(prompt_tokens, cached_tokens, reasoning_tokens)
    obj = "chat.completion.chunk" if chat else "text_completion"
    events: list[bytes] = []

    def chunk(choices: list[dict[str, Any]], completion_tokens: int) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": reply_id,
            "object": obj,
            "created": created,
            "model": model,
            "choices": choices,
        }
        if usage_every_chunk:
            payload["usage"] = counts.usage(completion_tokens)
        elif usage_null:
            payload["usage"] = None
        return payload

    def tool_choice(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {"index": 0, "delta": {"tool_calls": [delta]}, "logprobs": None, "finish_reason": finish}

    def choice(text: str, finish: str | None) -> dict[str, Any]:
        if chat:
            return {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

    if chat:
        role = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        events.append(event(chunk([role], 0)))
    first_content = len(events)
    last = len(words) - 1 if call is None else -1
    for index, word in enumerate(words):
        events.append(event(chunk([choice(word, finish_reason if index == last else None)], index + 1)))
    if call is not None:
        opening = {
            "index": 0,
            "id": call.call_id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        said = len(words) + 1
        events.append(event(chunk([tool_choice(opening, None)], said)))
        for index, piece in enumerate(call.pieces):
            finish = finish_reason if index == len(call.pieces) - 1 else None
            fragment = {"index": 0, "function": {"arguments": piece}}
            spent = said + min(index + 1, call.tokens - 1)
            events.append(event(chunk([tool_choice(fragment, finish)], spent)))
    content = range(first_content, len(events))
    if not words and call is None:
        closing = (
            {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason}
            if chat
            else {"text": "", "index": 0, "logprobs": None, "finish_reason": finish_reason}
        )
        events.append(event(chunk([closing], 0)))
    if usage_chunk:
        final = {"id": reply_id, "object": obj, "created": created, "model": model, "choices": []}
        final["usage"] = counts.usage(len(words) + (0 if call is None else call.tokens))
        events.append(event(final))
    events.append(DONE_EVENT)
    return events, content


def embedding_vector(value: str | list[int], dimensions: int) -> list[float]:
    """A deterministic vector for one input, each element in ``[-1, 1)``.

    Elements are ``k / 32768 - 1`` for 16-bit ``k`` taken from a hash of the input, so they are exact
    in float32 and the ``base64`` encoding decodes to the very same numbers as the ``float`` one.
    """
    data = value.encode() if isinstance(value, str) else orjson.dumps(value)
    digest = hashlib.shake_128(data).digest(2 * dimensions)
    return [k / 32768.0 - 1.0 for k in struct.unpack(f"<{dimensions}H", digest)]


def embeddings(
    model: str,
    inputs: Sequence[str | list[int]],
    dimensions: int,
    encoding_format: str,
    prompt_tokens: int | None,
) -> bytes:
    """An ``embeddings`` list body; ``usage`` is omitted when ``prompt_tokens`` is None."""
    data: list[dict[str, Any]] = []
    for index, value in enumerate(inputs):
        vector = embedding_vector(value, dimensions)
        encoded: list[float] | str = (
            base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
            if encoding_format == "base64"
            else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    body: dict[str, Any] = {"object": "list", "data": data, "model": model}
    if prompt_tokens is not None:
        body["usage"] = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return orjson.dumps(body)


def images(image_id: str, created: int, count: int, response_format: str) -> bytes:
    """An ``images/generations`` body with ``count`` entries of ``url`` or ``b64_json``."""
    if response_format == "b64_json":
        data: list[dict[str, str]] = [{"b64_json": _PIXEL_PNG_B64} for _ in range(count)]
    else:
        data = [
            {"url": f"https://images.fake-upstream.invalid/{image_id}-{index}.png"} for index in range(count)
        ]
    return orjson.dumps({"created": created, "data": data})


@lru_cache(maxsize=8)
def model_list(models: tuple[str, ...]) -> bytes:
    """The ``GET /v1/models`` body."""
    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "fake-upstream"} for name in models
            ],
        }
    )
