"""Checking an OpenAI request body, whichever front it came in by: JSON, UTF-8 and the fields we rely on.

Validation is by hand rather than through a pydantic model: the relay forwards the caller's bytes
unchanged, so it only checks the handful of fields it reads or that would make the upstream fail in a
way the caller cannot understand; every failure is a 4xx naming the field, before any upstream call
or balance change.

Every dimension a client controls is bounded here, before any RPC: the body's nesting depth, array
lengths, integers (a value the relay puts into a protobuf int64 must fit one, and token counts are
kept far below that so cost arithmetic cannot overflow either), ``n`` and the key's length. The
body's size is bounded by the front that reads it (:mod:`services.relay.edge.http.requests`).
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from services.common.errors import AuthenticationError, InvalidRequest

__all__ = [
    "MAX_ADMIN_TOKEN_CHARS",
    "MAX_API_KEY_CHARS",
    "MAX_N",
    "MAX_TOKENS",
    "bounded_credential",
    "optional_array",
    "optional_bool",
    "optional_number",
    "optional_object",
    "optional_positive_int",
    "parse_json",
    "refuse_nul",
    "require_messages",
    "require_model",
    "require_text_or_array",
]

# Keys are ``rg-`` + 12 + ``-`` + 32 characters (48). A future format may grow the id or the secret, so
# the edge allows well over that; anything longer cannot be a key and is refused without asking auth.
MAX_API_KEY_CHARS = 128

# Admin tokens are compact JWTs of a few hundred characters.
MAX_ADMIN_TOKEN_CHARS = 4096

# Token counts (max_tokens, max_completion_tokens): no model comes near 2**31 tokens, and at that bound
# tokens x any price per million tokens stays far inside int64 micro-units in quota's arithmetic.
MAX_TOKENS = 2**31 - 1

# OpenAI's own upper bound for ``n``.
MAX_N = 128

# Model names are identifiers, and they end up in request logs.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _too_deep(value: Any, limit: int) -> bool:
    """Whether ``value`` nests more than ``limit`` arrays and objects deep (itself counting as one).

    Iterative: the point is to refuse what recursive code (ours, orjson's serializer, protobuf's JSON
    parser) would fail on."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if depth > limit:
            return True
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, dict | list):
                pending.append((child, depth + 1))
    return False


def parse_json(raw: bytes, *, max_depth: int) -> dict[str, Any]:
    """The body as a JSON object; 400 for anything else (invalid UTF-8 included), and for a body that
    nests arrays and objects more than ``max_depth`` levels deep (the body itself is level 1)."""
    if not raw:
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson also rejects invalid UTF-8 and more than 1,024 levels of nesting here.
        raise InvalidRequest(f"The request body is not valid JSON: {exc}.") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    # Fewer brackets than the limit (strings included) cannot nest too deep: most bodies stop here.
    if raw.count(b"[") + raw.count(b"{") > max_depth:
        for field, value in body.items():
            if isinstance(value, dict | list) and _too_deep(value, max_depth - 1):
                raise InvalidRequest(
                    f"'{field}' is nested more than {max_depth} levels deep.", param=str(field)
                )
    return body


def refuse_nul(value: Any, *, param: str | None = None) -> None:
    """400 when any string in ``value`` (object keys included) holds U+0000: PostgreSQL text cannot
    store it, so such a name or id could only fail deeper down."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise InvalidRequest("Strings may not contain NUL (U+0000) characters.", param=param)
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)


def bounded_credential(credential: str, max_chars: int) -> str:
    """``credential`` unless it is longer than any credential this gateway issues (then 401, no RPC)."""
    if len(credential) > max_chars:
        raise AuthenticationError(
            "Incorrect API key provided: it is longer than any key this gateway issues."
        )
    return credential


def require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("You must provide a model parameter (a non-empty string).", param="model")
    if len(model) > 200:
        raise InvalidRequest("The model name is too long.", param="model")
    if _CONTROL.search(model):
        raise InvalidRequest("The model name contains control characters.", param="model")
    return model


def require_messages(body: dict[str, Any], max_items: int) -> list[Any]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array.", param="messages")
    if len(messages) > max_items:
        raise InvalidRequest(f"'messages' has more than {max_items} items.", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(
                f"messages[{index}] must be an object with a string 'role'.", param="messages"
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise InvalidRequest(f"messages[{index}].content must be a string or an array.", param="messages")
    return messages


def _is_token_array(value: list[Any]) -> bool:
    return all(isinstance(item, int) and not isinstance(item, bool) for item in value)


def require_text_or_array(body: dict[str, Any], field: str, max_items: int) -> Any:
    """A string or a non-empty array of at most ``max_items`` inputs; one array of token ids is a
    single input (bounded by the body size alone)."""
    value = body.get(field)
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if len(value) > max_items and not _is_token_array(value):
            raise InvalidRequest(f"'{field}' has more than {max_items} items.", param=field)
        return value
    raise InvalidRequest(f"'{field}' must be a string or a non-empty array.", param=field)


def optional_array(body: dict[str, Any], field: str, max_items: int) -> None:
    value = body.get(field)
    if value is None:
        return
    if not isinstance(value, list):
        raise InvalidRequest(f"'{field}' must be an array.", param=field)
    if len(value) > max_items:
        raise InvalidRequest(f"'{field}' has more than {max_items} items.", param=field)


def optional_bool(body: dict[str, Any], field: str) -> bool:
    value = body.get(field)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{field}' must be a boolean.", param=field)
    return value


def optional_positive_int(body: dict[str, Any], field: str, maximum: int) -> int | None:
    value = body.get(field)
    if value is not None and (
        not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= maximum
    ):
        raise InvalidRequest(f"'{field}' must be an integer from 1 to {maximum}.", param=field)
    return value


def optional_number(body: dict[str, Any], field: str) -> None:
    value = body.get(field)
    if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
        raise InvalidRequest(f"'{field}' must be a number.", param=field)


def optional_object(body: dict[str, Any], field: str) -> None:
    value = body.get(field)
    if value is not None and not isinstance(value, dict):
        raise InvalidRequest(f"'{field}' must be an object.", param=field)
