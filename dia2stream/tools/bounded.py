"""Running a load's client tasks for a bounded time: every load tool stops by itself."""

from __future__ import annotations

import asyncio


async def run_within(tasks: list[asyncio.Task], limit_s: float) -> set[asyncio.Task]:
    """Wait for `tasks` at most `limit_s` seconds, cancel whatever is still running and wait for
    it to end; returns the tasks that were cut off."""
    _, pending = await asyncio.wait(tasks, timeout=limit_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return pending
