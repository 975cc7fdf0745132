"""The chat-level extensions for reasoning, prompt caching and documents, read the same way by the
Anthropic and Gemini conversions (LiteLLM's conventions, so a caller moving from LiteLLM keeps them).

* ``reasoning_effort`` (OpenAI's, https://platform.openai.com/docs/api-reference/chat/create) becomes a
  thinking budget as LiteLLM maps it (``minimal`` and ``low`` 1024 tokens, ``medium`` 2048, ``high``
  4096; ``none`` switches thinking off). ``thinking`` (Anthropic's config object,
  https://docs.anthropic.com/en/docs/build-with-claude/extended-thinking) wins over it.
* ``cache_control`` (Anthropic's ``{"type": "ephemeral"}``, optionally with ``ttl``,
  https://docs.anthropic.com/en/docs/build-with-claude/prompt-caching) may sit on a content part, a
  message (its last block) or a tool.
* ``file`` content parts are OpenAI's (``{"type": "file", "file": {"file_data": "data:...;base64,...",
  "filename": ...}}``); only inline data can go to another provider (an OpenAI ``file_id`` means
  nothing there).
* An assistant message's ``thinking_blocks`` are Anthropic's signed ``thinking`` and
  ``redacted_thinking`` blocks, sent back as they came.
* Gemini's ``thoughtSignature`` of a function call travels inside the OpenAI tool call id, after
  :data:`THOUGHT_SEPARATOR` (LiteLLM's), so a caller that sends the id back sends the signature back.
"""

from __future__ import annotations

from typing import Any

from services.relay.providers.base import invalid
from services.relay.providers.content import parse_data_url

__all__ = [
    "MIN_THINKING_BUDGET",
    "THOUGHT_SEPARATOR",
    "anthropic_thinking",
    "cache_control_of",
    "effort_budget",
    "file_data",
    "gemini_thinking",
    "split_call_id",
    "thinking_blocks_of",
]

# reasoning_effort -> thinking budget (LiteLLM's table); "none" asks for no thinking.
_EFFORT_BUDGETS: dict[str, int] = {"none": 0, "minimal": 1024, "low": 1024, "medium": 2048, "high": 4096}
# Anthropic refuses a smaller budget.
MIN_THINKING_BUDGET = 1024
THOUGHT_SEPARATOR = "__thought__"


def effort_budget(body: dict[str, Any]) -> int | None:
    """The thinking budget ``reasoning_effort`` asks for; 0 for ``none``, None when it is absent."""
    effort = body.get("reasoning_effort")
    if effort is None:
        return None
    budget = _EFFORT_BUDGETS.get(effort) if isinstance(effort, str) else None
    if budget is None:
        raise invalid(
            "reasoning_effort must be one of none, minimal, low, medium and high.", "reasoning_effort"
        )
    return budget


def _thinking_object(body: dict[str, Any]) -> dict[str, Any] | None:
    thinking = body.get("thinking")
    if thinking is None:
        return None
    if not isinstance(thinking, dict) or not isinstance(thinking.get("type"), str):
        raise invalid("thinking must be an object with a type (enabled, disabled or adaptive).", "thinking")
    return thinking


def anthropic_thinking(body: dict[str, Any], cap: int) -> dict[str, Any] | None:
    """Anthropic's ``thinking`` for a request capped at ``cap`` output tokens.

    A caller's ``thinking`` goes as given (Anthropic judges it: a budget under 1024 or not under
    ``max_tokens`` is its 400). A budget from ``reasoning_effort`` is kept under the cap the request
    was held for, since thinking is output and the hold must cover all of it (LiteLLM raises the cap
    instead); an effort that leaves less than Anthropic's minimum is refused here."""
    thinking = _thinking_object(body)
    if thinking is not None:
        return thinking
    budget = effort_budget(body)
    if not budget:
        return None
    budget = min(budget, cap - 1)
    if budget < MIN_THINKING_BUDGET:
        raise invalid(
            f"reasoning_effort needs max_tokens above {MIN_THINKING_BUDGET} on this model "
            "(Anthropic's smallest thinking budget).",
            "max_tokens",
        )
    return {"type": "enabled", "budget_tokens": budget}


def gemini_thinking(body: dict[str, Any]) -> dict[str, Any] | None:
    """Gemini's ``generationConfig.thinkingConfig`` (https://ai.google.dev/gemini-api/docs/thinking):
    a budget with the thoughts included, ``-1`` (dynamic) for adaptive, ``0`` for none."""
    thinking = _thinking_object(body)
    if thinking is not None:
        kind = thinking["type"]
        if kind == "disabled":
            return {"thinkingBudget": 0}
        if kind == "adaptive":
            return {"thinkingBudget": -1, "includeThoughts": True}
        budget = thinking.get("budget_tokens")
        if kind != "enabled" or isinstance(budget, bool) or not isinstance(budget, int):
            raise invalid(
                "thinking must be enabled with an integer budget_tokens, disabled or adaptive.", "thinking"
            )
        return {"thinkingBudget": budget, "includeThoughts": True}
    budget = effort_budget(body)
    if budget is None:
        return None
    return {"thinkingBudget": budget, "includeThoughts": True} if budget else {"thinkingBudget": 0}


def cache_control_of(item: dict[str, Any]) -> dict[str, Any] | None:
    """The ``cache_control`` of a part, message or tool, checked for its shape only."""
    control = item.get("cache_control")
    if control is None:
        return None
    if not isinstance(control, dict) or control.get("type") != "ephemeral":
        raise invalid('cache_control must be {"type": "ephemeral"}, optionally with a ttl.', "messages")
    return control


def file_data(part: dict[str, Any]) -> tuple[str, str, str | None]:
    """``(media type, base64 data, file name)`` of an OpenAI ``file`` content part."""
    file = part.get("file")
    url = file.get("file_data") if isinstance(file, dict) else None
    data = parse_data_url(url) if isinstance(url, str) else None
    if data is None:
        raise invalid(
            "A file part must carry file_data as a base64 data URL (data:application/pdf;base64,...); "
            "uploaded file ids cannot be sent to this channel.",
            "messages",
        )
    name = file.get("filename") if isinstance(file, dict) else None
    return data[0], data[1], name if isinstance(name, str) and name else None


def thinking_blocks_of(message: dict[str, Any]) -> list[dict[str, Any]]:
    """An assistant message's ``thinking_blocks`` as Anthropic takes them back (only their fields)."""
    raw = message.get("thinking_blocks")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise invalid("thinking_blocks must be a list of thinking blocks.", "messages")
    blocks: list[dict[str, Any]] = []
    for block in raw:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "thinking":
            entry = {"type": "thinking", "thinking": str(block.get("thinking") or "")}
            # A block without its signature goes without one: Anthropic, not the relay, refuses it.
            if isinstance(block.get("signature"), str):
                entry["signature"] = block["signature"]
            blocks.append(entry)
        elif kind == "redacted_thinking":
            blocks.append({"type": "redacted_thinking", "data": str(block.get("data") or "")})
        else:
            raise invalid("thinking_blocks take thinking and redacted_thinking blocks only.", "messages")
    return blocks


def split_call_id(call_id: str) -> tuple[str, str | None]:
    """A tool call id and the Gemini thought signature carried in it, if any."""
    plain, separator, signature = call_id.partition(THOUGHT_SEPARATOR)
    return (plain, signature) if separator and signature else (call_id, None)
