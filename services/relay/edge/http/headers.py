"""Response headers the relay adds to OpenAI answers.

* ``x-request-id``: the relay's id of the request (also the reservation id and the usage event id).
  A caller's own ``x-request-id`` is logged for correlation but never used as ours: ours is the
  idempotency key of the money, and two requests sharing a caller-chosen id must not share a hold.
* ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``, as OpenAI sends them, from the RPM and
  TPM windows quota reports with the reservation (absent when no such limit applies, so always on a
  request admitted on a lease: keys with RPM or TPM limits are never leased).
* ``x-relaygate-overhead-ms``: time spent in the gateway so far (elapsed minus waiting on upstreams).
* ``x-relaygate-available-micros``: the balance left after this request's hold, when quota said so
  (exact reservations; a request admitted on a lease made no RPC, so the relay does not know it).
* ``x-relaygate-cache``: ``hit`` or ``miss`` when the response cache was consulted.
"""

from __future__ import annotations

from services.common.pb.relaygate.quota.v1.quota_pb2 import RateLimitWindow, ReserveResponse
from services.relay.meter.record import Exchange

RawHeaders = list[tuple[bytes, bytes]]

JSON = (b"content-type", b"application/json")
EVENT_STREAM = (b"content-type", b"text/event-stream")
# Proxies (nginx) must not buffer a stream, nor caches keep it.
STREAM_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    EVENT_STREAM,
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)


def reset_text(milliseconds: int) -> bytes:
    """OpenAI's duration format for resets: ``"20ms"``, ``"1s"``, ``"6m0s"``, ``"1h2m3s"``."""
    if milliseconds < 1000:
        return b"%dms" % max(0, milliseconds)
    seconds = milliseconds / 1000
    if seconds < 60:
        return f"{seconds:g}s".encode()
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"
    return text.encode()


def _window(headers: RawHeaders, kind: bytes, window: RateLimitWindow) -> None:
    headers.append((b"x-ratelimit-limit-" + kind, b"%d" % window.limit))
    headers.append((b"x-ratelimit-remaining-" + kind, b"%d" % max(0, window.remaining)))
    headers.append((b"x-ratelimit-reset-" + kind, reset_text(window.reset_ms)))


def ratelimit_headers(reservation: ReserveResponse | None) -> RawHeaders:
    """The ``x-ratelimit-*`` headers for a reservation (empty when no RPM/TPM limit applies)."""
    headers: RawHeaders = []
    if reservation is None:
        return headers
    if reservation.HasField("requests"):
        _window(headers, b"requests", reservation.requests)
    if reservation.HasField("tokens"):
        _window(headers, b"tokens", reservation.tokens)
    return headers


def gateway_headers(exchange: Exchange, *, cache: bytes | None = None) -> RawHeaders:
    """Request id, rate limits, overhead, available balance and cache status of ``exchange``."""
    headers: RawHeaders = [(b"x-request-id", exchange.request_id.encode())]
    reservation = exchange.reservation
    if reservation is not None:
        headers.extend(ratelimit_headers(reservation))
        headers.append((b"x-relaygate-available-micros", b"%d" % reservation.available_micros))
    overhead_ms = (exchange.elapsed_s() - exchange.upstream_s) * 1000
    headers.append((b"x-relaygate-overhead-ms", b"%.2f" % max(0.0, overhead_ms)))
    if cache is not None:
        headers.append((b"x-relaygate-cache", cache))
    return headers
