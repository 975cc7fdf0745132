"""Provider adapters: how a channel of each type is spoken to (see :mod:`.base`).

``openai`` channels have no adapter (None): their traffic passes through unchanged.
"""

from __future__ import annotations

from services.relay.providers.anthropic import ANTHROPIC
from services.relay.providers.azure import AZURE
from services.relay.providers.base import Provider, StreamDecoder
from services.relay.providers.gemini import GEMINI

__all__ = ["Provider", "StreamDecoder", "provider_for"]

_BY_TYPE: dict[str, Provider] = {p.kind: p for p in (AZURE, ANTHROPIC, GEMINI)}


def provider_for(kind: str) -> Provider | None:
    """The adapter of a channel type; None for ``openai`` (and an empty type, its default).

    An unknown type raises ``ValueError``: the catalog refuses those, so one here is a newer
    catalog than this relay, and sending it OpenAI's format would be wrong."""
    if kind in ("", "openai"):
        return None
    provider = _BY_TYPE.get(kind)
    if provider is None:
        raise ValueError(f"unknown channel type {kind!r}")
    return provider
