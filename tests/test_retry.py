"""dia2stream/tools/retry.py: a client retries `busy` (error busy + close 1013, close 1013, HTTP 503)
with a backoff, and gives up at once on anything else. Against a stand-in websockets server on
127.0.0.1 that refuses a set number of times, not the model server."""

from __future__ import annotations

import json

import pytest
from websockets.asyncio.server import serve
from websockets.exceptions import InvalidStatus

from dia2stream.tools.retry import Busy, BusyRetry, open_call

FAST = dict(first_delay_s=0.01, max_delay_s=0.02)


class Refuser:
    """Refuses the first `refuse` upgrades in the way `how` says, then sends `ready`."""

    def __init__(self, refuse: int, how: str):
        self.refuse, self.how, self.tries = refuse, how, 0

    def process_request(self, connection, request):
        self.tries += 1
        if self.how == "http" and self.tries <= self.refuse:
            return connection.respond(503, "no server is available\n")
        if self.how == "401":
            return connection.respond(401, "missing or wrong token\n")
        return None

    async def handler(self, ws):
        if self.how in ("error", "close") and self.tries <= self.refuse:
            if self.how == "error":
                await ws.send(json.dumps({"event": "error", "code": "busy", "message": "all 2 call slots are taken"}))
            await ws.close(1013, "busy")
            return
        await ws.send(json.dumps({"event": "ready", "protocol": 1}))
        await ws.wait_closed()


@pytest.mark.parametrize("how", ["error", "close", "http"])
async def test_busy_is_retried_until_served(how):
    refuser = Refuser(refuse=2, how=how)
    heard = []
    async with serve(refuser.handler, "127.0.0.1", 0, process_request=refuser.process_request) as server:
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
        ws, ready = await open_call(url, BusyRetry(attempts=3, **FAST), open_timeout=10, on_refused=heard.append)
        async with ws:
            assert ready["event"] == "ready"
    assert refuser.tries == 3 and len(heard) == 2
    assert {"error": "error busy", "close": "close 1013", "http": "HTTP 503"}[how] == heard[0].how
    if how == "error":
        assert heard[0].close_code == 1013 and "slots" in heard[0].message


async def test_gives_up_after_its_attempts_with_every_refusal():
    refuser = Refuser(refuse=10, how="error")
    async with serve(refuser.handler, "127.0.0.1", 0, process_request=refuser.process_request) as server:
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
        with pytest.raises(Busy) as info:
            await open_call(url, BusyRetry(attempts=3, **FAST), open_timeout=10)
    assert refuser.tries == 3 and len(info.value.refusals) == 3
    assert "busy after 3 tries" in str(info.value)


async def test_other_refusals_are_not_retried():
    refuser = Refuser(refuse=0, how="401")
    async with serve(refuser.handler, "127.0.0.1", 0, process_request=refuser.process_request) as server:
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
        with pytest.raises(InvalidStatus):
            await open_call(url, BusyRetry(attempts=5, **FAST), open_timeout=10)
    assert refuser.tries == 1


def test_backoff_doubles_up_to_its_ceiling_with_jitter():
    retry = BusyRetry(first_delay_s=0.25, max_delay_s=1.0)
    for tries, full in ((1, 0.25), (2, 0.5), (3, 1.0), (6, 1.0)):
        for _ in range(20):
            assert full * 0.5 <= retry.delay_s(tries) <= full
