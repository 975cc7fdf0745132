"""Group commit: batching concurrent submissions, per-operation answers, and isolating a failing one."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from services.quota.group_commit import GroupCommit


class Recorder:
    """An ``execute`` that records its batches, answers ``op * 10`` and refuses negative operations."""

    def __init__(self, *, fail_when: int | None = None, exc: BaseException | None = None) -> None:
        self.batches: list[list[int]] = []
        self.fail_when = fail_when
        self.exc = exc
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, batch: Sequence[int]) -> list[int | BaseException]:
        self.batches.append(list(batch))
        await self.gate.wait()
        if self.fail_when is not None and self.fail_when in batch and self.exc is not None:
            raise self.exc
        return [ValueError(f"refused {op}") if op < 0 else op * 10 for op in batch]


async def test_concurrent_submissions_share_batches_and_get_their_own_answers() -> None:
    execute = Recorder()
    execute.gate.clear()
    commit = GroupCommit("t", execute, max_batch=4, concurrency=1)
    first = asyncio.ensure_future(commit.submit(0))
    await asyncio.sleep(0)  # the first batch starts with the first submission alone
    rest = [asyncio.ensure_future(commit.submit(op)) for op in (1, -2, 3, 4, 5)]
    await asyncio.sleep(0)
    execute.gate.set()

    results = await asyncio.gather(first, *rest, return_exceptions=True)

    assert execute.batches == [[0], [1, -2, 3, 4], [5]]
    assert [r if isinstance(r, int) else str(r) for r in results] == [0, 10, "refused -2", 30, 40, 50]


async def test_a_lone_submission_is_not_delayed() -> None:
    execute = Recorder()
    commit = GroupCommit("t", execute, max_batch=64, concurrency=1)
    assert await asyncio.wait_for(commit.submit(7), timeout=1) == 70
    assert execute.batches == [[7]]


async def test_a_failing_statement_is_isolated_to_its_operation() -> None:
    broken = IntegrityError("INSERT ...", {}, Exception("duplicate key"))
    execute = Recorder(fail_when=2, exc=broken)
    execute.gate.clear()
    commit = GroupCommit("t", execute, max_batch=10, concurrency=1)
    blocker = asyncio.ensure_future(commit.submit(9))
    await asyncio.sleep(0)
    futures = [asyncio.ensure_future(commit.submit(op)) for op in (1, 2, 3)]
    await asyncio.sleep(0)
    execute.gate.set()

    results = await asyncio.gather(blocker, *futures, return_exceptions=True)

    assert results[0] == 90
    assert (results[1], results[3]) == (10, 30)
    assert results[2] is broken
    assert execute.batches[1:] == [[1, 2, 3], [1], [2], [3]]


async def test_a_lost_connection_fails_the_whole_batch_once() -> None:
    lost = OperationalError("SELECT 1", {}, Exception("connection refused"), connection_invalidated=True)
    execute = Recorder(fail_when=1, exc=lost)
    execute.gate.clear()
    commit = GroupCommit("t", execute, max_batch=10, concurrency=1)
    blocker = asyncio.ensure_future(commit.submit(9))
    await asyncio.sleep(0)
    futures = [asyncio.ensure_future(commit.submit(op)) for op in (1, 2)]
    await asyncio.sleep(0)
    execute.gate.set()

    results = await asyncio.gather(blocker, *futures, return_exceptions=True)

    assert results == [90, lost, lost]
    assert execute.batches == [[9], [1, 2]], "no retry one by one: every retry would fail the same way"


async def test_a_caller_that_gives_up_is_dropped_unless_its_batch_started() -> None:
    execute = Recorder()
    execute.gate.clear()
    commit = GroupCommit("t", execute, max_batch=10, concurrency=1)
    started = asyncio.ensure_future(commit.submit(9))
    await asyncio.sleep(0)
    waiting = asyncio.ensure_future(commit.submit(1))
    patient = asyncio.ensure_future(commit.submit(2))
    await asyncio.sleep(0)
    started.cancel()  # its batch is running: it completes all the same
    waiting.cancel()  # its batch has not started: it never runs
    await asyncio.sleep(0)
    execute.gate.set()

    assert await patient == 20
    for future in (started, waiting):
        with pytest.raises(asyncio.CancelledError):
            await future
    await commit.close()
    assert execute.batches == [[9], [2]]
    with pytest.raises(RuntimeError, match="closed"):
        await commit.submit(3)
