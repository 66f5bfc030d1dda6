"""The engine in its own process (`serve/engine_process.py`), driven through `EngineProxy` without
a server: what crosses (one batch per engine step for every call, replies in command order,
epochs, the clients' frame counts), and that the engine process never outlives its server, whether
the server stops it or dies. Whole-server behaviour across the boundary (floods, liveness,
shutdown) is in test_isolation.py, test_engine_failure.py and test_shutdown.py, which run the
server in this mode by default."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dia2stream.call.call import Drained
from dia2stream.serve.engine_process import HEARTBEAT_S, EngineProxy
from dia2stream.serve.metrics import Metrics
from dia2stream.wire import protocol as p
from dia2stream.wire.frames import AudioFrame, FrameWriter
from dia2stream.wire.formats import decode_frame

from helpers import LONG_TEXT, server_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def until(inbox: queue.Queue, kind, timeout: float = 60.0) -> list:
    """Items from `inbox` up to and including the first of type `kind`."""
    got = []
    deadline = time.monotonic() + timeout
    while True:
        item = inbox.get(timeout=max(0.1, deadline - time.monotonic()))
        got.append(item)
        if isinstance(item, kind):
            return got


def gone(pid: int, timeout: float = 30.0) -> bool:
    """The process has exited (a zombie waiting for whoever adopted it counts: it runs no more)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_calls_across_the_process_boundary_batch_per_step_and_leave_nothing_behind():
    fds_before = open_fds()
    metrics = Metrics()
    engine = EngineProxy.start(server_config(mimi="random-small", max_calls=2, log_level="WARNING"), metrics)
    try:
        assert engine.pid != os.getpid() and engine.running and engine.max_calls == 2
        inboxes = [queue.Queue(), queue.Queue()]
        calls = [engine.open_call(inboxes[0].put), engine.open_call(inboxes[1].put)]
        assert [c.slot.index for c in calls] == [0, 1]
        assert engine.open_call(lambda item: None) is None  # every slot taken, decided here
        # A reply keeps its place behind the command before it; it never crosses itself.
        engine.submit(calls[0], p.Start(text=LONG_TEXT, id="a", format="ulaw_8000"))
        engine.reply(calls[0], p.Pong(id="after-start"))
        engine.submit(calls[1], p.Start(text=LONG_TEXT, id="b"))
        batches_before, steps_before, t0 = engine.batches, metrics.value("dia2_frame_step_seconds_count"), \
            time.monotonic()
        items = [until(inbox, p.Done) for inbox in inboxes]
        batches, elapsed = engine.batches - batches_before, time.monotonic() - t0
        steps = metrics.value("dia2_frame_step_seconds_count") - steps_before
        assert isinstance(items[0][0], p.Started) and items[0][1] == p.Pong(id="after-start")
        frames = [[i for i in got if isinstance(i, AudioFrame)] for got in items]
        assert all(len(f) > 10 for f in frames)
        # frames are PCM stamped with the call's format; the server's writer encodes them
        assert {f.format for f in frames[0]} == {"ulaw_8000"} and frames[0][0].fresh
        writer = FrameWriter()
        assert all(len(decode_frame(writer.message(f), "ulaw_8000")) == 640 for f in frames[0])
        # One batch per engine step (both calls' frames and events together), plus heartbeats and
        # the answer to the reply: never one per item.
        assert steps >= max(len(f) for f in frames)
        assert batches <= steps + elapsed / HEARTBEAT_S + 3, (batches, steps, elapsed)
        assert sum(map(len, items)) > batches, (sum(map(len, items)), batches)
        print(f"\n[engine process] {sum(map(len, items))} items in {batches} batches over {steps:.0f} steps, {elapsed:.1f} s")
        health = engine.health()
        assert health["calls"] == 2 and health["failure"] is None and health["engine_pid"] == engine.pid
        # Epochs move with pause and close on both sides alike: frames after a pause are newer.
        engine.submit(calls[0], p.Start(text=LONG_TEXT * 2, id="c"))
        until(inboxes[0], AudioFrame)
        engine.submit(calls[0], p.Pause(id="p"))
        until(inboxes[0], p.Paused)
        assert calls[0].epoch == 1  # frames made before the pause (epoch 0) are the sender's to drop
        engine.submit(calls[0], p.Resume(id="r"))
        resumed = [i for i in until(inboxes[0], p.Done) if isinstance(i, AudioFrame)]
        assert resumed and all(f.epoch == 1 for f in resumed) and resumed[0].fresh
        engine.drain_call(calls[1])
        until(inboxes[1], Drained)
        for call in calls:
            engine.close_call(call)
        again = engine.open_call(lambda item: None)
        assert again.slot.index == 0  # the lowest free slot, the same one the engine process takes
        engine.close_call(again)
    finally:
        engine.close()
    assert gone(engine.pid, timeout=5)
    assert not engine.running
    assert open_fds() == fds_before


DYING_SERVER = """
import os, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from helpers import server_config
from dia2stream.serve.engine_process import HEARTBEAT_S, EngineProxy
engine = EngineProxy.start(server_config(mimi="random-small", log_level="WARNING"))
print(engine.pid, flush=True)
os._exit(3)  # the server dies without a word to its engine process
"""


def test_the_engine_process_exits_when_its_server_dies():
    out = subprocess.run([sys.executable, "-c", DYING_SERVER, str(ROOT), str(ROOT / "tests")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 3, out.stderr[-2000:]
    pid = int(out.stdout.split()[-1])
    assert gone(pid), f"engine process {pid} outlived its server"


def test_a_call_opened_after_moved_calls_closed_is_served():
    """Calls move between slots in the engine process (a turn starting alone on the top slot is
    brought to slot 0), so the server cannot know which slot a closed call leaves free: the
    engine opens the next call on its own lowest free slot, and that call is served."""
    engine = EngineProxy.start(server_config(mimi="random-small", max_calls=2, log_level="WARNING",
                                             max_lead_ms=1e6), None)
    try:
        inboxes = [queue.Queue(), queue.Queue()]
        calls = [engine.open_call(inboxes[0].put), engine.open_call(inboxes[1].put)]
        engine.submit(calls[1], p.Start(text="[S1] Moved down.", id="moved"))  # alone: moved to slot 0
        until(inboxes[1], p.Done)
        engine.close_call(calls[1])  # frees slot 0 in the engine; slot 1 as this side counted it
        newcomer = queue.Queue()
        call = engine.open_call(newcomer.put)
        engine.submit(call, p.Start(text="[S1] Still served.", id="new"))
        engine.reply(call, p.Pong(id="after"))
        items = until(newcomer, p.Done)
        assert [i.word for i in items if isinstance(i, p.Word)] == ["Still", "served."]
        assert any(isinstance(i, p.Pong) for i in items)
    finally:
        engine.close()


def test_a_recent_figure_is_read_again_only_once_it_is_old():
    from dia2stream.serve.engine_process import Recent

    now, reads = [0.0], []
    figure = Recent(lambda: reads.append(now[0]) or len(reads), every_s=1.0, clock=lambda: now[0])
    assert [figure(), figure()] == [1, 1]
    now[0] = 0.99
    assert figure() == 1 and reads == [0.0]
    now[0] = 1.0
    assert figure() == 2 and figure() == 2 and reads == [0.0, 1.0]
