"""One connection's outgoing queue: events and frames from the generation thread, in order, to
the connection's send loop on the event loop, with a bound.

The generation thread must never block on a client, so it hands items over with
`call_soon_threadsafe` and forgets them. What bounds the queue is the client: pacing stops a
call's frames once `max_unsent_frames` wait here, and the command rate bounds replies; a queue
that still grows past `Limits.max_outbox_items` belongs to a client that stopped reading (finding
4: 437,000 queued pongs, +143 MiB). Past the bound the outbox takes nothing more and tells its
owner once, who closes the connection (`limits.NOT_READING_CLOSE_CODE`).
"""

from __future__ import annotations

import asyncio
from typing import Callable

from dia2stream.serve.limits import Limits, outbox_overflowing


class Outbox:
    def __init__(self, loop: asyncio.AbstractEventLoop, limits: Limits,
                 on_overflow: Callable[[], None]) -> None:
        self._loop = loop
        self._limits = limits
        self._on_overflow = on_overflow
        self._queue: asyncio.Queue = asyncio.Queue()
        self.overflowed = False

    def put_threadsafe(self, item: object) -> None:
        """From any thread (the engine's sink). Never blocks."""
        try:
            self._loop.call_soon_threadsafe(self.put, item)
        except RuntimeError:
            pass  # the loop is closed: the server is gone

    def put(self, item: object) -> None:
        """On the event loop."""
        if self.overflowed:
            return  # the connection is being closed; what it would have been sent is dropped
        if outbox_overflowing(self._queue.qsize() + 1, self._limits):
            self.overflowed = True
            self._on_overflow()
            return
        self._queue.put_nowait(item)

    async def get(self) -> object:
        return await self._queue.get()

    def qsize(self) -> int:
        return self._queue.qsize()
