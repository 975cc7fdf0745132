"""Reading and checking request bodies at the edge: size, JSON, UTF-8 and the fields we rely on.

Validation is by hand rather than through a pydantic model: the relay forwards the caller's bytes
unchanged, so it only needs to check the handful of fields it reads, and it does so on every request.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request

from services.common.errors import InvalidRequest, PayloadTooLarge


async def read_json(request: Request, max_bytes: int) -> tuple[dict[str, Any], bytes]:
    """The parsed body and its raw bytes; 413 past ``max_bytes``, 400 for anything but a JSON object."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"Request body exceeds the limit of {max_bytes} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"Request body exceeds the limit of {max_bytes} bytes.")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw:
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson also rejects invalid UTF-8 here, which is what we want.
        raise InvalidRequest(f"The request body is not valid JSON: {exc}.") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body, raw


def require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("You must provide a model parameter (a non-empty string).", param="model")
    if len(model) > 200:
        raise InvalidRequest("The model name is too long.", param="model")
    return model


def require_messages(body: dict[str, Any]) -> list[Any]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array.", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(
                f"messages[{index}] must be an object with a string 'role'.", param="messages"
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise InvalidRequest(f"messages[{index}].content must be a string or an array.", param="messages")
    return messages


def optional_bool(body: dict[str, Any], field: str) -> bool:
    value = body.get(field)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{field}' must be a boolean.", param=field)
    return value


def optional_positive_int(body: dict[str, Any], field: str) -> None:
    value = body.get(field)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise InvalidRequest(f"'{field}' must be a positive integer.", param=field)
