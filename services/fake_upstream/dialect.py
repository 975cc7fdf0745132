"""What differs between the providers the fake upstream imitates, and what the app needs to know of it.

A :class:`Dialect` is one provider's wire conventions: which paths it serves (:class:`Route`), how
a request proves who it is (``refuse``), and what its errors look like (``error`` for a refused
request, ``injected`` for a ``fail_status`` failure, with the provider's headers). The app runs
every inference request through the same steps (stats, credentials, latency, injected failures,
handler, pacing) whatever the dialect.
"""

from __future__ import annotations

import enum
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .behaviour import Behaviour
from .endpoints import JsonReply, Reply, RequestError


@dataclass(frozen=True, slots=True)
class Call:
    """One inference request as a provider handler sees it."""

    body: Any
    """The parsed JSON body: always an object by the time a handler runs."""
    params: Mapping[str, str]
    """Values taken from the path (a Gemini model, an Azure deployment)."""
    query: Mapping[str, str]
    headers: Mapping[str, str]
    """Lower-cased names; the last of repeated headers wins."""


class Streams(enum.Enum):
    """How a route decides whether it answers with a stream."""

    NEVER = "never"
    ON_REQUEST = "on_request"
    """When the body says ``"stream": true`` (OpenAI, Azure, Anthropic)."""
    ALWAYS = "always"
    """The path itself streams (Gemini ``:streamGenerateContent``)."""


ProviderHandler = Callable[[Call, Behaviour], Reply]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    handler: ProviderHandler
    params: Mapping[str, str]
    streams: Streams = Streams.NEVER


@dataclass(frozen=True, slots=True)
class Dialect:
    """One provider's conventions; see the module docstring."""

    name: str
    match: Callable[[str], Route | None]
    refuse: Callable[[Call, Behaviour], JsonReply | None]
    """An error reply when the credentials or required headers / query parameters are wrong."""
    error: Callable[[RequestError], JsonReply]
    injected: Callable[[int, Behaviour], JsonReply]


def query_of(raw: bytes) -> dict[str, str]:
    """The query string's parameters; the last of repeated ones wins."""
    return dict(urllib.parse.parse_qsl(raw.decode("latin-1"), keep_blank_values=True))


def headers_of(raw: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    return {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in raw}


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an ``Authorization: Bearer`` header, if there is one."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None
