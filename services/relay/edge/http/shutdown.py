"""The relay's way out, step by step: each step timed, logged and bounded.

Every resource the lifespan opens registers the step that closes it (:meth:`ShutdownSteps.push`); on
the way out the steps run in reverse order, each under a deadline of its own, and each leaves one log
line (``shutdown step``: the step's name, its milliseconds and how it ended). A step that overruns its
deadline is cancelled and the next one runs: a broker, Redis or quota that stopped answering costs at
most that step's deadline, never the process's exit. A step that fails is logged and the next one
runs too: a close that raised must not keep the spool from being written or the leases from being
given back.

The deadlines are backstops over the bounds the components keep themselves (the publisher's
``event_shutdown_timeout_s``, the leases' ``credit_shutdown_s``, ...), never the bound a step is
expected to meet.

The whole way out has a deadline too (:class:`ShutdownClock`, set by the server when the signal comes).
A step never runs past it, and a step runs only while the time that steps after it reserve is left: a
stream drain that takes all it may still leaves the publisher its time (which spools what Kafka did
not take even when cut short).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["SHUTDOWN_CLOCK", "ShutdownClock", "ShutdownSteps", "timed_step"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# The key of the lifespan's :class:`ShutdownClock` in its state (what the lifespan yields, which
# uvicorn keeps): the server sets it when the signal comes.
SHUTDOWN_CLOCK = "relaygate.shutdown_clock"


class ShutdownClock:
    """When the way out must be over (``time.monotonic()``); None until the shutdown starts."""

    __slots__ = ("ends_at",)

    def __init__(self) -> None:
        self.ends_at: float | None = None

    def left_s(self) -> float | None:
        return None if self.ends_at is None else self.ends_at - time.monotonic()


@dataclass(frozen=True, slots=True)
class _Step:
    name: str
    close: Callable[[], Awaitable[object]]
    deadline_s: float
    # Time kept for this step by the steps that run before it.
    reserve_s: float


class ShutdownSteps:
    """The close steps of one lifespan, run in reverse order of :meth:`push` by its exit stack, within
    ``clock``'s deadline (none when not given)."""

    def __init__(self, stack: contextlib.AsyncExitStack, clock: ShutdownClock | None = None) -> None:
        self._stack = stack
        self._clock = clock
        self._steps: list[_Step] = []

    def push(
        self, name: str, close: Callable[[], Awaitable[object]], *, deadline_s: float, reserve_s: float = 0.0
    ) -> None:
        """Run ``close()`` on the way out, cancelled after ``deadline_s`` seconds; the steps that run
        before it leave it ``reserve_s`` of the way out's time."""
        step = _Step(name, close, deadline_s, reserve_s)
        # Pushed earlier, run later: what this step must leave is what the steps pushed before it keep.
        keep_s = sum(earlier.reserve_s for earlier in self._steps)
        self._steps.append(step)
        self._stack.push_async_callback(self._run, step, keep_s)

    async def _run(self, step: _Step, keep_s: float) -> None:
        deadline_s = step.deadline_s
        left_s = self._clock.left_s() if self._clock is not None else None
        if left_s is not None:
            deadline_s = max(0.0, min(deadline_s, left_s - keep_s))
        await _run_step(step, deadline_s)

    async def enter_async(
        self, name: str, context: contextlib.AbstractAsyncContextManager[T], *, deadline_s: float
    ) -> T:
        """Enter ``context`` now; its exit is a step, cancelled after ``deadline_s`` seconds."""
        inner = contextlib.AsyncExitStack()
        value = await inner.enter_async_context(context)
        self.push(name, inner.aclose, deadline_s=deadline_s)
        return value

    def enter_sync(self, name: str, context: contextlib.AbstractContextManager[T]) -> T:
        """Enter ``context`` now; its exit (synchronous, bounded by itself) is a step, timed."""
        return self._stack.enter_context(_timed_exit(name, context))


async def _run_step(step: _Step, deadline_s: float) -> None:
    started = time.perf_counter()
    outcome = "done"
    try:
        async with asyncio.timeout(deadline_s) as deadline:
            await step.close()
    except TimeoutError:
        if not deadline.expired():
            outcome = "failed"
            log.exception("shutdown step failed", extra={"step": step.name})
        else:
            outcome = "timed_out"
    except Exception:
        outcome = "failed"
        log.exception("shutdown step failed", extra={"step": step.name})
    _report(step.name, started, outcome, deadline_s)


@contextlib.contextmanager
def _timed_exit(name: str, context: contextlib.AbstractContextManager[T]) -> Iterator[T]:
    with contextlib.ExitStack() as inner:
        value = inner.enter_context(context)
        try:
            yield value
        finally:
            with timed_step(name):
                inner.close()


@contextlib.contextmanager
def timed_step(name: str, **details: object) -> Iterator[dict[str, object]]:
    """Log the block as one shutdown step; the block may add details to the yielded dict."""
    started = time.perf_counter()
    found: dict[str, object] = dict(details)
    try:
        yield found
    except BaseException:
        found["outcome"] = "failed"
        raise
    finally:
        _report(name, started, str(found.pop("outcome", "done")), None, found)


def _report(
    name: str,
    started: float,
    outcome: str,
    deadline_s: float | None,
    details: dict[str, object] | None = None,
) -> None:
    ms = round((time.perf_counter() - started) * 1000, 1)
    extra: dict[str, object] = {"step": name, "ms": ms, "outcome": outcome, **(details or {})}
    if deadline_s is not None:
        extra["deadline_ms"] = round(deadline_s * 1000)
    level = logging.INFO if outcome == "done" else logging.WARNING
    log.log(level, "shutdown step", extra=extra)
