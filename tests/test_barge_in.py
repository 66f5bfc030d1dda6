"""Barge-in rollback (`pause` with `played_ms`, issue 11) on the tiny checkpoint, in process."""

from __future__ import annotations

import queue
import time

import pytest
import torch

from dia2stream.wire import protocol as p
from dia2stream.call.call import AudioFrame
from dia2stream.engine.engine import Engine

from helpers import collect_events, engine_config

pytestmark = pytest.mark.slow

TEXT = "[S1] One two three four five six seven eight nine ten."
WORDS = TEXT.removeprefix("[S1] ").split()


@pytest.fixture(scope="module")
def engine(tiny_dir):
    from vendor_dia2 import Dia2

    tts = Dia2.from_pretrained(str(tiny_dir), device="cpu", mimi="random-small")
    eng = Engine(tts, engine_config(tts, max_lead_ms=1e6))
    yield eng
    eng.close()


def words(items):
    return [i.word for i in items if isinstance(i, p.Word)]


def record_state_before(engine, call, target: int, monkeypatch) -> dict:
    """Wrap the stepper's and codec's public step/decode to take snapshots as the call runs:
    its slot and text state before step `target`, its Mimi row before frame `target` is decoded."""
    taken: dict = {}
    step, decode = engine.stepper.launch, engine.codec.decode_frame

    def stepping(choices, active):
        if "stepper" not in taken and engine.stepper.position(call.slot.index) == target:
            taken["stepper"], taken["text"] = engine.stepper.snapshot(call.slot.index), call.machine.snapshot()
        return step(choices, active)

    def decoding(codes, rows):
        if "codec" not in taken and rows[call.slot.index] and engine.stepper.ready_frame_index(call.slot.index) == target:
            taken["codec"] = engine.codec.snapshot_row(call.slot.index)
        return decode(codes, rows)

    monkeypatch.setattr(engine.stepper, "launch", stepping)
    monkeypatch.setattr(engine.codec, "decode_frame", decoding)
    return taken


def test_rollback_stands_exactly_where_the_heard_audio_ended_and_inject_replaces_the_rest(engine, monkeypatch):
    got = queue.Queue()
    call = engine.open_call(got.put)
    try:
        engine.submit(call, p.Start(text=TEXT, seed=5, id="t"))
        collect_events(got, p.Done)
        heard = 6
        target = call.turn.send_from + heard
        engine.submit(call, p.Reset())
        collect_events(got, p.ResetDone)
        taken = record_state_before(engine, call, target, monkeypatch)
        engine.submit(call, p.Start(text=TEXT, seed=5, id="t"))
        first = collect_events(got, p.Done)
        monkeypatch.undo()
        assert call.turn.send_from + heard == target and {"stepper", "text", "codec"} <= set(taken)
        assert words(first) == WORDS

        engine.submit(call, p.Pause(played_ms=heard * 80.0 + 30, id="barge"))  # 6.4 frames: 6 whole ones heard
        paused = collect_events(got, p.Paused)[-1]
        assert paused.id == "barge"
        spoken, unspoken = [w["word"] for w in paused.spoken], paused.unspoken
        assert spoken + unspoken == WORDS  # every word of the turn, in order
        assert all(w["start_s"] < heard * 0.08 for w in paused.spoken)
        assert unspoken, "the caller heard less than the whole utterance"

        stepper_snap, text_state = taken["stepper"], taken["text"]
        slot = call.slot.index
        for _ in range(1000):  # the codec re-decode is planned work, done between frames
            if call.slot.pending_replay is None:
                break
            time.sleep(0.01)
        assert call.slot.pending_replay is None
        assert engine.stepper.position(slot) == target
        assert torch.equal(engine.stepper.step_inputs(slot), stepper_snap.tokens)  # the inputs of step `target`
        assert call.machine.state == text_state  # words, pads and look-ahead as they were
        live = engine.codec.snapshot_row(slot)
        for module, fields in taken["codec"].states.items():  # Mimi where frame target-1 left it
            for name, value in fields.items():
                other = live.states[module][name]
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, other), (module, name)
                elif isinstance(value, dict):
                    assert all(torch.equal(value[k], other[k]) for k in value), (module, name)

        engine.submit(call, p.Inject(text=" Sorry, go ahead.", id="x"))
        after = collect_events(got, p.Done)
        assert isinstance(after[0], p.Resumed)
        assert words(after) == ["Sorry,", "go", "ahead."]  # the unheard words are gone
        assert all(w.id == "x" for w in after if isinstance(w, p.Word))
    finally:
        engine.close_call(call)


def test_inject_after_a_barge_in_mid_word_cuts_the_word_off_and_its_words_follow_the_lead_in(engine):
    got = queue.Queue()
    call = engine.open_call(got.put)
    data, lead_in = engine.tts.config.data, engine.config.lead_in_frames
    marks = (data.text_pad_token_id, data.text_new_word_token_id)
    try:
        engine.submit(call, p.Start(text=TEXT, seed=5, id="t"))
        collect_events(got, p.Done)
        sent_from, text = call.turn.send_from, call.context_text()[:, 0]
        # a frame heard mid-word: its step emits one of a word's tokens, and so does the next
        target = next(f for f in range(sent_from + 2, len(text) - 2)
                      if text[f + 1] not in marks and text[f + 2] not in marks)
        engine.submit(call, p.Pause(played_ms=(target - sent_from) * 80.0, id="barge"))
        collect_events(got, p.Paused)
        engine.submit(call, p.Inject(text=" Sorry, go ahead.", id="x"))
        after = collect_events(got, p.Done)
        assert words(after) == ["Sorry,", "go", "ahead."]
        first_step = next(step for word, step in call.machine.words if word == "Sorry,")
        assert first_step == target + lead_in  # the lead-in, then the word, whatever the model sampled
        text = call.context_text()[:, 0]
        # inputs of the steps after `target` up to the new word's: the pads of the hold, none of
        # the cut word's tokens (without the cut they would continue it)
        assert all(t == data.text_pad_token_id for t in text[target + 1:first_step + 1]), text[target:first_step + 2]
    finally:
        engine.close_call(call)


def test_resume_after_rollback_speaks_the_unheard_words_again(engine):
    got = queue.Queue()
    call = engine.open_call(got.put)
    try:
        engine.submit(call, p.Start(text=TEXT, seed=8, id="t"))
        collect_events(got, p.Done)
        engine.submit(call, p.Pause(played_ms=4 * 80.0))
        paused = collect_events(got, p.Paused)[-1]
        assert paused.unspoken
        engine.submit(call, p.Resume())
        after = collect_events(got, p.Done)
        assert not any(isinstance(i, p.ErrorEvent) for i in after)
        assert words(after) == paused.unspoken
        assert all(i.id == "t" for i in after if isinstance(i, p.Word))
    finally:
        engine.close_call(call)


def test_text_sent_after_the_point_rolled_back_to_is_not_lost(engine):
    """A barge-in goes back to a step before the inject and the flush arrived: their words are
    still unspoken, and a resume speaks them and ends the turn."""
    got = queue.Queue()
    call = engine.open_call(got.put)
    try:
        engine.submit(call, p.Start(text="[S1] One two three", final=False, seed=8, id="t"))
        collect_events(got, p.Word)
        engine.submit(call, p.Inject(text=" four five six.", final=False, id="i"))
        engine.submit(call, p.Flush())
        first = collect_events(got, p.Done)
        assert words(first)[-3:] == ["four", "five", "six."]
        engine.submit(call, p.Pause(played_ms=80.0))  # the first frame heard: before the inject's step
        paused = collect_events(got, p.Paused)[-1]
        assert [w["word"] for w in paused.spoken] + paused.unspoken == WORDS[:3] + ["four", "five", "six."]
        assert paused.unspoken[-3:] == ["four", "five", "six."]
        engine.submit(call, p.Resume())
        after = collect_events(got, p.Done, timeout=60)  # with the flush lost, the turn would hold for text
        assert words(after) == paused.unspoken
    finally:
        engine.close_call(call)


def test_no_frame_after_paused_with_played_ms_while_generating(tiny_dir):
    from vendor_dia2 import Dia2

    tts = Dia2.from_pretrained(str(tiny_dir), device="cpu", mimi="random-small")
    eng = Engine(tts, engine_config(tts, max_lead_ms=400))  # paced: the pause lands mid-utterance
    got = queue.Queue()
    call = eng.open_call(got.put)
    try:
        eng.submit(call, p.Start(text=TEXT + " " + TEXT.removeprefix("[S1] "), seed=2))
        frames = 0
        while frames < 8:
            frames += isinstance(got.get(timeout=60), AudioFrame)
        eng.submit(call, p.Pause(played_ms=3 * 80.0))
        items = collect_events(got, p.Paused)
        paused = items[-1]
        assert paused.spoken is not None and paused.unspoken
        late = []
        try:
            while True:
                late.append(got.get(timeout=1.0))
        except queue.Empty:
            pass
        assert not any(isinstance(i, AudioFrame) for i in late)
    finally:
        eng.close()


@pytest.mark.parametrize("played, code", [(-1, "invalid_field"), ("12", "invalid_field"), (float("nan"), "invalid_json"),
                                          (True, "invalid_field")])
def test_bad_played_ms_is_refused_by_the_parser(played, code):
    import json

    try:
        message = json.dumps({"cmd": "pause", "played_ms": played})
    except ValueError:
        return
    with pytest.raises(p.ProtocolError) as err:
        p.parse_command(message)
    assert err.value.code in (code, "invalid_field")


def test_played_ms_past_what_was_sent_is_refused_and_the_call_goes_on(engine):
    got = queue.Queue()
    call = engine.open_call(got.put)
    try:
        engine.submit(call, p.Pause(played_ms=80.0, id="early"))  # nothing started
        error = collect_events(got, p.ErrorEvent)[-1]
        assert error.code == "invalid_field" and error.id == "early"
        engine.submit(call, p.Start(text="[S1] Hello there.", seed=1))
        done = collect_events(got, p.Done)[-1]
        engine.submit(call, p.Pause(played_ms=(done.frames + 5) * 80.0, id="far"))
        error = collect_events(got, p.ErrorEvent)[-1]
        assert error.code == "invalid_field" and "sent" in error.message and error.id == "far"
        engine.submit(call, p.Inject(text=" And more.", id="more"))  # the call is intact: idle, warm
        after = collect_events(got, p.Done)
        assert words(after) == ["And", "more."]
    finally:
        engine.close_call(call)
