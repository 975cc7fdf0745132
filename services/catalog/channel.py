"""A channel as the catalog stores it, and the checks it passes before it is stored.

Credentials (the API key, secret-looking header values) are write-only through the admin API, which
shows them masked (:mod:`services.common.credentials`). A channel sent back with a credential still
masked, as listed, keeps the stored value, so editing a listed channel never needs the secret again.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.common import credentials
from services.common.errors import InvalidRequest

__all__ = ["CHANNEL_TYPES", "Channel", "restore_credentials", "validate_channel"]

# The provider wire formats a channel may speak; "openai" is sent as is, the others are converted.
CHANNEL_TYPES = ("openai", "azure-openai", "anthropic", "gemini")

DEFAULT_CONNECT_MS = 5_000
DEFAULT_FIRST_BYTE_MS = 60_000
DEFAULT_TOTAL_MS = 600_000
DEFAULT_MAX_CONNECTIONS = 200
MAX_WEIGHT = 1_000_000


@dataclass(frozen=True, slots=True)
class Channel:
    """An upstream endpoint. On upsert, an empty ``channel_id`` creates a new channel and a 0 timeout
    or connection limit means the default."""

    channel_id: str = ""
    name: str = ""
    # The provider's base URL: OpenAI-compatible ones (and Anthropic's, Gemini's) include the API
    # version path (/v1, /v1beta); Azure's is the resource's root (https://NAME.openai.azure.com).
    base_url: str = ""
    api_key: str = ""
    models: tuple[str, ...] = ()
    # Public model name -> the provider's model name.
    model_map: Mapping[str, str] = field(default_factory=dict)
    priority: int = 0
    weight: int = 1
    headers: Mapping[str, str] = field(default_factory=dict)
    connect_timeout_ms: int = 0
    first_byte_timeout_ms: int = 0
    total_timeout_ms: int = 0
    max_connections: int = 0
    enabled: bool = True
    # One of CHANNEL_TYPES; empty means "openai".
    type: str = ""
    # Azure OpenAI's api-version query parameter; required for azure-openai channels only.
    api_version: str = ""


def _invalid(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param)


def _text(name: str, value: str, max_len: int, *, required: bool) -> str:
    value = value.strip()
    if required and not value:
        raise _invalid(f"{name} is required", name)
    if len(value) > max_len:
        raise _invalid(f"{name} is longer than {max_len} characters", name)
    return value


def _or_default(name: str, value: int, default: int) -> int:
    if value < 0:
        raise _invalid(f"{name} must not be negative (got {value})", name)
    return value or default


def _no_line_breaks(name: str, pairs: Mapping[str, str]) -> dict[str, str]:
    for key, value in pairs.items():
        if not key.strip():
            raise _invalid(f"{name} has an empty key", name)
        # A CR or LF would let a stored header inject extra headers into every upstream request.
        if any(c in key + value for c in "\r\n\0"):
            raise _invalid(f"{name}[{key!r}] contains a line break", name)
    return dict(pairs)


def _no_credentials_in_url(parts: urllib.parse.SplitResult) -> None:
    """Credentials belong in ``api_key`` or a header, which are never shown; a URL is shown as is."""
    secret_query = [
        name
        for name, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if credentials.is_secret_header(name)
    ]
    if parts.password is not None or secret_query:
        raise _invalid(
            "base_url must not carry credentials (user:password@ or a key in the query): "
            "put them in api_key or headers, which are stored write-only",
            "base_url",
        )


def restore_credentials(channel: Channel, stored: Channel | None) -> Channel:
    """``channel`` with every credential sent back masked replaced by the stored value it masks.

    Raises InvalidRequest for a masked value that is not the mask of this channel's stored one.
    """
    api_key = credentials.unmask(channel.api_key, stored.api_key if stored else "")
    if api_key is None:
        raise _invalid("api_key is masked but not this channel's: send the real key", "api_key")
    headers: dict[str, str] = {}
    for name, value in channel.headers.items():
        kept = credentials.unmask(value, stored.headers.get(name, "") if stored else "")
        if kept is None:
            raise _invalid(
                f"headers[{name!r}] is masked but not this channel's: send the real value", "headers"
            )
        headers[name] = kept
    return dataclasses.replace(channel, api_key=api_key, headers=headers)


def validate_channel(channel: Channel) -> Channel:
    """Check a channel before it is stored; returns it normalized (defaults filled in, models deduped)."""
    channel_id = _text("channel_id", channel.channel_id, 40, required=False)
    base_url = _text("base_url", channel.base_url, 500, required=True)
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in base_url):
        raise _invalid(f"base_url must be an http(s):// URL with a host (got {base_url!r})", "base_url")
    _no_credentials_in_url(parts)
    models_: list[str] = []
    for model in channel.models:
        name = _text("models", model, 200, required=True)
        if name not in models_:
            models_.append(name)
    # proto3 cannot tell an omitted weight from 0, so 0 means the default like every other number here;
    # "never pick this channel" is what `enabled` is for.
    weight = _or_default("weight", channel.weight, 1)
    if weight > MAX_WEIGHT:
        raise _invalid(f"weight must be between 1 and {MAX_WEIGHT} (got {weight})", "weight")
    max_connections = _or_default("max_connections", channel.max_connections, DEFAULT_MAX_CONNECTIONS)
    connect = _or_default("connect_timeout_ms", channel.connect_timeout_ms, DEFAULT_CONNECT_MS)
    first_byte = _or_default("first_byte_timeout_ms", channel.first_byte_timeout_ms, DEFAULT_FIRST_BYTE_MS)
    total = _or_default("total_timeout_ms", channel.total_timeout_ms, DEFAULT_TOTAL_MS)
    if first_byte > total or connect > total:
        raise _invalid(
            "total_timeout_ms must not be shorter than the connect or first-byte timeout", "total_timeout_ms"
        )
    kind = channel.type.strip() or "openai"
    if kind not in CHANNEL_TYPES:
        raise _invalid(f"type must be one of {', '.join(CHANNEL_TYPES)} (got {kind!r})", "type")
    api_version = _text("api_version", channel.api_version, 64, required=kind == "azure-openai")
    if api_version and kind != "azure-openai":
        raise _invalid("api_version applies to azure-openai channels only", "api_version")
    if any(not (c.isalnum() or c in "-_.") for c in api_version):
        raise _invalid(f"api_version must look like 2024-10-21 (got {api_version!r})", "api_version")
    return Channel(
        channel_id=channel_id,
        name=_text("name", channel.name, 200, required=True),
        base_url=base_url.rstrip("/"),
        api_key=_text("api_key", channel.api_key, 500, required=False),
        models=tuple(models_),
        model_map=_no_line_breaks("model_map", channel.model_map),
        priority=channel.priority,
        weight=weight,
        headers=_no_line_breaks("headers", channel.headers),
        connect_timeout_ms=connect,
        first_byte_timeout_ms=first_byte,
        total_timeout_ms=total,
        max_connections=max_connections,
        enabled=channel.enabled,
        type=kind,
        api_version=api_version,
    )
