"""Sending a request upstream through the pooled client, with failover across channels.

Which failures may go to the next channel: connect errors, timeouts, dropped connections, 5xx and
429. Anything else the upstream answers (400, 401, 404, 422, ...) is the caller's or the channel's
configuration problem and is returned as is, never retried. httpx exceptions are mapped to the
gateway's error tree here and nowhere else.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx

from services.common.errors import GatewayError, UpstreamError, UpstreamStatus, UpstreamTimeout
from services.common.telemetry import METRICS
from services.relay.channels import Channel

log = logging.getLogger(__name__)

_RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529})


@dataclass(slots=True)
class UpstreamReply:
    channel: Channel
    status: int
    content_type: str
    body: bytes
    ttfb_s: float
    elapsed_s: float
    attempts: int


@contextlib.contextmanager
def map_upstream_errors(channel: Channel) -> Iterator[None]:
    """Turn httpx failures into the most specific :class:`UpstreamError`."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise UpstreamTimeout(f"Channel {channel.name!r} timed out ({type(exc).__name__}).") from exc
    except httpx.TransportError as exc:
        raise UpstreamError(f"Channel {channel.name!r} failed: {type(exc).__name__}.") from exc


def build_headers(channel: Channel, request_id: str) -> dict[str, str]:
    headers = {"content-type": "application/json", "x-request-id": request_id}
    if channel.api_key:
        headers["authorization"] = f"Bearer {channel.api_key}"
    headers.update(channel.headers)
    return headers


class Upstreams:
    """The process's upstream HTTP pool; owned by the relay's lifespan."""

    def __init__(self, client: httpx.AsyncClient, *, max_attempts: int) -> None:
        self.client = client
        self.max_attempts = max_attempts

    async def post_json(
        self,
        candidates: list[Channel],
        path: str,
        payload_for: Callable[[Channel], bytes],
        *,
        request_id: str,
    ) -> UpstreamReply:
        """POST to the first channel that answers without a retryable failure.

        Raises the last :class:`UpstreamError` when every attempt failed.
        """
        last_error: GatewayError | None = None
        attempts = 0
        for channel in candidates[: self.max_attempts]:
            attempts += 1
            started = time.perf_counter()
            try:
                with map_upstream_errors(channel):
                    response = await self.client.post(
                        f"{channel.base_url}{path}",
                        content=payload_for(channel),
                        headers=build_headers(channel, request_id),
                        timeout=httpx.Timeout(
                            connect=channel.connect_timeout_s,
                            read=channel.first_byte_timeout_s,
                            write=channel.connect_timeout_s,
                            pool=channel.connect_timeout_s,
                        ),
                    )
            except UpstreamError as exc:
                outcome = "timeout" if isinstance(exc, UpstreamTimeout) else "transport"
                METRICS.upstream_attempts.labels(channel=channel.name, outcome=outcome).inc()
                log.warning("upstream attempt failed", extra={"channel": channel.name, "error": exc.message})
                last_error = exc
                continue
            elapsed = time.perf_counter() - started
            METRICS.upstream_ttfb.labels(channel=channel.name).observe(elapsed)
            if response.status_code in _RETRYABLE_STATUS:
                METRICS.upstream_attempts.labels(
                    channel=channel.name, outcome=f"status_{response.status_code}"
                ).inc()
                last_error = UpstreamStatus(status=response.status_code, body=response.content)
                continue
            METRICS.upstream_attempts.labels(channel=channel.name, outcome="ok").inc()
            return UpstreamReply(
                channel=channel,
                status=response.status_code,
                content_type=response.headers.get("content-type", "application/json"),
                body=response.content,
                ttfb_s=elapsed,
                elapsed_s=elapsed,
                attempts=attempts,
            )
        if last_error is None:
            raise UpstreamError("No channel could be tried.")
        raise last_error
