"""Finding 8: stopping at once (SIGTERM with `--drain-timeout-s 0`, or a second SIGTERM during a
drain) ends a real server process (server.py, tiny checkpoint) within 2 s with exit code 0, even
with a client that stopped reading after a ping flood; a client that reads gets `error`
`shutting_down` and close 1001. The graceful drain itself: tests/test_readiness.py, test_fleet.py."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from helpers import http_call

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"dia2stream ready on ws://127\.0\.0\.1:(\d+)/")
# Generous on purpose: a busy 2-core machine took 2.4 s. What this guards against is the old
# 10.6 s (websockets' 10 s closing handshake per stuck client); the real figure is printed.
EXIT_WITHIN_S = 8.0


def start_server(*flags: str) -> tuple[subprocess.Popen, int, list[str]]:
    """The server process, its port, and its output so far (read on by a thread, so the pipe
    never fills and blocks the server's logging)."""
    proc = subprocess.Popen([sys.executable, "server.py", "--checkpoint", "tiny", "--mimi", "random-small",
                             "--host", "127.0.0.1", "--port", "0", "--overload-refusal-s", "0", *flags], cwd=ROOT,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = READY.search(line)
        if found:
            threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
            return proc, int(found.group(1)), lines
    proc.kill()
    raise AssertionError("server did not start:\n" + "".join(lines[-20:]))


def wait_for_output(lines: list[str], text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in lines):
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in the server's output within {timeout:g} s")
        time.sleep(0.05)


def small_buffer_socket(port: int) -> socket.socket:
    """A client socket with a small receive buffer: once it stops reading, the server's writes
    back up quickly instead of filling megabytes of loopback buffers."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    return sock


@pytest.mark.parametrize("stop_by", ["sigterm without drain", "second sigterm"])
async def test_sigterm_exits_0_promptly_with_a_client_that_does_not_read(stop_by):
    drain = ["--drain-timeout-s", "0"] if stop_by == "sigterm without drain" else []
    proc, port, output = await asyncio.to_thread(start_server, "--max-calls", "2", "--max-lead-ms", "5000", *drain)
    try:
        url = f"ws://127.0.0.1:{port}/"
        _, _, health = await asyncio.to_thread(http_call, port, "GET", "/health")
        engine_pid = json.loads(health)["engine_pid"]  # the engine runs in its own process (the default)
        reader = await connect(url, open_timeout=30)
        assert json.loads(await reader.recv())["event"] == "ready"
        # max_queue=1: the client library stops reading the socket once one message waits
        stuck = await connect(url, open_timeout=30, max_queue=1, sock=small_buffer_socket(port))
        await stuck.send(json.dumps({"cmd": "start", "text": "[S1] " + " ".join(["word"] * 60), "id": "s"}))
        await reader.send(json.dumps({"cmd": "start", "text": "[S1] " + " ".join(["word"] * 60), "id": "r"}))
        for i in range(3000):  # a ping flood, never read
            await stuck.send(json.dumps({"cmd": "ping", "id": i}))
        frames = 0
        while frames < 5:
            frames += isinstance(await asyncio.wait_for(reader.recv(), 30), bytes)
        await asyncio.sleep(1.0)  # the stuck client's frames and pongs back up

        if stop_by == "second sigterm":
            proc.send_signal(signal.SIGTERM)  # drains: both calls are speaking, so it would wait
            await asyncio.to_thread(wait_for_output, output, "draining", 20)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        events = []
        with pytest.raises(ConnectionClosed):
            while True:
                message = await asyncio.wait_for(reader.recv(), 10)
                if isinstance(message, str):
                    events.append(json.loads(message))
        code = await asyncio.to_thread(proc.wait, 20)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(output)
    print(f"\n[shutdown] {stop_by} -> exit {code} in {elapsed:.2f} s with a client that does not read")
    assert code == 0, output[-2000:]
    assert elapsed < EXIT_WITHIN_S, f"exit took {elapsed:.2f} s\n{output[-2000:]}"
    assert events and events[-1]["event"] == "error" and events[-1]["code"] == "shutting_down"
    assert reader.close_code == 1001
    assert not Path(f"/proc/{engine_pid}").exists(), "the engine process outlived its server"
    stuck.transport.abort()
