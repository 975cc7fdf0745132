"""A client channel that presents a renewed certificate without a restart.

grpcio fixes a channel's credentials when the channel is created: every handshake of that channel,
reconnects included, presents the certificate it was created with. So the channel a service holds is
this wrapper: before a call (at most once per :data:`CHECK_EVERY_S`) it asks
:class:`services.common.tls.Renewals` whether the certificate files were renewed and, when they were,
creates a new channel with the new credentials for the calls from then on. Stubs stay valid: each of
their methods looks the current channel up when called. The replaced channel is closed with a grace
period, so calls already on it finish.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final

import grpc

from services.common.tls import Renewals, Tls

__all__ = ["CHECK_EVERY_S", "RETIRE_GRACE_S", "RenewingChannel"]

# Often enough that a renewal is presented long before the old certificate ends, rarely enough that
# the hot path (the relay's calls to quota) pays nothing measurable.
CHECK_EVERY_S: Final = 5.0
# Calls still running on a replaced channel get this long before it is closed under them.
RETIRE_GRACE_S: Final = 60.0

_Open = Callable[[Tls], grpc.aio.Channel]


class RenewingChannel(grpc.aio.Channel):
    """A channel whose client certificate follows its files (see the module docstring)."""

    def __init__(
        self,
        tls: Tls,
        open_channel: _Open,
        *,
        check_every_s: float = CHECK_EVERY_S,
        clock: Callable[[], float],
    ) -> None:
        self._renewals = Renewals(tls)
        self._open = open_channel
        self._check_every_s = check_every_s
        self._clock = clock
        self._checked_at = clock()
        self._current = open_channel(tls)
        self._retiring: set[asyncio.Task[None]] = set()

    def current(self) -> grpc.aio.Channel:
        """The channel for the next call, created anew when the certificate was renewed."""
        now = self._clock()
        if now - self._checked_at >= self._check_every_s:
            self._checked_at = now
            renewed = self._renewals.renewed()
            if renewed is not None:
                replaced, self._current = self._current, self._open(renewed)
                task = asyncio.get_running_loop().create_task(replaced.close(RETIRE_GRACE_S))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
        return self._current

    async def close(self, grace: float | None = None) -> None:
        await self._current.close(grace)
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._current.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._current.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._current.channel_ready()

    async def __aenter__(self) -> RenewingChannel:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool | None:
        await self.close(None)
        return None

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Method(self, "unary_unary", method, args, kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Method(self, "unary_stream", method, args, kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Method(self, "stream_unary", method, args, kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Method(self, "stream_stream", method, args, kwargs)


class _Method:
    """One RPC of a stub: called, it goes through the channel current at that moment (the multicallable
    is made once per underlying channel)."""

    def __init__(
        self, owner: RenewingChannel, kind: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self._owner = owner
        self._kind = kind
        self._method = method
        self._args = args
        self._kwargs = kwargs
        self._made: tuple[grpc.aio.Channel, Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        channel = self._owner.current()
        if self._made is None or self._made[0] is not channel:
            self._made = (channel, getattr(channel, self._kind)(self._method, *self._args, **self._kwargs))
        return self._made[1](*args, **kwargs)
