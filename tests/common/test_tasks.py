"""Stopping a background task absorbs the task's cancellation, never the caller's."""

from __future__ import annotations

import asyncio

import pytest

from services.common.tasks import cancel_and_wait


async def test_a_stopped_task_is_cancelled_and_awaited() -> None:
    task = asyncio.create_task(asyncio.Event().wait())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert task.cancelled()


async def test_a_caller_cut_short_while_the_task_winds_down_is_cancelled_itself() -> None:
    async def slow_to_stop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(5)

    task = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await cancel_and_wait(task)
    task.cancel()
    await asyncio.wait([task])


async def test_an_error_the_task_ended_with_is_raised() -> None:
    async def fails() -> None:
        raise RuntimeError("broken loop")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="broken loop"):
        await cancel_and_wait(task)
