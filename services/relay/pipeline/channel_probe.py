"""The admin API's channel test: one small chat request straight to one channel, answered with its
status, latency and the upstream's error if any.

The probe bypasses everything a caller's request goes through: no key, no credit held, no usage event
(so it is billed to no one and appears in no usage or log), no breaker (a channel whose breaker is
open is exactly the one an operator wants to try) and none of the relay's pools (a connection of its
own, closed after, so the channel's pool figures stay the traffic's). The request is built as the
relay builds a caller's: the channel's target, headers and, for another provider's format, its
adapter's request.
"""

from __future__ import annotations

import time
from asyncio import timeout as asyncio_timeout
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx
import orjson

from services.common.credentials import mask
from services.relay.pipeline.relay import payload_for
from services.relay.providers.base import CHAT_PATH
from services.relay.upstream.channels import Channel
from services.relay.upstream.transport import ChannelTransport

# The path a probe is sent to (re-exported: the admin route checks the channel serves it).
__all__ = ["CHAT_PATH", "ProbeResult", "probe"]

# What the probe asks for: one output token of a one-word prompt.
_PROMPT = "ping"
_MAX_TOKENS = 1
# A probe never waits on a slow upstream as long as a caller's request may.
MAX_PROBE_S = 30.0
# The start of an error answer shown to the operator.
_ERROR_CHARS = 500


@dataclass(frozen=True, slots=True)
class ProbeResult:
    model: str
    # 0 when no answer came (refused connection, timeout).
    status: int
    latency_ms: float
    # The upstream's error answer (or why none came); empty on success.
    error: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": 200 <= self.status < 300,
            "model": self.model,
            "status": self.status,
            "latency_ms": self.latency_ms,
            "error": self.error,
        }


def _payload(channel: Channel, model: str) -> bytes:
    """The probe's body as this channel receives a caller's (renamed model, another provider's format)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": _PROMPT}],
        "max_tokens": _MAX_TOKENS,
    }
    return payload_for(body, orjson.dumps(body), model, max_output_tokens=_MAX_TOKENS)(channel)


def _shown(channel: Channel, text: str) -> str:
    """An error for the admin: the channel's key never appears in it, even if the upstream echoed it."""
    if channel.api_key:
        text = text.replace(channel.api_key, mask(channel.api_key))
    return text[:_ERROR_CHARS]


async def probe(channel: Channel, model: str) -> ProbeResult:
    """Send the probe for ``model`` (a model the channel serves) and wait for the whole answer."""
    payload = _payload(channel, model)
    timeouts = channel.timeouts()
    total_s = min(channel.total_timeout_s, MAX_PROBE_S)
    transport = ChannelTransport(channel.base_url, max_connections=1, max_idle=0, keepalive_expiry=0.0)
    started = time.perf_counter()
    status, error = 0, ""
    try:
        request = httpcore.Request(
            b"POST",
            transport.url(channel.target(CHAT_PATH, model, stream=False)),
            headers=[*channel.raw_headers, (b"content-length", b"%d" % len(payload))],
            content=payload,
            extensions={"timeout": timeouts},
        )
        async with asyncio_timeout(total_s):
            response, body = await transport.open(request)
            try:
                content = b"".join([part async for part in body])
            finally:
                await body.aclose()
        status = response.status
        if not 200 <= status < 300:
            error = _shown(channel, content.decode("utf-8", "replace"))
    except TimeoutError:
        error = f"No complete answer within {total_s:g} s."
    except httpx.TransportError as exc:
        error = _shown(channel, f"{type(exc).__name__}: {exc}".rstrip(": "))
    finally:
        await transport.aclose()
    return ProbeResult(model, status, round((time.perf_counter() - started) * 1000, 3), error)
