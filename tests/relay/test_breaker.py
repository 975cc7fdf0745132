"""The per-channel circuit breaker, driven by a manual clock."""

from __future__ import annotations

import pytest

from services.common.clock import ManualClock
from services.relay.upstream.breaker import Breaker, BreakerPolicy, Breakers, Outcome, State

POLICY = BreakerPolicy(
    window_s=10.0, min_requests=4, failure_ratio=0.5, open_s=2.0, max_open_s=8.0, throttle_s=1.0
)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def breaker(clock: ManualClock) -> Breaker:
    return Breaker("test-channel", POLICY, clock)


def attempt(
    breaker: Breaker,
    outcome: Outcome,
    *,
    retry_after: float | None = None,
    answered_by_status: str | None = None,
) -> None:
    assert breaker.allow()
    breaker.record(outcome, retry_after=retry_after, answered_by_status=answered_by_status)


def state(breaker: Breaker) -> State:
    # Read through a call: an attribute read inline stays narrowed by the test's previous assert, and
    # the attempts in between (which move it) are invisible to the type checker.
    return breaker.state


def test_opens_on_the_failure_ratio_once_enough_attempts_were_seen(breaker: Breaker) -> None:
    attempt(breaker, Outcome.FAILURE)
    attempt(breaker, Outcome.FAILURE)
    attempt(breaker, Outcome.FAILURE)
    # Three failures out of three: below min_requests, so no verdict yet.
    assert state(breaker) is State.CLOSED
    attempt(breaker, Outcome.FAILURE)
    assert state(breaker) is State.OPEN
    assert not breaker.allow()
    assert breaker.retry_in() == pytest.approx(2.0)


def test_a_healthy_majority_keeps_it_closed(breaker: Breaker) -> None:
    for outcome in [Outcome.SUCCESS, Outcome.FAILURE, Outcome.SUCCESS, Outcome.SUCCESS, Outcome.SUCCESS]:
        attempt(breaker, outcome)
    assert state(breaker) is State.CLOSED


def test_old_failures_leave_the_window(breaker: Breaker, clock: ManualClock) -> None:
    for _ in range(3):
        attempt(breaker, Outcome.FAILURE)
    clock.advance(11.0)
    attempt(breaker, Outcome.FAILURE)
    # Only one failure is still in the window: below min_requests.
    assert state(breaker) is State.CLOSED


def test_half_open_lets_exactly_one_probe_through_and_a_success_closes(
    breaker: Breaker, clock: ManualClock
) -> None:
    for _ in range(4):
        attempt(breaker, Outcome.FAILURE)
    clock.advance(2.0)
    assert breaker.allow()  # the probe
    assert state(breaker) is State.HALF_OPEN
    assert not breaker.allow()  # a second request while the probe is out
    breaker.record(Outcome.SUCCESS)
    assert state(breaker) is State.CLOSED
    assert breaker.allow() and breaker.allow()


def test_a_failed_probe_reopens_with_a_doubled_cooldown_up_to_the_cap(
    breaker: Breaker, clock: ManualClock
) -> None:
    for _ in range(4):
        attempt(breaker, Outcome.FAILURE)
    waits = []
    for _ in range(4):
        clock.advance(breaker.retry_in())
        attempt(breaker, Outcome.FAILURE)
        assert state(breaker) is State.OPEN
        waits.append(breaker.retry_in())
    assert waits == [4.0, 8.0, 8.0, 8.0]
    clock.advance(8.0)
    attempt(breaker, Outcome.SUCCESS)
    # Closing resets the cool-down.
    for _ in range(4):
        attempt(breaker, Outcome.FAILURE)
    assert breaker.retry_in() == pytest.approx(2.0)


def test_overload_pauses_the_channel_without_opening_it(breaker: Breaker, clock: ManualClock) -> None:
    for _ in range(10):
        attempt(breaker, Outcome.OVERLOAD, retry_after=3.0)
        assert state(breaker) is State.CLOSED
        assert not breaker.allow()
        clock.advance(3.0)
    assert breaker.allow()
    # Without a Retry-After the default pause applies.
    breaker.record(Outcome.OVERLOAD)
    assert breaker.retry_in() == pytest.approx(1.0)


def test_an_abandoned_probe_frees_the_slot(breaker: Breaker, clock: ManualClock) -> None:
    for _ in range(4):
        attempt(breaker, Outcome.FAILURE)
    clock.advance(2.0)
    assert breaker.allow()
    breaker.record(Outcome.ABANDONED)
    assert state(breaker) is State.HALF_OPEN
    assert breaker.allow()


def test_breakers_follow_the_channel_table(clock: ManualClock) -> None:
    breakers = Breakers(POLICY, clock)
    first = breakers.get("ch_a", "a")
    assert breakers.get("ch_a", "a") is first
    breakers.retain({"ch_b"})
    assert breakers.get("ch_a", "a") is not first


def test_the_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        BreakerPolicy(open_s=10, max_open_s=5)
    with pytest.raises(ValueError):
        BreakerPolicy(failure_ratio=0)


def test_an_operator_reset_closes_an_open_breaker(clock: ManualClock) -> None:
    breakers = Breakers(POLICY, clock)
    breaker = breakers.get("ch_a", "a")
    for _ in range(4):
        attempt(breaker, Outcome.FAILURE)
    assert state(breaker) is State.OPEN
    assert breakers.reset("ch_a")
    assert state(breaker) is State.CLOSED and breaker.allow()
    assert not breakers.reset("ch_unknown")


def test_one_key_getting_5xx_answers_cannot_open_it(breaker: Breaker) -> None:
    # A caller whose bodies crash the provider: every one of its attempts is a 5xx answer.
    for _ in range(20):
        attempt(breaker, Outcome.FAILURE, answered_by_status="key_poison")
    assert state(breaker) is State.CLOSED
    # Other keys are still served by the channel.
    attempt(breaker, Outcome.SUCCESS)
    assert state(breaker) is State.CLOSED


def test_5xx_answers_to_several_keys_open_it(breaker: Breaker) -> None:
    attempt(breaker, Outcome.FAILURE, answered_by_status="key_a")
    attempt(breaker, Outcome.FAILURE, answered_by_status="key_a")
    attempt(breaker, Outcome.FAILURE, answered_by_status="key_a")
    assert state(breaker) is State.CLOSED
    # A second key gets them too: the channel is failing, and every earlier answer counts.
    attempt(breaker, Outcome.FAILURE, answered_by_status="key_b")
    assert state(breaker) is State.OPEN


def test_connect_failures_open_it_whoever_sent_the_requests(breaker: Breaker) -> None:
    for _ in range(4):
        attempt(breaker, Outcome.FAILURE)  # connect errors and timeouts carry no caller
    assert state(breaker) is State.OPEN


def test_a_key_seen_long_ago_does_not_make_a_crowd(breaker: Breaker, clock: ManualClock) -> None:
    attempt(breaker, Outcome.FAILURE, answered_by_status="key_old")
    clock.advance(11.0)
    for _ in range(6):
        attempt(breaker, Outcome.FAILURE, answered_by_status="key_poison")
    assert state(breaker) is State.CLOSED
