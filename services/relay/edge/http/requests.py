"""Reading requests at the HTTP edge: the headers the relay reads, and the body, bounded in size.

What the body must hold is checked by :mod:`services.relay.pipeline.checks`, shared by every front.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from services.common.errors import PayloadTooLarge
from services.relay.pipeline.checks import parse_json

__all__ = ["ClientGone", "Incoming", "read_body", "read_json"]

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


class ClientGone(Exception):
    """The client disconnected before its request body was complete; nothing can be answered."""


_WANTED = {
    b"authorization": "authorization",
    b"x-api-key": "x_api_key",
    b"content-length": "content_length",
    b"x-relaygate-cache": "cache",
    b"x-request-id": "client_request_id",
    b"x-forwarded-for": "forwarded_for",
}


@dataclass(slots=True)
class Incoming:
    """The request headers the relay reads, picked from the ASGI scope in one pass."""

    authorization: str | None = None
    x_api_key: str | None = None
    content_length: str | None = None
    cache: str | None = None
    client_request_id: str | None = None
    forwarded_for: str | None = None

    @classmethod
    def from_scope(cls, scope: MutableMapping[str, Any]) -> Incoming:
        incoming = cls()
        for name, value in scope["headers"]:
            field = _WANTED.get(name)
            if field is not None and getattr(incoming, field) is None:
                setattr(incoming, field, value.decode("latin-1"))
        return incoming

    def client_ip(self, scope: MutableMapping[str, Any], *, trust_forwarded_for: bool) -> str:
        if trust_forwarded_for and self.forwarded_for:
            return self.forwarded_for.split(",", 1)[0].strip()
        client = scope.get("client")
        return str(client[0]) if client else ""


def _too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body exceeds the limit of {max_bytes} bytes.")


async def read_body(receive: Receive, declared_length: str | None, max_bytes: int) -> bytes:
    """The whole body from ASGI ``receive``; 413 past ``max_bytes`` (declared or counted)."""
    if declared_length is not None and _declared_above(declared_length, max_bytes):
        raise _too_large(max_bytes)
    message = await receive()
    if message["type"] != "http.request":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
        return body
    chunks = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _declared_above(declared_length: str, max_bytes: int) -> bool:
    # The HTTP parser only lets ASCII digits through; the length check keeps int() cheap regardless.
    digits = declared_length.strip()
    if not (digits.isascii() and digits.isdigit()):
        return False
    return len(digits) > len(str(max_bytes)) or int(digits) > max_bytes


async def read_json(request: Request, *, max_bytes: int, max_depth: int) -> tuple[dict[str, Any], bytes]:
    """The parsed body and its raw bytes of a Starlette request (the admin API's)."""
    raw = await read_body(request.receive, request.headers.get("content-length"), max_bytes)
    return parse_json(raw, max_depth=max_depth), raw
