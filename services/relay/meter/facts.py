"""What the gateway tells a caller about its request: response headers on the HTTP front, trailing
metadata on the gRPC front (the same names and values).

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

__all__ = ["Facts", "gateway_facts", "ratelimit_facts", "reset_text"]

# (name, value) pairs, lower-case names: HTTP header fields as they are, gRPC metadata decoded.
Facts = list[tuple[bytes, bytes]]


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


def _window(facts: Facts, kind: bytes, window: RateLimitWindow) -> None:
    facts.append((b"x-ratelimit-limit-" + kind, b"%d" % window.limit))
    facts.append((b"x-ratelimit-remaining-" + kind, b"%d" % max(0, window.remaining)))
    facts.append((b"x-ratelimit-reset-" + kind, reset_text(window.reset_ms)))


def ratelimit_facts(reservation: ReserveResponse | None) -> Facts:
    """The ``x-ratelimit-*`` facts of a reservation (empty when no RPM/TPM limit applies)."""
    facts: Facts = []
    if reservation is None:
        return facts
    if reservation.HasField("requests"):
        _window(facts, b"requests", reservation.requests)
    if reservation.HasField("tokens"):
        _window(facts, b"tokens", reservation.tokens)
    return facts


def gateway_facts(exchange: Exchange, *, cache: bytes | None = None) -> Facts:
    """Request id, rate limits, overhead, available balance and cache status of ``exchange``."""
    facts: Facts = [(b"x-request-id", exchange.request_id.encode())]
    reservation = exchange.reservation
    if reservation is not None:
        facts.extend(ratelimit_facts(reservation))
        facts.append((b"x-relaygate-available-micros", b"%d" % reservation.available_micros))
    overhead_ms = (exchange.elapsed_s() - exchange.upstream_s) * 1000
    facts.append((b"x-relaygate-overhead-ms", b"%.2f" % max(0.0, overhead_ms)))
    if cache is not None:
        facts.append((b"x-relaygate-cache", cache))
    return facts
