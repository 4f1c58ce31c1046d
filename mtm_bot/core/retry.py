"""The one retry policy for what lives across a network (Redis, Discord): wait, doubling up to a bound, and
say so in one line per failure, never a traceback.

    await retry(call, on=UNAVAILABLE, say=lambda err, delay: log.warning("... retrying in %.0f s.", delay),
                backoff=Backoff(1.0, 30.0), stopping=event)    # the result of call(); raises once stopping is set

Loops that stay open (a stream listener, a subscription) keep a `Backoff` of their own: `reset()` after a
success, `wait()` after a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class Backoff:
    """Waits of `first` seconds, doubling after each, up to `most`."""

    def __init__(self, first: float, most: float) -> None:
        self.first, self.most = first, most
        self.delay = first  # the next wait

    def reset(self) -> None:
        self.delay = self.first

    async def wait(self, stopping: asyncio.Event | None = None) -> None:
        """Sleep the next wait (cut short once `stopping` is set); the one after it is twice as long."""
        if stopping is None:
            await asyncio.sleep(self.delay)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.delay)
        self.delay = min(self.delay * 2, self.most)


async def retry(
    call: Callable[[], Awaitable[T]],
    *,
    on: tuple[type[BaseException], ...],
    say: Callable[[BaseException, float], None],
    backoff: Backoff,
    stopping: asyncio.Event | None = None,
) -> T:
    """`await call()` until it returns. A failure of a type in `on` is said (`say(error, seconds to wait)`) and
    waited out; once `stopping` is set, the failure is raised instead."""
    while True:
        try:
            return await call()
        except on as err:
            if stopping is not None and stopping.is_set():
                raise
            say(err, backoff.delay)
            await backoff.wait(stopping)
            if stopping is not None and stopping.is_set():
                raise
