"""A circuit breaker per channel: stop sending to an upstream that keeps failing, probe it, come back.

States::

    closed ──(failure ratio ≥ threshold over the window, with enough attempts)──▶ open
    open ──(cool-down elapsed: the next request is the one probe)──▶ half-open
    half-open ──probe succeeds──▶ closed          half-open ──probe fails──▶ open (cool-down doubled)

What counts (see :class:`Outcome`): connect errors, timeouts, dropped connections and 5xx are
failures; any other answer, caller errors included, proves the channel works. A failure to connect
or to get the first byte is the channel's own, whoever sent the request. A 5xx *answer* may be the
channel's, or one caller's body that crashes the provider: those count towards opening only once
at least ``min_callers`` distinct keys got them within the window, so one key sending poison bodies
cannot open the breaker that every other key shares (each of its own requests still fails over).
Overload answers (429, 529) are neither: they pause the channel for the upstream's ``Retry-After``
without moving it towards open, because a provider asking for patience is not broken (peer lesson:
channels auto-disabled on "model overloaded"). A channel an operator disabled is absent from the
table altogether, so that decision is never undone here.

Each relay process keeps its own breakers; they are in-memory, cheap, and reset on restart.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from services.common.clock import Clock, SystemClock
from services.common.telemetry import METRICS

__all__ = ["Breaker", "BreakerPolicy", "Breakers", "Outcome", "State"]


class State(enum.IntEnum):
    """Exported as the ``relaygate_breaker_state`` gauge value."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Outcome(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    OVERLOAD = "overload"
    # The attempt ended without a verdict (the client went away first): frees a probe slot only.
    ABANDONED = "abandoned"


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    window_s: float = 30.0
    min_requests: int = 5
    failure_ratio: float = 0.5
    open_s: float = 5.0
    max_open_s: float = 60.0
    throttle_s: float = 1.0
    # Distinct keys whose 5xx answers must be in the window before those answers count as failures.
    min_callers: int = 2

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.open_s <= 0 or self.max_open_s < self.open_s:
            raise ValueError("breaker windows must be positive, and max_open_s >= open_s")
        if not 0 < self.failure_ratio <= 1 or self.min_requests < 1 or self.min_callers < 1:
            raise ValueError("failure_ratio must be in (0, 1], min_requests and min_callers >= 1")


# The window is kept as this many buckets, so old attempts fall out in steps of window_s / _BUCKETS.
_BUCKETS = 10
# Keys remembered with their last 5xx answer; a flood of distinct keys needs no more to reach any
# sensible ``min_callers``.
_MAX_CALLERS = 64


class Breaker:
    """One channel's breaker. Not thread-safe; used from the event loop only."""

    def __init__(self, name: str, policy: BreakerPolicy, clock: Clock) -> None:
        self.name = name
        self._policy = policy
        self._clock = clock
        self._bucket_s = policy.window_s / _BUCKETS
        # Per bucket: [bucket number, attempts, failures, 5xx answers].
        self._buckets = [[-1, 0, 0, 0] for _ in range(_BUCKETS)]
        # Key -> when it last got a 5xx answer (monotonic), to tell one caller from many.
        self._callers: dict[str, float] = {}
        self.state = State.CLOSED
        self._open_until = 0.0
        self._cooldown = policy.open_s
        self._probing = False
        self._paused_until = 0.0
        self._gauge = METRICS.breaker_state.labels(channel=name)
        self._gauge.set(State.CLOSED)

    def allow(self) -> bool:
        """Whether a request may go to this channel now; in half-open, True claims the one probe."""
        now = self._clock.monotonic()
        if now < self._paused_until:
            return False
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN:
            if now < self._open_until:
                return False
            self._move(State.HALF_OPEN)
        if self._probing:
            return False
        self._probing = True
        return True

    def retry_in(self) -> float:
        """Seconds until this channel may accept a request again (0 when it may now)."""
        now = self._clock.monotonic()
        until = self._paused_until
        if self.state is State.OPEN:
            until = max(until, self._open_until)
        elif self.state is State.HALF_OPEN and self._probing:
            until = max(until, now + self._bucket_s)
        return max(0.0, until - now)

    def record(
        self, outcome: Outcome, *, retry_after: float | None = None, answered_by_status: str | None = None
    ) -> None:
        """Account for one attempt that :meth:`allow` let through.

        ``answered_by_status`` names the key of a failure that is a 5xx answer (as opposed to a
        connect error or timeout): such failures count once enough distinct keys got them."""
        now = self._clock.monotonic()
        probe, self._probing = self._probing, False
        if outcome is Outcome.ABANDONED:
            return
        if outcome is Outcome.OVERLOAD:
            pause = retry_after if retry_after is not None else self._policy.throttle_s
            self._paused_until = max(self._paused_until, now + min(pause, self._policy.max_open_s))
            if probe:
                # Still not serving: wait out the same cool-down again, without escalating it.
                self._open(now, escalate=False)
            return
        failed = outcome is Outcome.FAILURE
        if probe:
            if failed:
                self._open(now, escalate=True)
            else:
                self._close()
            return
        answered = failed and answered_by_status is not None
        if answered:
            self._remember_caller(answered_by_status or "", now)
        attempts, hard, answers = self._count(now, failed and not answered, answered)
        # Only a failure can open the breaker, so a success (the common case) never walks the callers.
        if self.state is not State.CLOSED or not failed or attempts < self._policy.min_requests:
            return
        if answers and self._callers_in_window(now) >= self._policy.min_callers:
            hard += answers
        if hard >= self._policy.failure_ratio * attempts:
            self._open(now, escalate=False)

    def reset(self) -> None:
        """Back to closed with an empty window and no pause."""
        self._probing = False
        self._paused_until = 0.0
        self._close()

    def _count(self, now: float, failed: bool, answered: bool) -> tuple[int, int, int]:
        """Add one attempt to the current bucket; returns the window's attempts, failures of the
        channel itself, and failed 5xx answers."""
        number = int(now / self._bucket_s)
        bucket = self._buckets[number % _BUCKETS]
        if bucket[0] != number:
            bucket[0], bucket[1], bucket[2], bucket[3] = number, 0, 0, 0
        bucket[1] += 1
        bucket[2] += failed
        bucket[3] += answered
        oldest = number - _BUCKETS + 1
        attempts = failures = answers = 0
        for start, n, f, a in self._buckets:
            if start >= oldest:
                attempts += n
                failures += f
                answers += a
        return attempts, failures, answers

    def _remember_caller(self, key: str, now: float) -> None:
        callers = self._callers
        callers.pop(key, None)
        callers[key] = now  # dicts keep insertion order: the oldest entry comes first
        if len(callers) > _MAX_CALLERS:
            del callers[next(iter(callers))]

    def _callers_in_window(self, now: float) -> int:
        since = now - self._policy.window_s
        return sum(1 for seen in self._callers.values() if seen >= since)

    def _open(self, now: float, *, escalate: bool) -> None:
        if escalate:
            self._cooldown = min(self._cooldown * 2, self._policy.max_open_s)
        self._open_until = now + self._cooldown
        self._move(State.OPEN)

    def _close(self) -> None:
        self._cooldown = self._policy.open_s
        for bucket in self._buckets:
            bucket[0] = -1
        self._callers.clear()
        self._move(State.CLOSED)

    def _move(self, state: State) -> None:
        if state is not self.state:
            METRICS.breaker_transitions.labels(channel=self.name, to=state.name.lower()).inc()
            self.state = state
            self._gauge.set(state)


class Breakers:
    """The breakers of every channel in the table, keyed by channel id."""

    def __init__(self, policy: BreakerPolicy, clock: Clock | None = None) -> None:
        self._policy = policy
        self._clock = clock or SystemClock()
        self._by_channel: dict[str, Breaker] = {}

    def get(self, channel_id: str, name: str) -> Breaker:
        breaker = self._by_channel.get(channel_id)
        if breaker is None:
            breaker = self._by_channel[channel_id] = Breaker(name, self._policy, self._clock)
        return breaker

    def find(self, channel_id: str) -> Breaker | None:
        return self._by_channel.get(channel_id)

    def reset(self, channel_id: str) -> bool:
        """Close ``channel_id``'s breaker now (an operator fixed the channel); False if unknown."""
        breaker = self._by_channel.get(channel_id)
        if breaker is None:
            return False
        breaker.reset()
        return True

    def retain(self, channel_ids: set[str]) -> None:
        """Forget the breakers of channels no longer in the table."""
        for channel_id in list(self._by_channel):
            if channel_id not in channel_ids:
                breaker = self._by_channel.pop(channel_id)
                METRICS.breaker_state.remove(breaker.name)
