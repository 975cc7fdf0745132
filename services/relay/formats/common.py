"""Pieces both formats share: reading an OpenAI chat answer and chat stream chunks, usage in its
several provider spellings, and the SSE framing of the events a format emits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from services.common.errors import GatewayError, InvalidRequest, UpstreamError

__all__ = [
    "ERROR_MARK",
    "ChatUsage",
    "chat_usage",
    "data_of",
    "event",
    "items",
    "obj",
    "passthrough_message",
    "read_answer",
    "refuse",
    "split_events",
]


# What a converter's ``error_event`` hands the relay instead of the rendered error: an SSE comment, so
# the error is rendered in order, after the chunks queued before it (see the stream converters).
ERROR_MARK = b": relaygate-error"


def refuse(message: str, param: str | None = None) -> InvalidRequest:
    return InvalidRequest(message, param=param)


@dataclass(frozen=True, slots=True)
class ChatUsage:
    """An OpenAI chat ``usage`` split the way Anthropic and the Responses API report it."""

    # Every prompt token, cached ones included (OpenAI's prompt_tokens).
    prompt: int = 0
    # Prompt tokens read from the provider's cache.
    cache_read: int = 0
    # Prompt tokens written to the provider's cache (Anthropic's cache_creation_input_tokens).
    cache_write: int = 0
    output: int = 0
    reasoning: int = 0

    @property
    def uncached_prompt(self) -> int:
        """Anthropic's ``input_tokens``: the prompt tokens neither read from nor written to the cache."""
        return max(0, self.prompt - self.cache_read - self.cache_write)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def chat_usage(usage: Any) -> ChatUsage | None:
    """The usage of a chat answer or chunk; None when it reports none.

    Cache writes have no field in OpenAI's chat format; a channel that converts a provider's answer
    puts them beside ``cached_tokens`` in ``prompt_tokens_details`` (as ``cache_write_tokens``, the
    Responses API's name, or ``cache_creation_tokens``)."""
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage.get("prompt_tokens"))
    details = usage.get("prompt_tokens_details")
    read = write = 0
    if isinstance(details, dict):
        read = _count(details.get("cached_tokens"))
        write = _count(details.get("cache_write_tokens")) or _count(details.get("cache_creation_tokens"))
    output_details = usage.get("completion_tokens_details")
    reasoning = _count(output_details.get("reasoning_tokens")) if isinstance(output_details, dict) else 0
    return ChatUsage(
        prompt=prompt,
        cache_read=min(read, prompt),
        cache_write=min(write, max(0, prompt - read)),
        output=_count(usage.get("completion_tokens")),
        reasoning=reasoning,
    )


def obj(value: Any) -> dict[str, Any]:
    """``value`` when it is a JSON object, else an empty one (for reading optional members)."""
    return value if isinstance(value, dict) else {}


def items(value: Any) -> list[Any]:
    """``value`` when it is a JSON array, else an empty one."""
    return value if isinstance(value, list) else []


def event(name: bytes, payload: dict[str, Any]) -> bytes:
    """One named SSE event, as both Anthropic and the Responses API frame theirs."""
    return b"event: " + name + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def split_events(data: bytes) -> list[bytes]:
    """The complete SSE events of ``data`` (which ends on an event boundary), without separators."""
    return [block for block in data.replace(b"\r\n", b"\n").split(b"\n\n") if block]


def data_of(block: bytes) -> bytes:
    """The ``data`` of one event (its ``data:`` lines joined); ``b""`` for a comment-only event."""
    if block.startswith(b"data:") and b"\n" not in block:
        return block[5:].lstrip(b" ")
    return b"\n".join(line[5:].lstrip(b" ") for line in block.split(b"\n") if line.startswith(b"data:"))


def passthrough_message(exc: GatewayError) -> str:
    """The message of ``exc``; for an upstream's error passed through, the upstream's own message
    (its body is in OpenAI's shape or the channel's own)."""
    body = getattr(exc, "body", None)
    if isinstance(body, bytes) and body:
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            return exc.message
        error = parsed.get("error") if isinstance(parsed, dict) else None
        if isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"]:
            return str(error["message"])
    return exc.message


def read_answer(answer: bytes) -> dict[str, Any]:
    """A chat answer as an object; a channel's 2xx answer that is not one is the provider's fault."""
    try:
        parsed = orjson.loads(answer)
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise UpstreamError("The upstream provider's answer is not a JSON object.")
    return parsed
