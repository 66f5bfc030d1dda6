"""The next turn after `done` starts at the last frame the finished turn sent: the steps it ran
past it (the delayed codebooks' silent tail) are taken back, so every frame before the new turn is
teacher-forced and its first steps run decoder-only. In process on the tiny checkpoint (random
weights: tokens and positions, not how it sounds)."""

from __future__ import annotations

import base64
import time

import pytest
import torch

from vendor_dia2.runtime import SamplingParams
from vendor_dia2.script import parse_script

from dia2stream.call.call import AudioFrame, Phase
from dia2stream.wire import protocol as p

from helpers import collect_events as collect, tone, wav_bytes
from engine_fixtures import call, engine, tts  # noqa: F401 (fixtures)
from stepping import run_steps as generate

pytestmark = pytest.mark.slow

AGENT = "[S1] Hello there, how are you today?"
ANSWER = " Fine, thank you."


def test_the_next_turn_starts_at_the_last_sent_frame(engine, call):
    got = call.test_events
    engine.submit(call, p.Start(text=AGENT, temperature=0.0, seed=3, id="a"))
    collect(got, p.Done)
    sent_until, ran_to = call.turn.next_frame, call.position
    assert ran_to > sent_until  # the finished turn ran past its last sent frame
    engine.submit(call, p.Inject(text=ANSWER, id="b"))
    items = collect(got, p.Done)
    started = next(item for item in items if isinstance(item, p.Started))
    assert started.position == sent_until
    assert call.turn.first_frame == sent_until
    assert [item.word for item in items if isinstance(item, p.Word)] == ["Fine,", "thank", "you."]
    assert any(isinstance(item, AudioFrame) for item in items)


def test_the_next_turn_has_the_greedy_tokens_of_a_runtime_that_rewinds_to_the_last_sent_frame(engine, call, tts):
    """Reference: a one-call stepper of its own generates the agent's turn greedily as far as the
    engine ran it, goes back to the first frame the engine did not send (`FrameStepper.rewind`,
    the state machine's state before that step), then generates the next turn greedily."""
    got = call.test_events
    engine.submit(call, p.Start(text=AGENT, temperature=0.0, seed=3, id="a"))
    collect(got, p.Done)
    resume_at, ran_to = call.turn.next_frame, call.position
    engine.submit(call, p.Inject(text=ANSWER, id="b"))
    collect(got, p.Done)
    compare = call.position - resume_at - engine.stepper.max_delay  # complete frames of the answer
    assert compare > 10
    got_codes = engine.stepper.aligned_codes(call.slot.index, resume_at, resume_at + compare).cpu()
    got_words = call.machine.transcript

    stepper = tts.new_stepper(n_calls=1, cfg=True, max_positions=engine.context_frames)
    stepper.set_sampling(0, SamplingParams(text_temperature=0.0, audio_temperature=0.0, cfg_scale=2.0, seed=3))
    machine = tts.new_state_machine()
    machine.push(parse_script(AGENT, tts.tokenizer, leading_speaker=None, keep_own_speaker=True), final=True)
    generate(stepper, machine, 0, resume_at)
    state_at, text_in = machine.snapshot(), stepper.text_inputs(0)
    generate(stepper, machine, resume_at, ran_to)  # the tail, as the engine ran it
    machine.restore(state_at)
    stepper.rewind(0, resume_at, text_in)
    machine.hold_words(call.settings.lead_in_frames)
    assert not stepper.needs_depformer(0)  # every frame before resume_at is teacher-forced
    machine.push(parse_script(ANSWER, tts.tokenizer, leading_speaker=None, keep_own_speaker=True), final=True)
    generate(stepper, machine, resume_at, call.position)
    assert torch.equal(stepper.aligned_codes(0, resume_at, resume_at + compare).cpu(), got_codes)
    assert machine.transcript == got_words


def test_after_a_callers_turn_the_next_turn_starts_where_it_ended(engine, call):
    """The caller's turn already took the tail back and stands the slot at its own end."""
    got = call.test_events
    engine.submit(call, p.Start(text=AGENT, temperature=0.0, seed=3, id="a"))
    collect(got, p.Done)
    wav = wav_bytes(tone(2.0, 24_000), 24_000)
    cmd = p.UserTurn(audio_b64=base64.b64encode(wav).decode(), format="wav", transcript="yes please")
    engine.submit_user_turn(call, cmd, engine.load_user_turn(cmd))
    appended = collect(got, p.UserTurnDone)[-1]
    engine.submit(call, p.Inject(text=ANSWER, id="b"))
    started = next(item for item in collect(got, p.Done) if isinstance(item, p.Started))
    assert started.position == appended.position


def test_each_next_turn_starts_at_the_last_frame_the_turn_before_sent(engine, call):
    got = call.test_events
    engine.submit(call, p.Start(text=AGENT, temperature=0.0, seed=3, id="a"))
    collect(got, p.Done)
    for n in range(3):
        sent_until = call.turn.next_frame
        engine.submit(call, p.Inject(text=ANSWER, id=f"turn-{n}"))
        items = collect(got, p.Done)
        started = next(item for item in items if isinstance(item, p.Started))
        assert started.position == sent_until
        assert [item.word for item in items if isinstance(item, p.Word)] == ["Fine,", "thank", "you."]


def test_words_after_a_hold_follow_the_last_sent_frame_after_the_lead_in(engine, call):
    """A turn whose text came slower than speech holds once its words are out; the next words
    start right after the last frame it sent (and its lead-in), not after the 18 steps of silent
    tail it made before holding."""
    got = call.test_events
    engine.submit(call, p.Start(text="[S1] Hello there,", final=False, temperature=0.0, seed=3, id="a"))
    deadline = time.monotonic() + 120
    while call.phase is not Phase.HOLDING:  # a hold sends nothing: watch the phase
        assert time.monotonic() < deadline, "never held"
        time.sleep(0.005)
    sent_until, held_at = call.turn.next_frame, call.position
    assert held_at > sent_until
    heard = len(call.machine.words)
    engine.submit(call, p.Inject(text=" my friend."))
    engine.submit(call, p.Flush())
    collect(got, p.Done)
    assert call.machine.words[heard][1] == sent_until + call.settings.lead_in_frames
