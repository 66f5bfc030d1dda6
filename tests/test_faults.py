"""Faults stay inside their call (issue 13): an exception in one call's frame ends that call's
utterance with `internal_error` carrying its id, resets it, and the other call's audio is
bit-for-bit what it is without the fault. The fault is injected by wrapping `Call.advance` for
one slot (the test-only hook), on an in-process engine (tiny checkpoint)."""

from __future__ import annotations

import queue

import numpy as np
import pytest

from dia2stream.wire import protocol as p
from dia2stream.call.call import AudioFrame, Call
from dia2stream.engine.engine import Engine

from helpers import engine_config

pytestmark = pytest.mark.slow

TEXT_A = "[S1] " + " ".join(["alpha"] * 12)
TEXT_B = "[S1] Thanks for calling, how can I help you today?"


@pytest.fixture(scope="module")
def small_tts(tiny_dir):
    from vendor_dia2 import Dia2

    return Dia2.from_pretrained(str(tiny_dir), device="cpu", mimi="random-small")


def inject_fault(monkeypatch, slot: int, after_frames: int) -> list:
    """Make `Call.advance` raise for `slot` once it has run `after_frames` times in a turn."""
    real = Call.advance
    raised = []

    def advance(self, action, step=None):
        if self.slot.index == slot and not raised and self.position - self.turn.start_position > after_frames:
            raised.append(self.position)
            raise RuntimeError("injected fault")
        return real(self, action, step)

    monkeypatch.setattr(Call, "advance", advance)
    return raised


def collect(sink: queue.Queue, until: tuple, timeout: float = 120.0) -> list:
    items = []
    while True:
        item = sink.get(timeout=timeout)
        items.append(item)
        if isinstance(item, until):
            return items


def run_pair(tts) -> tuple[list, list, Engine, tuple[Call, Call], tuple[queue.Queue, queue.Queue]]:
    engine = Engine(tts, engine_config(tts, max_calls=2, max_lead_ms=1e6, batch_sizes=(2,)))
    sinks = queue.Queue(), queue.Queue()
    calls = tuple(engine.open_call(s.put) for s in sinks)
    engine.submit(calls[0], p.Start(text=TEXT_A, seed=1, id="a"))
    engine.submit(calls[1], p.Start(text=TEXT_B, seed=2, id="b"))
    a = collect(sinks[0], (p.Done, p.ErrorEvent))
    b = collect(sinks[1], (p.Done, p.ErrorEvent))
    return a, b, engine, calls, sinks


def test_a_fault_in_one_calls_frame_ends_only_that_call(small_tts, monkeypatch):
    _, quiet_b, engine, _, _ = run_pair(small_tts)
    engine.close()

    raised = inject_fault(monkeypatch, slot=0, after_frames=6)
    a, b, engine, calls, sinks = run_pair(small_tts)
    try:
        assert raised, "the fault was never injected"
        error = a[-1]
        assert isinstance(error, p.ErrorEvent) and error.code == "internal_error" and error.id == "a"
        assert "injected fault" in error.message
        assert not any(isinstance(i, p.Done) for i in a)
        # the other call noticed nothing: same events, same audio
        assert isinstance(b[-1], p.Done) and b[-1].id == "b"
        assert [type(i) for i in b] == [type(i) for i in quiet_b]
        frames = [i.pcm for i in b if isinstance(i, AudioFrame)]
        quiet = [i.pcm for i in quiet_b if isinstance(i, AudioFrame)]
        assert len(frames) == len(quiet) > 0
        for x, y in zip(frames, quiet):
            np.testing.assert_array_equal(x, y)
        # the faulty call was reset and works again
        assert calls[0].turn is None and calls[0].phase.value == "none"
        engine.submit(calls[0], p.Inject(text=" more", id="i"))
        assert collect(sinks[0], (p.ErrorEvent,))[-1].code == "not_started"
        monkeypatch.undo()
        engine.submit(calls[0], p.Start(text="[S1] Hello again.", seed=3, id="again"))
        again = collect(sinks[0], (p.Done, p.ErrorEvent))
        assert isinstance(again[-1], p.Done) and again[-1].frames > 0
    finally:
        engine.close()
