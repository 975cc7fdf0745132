"""Token estimates for reservations, and usage read back from upstream responses.

A reservation must cover the worst case, so the prompt estimate is an upper bound rather than a
tokenizer guess: every BPE token covers at least one byte of text, so the UTF-8 byte count of the
text (plus a per-message overhead) never undercounts. The settle then charges what the provider
reports, and the difference goes back to the balance.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from services.common.pb.relaygate.common.v1.types_pb2 import Usage

# OpenAI's chat format spends a few tokens per message on role and separators.
_PER_MESSAGE_OVERHEAD = 4
_PER_IMAGE_PART_TOKENS = 1_000


def _text_bytes(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, int) and not isinstance(value, bool):
        return 1  # a token id (completions and embeddings accept arrays of them)
    if isinstance(value, list):
        total = 0
        for part in value:
            if isinstance(part, dict):
                if part.get("type") == "image_url":
                    total += _PER_IMAGE_PART_TOKENS
                elif part.get("type") == "file":
                    # A document (a PDF as a base64 data URL): its pages are counted as text and
                    # images, a few thousand tokens a page, which its base64 text outnumbers in
                    # practice (an estimate, not a bound: a very sparse PDF can count more).
                    total += _PER_IMAGE_PART_TOKENS + _json_bytes(part.get("file"))
                else:
                    total += _text_bytes(part.get("text"))
            else:
                total += _text_bytes(part)
        return total
    return 0


def _json_bytes(value: Any) -> int:
    return len(orjson.dumps(value)) if value else 0


def estimate_chat_prompt(messages: list[Any], body: dict[str, Any] | None = None) -> int:
    """Upper bound of a chat prompt: message texts, names and tool calls, plus tool definitions."""
    total = 3
    for message in messages:
        if isinstance(message, dict):
            total += (
                _PER_MESSAGE_OVERHEAD
                + _text_bytes(message.get("content"))
                + _text_bytes(message.get("name"))
                + _json_bytes(message.get("tool_calls"))
                # Thinking sent back to continue a turn is prompt too.
                + _json_bytes(message.get("thinking_blocks"))
            )
    if body is not None:
        total += _json_bytes(body.get("tools")) + _json_bytes(body.get("functions"))
    return total


def estimate_text_prompt(prompt: Any) -> int:
    return _text_bytes(prompt) + 1


def requested_max_output(body: dict[str, Any]) -> int:
    """The caller's output cap, 0 when it set none (quota then applies the model's default cap)."""
    for field in ("max_completion_tokens", "max_tokens"):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def requested_choices(body: dict[str, Any]) -> int:
    """Completions the upstream generates and bills: ``n``, or ``best_of`` (completions) when larger."""
    found = 1
    for field in ("n", "best_of"):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > found:
            found = value
    return found


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def from_openai(usage: Any) -> Usage | None:
    """Usage from an OpenAI ``usage`` object; None when absent. Zero counts are real values."""
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    details = usage.get("completion_tokens_details")
    reasoning = _int(details.get("reasoning_tokens")) if isinstance(details, dict) else 0
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    if "completion_tokens" not in usage and "total_tokens" in usage:
        completion = max(0, _int(usage.get("total_tokens")) - prompt)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_prompt_tokens=min(cached, prompt),
        reasoning_tokens=min(reasoning, completion),
    )


# The top-level "usage" object of a JSON answer; one level of nesting (the *_tokens_details objects).
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*(\{(?:[^{}]|\{[^{}]*\})*\}|null)')


def from_body(body: bytes) -> Usage | None:
    """Usage reported in a non-streaming JSON answer, without parsing the whole body.

    Answers can be large (embeddings, base64 images) while ``usage`` is a small object near the end,
    so the last ``"usage": {...}`` is located and only it is parsed. Inside JSON strings a quote is
    always escaped, so ``"usage":`` cannot match text content.
    """
    index = body.rfind(b'"usage"')
    while index >= 0:
        match = _USAGE_OBJECT.match(body, index)
        if match is not None:
            try:
                return from_openai(orjson.loads(match.group(1)))
            except orjson.JSONDecodeError:
                return None
        index = body.rfind(b'"usage"', 0, index)
    return None


def count_images(body: bytes) -> int | None:
    """Images in an ``images/generations`` answer (entries of its ``data`` array), None if unreadable."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    data = parsed.get("data") if isinstance(parsed, dict) else None
    return len(data) if isinstance(data, list) else None


def estimate_answer(body: bytes, prompt_tokens: int) -> Usage:
    """A marked estimate for a 2xx answer that reported no usage: the prompt's upper bound, and the
    UTF-8 bytes of the generated texts (never fewer than their tokens). Quota caps it at the hold."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    completion = 0
    choices = parsed.get("choices") if isinstance(parsed, dict) else None
    for choice in choices if isinstance(choices, list) else ():
        if isinstance(choice, dict):
            message = choice.get("message")
            if isinstance(message, dict):
                completion += _text_bytes(message.get("content")) + _json_bytes(message.get("tool_calls"))
            completion += _text_bytes(choice.get("text"))
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, estimated=True)
