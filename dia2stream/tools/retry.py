"""Opening a call as a client behind a balancer must: a `busy` refusal is retried after a short
backoff, since the next try may land on a server with a free slot (or this one, once a call ends).

A refusal is any of: `error` `busy` as the first message (then close 1013), a close 1013 before
`ready`, or HTTP 503 on the upgrade (a draining server, or HAProxy with no server available).
Anything else (401, a refused connection, a timeout) is raised at once: retrying will not help.

    ws, ready = await open_call(url, BusyRetry(attempts=4), open_timeout=10)
    async with ws: ...
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from typing import Any, Callable

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

CLOSE_TRY_AGAIN_LATER = 1013
HTTP_UNAVAILABLE = 503
_JITTER = random.Random()


@dataclass(frozen=True)
class BusyRetry:
    """`attempts` tries in all (1 = no retry); the wait before try n+1 is `first_delay_s * 2**(n-1)`,
    at most `max_delay_s`, times a random factor in [0.5, 1] so refused callers do not return in step."""

    attempts: int = 4
    first_delay_s: float = 0.25
    max_delay_s: float = 2.0

    def delay_s(self, tries: int) -> float:
        return min(self.max_delay_s, self.first_delay_s * 2 ** (tries - 1)) * _JITTER.uniform(0.5, 1.0)


@dataclass(frozen=True)
class Refusal:
    """One `busy`: how it came (`error busy` + close code, close 1013, or HTTP 503) and what it said."""

    how: str
    close_code: int | None = None
    message: str = ""

    def __str__(self) -> str:
        return f"{self.how}: {self.message}" if self.message else self.how


class Busy(Exception):
    """Every try was refused `busy`; `refusals` lists them in order."""

    def __init__(self, refusals: list[Refusal]):
        super().__init__(f"busy after {len(refusals)} tries ({refusals[-1]})")
        self.refusals = refusals


async def open_call(url: str, retry: BusyRetry = BusyRetry(), *, open_timeout: float = 10.0,
                    on_refused: Callable[[Refusal], None] | None = None,
                    **connect_kwargs: Any) -> tuple[ClientConnection, dict]:
    """Connect and read `ready`, retrying `busy` (see the module docstring). Returns the open
    connection and the `ready` event (a dict); the caller closes the connection. Raises `Busy`
    when every try was refused; `on_refused` hears of each refusal as it happens."""
    refusals: list[Refusal] = []
    for tries in range(1, retry.attempts + 1):
        opened = await _try_once(url, open_timeout, connect_kwargs)
        if not isinstance(opened, Refusal):
            return opened
        refusals.append(opened)
        if on_refused is not None:
            on_refused(opened)
        if tries < retry.attempts:
            await asyncio.sleep(retry.delay_s(tries))
    raise Busy(refusals)


async def _try_once(url: str, open_timeout: float, connect_kwargs: dict) -> tuple[ClientConnection, dict] | Refusal:
    try:
        ws = await connect(url, open_timeout=open_timeout, **connect_kwargs)
    except InvalidStatus as exc:
        if exc.response.status_code != HTTP_UNAVAILABLE:
            raise
        return Refusal("HTTP 503", message=exc.response.body.decode("utf-8", "replace").strip()[:200])
    try:
        first = await asyncio.wait_for(ws.recv(), open_timeout)
    except ConnectionClosed as exc:
        if exc.rcvd is not None and exc.rcvd.code == CLOSE_TRY_AGAIN_LATER:
            return Refusal("close 1013", CLOSE_TRY_AGAIN_LATER, exc.rcvd.reason)
        raise
    except BaseException:
        await ws.close()
        raise
    event = json.loads(first) if isinstance(first, str) else {}
    if event.get("event") == "error" and event.get("code") == "busy":
        code = await _close_code(ws, open_timeout)
        return Refusal("error busy", code, str(event.get("message", "")))
    return ws, event


async def _close_code(ws: ClientConnection, timeout: float) -> int | None:
    """The code the server closes a refused connection with (1013), read within `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            await ws.wait_closed()
    except TimeoutError:
        await ws.close()
    return ws.close_code
