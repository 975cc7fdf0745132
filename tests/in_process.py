"""A service's ``run(settings, stop=..., on_started=...)`` as a task of the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any


@contextlib.asynccontextmanager
async def in_process(
    run: Callable[..., Coroutine[Any, Any, None]], settings: Any, *, timeout: float = 30.0
) -> AsyncIterator[int]:
    """Start ``run(settings, ...)`` and yield the port it reports once it serves; when the block exits,
    set its stop event and wait for it to return (its errors are raised here).

    A ``run`` that fails or returns before it serves raises its error (or ``AssertionError``) at once.
    """
    stop = asyncio.Event()
    started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run(settings, stop=stop, on_started=started.set_result))
    waiting: set[asyncio.Future[Any]] = {task, started}
    await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raises the startup error
        raise AssertionError(f"{run.__module__} returned before it started")
    if not started.done():
        task.cancel()
        raise AssertionError(f"{run.__module__} did not start within {timeout:g}s")
    try:
        yield started.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout)
