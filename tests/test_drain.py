"""A drain (the first SIGTERM) and a barge-in: a speaking call that sends `pause` with
`played_ms` during the drain gets its `paused` (the spoken/unspoken split an orchestrator needs
to move the conversation to another server) before `shutting_down` and the close 1001: events
answer commands in order (docs/protocol.md). A real server on the tiny checkpoint, in a thread,
with the engine in its own process (the default) and in this one."""

from __future__ import annotations

import asyncio
import json

import pytest

from test_readiness import TIMEOUT, Served, events_until_closed, open_ready, until, ready_is

pytestmark = pytest.mark.slow

LONG_TEXT = "[S1] " + " ".join(["word"] * 40)


@pytest.mark.parametrize("engine_process", ["on", "off"])
async def test_a_pause_with_played_ms_during_a_drain_is_answered_before_the_close(engine_process):
    with Served(drain_timeout_s=120, engine_process=engine_process) as server:
        speaker = await open_ready(server.url)
        await speaker.send(json.dumps({"cmd": "start", "text": LONG_TEXT, "id": "long"}))
        frames = 0
        while frames < 12:  # it is speaking, with more than the 800 ms below sent
            frames += isinstance(await asyncio.wait_for(speaker.recv(), TIMEOUT), bytes)
        server.drain()
        await until(lambda: ready_is(server, 503), "draining")
        await speaker.send(json.dumps({"cmd": "pause", "played_ms": 800, "id": "barge"}))
        events, _ = await events_until_closed(speaker)
        kinds = [e["event"] if e["event"] != "error" else e["code"] for e in events if e["event"] != "word"]
        paused = [e for e in events if e["event"] == "paused"]
        assert paused and paused[0]["id"] == "barge", kinds
        assert paused[0]["spoken"] is not None and paused[0]["unspoken"], paused[0]
        assert kinds[-1] == "shutting_down" and kinds.index("paused") < len(kinds) - 1, kinds
        assert speaker.close_code == 1001
        assert server.finished(TIMEOUT)
