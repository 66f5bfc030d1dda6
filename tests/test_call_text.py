"""What a call does with text that is not speakable, whichever door it came through (the native
parser refuses some of it first; the HTTP and hosted-API doors build commands themselves)."""

from __future__ import annotations

import queue

import pytest

from dia2stream.engine.engine import Engine
from dia2stream.wire import protocol as p
from dia2stream.wire.protocol import ErrorCode

from helpers import collect_events, engine_config


@pytest.fixture(scope="module")
def engine():
    from dia2stream.engine.simulated import GpuProfile, SimulatedDia2

    tts = SimulatedDia2(GpuProfile.load("profiles/h200-2b.json"))
    eng = Engine(tts, engine_config(tts, max_calls=2, max_lead_ms=1e6, max_unsent_frames=10**9))
    yield eng
    eng.close()


@pytest.mark.parametrize("command, code", [
    (p.Start(text="[S1] Hello \ud800 there", id="s"), ErrorCode.INVALID_FIELD),
    (p.Start(text="[S1] [S2] [S1]", id="s"), ErrorCode.EMPTY_TEXT),
])
def test_unspeakable_text_is_refused_as_bad_input_and_the_call_goes_on(engine, command, code):
    got = queue.Queue()
    call = engine.open_call(got.put)
    try:
        engine.submit(call, command)
        error = got.get(timeout=30)
        assert isinstance(error, p.ErrorEvent) and error.code == code and error.id == "s", error
        engine.submit(call, p.Start(text="[S1] Still here.", id="ok"))
        done = collect_events(got, p.Done)[-1]
        assert done.id == "ok" and done.frames > 0
    finally:
        engine.close_call(call)


def test_an_inject_with_a_lone_surrogate_is_refused_and_the_turn_goes_on(engine):
    got = queue.Queue()
    call = engine.open_call(got.put)
    try:
        engine.submit(call, p.Start(text="[S1] One two", final=False, id="s"))
        engine.submit(call, p.Inject(text=" \udfff three", final=False, id="bad"))
        engine.submit(call, p.Inject(text=" four.", id="good"))
        items = []
        while not isinstance(items[-1] if items else None, p.Done):
            items.append(got.get(timeout=30))
        errors = [i for i in items if isinstance(i, p.ErrorEvent)]
        assert [(e.code, e.id) for e in errors] == [(ErrorCode.INVALID_FIELD, "bad")]
        assert [i.word for i in items if isinstance(i, p.Word)] == ["One", "two", "four."]
    finally:
        engine.close_call(call)
