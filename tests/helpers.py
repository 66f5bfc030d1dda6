"""Helpers shared by the tests: engines and servers built the way the server builds them."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import io
import json
import queue
import threading
import time
import urllib.request

import numpy as np
import soundfile as sf
from websockets.asyncio.client import connect

from dia2stream.clock import FRAME_SAMPLES
from dia2stream.serve.config import ServerConfig
from dia2stream.serve.server import run
from dia2stream.wire import protocol as p


def engine_config(tts, **overrides):
    """The engine settings `server.py` would use for `tts`, with `overrides` (fields of ServerConfig
    or EngineConfig). Engines built for tests never refuse a call because this machine is slow."""
    overrides.setdefault("overload_refusal_s", 0.0)
    return ServerConfig().engine_config(tts.device, **overrides)


def server_config(**fields) -> ServerConfig:
    """A tiny-checkpoint CPU server on a free loopback port. It does not refuse calls because this
    machine is slow (`overload_refusal_s=0`): the refusal itself has a test of its own. Its engine
    runs in the test's process unless `engine_process="on"` (the server's default): an engine
    process costs ~4 s to start here, and most tests start a server of their own. The module-wide
    `server` fixture (conftest.py), the isolation, liveness and engine-process tests and every
    real `server.py` run the engine in its own process."""
    fields = {"host": "127.0.0.1", "port": 0, "checkpoint": "tiny", "device": "cpu", "overload_refusal_s": 0.0,
              "engine_process": "off", **fields}
    return ServerConfig(**fields)


FRAME_BYTES = 4 + 2 * FRAME_SAMPLES  # pcm_24000: header + 16-bit samples
STEP_TIMEOUT = 30.0  # the most any single expected message may take (CPU, shared cores)
LONG_TEXT = "[S1] One two three four five six seven eight."


# ---------------------------------------------------------------------------------------------
# A server in a thread
# ---------------------------------------------------------------------------------------------


class ServerThread:
    """`dia2stream.server.run` on its own event loop in a daemon thread."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self._port: concurrent.futures.Future = concurrent.futures.Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="dia2-test-server", daemon=True)

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        await run(self.config, self._port, stop=self._stop)

    def start(self, timeout: float = 120.0) -> "ServerThread":
        self._thread.start()
        self.port = self._port.result(timeout=timeout)
        self.url = f"ws://127.0.0.1:{self.port}/"
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "server thread did not stop"


# ---------------------------------------------------------------------------------------------
# A small test client that records everything with arrival times
# ---------------------------------------------------------------------------------------------


class Client:
    def __init__(self, ws):
        self.ws = ws
        self.items: list[tuple[float, str, object]] = []  # (perf_counter, "frame"|"event", payload)

    @classmethod
    async def open(cls, url: str) -> tuple["Client", dict]:
        ws = await connect(url, open_timeout=STEP_TIMEOUT, close_timeout=2)
        client = cls(ws)
        ready = await client.event()
        client.items.clear()  # keep only what follows the handshake
        return client, ready

    async def send(self, **cmd) -> float:
        await self.ws.send(json.dumps(cmd))
        return time.perf_counter()

    async def send_raw(self, message) -> None:
        await self.ws.send(message)

    async def next(self, timeout: float = STEP_TIMEOUT) -> tuple[float, str, object]:
        message = await asyncio.wait_for(self.ws.recv(), timeout)
        now = time.perf_counter()
        if isinstance(message, bytes):
            item = (now, "frame", message)
        else:
            item = (now, "event", json.loads(message))
        self.items.append(item)
        return item

    async def event(self, timeout: float = STEP_TIMEOUT) -> dict:
        """The next message, which must be an event."""
        _, kind, payload = await self.next(timeout)
        assert kind == "event", f"expected an event, got a {len(payload)}-byte binary frame"
        return payload

    async def until(self, event: str, timeout: float = 60.0, **match) -> dict:
        """Read (recording frames and events) until `event` with the given fields arrives.

        An `error` event that is not the one waited for fails the test at once."""
        deadline = time.perf_counter() + timeout
        while True:
            remaining = deadline - time.perf_counter()
            assert remaining > 0, f"no {event} {match} within {timeout} s; got {self.summary()}"
            _, kind, payload = await self.next(remaining)
            if kind != "event":
                continue
            if payload["event"] == event and all(payload.get(k) == v for k, v in match.items()):
                return payload
            assert payload["event"] != "error", f"unexpected error: {payload}"

    async def frames(self, n: int, timeout: float = STEP_TIMEOUT) -> None:
        """Read until `n` more frames have arrived."""
        target = self.count("frame") + n
        while self.count("frame") < target:
            _, kind, payload = await self.next(timeout)
            assert not (kind == "event" and payload["event"] in ("done", "error")), payload

    async def quiet(self, seconds: float) -> list:
        """Everything that arrives within `seconds` (nothing, when the server is silent)."""
        got = []
        deadline = time.perf_counter() + seconds
        while (remaining := deadline - time.perf_counter()) > 0:
            try:
                got.append(await self.next(remaining))
            except asyncio.TimeoutError:
                break
        return got

    def count(self, kind: str) -> int:
        return sum(1 for _, k, _ in self.items if k == kind)

    def events(self, name: str | None = None) -> list[dict]:
        return [e for _, k, e in self.items if k == "event" and (name is None or e["event"] == name)]

    def frame_times(self) -> list[float]:
        return [t for t, k, _ in self.items if k == "frame"]

    def summary(self) -> str:
        events = [e["event"] + (f"({e.get('code')})" if e["event"] == "error" else "") for e in self.events()]
        return f"{self.count('frame')} frames, events {events}"

    async def close(self) -> None:
        await self.ws.close()


async def speak(client: Client, text: str, id="t") -> dict:
    """start → done on a connection; returns `done`."""
    await client.send(cmd="start", text=text, id=id)
    return await client.until("done", id=id)


def http_get(port: int, path: str = "/health") -> tuple[int, str, dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.status, response.headers.get("Content-Type"), json.loads(response.read())


def http_call(port: int, method: str, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def wait_until_idle(port: int, timeout_s: float = 30.0) -> None:
    """Return once the server on `port` has no call (/health), or after `timeout_s` regardless: the
    engine frees a hung-up call's slot a little after its socket closes (later on a busy machine),
    and a test that shares its module's server must not be refused as busy by the calls of the
    tests before it. Only a wait: what the test then sees is the test's to judge."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, _, body = http_call(port, "GET", "/health")
        if status == 200 and json.loads(body)["calls"] == 0:
            return
        time.sleep(0.05)


def word(text: str, *tokens: int):
    """A script entry for a word of these tokens (its padding is its token count, as parsed)."""
    from vendor_dia2.script import ScriptEntry

    return ScriptEntry(text=text, tokens=tuple(tokens), padding=len(tokens))


def pause(frames: int):
    """A script entry for a break of `frames` frames."""
    from vendor_dia2.script import ScriptEntry

    return ScriptEntry(text="", tokens=(), padding=frames)


def collect_events(got: queue.Queue, until, timeout: float = 120.0) -> list:
    """A call's events from its queue, up to and including the first of type `until`; any
    other error event fails the test."""
    items = []
    while True:
        item = got.get(timeout=timeout)
        items.append(item)
        if isinstance(item, until):
            return items
        assert not isinstance(item, p.ErrorEvent), item


def tone(seconds: float, rate: int, freq: float = 220.0, level: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (level * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()
