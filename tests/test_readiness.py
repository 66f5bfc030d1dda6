"""Readiness for a balancer (issue 22): `/ready` next to `/health`, the HAProxy agent-check reply,
and the graceful drain. Unit tests on the pure parts first, then a real server on the tiny
checkpoint (127.0.0.1, free ports) run in a thread: /ready and the agent follow the free slots,
and a drain lets a speaking call finish while idle ones and new turns are sent away."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
import urllib.error
import urllib.request

import pytest
from websockets.asyncio.client import connect
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Request

from dia2stream.serve.agent import AgentResponder, agent_reply, free_percent
from dia2stream.serve.config import ServerConfig, parse_args
from dia2stream.serve.http import HttpGate, HttpPolicy
from dia2stream.serve.server import run

TIMEOUT = 30.0  # the most one expected message or condition may take on a busy 2-core machine
LONG_TEXT = "[S1] " + " ".join(["word"] * 24)  # about 7 s of audio at the tiny checkpoint's pace


def figures(status="ok", calls=0, max_calls=4, busy=None, overloaded=False) -> dict:
    busy = calls >= max_calls or overloaded if busy is None else busy
    return {"status": status, "model": "tiny", "device": "cpu", "calls": calls, "max_calls": max_calls,
            "busy": busy, "overloaded": overloaded, "step_ms": 1.0, "step_calls": calls}


# --- unit: /ready and the agent reply ------------------------------------------------------------


def respond(health: dict, path: str, method: str = "GET"):
    gate = HttpGate(HttpPolicy(auth_token="secret"), health=lambda: health)
    return gate.respond(Request(path, Headers(), method))


@pytest.mark.parametrize("health, ready, alive", [
    (figures(calls=3), 200, 200),
    (figures(calls=4), 503, 200),  # full: not ready, but alive (no restart for being full)
    (figures(calls=1, overloaded=True), 503, 200),  # behind real time
    (figures(status="draining", calls=1), 503, 200),
    (figures(status="stopping"), 503, 200),
    (figures(status="failed"), 503, 503),  # the engine stopped: liveness fails too
])
def test_ready_and_health_status_codes_without_a_token(health, ready, alive):
    got_ready, got_health = respond(health, "/ready"), respond(health, "/health")
    assert (got_ready.status_code, got_health.status_code) == (ready, alive)
    assert json.loads(got_ready.body) == health == json.loads(got_health.body)
    assert got_ready.headers["Content-Type"] == "application/json"


def test_ready_head_and_other_methods():
    head = respond(figures(calls=4), "/ready", "HEAD")
    assert head.status_code == 503 and head.body == b"" and int(head.headers["Content-Length"]) > 0
    post = respond(figures(), "/ready?x=1", "POST")
    assert post.status_code == 405 and post.headers["Allow"] == "GET, HEAD"


@pytest.mark.parametrize("health, reply", [
    (figures(calls=0, max_calls=64), "up ready 100%\n"),
    (figures(calls=40, max_calls=64), "up ready 37%\n"),  # 24 of 64 free, rounded down
    (figures(calls=63, max_calls=64), "up ready 1%\n"),
    (figures(calls=64, max_calls=64), "up ready 0%\n"),
    (figures(calls=2, max_calls=64, overloaded=True), "up ready 0%\n"),  # behind: no new call
    (figures(status="draining", calls=5), "drain\n"),
    (figures(status="stopping"), "down #stopping\n"),
    (figures(status="failed"), "down #failed\n"),
])
def test_agent_reply(health, reply):
    assert agent_reply(health) == reply


def test_free_percent_is_zero_when_busy():
    assert free_percent(figures(calls=1, max_calls=2)) == 50
    assert free_percent(figures(calls=1, max_calls=2, busy=True)) == 0


async def read_agent(port: int, send: bytes = b"") -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if send:
            writer.write(send)  # HAProxy's agent-send: ignored
        return (await asyncio.wait_for(reader.read(), TIMEOUT)).decode("ascii")
    finally:
        writer.close()


async def test_agent_responder_answers_each_connection_with_the_current_figures():
    health = figures(calls=1, max_calls=4)
    async with AgentResponder(lambda: health, "127.0.0.1", 0) as agent:
        assert await read_agent(agent.port) == "up ready 75%\n"
        health = figures(status="draining", calls=1)
        assert await read_agent(agent.port, b"backend dia2\n") == "drain\n"


def test_agent_and_drain_flags():
    config = parse_args(["--agent-port", "8766", "--drain-timeout-s", "45"], environ={})
    assert (config.agent_port, config.drain_timeout_s) == (8766, 45.0)
    assert parse_args([], environ={"DIA2_AGENT_PORT": "0"}).agent_port == 0
    assert (ServerConfig().agent_port, ServerConfig().drain_timeout_s) == (None, 30.0)
    for bad in (["--agent-port", "70000"], ["--drain-timeout-s", "-1"], ["--drain-timeout-s", "nan"]):
        with pytest.raises(SystemExit):
            parse_args(bad, environ={})


# --- a real server ---------------------------------------------------------------------------------


class Served:
    """`run()` in a thread with its own loop, on free ports, with the agent on; `drain()` and
    `stop()` act as a first and a second SIGTERM."""

    def __init__(self, **config):
        self.config = ServerConfig(host="127.0.0.1", port=0, checkpoint="tiny", mimi="random-small", device="cpu",
                                   overload_refusal_s=0.0,
                                   log_level="WARNING", max_calls=2, agent_port=0, **config)
        self._port: concurrent.futures.Future = concurrent.futures.Future()
        self._agent: concurrent.futures.Future = concurrent.futures.Future()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)

    async def _serve(self) -> None:
        self.loop, self._stop, self._drain = asyncio.get_running_loop(), asyncio.Event(), asyncio.Event()
        self._ready.set()
        await run(self.config, self._port, stop=self._stop, drain=self._drain, agent_ready=self._agent)

    def __enter__(self) -> "Served":
        self._thread.start()
        self.port, self.agent_port = self._port.result(timeout=120), self._agent.result(timeout=120)
        self._ready.wait(10)
        self.url = f"ws://127.0.0.1:{self.port}/"
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self._thread.join(timeout=TIMEOUT)
        assert not self._thread.is_alive(), "the server did not stop"

    def drain(self) -> None:
        self.loop.call_soon_threadsafe(self._drain.set)

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)

    def finished(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    async def http(self, path: str) -> tuple[int, dict]:
        def get():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=TIMEOUT) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())
        return await asyncio.to_thread(get)

    async def agent(self) -> str:
        return await read_agent(self.agent_port)


async def until(condition, what: str, timeout: float = TIMEOUT):
    """Poll an async condition until it holds (its value), or fail saying what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.05)


async def open_ready(url: str):
    ws = await connect(url, open_timeout=TIMEOUT)
    assert json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))["event"] == "ready"
    return ws


async def events_until_closed(ws) -> tuple[list[dict], int]:
    """Every event and the number of frames up to the close."""
    events, frames = [], 0
    with pytest.raises(ConnectionClosed):
        while True:
            message = await asyncio.wait_for(ws.recv(), TIMEOUT)
            if isinstance(message, bytes):
                frames += 1
            else:
                events.append(json.loads(message))
    return events, frames


@pytest.mark.slow
async def test_ready_and_agent_follow_the_free_slots():
    with Served() as server:
        status, body = await server.http("/ready")
        assert status == 200 and body["calls"] == 0 and await server.agent() == "up ready 100%\n"
        first = await open_ready(server.url)
        await until(lambda: agent_says(server, "up ready 50%\n"), "agent 50% with one call of two")
        second = await open_ready(server.url)
        await until(lambda: ready_is(server, 503), "/ready 503 with both slots taken")
        assert await server.agent() == "up ready 0%\n"
        assert (await server.http("/health"))[0] == 200  # full is not dead
        await second.close()
        await until(lambda: ready_is(server, 200), "/ready 200 once a slot frees")
        assert await server.agent() == "up ready 50%\n"
        await first.close()


async def agent_says(server: Served, reply: str) -> bool:
    return await server.agent() == reply


async def ready_is(server: Served, status: int) -> bool:
    return (await server.http("/ready"))[0] == status


@pytest.mark.slow
async def test_drain_lets_the_speaking_call_finish_and_sends_the_others_away():
    with Served(drain_timeout_s=120) as server:
        speaker, idle = await open_ready(server.url), await open_ready(server.url)
        await speaker.send(json.dumps({"cmd": "start", "text": LONG_TEXT, "id": "long"}))
        frames = 0
        while frames < 3:  # it is speaking
            frames += isinstance(await asyncio.wait_for(speaker.recv(), TIMEOUT), bytes)
        t0 = time.monotonic()
        server.drain()

        # The idle call is closed at once, told why.
        idle_events, _ = await events_until_closed(idle)
        assert idle_events[-1]["code"] == "shutting_down" and idle.close_code == 1001
        # No new call: /ready, the agent and the upgrade all say so; /health stays 200.
        status, body = await server.http("/ready")
        assert status == 503 and body["status"] == "draining"
        assert (await server.http("/health"))[0] == 200 and await server.agent() == "drain\n"
        with pytest.raises(InvalidStatus) as refused:
            await connect(server.url, open_timeout=TIMEOUT)
        assert refused.value.response.status_code == 503
        # A new turn on the speaking call is refused; an inject continues the utterance.
        await speaker.send(json.dumps({"cmd": "start", "text": "[S1] Another one.", "id": "new"}))
        await speaker.send(json.dumps({"cmd": "inject", "text": " and the end.", "id": "more"}))

        events, later_frames = await events_until_closed(speaker)
        drain_s = time.monotonic() - t0
        codes = [e.get("code") for e in events if e["event"] == "error"]
        assert codes == ["draining", "shutting_down"], events
        done = [e for e in events if e["event"] == "done"]
        assert len(done) == 1 and done[0]["id"] == "more" and done[0]["frames"] == frames + later_frames
        assert events.index(done[0]) < len(events) - 1 and events[-1]["code"] == "shutting_down"
        words = [e["word"] for e in events if e["event"] == "word"]
        assert words[-3:] == ["and", "the", "end."]
        assert speaker.close_code == 1001
        assert server.finished(TIMEOUT), "the server did not stop once its calls had ended"
    print(f"\n[drain] the speaking call ended {drain_s:.2f} s after the drain began "
          f"({frames + later_frames} frames, {later_frames} after it); the server then stopped by itself")


@pytest.mark.slow
@pytest.mark.parametrize("ends_by", ["timeout", "second signal"])
async def test_drain_ends_at_the_timeout_or_a_second_signal(ends_by):
    with Served(drain_timeout_s=1.0 if ends_by == "timeout" else 120) as server:
        speaker = await open_ready(server.url)
        await speaker.send(json.dumps({"cmd": "start", "text": LONG_TEXT + " " + LONG_TEXT[5:], "id": "long"}))
        while not isinstance(await asyncio.wait_for(speaker.recv(), TIMEOUT), bytes):
            pass
        t0 = time.monotonic()
        server.drain()
        if ends_by == "second signal":
            await until(lambda: ready_is(server, 503), "draining")
            server.stop()
        events, _ = await events_until_closed(speaker)
        elapsed = time.monotonic() - t0
        assert events[-1]["code"] == "shutting_down" and speaker.close_code == 1001
        assert not any(e["event"] == "done" for e in events)  # cut off: the utterance was far longer
        assert server.finished(TIMEOUT)
    print(f"\n[drain] ended by {ends_by} after {elapsed:.2f} s")


def test_device_cuda_n_beyond_the_machines_gpus_is_a_clear_error():
    import torch

    from dia2stream.serve.build import use_device

    use_device(None)
    use_device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=f"this machine has {count} CUDA device"):
        use_device(f"cuda:{count}")
