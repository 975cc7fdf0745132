"""Token estimates for reservations, and usage read back from upstream responses.

A reservation must cover the worst case, so the prompt estimate is an upper bound rather than a
tokenizer guess: every BPE token covers at least one byte of text, so the UTF-8 byte count of the
text (plus a per-message overhead) never undercounts. The settle then charges what the provider
reports, and the difference goes back to the balance.
"""

from __future__ import annotations

from typing import Any

from services.common.pb.relaygate.common.v1.types_pb2 import Usage

# OpenAI's chat format spends a few tokens per message on role and separators.
_PER_MESSAGE_OVERHEAD = 4
_PER_IMAGE_PART_TOKENS = 1_000


def _text_bytes(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        total = 0
        for part in value:
            if isinstance(part, dict):
                if part.get("type") == "image_url":
                    total += _PER_IMAGE_PART_TOKENS
                else:
                    total += _text_bytes(part.get("text"))
            else:
                total += _text_bytes(part)
        return total
    return 0


def estimate_chat_prompt(messages: list[Any]) -> int:
    total = 3
    for message in messages:
        if isinstance(message, dict):
            total += (
                _PER_MESSAGE_OVERHEAD + _text_bytes(message.get("content")) + _text_bytes(message.get("name"))
            )
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


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def from_openai(usage: Any) -> Usage | None:
    """Usage from an OpenAI ``usage`` object; None when absent. Zero counts are real values."""
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    if "completion_tokens" not in usage and "total_tokens" in usage:
        completion = max(0, _int(usage.get("total_tokens")) - prompt)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, cached_prompt_tokens=min(cached, prompt))
