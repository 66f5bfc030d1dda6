"""Liveness that means something (issue 19): when the engine cannot serve, `/health` answers 503
with the reason, every client gets `internal_error` with a message and close 1011 (never
silence), and the server exits non-zero for its supervisor to restart it.

Faults are injected in the test's own stepper by wrapping `FrameStepper.step` (no hook in the
server): in the engine's process (the default, `--engine-process on`) by a function `run()` calls
there before the engine is built (`engine_init`), armed by a file; in one process
(`--engine-process off`) by monkeypatch. A CUDA error (sticky: the engine stops at once), a step
that hangs (the watchdog sees no frame step while calls wait), the engine process killed, and,
through a real `server.py` process, its engine process killed: the process exits with status 1."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import os
import signal
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

    def __init__(self, config, engine_init=None) -> None:
        self.config, self.engine_init = config, engine_init
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
        return await run(self.config, self.port_future, stop=self._stop, engine_init=self.engine_init)

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
    """Wraps FrameStepper.launch in this process (`--engine-process off`): once armed, the next step
    raises `error` or blocks until released."""

    def __init__(self, monkeypatch, error: BaseException | None = None) -> None:
        self._armed, self._hit, self._released = threading.Event(), threading.Event(), threading.Event()
        real = FrameStepper.launch

        def step(stepper, *args, **kwargs):
            if self._armed.is_set():
                self._hit.set()
                if error is not None:
                    raise error
                self._released.wait(60)  # a hung device
            return real(stepper, *args, **kwargs)

        monkeypatch.setattr(FrameStepper, "launch", step)

    def arm(self) -> None:
        self._armed.set()

    def release(self) -> None:
        self._released.set()

    def was_hit(self) -> bool:
        return self._hit.is_set()


class FaultyStepInEngineProcess:
    """The same fault in the engine's own process: `engine_init` wraps its FrameStepper.step there;
    it is armed by creating a file, and a hung step is released by removing it."""

    engine_process = "on"

    def __init__(self, tmp_path: Path, error: str | None = None) -> None:
        self.arm_file = tmp_path / "arm"
        self.engine_init = functools.partial(wrap_step_in_this_process, str(self.arm_file), error)

    def arm(self) -> None:
        self.arm_file.touch()

    def release(self) -> None:
        self.arm_file.unlink(missing_ok=True)

    def was_hit(self) -> bool:
        return Path(str(self.arm_file) + ".hit").exists()


def wrap_step_in_this_process(arm_file: str, error: str | None) -> None:
    """Run in the engine's process before its engine is built (`run(engine_init=...)`)."""
    real = FrameStepper.launch

    def step(stepper, *args, **kwargs):
        if os.path.exists(arm_file):
            Path(arm_file + ".hit").touch()
            if error is not None:
                raise torch.AcceleratorError(error)
            deadline = time.monotonic() + 60
            while os.path.exists(arm_file) and time.monotonic() < deadline:  # a hung device
                time.sleep(0.05)
        return real(stepper, *args, **kwargs)

    FrameStepper.launch = step


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


async def fail_while_speaking(fault, **config) -> tuple[float, dict, list, int]:
    """Two clients (one speaking), then `fault` (a callable that breaks the engine): how long
    /health took to say 503, its body, each client's last event and close code, the exit status."""
    server = ServerRun(server_config(mimi="random-small", log_level="CRITICAL", max_calls=2, **config),
                       engine_init=getattr(fault, "engine_init", None)).start()
    try:
        speaker, _ = await Client.open(server.url)
        idle, _ = await Client.open(server.url)
        await speaker.send(cmd="start", text=LONG_TEXT * 3, id="u")
        await speaker.until("started", id="u")
        await speaker.frames(2)
        await asyncio.to_thread(fault.arm)
        took, body = await health_503(server.port)
        ends = await asyncio.gather(told_and_closed(speaker), told_and_closed(idle))
        fault.release()
        status = await asyncio.to_thread(server.status.result, 60)
        return took, body, ends, status
    finally:
        fault.release()
        server.stop()


@pytest.mark.parametrize("engine_process", ["on", "off"])
async def test_a_cuda_error_in_the_step_fails_health_tells_clients_and_exits_1(engine_process, monkeypatch, tmp_path,
                                                                                capsys):
    if engine_process == "on":
        fault = FaultyStepInEngineProcess(tmp_path, CUDA_FAULT)
    else:
        fault = FaultyStep(monkeypatch, torch.AcceleratorError(CUDA_FAULT))
    took, body, ends, status = await fail_while_speaking(fault, engine_process=engine_process)
    with capsys.disabled():
        print(f"\n[liveness] CUDA error (--engine-process {engine_process}): /health 503 {took:.2f} s after the "
              "fault was armed")
    assert fault.was_hit()
    assert took < 2.0
    assert body["status"] == "failed" and "AcceleratorError" in body["failure"] and CUDA_FAULT in body["failure"]
    for event, code in ends:
        assert event["event"] == "error" and event["code"] == "internal_error", event
        assert "engine failed" in event["message"] and CUDA_FAULT in event["message"]
        assert code == ENGINE_FAILED_CLOSE_CODE
    assert status == EXIT_ENGINE_FAILED


async def test_a_hung_step_is_seen_by_the_watchdog(tmp_path, capsys):
    fault = FaultyStepInEngineProcess(tmp_path)  # blocks instead of raising
    took, body, ends, status = await fail_while_speaking(fault, engine_stall_s=1.0, engine_process="on")
    with capsys.disabled():
        print(f"\n[liveness] hung step, --engine-stall-s 1: /health 503 {took:.2f} s after the fault was armed")
    assert body["status"] == "failed" and "no frame step" in body["failure"]
    for event, code in ends:
        assert event["code"] == "internal_error" and "no frame step" in event["message"]
        assert code == ENGINE_FAILED_CLOSE_CODE
    assert status == EXIT_ENGINE_FAILED


async def test_a_healthy_idle_server_is_not_failed_by_the_watchdog(monkeypatch):
    server = ServerRun(server_config(mimi="random-small", log_level="WARNING", engine_stall_s=0.5,
                                     engine_process="on")).start()
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


async def test_the_engine_process_killed_fails_health_tells_clients_and_exits_1(capsys):
    server = ServerRun(server_config(mimi="random-small", log_level="CRITICAL", max_calls=2,
                                     engine_process="on")).start()
    try:
        _, _, body = await asyncio.to_thread(http_call, server.port, "GET", "/health")
        engine_pid = json.loads(body)["engine_pid"]
        assert engine_pid != os.getpid()
        speaker, _ = await Client.open(server.url)
        idle, _ = await Client.open(server.url)
        await speaker.send(cmd="start", text=LONG_TEXT * 3, id="u")
        await speaker.frames(2)
        os.kill(engine_pid, signal.SIGKILL)
        took, body = await health_503(server.port)
        ends = await asyncio.gather(told_and_closed(speaker), told_and_closed(idle))
        exit_status = await asyncio.to_thread(server.status.result, 60)
    finally:
        server.stop()
    with capsys.disabled():
        print(f"\n[liveness] engine process killed: /health 503 {took:.2f} s after the kill")
    assert took < 2.0
    assert body["status"] == "failed" and "SIGKILL" in body["failure"], body
    for event, code in ends:
        assert event["code"] == "internal_error" and "engine process" in event["message"], event
        assert code == ENGINE_FAILED_CLOSE_CODE
    assert exit_status == EXIT_ENGINE_FAILED


async def test_a_real_server_process_exits_1_when_its_engine_process_dies(tmp_path):
    proc = subprocess.Popen([sys.executable, "server.py", "--checkpoint", "tiny", "--mimi", "random-small",
                             "--port", "0", "--device", "cpu", "--log-level", "WARNING"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = await asyncio.wait_for(asyncio.to_thread(_ready_line, proc), 180)
        url = line.split(" on ", 1)[1].strip()
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        _, _, body = await asyncio.to_thread(http_call, port, "GET", "/health")
        engine_pid = json.loads(body)["engine_pid"]
        client, _ = await Client.open(url)
        await client.send(cmd="start", text=LONG_TEXT * 4, id="u")
        await client.frames(2)
        os.kill(engine_pid, signal.SIGKILL)
        event, code = await told_and_closed(client)
        assert event["code"] == "internal_error" and code == ENGINE_FAILED_CLOSE_CODE, event
        assert await asyncio.to_thread(proc.wait, 60) == EXIT_ENGINE_FAILED
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    output = proc.stdout.read()
    assert "the engine cannot serve" in output and "SIGKILL" in output


def _ready_line(proc: subprocess.Popen) -> str:
    for line in proc.stdout:
        if line.startswith("dia2stream ready on "):
            return line
    raise AssertionError(f"server exited with {proc.wait()} before it was ready")
