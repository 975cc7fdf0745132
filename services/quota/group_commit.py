"""Group commit: concurrent operations of one kind share one database transaction.

A reserve or a settle costs a handful of statements and a commit, each a round trip to the primary;
most of its time is spent waiting on those, not computing. :class:`GroupCommit` queues submissions
and hands everything queued to one ``execute(batch)`` call, so fifty concurrent reserves cost one
transaction of a few statements instead of fifty. Nothing waits for a batch to fill: a submission
starts a batch at once when fewer than ``concurrency`` are running, and otherwise joins the next one,
which starts the moment a running batch ends. A lone request therefore sees no added latency, and
batches grow by themselves under load.

``execute`` returns one result or exception per operation, in order: a refusal (insufficient quota)
is that operation's answer and does not affect the others. When ``execute`` itself raises for a batch
of several operations, each is retried alone, so one operation that breaks a constraint cannot fail
its neighbours; :func:`isolable` decides which exceptions deserve that retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from sqlalchemy.exc import DBAPIError

from services.common.telemetry import METRICS

__all__ = ["GroupCommit", "isolable"]

log = logging.getLogger(__name__)

Op = TypeVar("Op")
Result = TypeVar("Result")

Execute = Callable[[Sequence[Op]], Awaitable[Sequence[Result | BaseException]]]


def isolable(exc: BaseException) -> bool:
    """True when retrying each operation alone may succeed: a statement failed (a constraint, a
    deadlock), not the connection. A lost connection would fail every retry too."""
    return isinstance(exc, DBAPIError) and not exc.connection_invalidated


class GroupCommit(Generic[Op, Result]):
    """Runs submitted operations in batches of at most ``max_batch``, ``concurrency`` batches at a time."""

    def __init__(self, name: str, execute: Execute[Op, Result], *, max_batch: int, concurrency: int) -> None:
        if max_batch < 1 or concurrency < 1:
            raise ValueError("max_batch and concurrency must be at least 1")
        self._name = name
        self._execute = execute
        self._max_batch = max_batch
        self._concurrency = concurrency
        self._queue: list[tuple[Op, asyncio.Future[Result]]] = []
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False
        self._sizes = METRICS.quota_batch_size.labels(kind=name)

    async def submit(self, op: Op) -> Result:
        """Run ``op`` in the next batch and return its result (or raise its exception).

        Cancelling the caller withdraws the operation if its batch has not started yet; once it has,
        the transaction commits or rolls back as a whole, and a retry by the caller finds the outcome.
        """
        if self._closed:
            raise RuntimeError(f"{self._name} group commit is closed")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append((op, future))
        self._start_batches()
        return await future

    async def close(self) -> None:
        """Refuse new submissions and wait for every queued and running batch to finish."""
        self._closed = True
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    def _start_batches(self) -> None:
        # A caller that gave up before its batch started (its deadline passed) is dropped: nobody
        # would learn of a hold made for it, and it would hold the caller's credit until it expired.
        self._queue = [(op, future) for op, future in self._queue if not future.done()]
        while self._queue and len(self._running) < self._concurrency:
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            task = asyncio.get_running_loop().create_task(self._run(batch), name=f"{self._name}-batch")
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._start_batches()

    async def _run(self, batch: list[tuple[Op, asyncio.Future[Result]]]) -> None:
        ops = [op for op, _ in batch]
        self._sizes.observe(len(ops))
        try:
            results = await self._execute(ops)
        except Exception as exc:
            if len(batch) > 1 and isolable(exc):
                log.warning(
                    "%s batch failed; retrying its operations one by one",
                    self._name,
                    extra={"size": len(batch), "error": f"{type(exc).__name__}: {exc}"[:300]},
                )
                for item in batch:
                    await self._run([item])
                return
            results = [exc] * len(batch)
        except BaseException:  # cancelled: the futures must not wait forever
            for _, future in batch:
                if not future.done():
                    future.cancel()
            raise
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # the caller was cancelled; its outcome is stored all the same
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        # A failed future nobody awaits any more would log "exception was never retrieved".
        for _, future in batch:
            if future.done() and not future.cancelled():
                with contextlib.suppress(BaseException):
                    future.exception()
