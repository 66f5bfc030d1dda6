"""Liveness that means something (issue 19): when the engine cannot serve, `/health` answers 503
with the reason, every client gets `internal_error` with a message and close 1011 (never
silence), and the server exits non-zero for its supervisor to restart it.

Faults are injected in the test's own stepper by wrapping `FrameStepper.step` (no hook in the
server): a CUDA error (sticky: the engine stops at once), a step that hangs (the watchdog sees no
frame step while calls wait), and, through a real `server.py` process, a CUDA error that makes
the process exit with status 1."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from websockets.exceptions import ConnectionClosed

from dia2stream.serve.liveness import ENGINE_FAILED_CLOSE_CODE, EXIT_ENGINE_FAILED
from dia2stream.serve.server import run
from vendor_dia2.runtime import FrameStepper

from helpers import LONG_TEXT, Client, http_call, server_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CUDA_FAULT = "CUDA error: an illegal memory access was encountered"


class ServerRun:
    """`run()` on its own loop in a thread, keeping what it returns (the exit status)."""

    def __init__(self, config) -> None:
        self.config = config
        self.port_future: concurrent.futures.Future = concurrent.futures.Future()
        self.status: concurrent.futures.Future = concurrent.futures.Future()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        try:
            self.status.set_result(asyncio.run(self._serve()))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.status.set_exception(exc)

    async def _serve(self) -> int:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        return await run(self.config, self.port_future, stop=self._stop)

    def start(self) -> "ServerRun":
        self._thread.start()
        self.port = self.port_future.result(timeout=120)
        self.url = f"ws://127.0.0.1:{self.port}/"
        return self

    def stop(self) -> None:
        if self._loop is not None and not self.status.done():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)


class FaultyStep:
    """Wraps FrameStepper.step: once armed, the next step raises `error` or blocks until released."""

    def __init__(self, monkeypatch, error: BaseException | None = None) -> None:
        self.error, self.armed, self.hit = error, threading.Event(), threading.Event()
        self.release = threading.Event()
        real = FrameStepper.step

        def step(stepper, *args, **kwargs):
            if self.armed.is_set():
                self.hit.set()
                if self.error is not None:
                    raise self.error
                self.release.wait(60)  # a hung device
            return real(stepper, *args, **kwargs)

        monkeypatch.setattr(FrameStepper, "step", step)


async def health_503(port: int, timeout: float = 30.0) -> tuple[float, dict]:
    """Poll /health until it answers 503: (seconds it took, body)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        status, _, body = await asyncio.to_thread(http_call, port, "GET", "/health")
        if status == 503:
            return time.perf_counter() - t0, json.loads(body)
        await asyncio.sleep(0.05)
    raise AssertionError(f"/health still {status} after {timeout} s: {body[:300]}")


async def told_and_closed(client: Client) -> tuple[dict, int | None]:
    """Read until the server closes: (the last event, the close code)."""
    last = None
    try:
        while True:
            _, kind, payload = await client.next(timeout=30)
            if kind == "event":
                last = payload
    except ConnectionClosed:
        pass
    return last, client.ws.close_code


async def fail_while_speaking(monkeypatch, fault: FaultyStep, **config) -> tuple[float, dict, list, int]:
    server = ServerRun(server_config(mimi="random-small", log_level="CRITICAL", max_calls=2, **config)).start()
    try:
        speaker, _ = await Client.open(server.url)
        idle, _ = await Client.open(server.url)
        await speaker.send(cmd="start", text=LONG_TEXT * 3, id="u")
        await speaker.until("started", id="u")
        await speaker.frames(2)
        fault.armed.set()
        took, body = await health_503(server.port)
        ends = await asyncio.gather(told_and_closed(speaker), told_and_closed(idle))
        fault.release.set()
        status = await asyncio.to_thread(server.status.result, 60)
        return took, body, ends, status
    finally:
        fault.release.set()
        server.stop()


async def test_a_cuda_error_in_the_step_fails_health_tells_clients_and_exits_1(monkeypatch, capsys):
    fault = FaultyStep(monkeypatch, torch.AcceleratorError(CUDA_FAULT))
    took, body, ends, status = await fail_while_speaking(monkeypatch, fault)
    with capsys.disabled():
        print(f"\n[liveness] CUDA error: /health 503 {took:.2f} s after the fault was armed")
    assert fault.hit.is_set()
    assert body["status"] == "failed" and "AcceleratorError" in body["failure"] and CUDA_FAULT in body["failure"]
    for event, code in ends:
        assert event["event"] == "error" and event["code"] == "internal_error", event
        assert "engine failed" in event["message"] and CUDA_FAULT in event["message"]
        assert code == ENGINE_FAILED_CLOSE_CODE
    assert status == EXIT_ENGINE_FAILED


async def test_a_hung_step_is_seen_by_the_watchdog(monkeypatch, capsys):
    fault = FaultyStep(monkeypatch)  # blocks instead of raising
    took, body, ends, status = await fail_while_speaking(monkeypatch, fault, engine_stall_s=1.0)
    with capsys.disabled():
        print(f"\n[liveness] hung step, --engine-stall-s 1: /health 503 {took:.2f} s after the fault was armed")
    assert body["status"] == "failed" and "no frame step" in body["failure"]
    for event, code in ends:
        assert event["code"] == "internal_error" and "no frame step" in event["message"]
        assert code == ENGINE_FAILED_CLOSE_CODE
    assert status == EXIT_ENGINE_FAILED


async def test_a_healthy_idle_server_is_not_failed_by_the_watchdog(monkeypatch):
    server = ServerRun(server_config(mimi="random-small", log_level="WARNING", engine_stall_s=0.5)).start()
    try:
        client, _ = await Client.open(server.url)
        await client.send(cmd="start", text="[S1] Hello there.", id="a")
        await client.until("done", id="a")
        await asyncio.sleep(1.5)  # idle well past the stall limit: nothing waits for a step
        status, _, body = await asyncio.to_thread(http_call, server.port, "GET", "/health")
        assert status == 200 and json.loads(body)["failure"] is None
        await client.close()
    finally:
        server.stop()
    assert server.status.result(30) == 0


WRAPPER = """
import runpy, sys, torch
from vendor_dia2.runtime import FrameStepper
real, steps = FrameStepper.step, [0]
def step(self, *args, **kwargs):
    steps[0] += 1
    if steps[0] > 40:  # the test's own stepper: a CUDA fault mid-utterance
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    return real(self, *args, **kwargs)
FrameStepper.step = step
sys.argv = ["server.py"] + sys.argv[1:]
runpy.run_path("server.py", run_name="__main__")
"""


async def test_a_real_server_process_exits_1_after_a_cuda_error(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, "--checkpoint", "tiny", "--mimi", "random-small",
                             "--port", "0", "--device", "cpu", "--log-level", "WARNING"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = await asyncio.wait_for(asyncio.to_thread(_ready_line, proc), 180)
        url = line.split(" on ", 1)[1].strip()
        client, _ = await Client.open(url)
        await client.send(cmd="start", text=LONG_TEXT * 4, id="u")
        event, code = await told_and_closed(client)
        assert event["code"] == "internal_error" and code == ENGINE_FAILED_CLOSE_CODE, event
        assert await asyncio.to_thread(proc.wait, 60) == EXIT_ENGINE_FAILED
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    output = proc.stdout.read()
    assert "the engine cannot serve" in output


def _ready_line(proc: subprocess.Popen) -> str:
    for line in proc.stdout:
        if line.startswith("dia2stream ready on "):
            return line
    raise AssertionError(f"server exited with {proc.wait()} before it was ready")
