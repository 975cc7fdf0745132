"""What a provider adapter does, and the OpenAI shapes every conversion writes.

A channel's type picks its :class:`Provider`. ``openai`` channels have none: their requests,
answers and streams pass through byte for byte (the fast path). An adapter whose ``converts`` is
False (Azure OpenAI) only changes where a request goes and how it authenticates; the others build
the provider's request from the caller's OpenAI chat body, turn its JSON answer into OpenAI's, and
decode its stream chunk by chunk (:class:`StreamDecoder`) into OpenAI's SSE chunks, reading the
usage on the way. Provider errors become OpenAI-shaped error bodies here, once.
"""

from __future__ import annotations

import abc
import time
from typing import Any, Protocol

import orjson

from services.common.errors import InvalidRequest
from services.common.pb.relaygate.common.v1.types_pb2 import Usage

__all__ = [
    "CHAT_PATH",
    "DONE",
    "Provider",
    "StreamDecoder",
    "error_body",
    "openai_usage",
    "tool_call_delta",
]

CHAT_PATH = b"/chat/completions"
DONE = b"data: [DONE]\n\n"
# Output tokens asked for when neither the caller nor the price book set a cap (Anthropic needs one).
DEFAULT_MAX_TOKENS = 4096


class StreamDecoder(Protocol):
    """Turns an upstream stream into the bytes the caller receives, one read at a time.

    ``usage`` is the provider's last report (None until one came), ``done`` whether the stream ended
    as the provider ends a complete answer, ``events`` the content-bearing events seen (for an
    estimate when no usage comes)."""

    done: bool
    events: int

    @property
    def usage(self) -> Usage | None: ...

    def feed(self, data: bytes) -> bytes:
        """The bytes to send now for ``data`` (possibly empty)."""
        ...

    def flush(self) -> bytes:
        """What to send once the upstream ended."""
        ...


class Provider(abc.ABC):
    """One provider's wire format; stateless, shared by every channel of its type."""

    kind: str = ""
    # False: OpenAI's bodies on another path (Azure); the pass-through code reads and writes them.
    converts: bool = True
    # True: the provider reads image URLs it does not host only when they are sent inline, so the
    # pipeline fetches them first (:mod:`services.relay.pipeline.media`).
    inline_images: bool = False

    @abc.abstractmethod
    def auth_headers(self, api_key: str) -> dict[str, str]:
        """The headers carrying the channel's key, when it has one, and whatever else the provider
        requires."""

    @abc.abstractmethod
    def target(self, prefix: bytes, path: bytes, model: str, *, stream: bool, api_version: str) -> bytes:
        """The request target (path and query) for an OpenAI ``path`` under the base URL's ``prefix``."""

    def serves(self, path: bytes) -> bool:
        """Whether requests for this OpenAI endpoint path can be sent to the provider."""
        return path == CHAT_PATH

    def request(self, body: dict[str, Any], model: str, *, stream: bool, max_output_tokens: int) -> bytes:
        """The provider's request for the caller's OpenAI chat ``body``; ``max_output_tokens`` is the
        output cap the request was held for (sent when the caller set none)."""
        raise NotImplementedError

    def answer(self, body: bytes, model: str) -> tuple[bytes, Usage | None]:
        """The OpenAI chat completion for the provider's JSON answer, and its usage."""
        raise NotImplementedError

    def decoder(self, model: str, *, include_usage: bool) -> StreamDecoder:
        """A decoder for one stream; ``include_usage``: the caller asked for the usage chunk."""
        raise NotImplementedError

    def error(self, status: int, body: bytes) -> tuple[int, bytes]:
        """The status and OpenAI-shaped body for a provider's error answer."""
        return status, body


def invalid(message: str, param: str | None = None) -> InvalidRequest:
    return InvalidRequest(message, param=param)


def openai_usage(usage: Usage) -> dict[str, Any]:
    """OpenAI's ``usage`` object for a usage record. Cache writes are prompt tokens the caller sent,
    so its ``prompt_tokens`` includes them (the record keeps them apart for pricing)."""
    prompt = usage.prompt_tokens + usage.cache_write_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": prompt + usage.completion_tokens,
        "prompt_tokens_details": {
            "cached_tokens": usage.cached_prompt_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
        },
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


class ChunkWriter:
    """OpenAI ``chat.completion.chunk`` events of one stream (same id, model and creation time)."""

    __slots__ = ("_head",)

    def __init__(self, response_id: str, model: str) -> None:
        # Every chunk starts the same: serialized once.
        head = orjson.dumps(
            {
                "id": response_id,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
            }
        )
        self._head = b"data: " + head[:-1] + b',"choices":'

    def delta(self, delta: dict[str, Any], *, index: int = 0, finish: str | None = None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self._head + orjson.dumps([choice]) + b"}\n\n"

    def usage(self, usage: Usage) -> bytes:
        return self._head + b'[],"usage":' + orjson.dumps(openai_usage(usage)) + b"}\n\n"


def tool_call_delta(index: int, call_id: str | None, name: str | None, arguments: str) -> dict[str, Any]:
    """A ``tool_calls`` delta: the first of a call carries its id, type and name."""
    function: dict[str, Any] = {"arguments": arguments}
    call: dict[str, Any] = {"index": index, "function": function}
    if call_id is not None:
        call["id"] = call_id
        call["type"] = "function"
        function["name"] = name or ""
    return {"tool_calls": [call]}


def completion(response_id: str, model: str, choices: list[dict[str, Any]], usage: Usage | None) -> bytes:
    """A whole OpenAI ``chat.completion``."""
    answer: dict[str, Any] = {
        "id": response_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        answer["usage"] = openai_usage(usage)
    return orjson.dumps(answer)


def error_body(message: str, kind: str, code: str | None = None) -> bytes:
    """OpenAI's error shape."""
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": code or kind}})


def loads_object(body: bytes) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
