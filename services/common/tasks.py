"""Stopping a background task, written once.

``task.cancel()`` then ``await task`` under ``suppress(CancelledError)`` swallows the caller's own
cancellation too: a close cut short by its deadline (a shutdown step's timeout) would go on as if
nothing happened. :func:`cancel_and_wait` waits on the task without awaiting it, so only the task's
cancellation is absorbed; an exception the task ended with is still raised.
"""

from __future__ import annotations

import asyncio

__all__ = ["cancel_and_wait"]


async def cancel_and_wait(task: asyncio.Task[object]) -> None:
    """Cancel ``task`` and wait until it has finished; the caller's cancellation reaches the caller."""
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled() and (error := task.exception()) is not None:
        raise error
