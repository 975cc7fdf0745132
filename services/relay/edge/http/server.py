"""uvicorn's server with the relay's way out: the signal logged, the HTTP drain timed and bounded, the
lifespan's shutdown bounded as a whole.

uvicorn on SIGTERM stops listening, asks every connection to close once its response is sent, waits
for them (``timeout_graceful_shutdown``), then runs the lifespan's shutdown and waits for it without
any deadline. Here a connection still open when the drain's deadline passes is closed (its request
task cancelled, as uvicorn would), and the lifespan gets ``lifespan_deadline_s``: past it the process
exits anyway, with the tasks still pending named in the log, rather than waiting for a SIGKILL that
would tell nothing.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from types import FrameType

import uvicorn

from services.relay.edge.http.shutdown import timed_step

__all__ = ["RelayServer"]

log = logging.getLogger(__name__)

# How often the drain checks whether the connections are gone (uvicorn: 0.1 s).
_POLL_S = 0.05


class RelayServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, *, lifespan_deadline_s: float) -> None:
        super().__init__(config)
        self._lifespan_deadline_s = lifespan_deadline_s
        self._signal: int | None = None
        self._signalled_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the signal handler: only note it (logging here could re-enter a write in progress).
        if self._signal is None:
            self._signal, self._signalled_at = sig, time.perf_counter()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        started = time.perf_counter()
        state = self.server_state
        log.info(
            "shutdown started",
            extra={
                "signal": signal.Signals(self._signal).name if self._signal is not None else "",
                # How long the loop took to notice: a blocked event loop shows here.
                "noticed_ms": _ms_since(self._signalled_at) if self._signalled_at is not None else 0.0,
                "connections": len(state.connections),
                "requests": len(state.tasks),
            },
        )
        await self._drain_http(sockets)
        if not self.force_exit:
            with timed_step("lifespan") as found:
                try:
                    async with asyncio.timeout(self._lifespan_deadline_s):
                        await self.lifespan.shutdown()
                except TimeoutError:
                    found["outcome"] = "timed_out"
                    found["pending"] = _pending_tasks()
        log.info("shutdown complete", extra={"ms": _ms_since(started)})

    async def _drain_http(self, sockets: list[socket.socket] | None) -> None:
        """Stop listening, let in-flight requests finish (``timeout_graceful_shutdown``), then close
        whatever is still open."""
        state = self.server_state
        with timed_step("http_drain", connections=len(state.connections)) as found:
            for server in self.servers:
                server.close()
            for sock in sockets or []:
                sock.close()
            for connection in list(state.connections):
                connection.shutdown()
            deadline = time.monotonic() + float(self.config.timeout_graceful_shutdown or 0)
            while (state.connections or state.tasks) and not self.force_exit:
                if time.monotonic() >= deadline:
                    found["outcome"] = "timed_out"
                    break
                await asyncio.sleep(_POLL_S)
            found["left"] = len(state.connections)
            for task in list(state.tasks):
                task.cancel()
            for connection in list(state.connections):
                transport = getattr(connection, "transport", None)
                if transport is not None:
                    transport.close()
            for server in self.servers:
                await server.wait_closed()


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


def _pending_tasks() -> list[str]:
    """The tasks still running, each with the chain of coroutines it waits in: what a shutdown that
    overran waited for."""
    current = asyncio.current_task()
    return sorted(
        f"{task.get_name()}: {_awaiting(task)}"
        for task in asyncio.all_tasks()
        if task is not current and not task.done()
    )


def _awaiting(task: asyncio.Task[object]) -> str:
    # A suspended task's stack is one frame; the coroutines it awaits hang off cr_await.
    names: list[str] = []
    where = "?"
    awaited: object = task.get_coro()
    while awaited is not None and len(names) < 12:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is not None:
            names.append(frame.f_code.co_qualname)
            where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return " > ".join(names) + f" ({where})"
