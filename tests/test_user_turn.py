"""The caller's turn (`user_turn`, issue 21): the caller's speech enters the call's context as
speaker 2, between agent turns. In process on the tiny checkpoint (random weights: these tests
check positions, order, tokens and errors; no one can hear a quality effect from them)."""

from __future__ import annotations

import base64
import queue

import numpy as np
import pytest
import torch

from vendor_dia2.delays import delay_codes
from vendor_dia2.prefix import forced_text
from vendor_dia2.runtime import PrefillSpan, SamplingParams
from vendor_dia2.script import parse_script

from dia2stream.call.call import AudioFrame
from dia2stream.clock import FRAME_SAMPLES
from dia2stream.engine.engine import Engine
from dia2stream.wire import protocol as p
from dia2stream.wire.formats import alaw_encode, ulaw_encode

from helpers import Client, ServerThread, collect_events as collect, engine_config, server_config, tone, wav_bytes
from engine_fixtures import call, engine, own_tts, tts  # noqa: F401 (fixtures)
from stepping import run_steps as generate

pytestmark = pytest.mark.slow

AGENT = "[S1] Hello there, how are you today?"
CALLER = "yes, it's Smith, S-M-I-T-H"
ANSWER = " Thank you, Mr Smith."


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def user_turn(audio: bytes, fmt: str = "wav", transcript: str = CALLER, **fields) -> p.UserTurn:
    return p.UserTurn(audio_b64=b64(audio), format=fmt, transcript=transcript, **fields)


def words(items) -> list[str]:
    return [i.word for i in items if isinstance(i, p.Word)]


def send_user_turn(engine, call, cmd: p.UserTurn):
    """As the server does: load in this (worker) thread, then queue for the call."""
    engine.submit_user_turn(call, cmd, engine.load_user_turn(cmd))


def speaker_token(tts, tag: str) -> int:
    return int(tts.tokenizer.encode(tag)[0])


# -- the context after a caller's turn ------------------------------------------------------------


def test_user_turn_appends_the_callers_frames_as_s2_and_the_next_turn_answers_as_s1(engine, call, tts):
    got = call.test_events
    engine.submit(call, p.Start(text=AGENT, temperature=0.0, id="a"))
    first = collect(got, p.Done)
    agent_words = words(first)
    resume_at = call.turn.next_frame  # the first frame the agent's turn did not decode
    audio = tone(3.0, 16_000)
    send_user_turn(engine, call, user_turn(wav_bytes(audio, 16_000), id="u"))
    between = collect(got, p.UserTurnDone)
    done = between[-1]
    frames = -(-len(audio) * 24_000 // 16_000 // FRAME_SAMPLES)
    assert done.id == "u" and done.frames == frames
    assert not any(isinstance(i, AudioFrame) for i in between), "the caller's audio is never sent back"
    assert call.position == resume_at + frames == done.position
    caller = [(w, s) for w, s in call.machine.transcript[len(agent_words):]]
    assert [w for w, _ in caller] == CALLER.split()
    assert all(resume_at <= s < resume_at + frames for _, s in caller)  # on the caller's frames

    engine.submit(call, p.Inject(text=ANSWER, id="b"))
    second = collect(got, p.Done)
    assert isinstance(second[0], p.Started) and second[0].position == resume_at + frames
    assert words(second) == ANSWER.split()
    lead_in = call.settings.lead_in_frames
    first_word = next(i for i in second if isinstance(i, p.Word))
    assert first_word.frame == lead_in, first_word  # the answer's lead-in, as after any turn
    assert second[-1].onset_ms == pytest.approx(second[-1].ttfa_ms + lead_in * 80, abs=0.2)
    transcript = call.machine.transcript
    assert [w for w, _ in transcript] == agent_words + CALLER.split() + ANSWER.split()
    assert [s for _, s in transcript] == sorted(s for _, s in transcript)
    # the text the model read: [S2] on the caller's first word, then [S1] on the agent's answer
    text = call.context_text()[:, 0]
    s1, s2 = speaker_token(tts, "[S1]"), speaker_token(tts, "[S2]")
    s2_at = [i for i in np.nonzero(text == s2)[0] if resume_at <= i < resume_at + frames]
    s1_after = [i for i in np.nonzero(text == s1)[0] if i >= resume_at + frames]
    assert s2_at and s1_after and s2_at[0] < s1_after[0]


def test_the_next_turn_has_the_greedy_tokens_of_a_reference_run_with_the_runtime(engine, call, tts):
    """Reference: a one-call stepper of its own generates the agent's turn greedily (the same
    tokens as the engine's: nothing of the engine's batching, slots or lead-in changes them),
    stops at the first frame the engine did not decode, prefills the same caller's audio (Mimi-
    encoded here) and words (forced through its own state machine) at that position, then
    generates the answer greedily. The engine's turn ran past that frame (its silent tail): the
    caller's turn replaces what it left there."""
    got = call.test_events
    engine.submit(call, p.Start(text=AGENT, temperature=0.0, seed=3, id="a"))
    collect(got, p.Done)
    resume_at, ran_to = call.turn.next_frame, call.position
    assert ran_to > resume_at  # the turn's tail ran past the last decoded frame
    agent_codes = engine.stepper.aligned_codes(call.slot.index, 0, resume_at).clone().cpu()
    cmd = user_turn(wav_bytes(tone(2.5, 24_000, freq=330.0), 24_000))
    loaded = engine.load_user_turn(cmd)
    engine.submit_user_turn(call, cmd, loaded)
    collect(got, p.UserTurnDone)
    engine.submit(call, p.Inject(text=ANSWER))
    collect(got, p.Done)
    start = resume_at + loaded.frames
    compare = call.position - start - engine.stepper.max_delay  # complete frames of the answer
    assert compare > 10
    got_codes = engine.stepper.aligned_codes(call.slot.index, start, start + compare).cpu()
    got_words = call.machine.transcript

    stepper = tts.new_stepper(n_calls=1, cfg=True, max_positions=engine.context_frames)
    stepper.set_sampling(0, SamplingParams(text_temperature=0.0, audio_temperature=0.0, cfg_scale=2.0, seed=3))
    machine = tts.new_state_machine()
    machine.push(parse_script(AGENT, tts.tokenizer, leading_speaker=None, keep_own_speaker=True), final=True)
    generate(stepper, machine, 0, resume_at)
    state_at, text_in = machine.snapshot(), stepper.text_inputs(0)
    generate(stepper, machine, resume_at, ran_to)  # the tail, as the engine ran it
    assert torch.equal(stepper.aligned_codes(0, 0, resume_at).cpu(), agent_codes)  # the engine's agent turn
    machine.restore(state_at)
    machine.push(list(loaded.entries), final=True)
    said = forced_text(machine, loaded.steps, loaded.frames, start=resume_at)
    machine.state.lookahead.clear()
    caller_codes = tts.codec.encode(torch.from_numpy(loaded.wav))[0][:, : loaded.frames].cpu()
    d = tts.config.data
    grid = delay_codes(torch.cat([agent_codes, caller_codes], dim=1), list(d.delay_pattern), d.audio_pad)
    stepper.prefill(0, grid[:, resume_at:], torch.cat([torch.tensor([text_in]), said]), loaded.frames,
                    boundary="clean", start=resume_at)
    assert stepper.last_prefill == PrefillSpan(resume_at, loaded.frames)
    machine.hold_words(call.settings.lead_in_frames)  # the answer's lead-in
    machine.push(parse_script(ANSWER, tts.tokenizer, leading_speaker="[S1]", keep_own_speaker=True), final=True)
    generate(stepper, machine, start, call.position)
    assert torch.equal(stepper.aligned_codes(0, start, start + compare).cpu(), got_codes)
    assert machine.transcript == got_words  # the same words at the same steps, the agent's, the caller's, the answer's


def test_a_one_call_stepper_runs_the_engines_turns_token_for_token_beside_another_call(own_tts):
    """Why the reference above is faithful: an engine's call, batched with another call's turn
    (a padded step over two slots) and sampled (not greedy), gets the tokens a fresh one-call
    stepper gets for the same text, seed and positions; the draws are keyed by (seed, position),
    not by slot or batch. (A reference must compare complete frames only: the last max_delay
    aligned frames before a call's position are not all written yet, and an append onto such
    frames is refused by `FrameStepper.prefill`.)"""
    tts = own_tts
    eng = Engine(tts, engine_config(tts, max_lead_ms=1e6, max_calls=2))
    got, other_got = queue.Queue(), queue.Queue()
    call, other = eng.open_call(got.put), eng.open_call(other_got.put)
    try:
        eng.submit(other, p.Start(text="[S1] Someone else is talking on the other slot, for quite a while.", id="o"))
        eng.submit(call, p.Start(text=AGENT, seed=3, id="a"))
        collect(got, p.Done)
        resume_at, mid = call.turn.next_frame, call.position
        eng.submit(call, p.Inject(text=ANSWER, id="b"))
        collect(got, p.Done)
        end = call.position - eng.stepper.max_delay
        engine_codes = eng.stepper.aligned_codes(call.slot.index, 0, end).cpu()
        collect(other_got, p.Done)
    finally:
        eng.close_call(call)
        eng.close_call(other)
        eng.close()
    stepper = tts.new_stepper(n_calls=1, cfg=True, max_positions=eng.context_frames)
    stepper.set_sampling(0, SamplingParams(cfg_scale=2.0, seed=3))
    machine = tts.new_state_machine()
    machine.push(parse_script(AGENT, tts.tokenizer, leading_speaker=None, keep_own_speaker=True), final=True)
    generate(stepper, machine, 0, resume_at)
    state_at, text_in = machine.snapshot(), stepper.text_inputs(0)
    generate(stepper, machine, resume_at, mid)  # the first turn's tail, which the next one takes back
    machine.restore(state_at)
    stepper.rewind(0, resume_at, text_in)
    machine.hold_words(call.settings.lead_in_frames)
    machine.push(parse_script(ANSWER, tts.tokenizer, leading_speaker=None, keep_own_speaker=True), final=True)
    generate(stepper, machine, resume_at, end + stepper.max_delay)
    assert torch.equal(stepper.aligned_codes(0, 0, end).cpu(), engine_codes)


def test_the_callers_turn_prefills_only_its_own_frames_however_long_the_context(engine, call):
    """The prefill appends at the call's position: its work is the caller's frames, the same
    after a short context and after a long one."""
    got = call.test_events
    spans = []
    for turn, text in enumerate((AGENT, " And now a much longer answer, with many more words than the first one had.")):
        engine.submit(call, p.Start(text=text, id=f"a{turn}") if turn == 0 else p.Inject(text=text, id=f"a{turn}"))
        collect(got, p.Done)
        resume_at = call.turn.next_frame
        send_user_turn(engine, call, user_turn(wav_bytes(tone(2.0, 16_000), 16_000), id=f"u{turn}"))
        done = collect(got, p.UserTurnDone)[-1]
        spans.append((engine.stepper.last_prefill, resume_at, done.frames))
    (first, at1, n1), (second, at2, n2) = spans
    assert first == PrefillSpan(at1, n1) and second == PrefillSpan(at2, n2)
    assert at2 > 2 * at1 and n1 == n2 == 25  # a longer context, the same work


# -- when a caller's turn is accepted -------------------------------------------------------------


def test_user_turn_while_generating_is_busy_and_the_utterance_goes_on(own_tts):
    tts = own_tts
    eng = Engine(tts, engine_config(tts, max_lead_ms=400))  # paced: the utterance takes a while
    got = queue.Queue()
    call = eng.open_call(got.put)
    try:
        eng.submit(call, p.Start(text="[S1] One two three four five six seven eight nine ten.", id="a"))
        collect(got, p.Started)
        send_user_turn(eng, call, user_turn(wav_bytes(tone(3.0, 8_000), 8_000), id="u"))
        items = []
        while not isinstance(item := got.get(timeout=120), p.Done):
            items.append(item)
        errors = [i for i in items if isinstance(i, p.ErrorEvent)]
        assert [(e.code, e.id, e.cmd) for e in errors] == [("busy", "u", "user_turn")]
        assert not any(isinstance(i, p.UserTurnDone) for i in items)
        assert words(items) == "One two three four five six seven eight nine ten.".split()
    finally:
        eng.close_call(call)
        eng.close()


def test_after_a_barge_in_the_callers_turn_follows_the_heard_point_and_inject_begins_a_new_turn(engine, call):
    got = call.test_events
    text = "[S1] One two three four five six seven eight nine ten."
    engine.submit(call, p.Start(text=text, seed=4, id="a"))
    collect(got, p.Done)
    heard = 6
    target = call.turn.send_from + heard
    engine.submit(call, p.Pause(played_ms=heard * 80.0, id="barge"))
    paused = collect(got, p.Paused)[-1]
    spoken = [w["word"] for w in paused.spoken]
    assert paused.unspoken and call.position == target
    send_user_turn(engine, call, user_turn(bytes(ulaw_encode((tone(2.0, 8_000) * 32767).astype(np.int16))),
                                           fmt="ulaw_8000", transcript="wait, stop", id="u"))
    done = collect(got, p.UserTurnDone)[-1]
    assert done.position == call.position == target + done.frames  # from the heard point on
    engine.submit(call, p.Resume(id="r"))
    err = got.get(timeout=60)
    assert isinstance(err, p.ErrorEvent) and err.code == "not_paused"  # the paused utterance ended there
    engine.submit(call, p.Inject(text=" Sorry, go ahead.", id="x"))
    after = collect(got, p.Done)
    assert isinstance(after[0], p.Started) and after[0].position == target + done.frames
    assert words(after) == ["Sorry,", "go", "ahead."]  # the words the caller did not hear are gone
    assert [w for w, _ in call.machine.transcript] == spoken + ["wait,", "stop"] + ["Sorry,", "go", "ahead."]
    # a later barge-in is about the agent's words only
    engine.submit(call, p.Pause(played_ms=80.0, id="p2"))
    again = collect(got, p.Paused)[-1]
    assert [w["word"] for w in again.spoken] + again.unspoken == ["Sorry,", "go", "ahead."]


def test_user_turn_before_any_start_is_not_started(engine, call):
    send_user_turn(engine, call, user_turn(wav_bytes(tone(3.0, 16_000), 16_000), id="u"))
    err = call.test_events.get(timeout=60)
    assert isinstance(err, p.ErrorEvent) and (err.code, err.id) == ("not_started", "u")


# -- context: user turns count, rollover keeps both speakers --------------------------------------


def find_block(codes: torch.Tensor, block: torch.Tensor) -> list[int]:
    """Frames where `block` [Q, N] starts inside `codes` [Q, F]."""
    n = block.shape[1]
    return [i for i in range(codes.shape[1] - n + 1) if torch.equal(codes[:, i:i + n], block)]


def test_rollover_with_caller_turns_keeps_both_speakers_recent_frames(own_tts):
    tts = own_tts
    eng = Engine(tts, engine_config(tts, max_lead_ms=1e6, context_frames=330, rollover_frames=150))
    got = queue.Queue()
    call = eng.open_call(got.put)
    try:
        s1, s2 = speaker_token(tts, "[S1]"), speaker_token(tts, "[S2]")
        eng.submit(call, p.Start(text="[S1] One two three four five six.", temperature=0.0, id="a"))
        collect(got, p.Done)
        audios = [tone(2.0, 16_000, freq=200.0 + 60 * i) for i in range(6)]
        blocks = []
        turn = 0
        while call.rollovers == 0:
            assert turn < 6, "the context never rolled over"
            cmd = user_turn(wav_bytes(audios[turn], 16_000), transcript=f"caller turn {turn}")
            loaded = eng.load_user_turn(cmd)
            blocks.append(tts.codec.encode(torch.from_numpy(loaded.wav))[0][:, : loaded.frames].cpu())
            eng.submit_user_turn(call, cmd, loaded)
            collect(got, p.UserTurnDone)
            if call.rollovers:
                break
            eng.submit(call, p.Inject(text=f" Answer number {turn}.", id=f"i{turn}"))
            collect(got, p.Done)
            turn += 1
        assert call.position <= eng.context_frames - eng.config.min_turn_frames
        codes = eng.stepper.aligned_codes(call.slot.index, 0, call.position).cpu()
        last, previous = find_block(codes, blocks[-1]), find_block(codes, blocks[-2])
        assert last == [call.position - blocks[-1].shape[1]]  # the caller's newest turn ends the context
        assert previous and previous[0] < last[0]  # the caller's turn before it was kept too ...
        text = call.context_text()[:, 0]
        between = text[previous[0] + blocks[-2].shape[1]:last[0]]
        assert s1 in between  # ... and the agent's answer between them
        assert s2 in text[previous[0]:previous[0] + blocks[-2].shape[1]]
        # the conversation goes on after it
        eng.submit(call, p.Inject(text=" Right.", id="z"))
        assert words(collect(got, p.Done)) == ["Right."]
    finally:
        eng.close_call(call)
        eng.close()


# -- hostile input through the server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def small_server():
    srv = ServerThread(server_config(log_level="WARNING", mimi="random-small", max_lead_ms=1e6)).start()
    yield srv
    srv.stop()


def raw_user_turn(audio: str, fmt: str = "wav", transcript: str = CALLER, **fields) -> dict:
    return {"cmd": "user_turn", "audio": audio, "format": fmt, "transcript": transcript, **fields}


NAN_WAV = wav_bytes(np.where(np.arange(16_000) % 100 == 0, np.nan, 0.2).astype(np.float32), 16_000, subtype="FLOAT")
TEN_MINUTES_ULAW = bytes(ulaw_encode((tone(600.0, 8_000) * 32767).astype(np.int16)))
HOSTILE = [
    ("bad base64", raw_user_turn("not base64!!"), "invalid_field", "base64"),
    ("unknown format", raw_user_turn(b64(b"\x00" * 100), fmt="mp3"), "invalid_field", "format"),
    ("ten minutes", raw_user_turn(b64(TEN_MINUTES_ULAW), fmt="ulaw_8000"), "bad_audio", "limit"),
    ("NaN samples", raw_user_turn(b64(NAN_WAV)), "bad_audio", "NaN"),
    ("silence", raw_user_turn(b64(bytes(3200)), fmt="pcm_16000"), "bad_audio", "silent"),
    ("corrupt file", raw_user_turn(b64(b"RIFF" + bytes(40))), "bad_audio", "corrupt"),
    ("wav sent as flac", raw_user_turn(b64(wav_bytes(tone(1.0, 16_000), 16_000)), fmt="flac"), "bad_audio", "WAV"),
    ("odd pcm bytes", raw_user_turn(b64(b"\x01" * 1001), fmt="pcm_8000"), "bad_audio", "whole"),
    ("words not the transcript's", raw_user_turn(b64(wav_bytes(tone(2.0, 16_000), 16_000)), transcript="one two",
                                                  words=[{"word": "one", "start_s": 0.1, "end_s": 0.5}]),
     "invalid_field", "transcript has 2"),
    ("words of other speech", raw_user_turn(b64(wav_bytes(tone(2.0, 16_000), 16_000)), transcript="yes it's Smith",
                                            words=[{"word": w, "start_s": 0.1 + 0.5 * k, "end_s": 0.5 + 0.5 * k}
                                                   for k, w in enumerate(["No,", "it's", "Smith."])]),
     "invalid_field", "not the transcript's word 1"),
    ("words past the audio", raw_user_turn(b64(wav_bytes(tone(1.0, 16_000), 16_000)), transcript="one",
                                           words=[{"word": "one", "start_s": 0.1, "end_s": 9.0}]),
     "invalid_field", "after the end"),
    ("words out of order", raw_user_turn(b64(wav_bytes(tone(2.0, 16_000), 16_000)), transcript="a b",
                                         words=[{"word": "a", "start_s": 1.0, "end_s": 1.5},
                                                {"word": "b", "start_s": 0.2, "end_s": 0.4}]),
     "invalid_field", "in order"),
    ("transcript too long for the audio", raw_user_turn(b64(wav_bytes(tone(0.5, 16_000), 16_000)),
                                                        transcript=" ".join(["word"] * 40)),
     "invalid_field", "do not fit"),
]


async def test_hostile_user_turns_get_coded_errors_and_the_call_goes_on(small_server):
    client, _ = await Client.open(small_server.url)
    try:
        await client.send(cmd="start", text=AGENT, id="a")
        await client.until("done", id="a")
        for i, (why, message, code, says) in enumerate(HOSTILE):
            await client.send(**message, id=i)
            err = await client.event(timeout=60)
            assert (err["event"], err.get("code"), err.get("id")) == ("error", code, i), (why, err)
            assert says in err["message"], (why, err["message"])
        frames_before = client.count("frame")
        audio = (tone(3.0, 8_000) * 32767).astype(np.int16)
        await client.send(**raw_user_turn(b64(bytes(alaw_encode(audio))), fmt="alaw_8000",
                                          words=[{"word": w, "start_s": 0.2 + 0.5 * k, "end_s": 0.6 + 0.5 * k}
                                                 for k, w in enumerate(CALLER.split())]), id="ok")
        done = await client.until("user_turn_done", id="ok")
        assert done["frames"] == 38 and done["prefill_ms"] >= 0  # 3 s: 37.5 frames, the last one padded
        assert not await client.quiet(0.3)  # no audio for the caller's turn
        assert client.count("frame") == frames_before
        await client.send(cmd="inject", text=ANSWER, id="b")
        started = await client.until("started", id="b")
        assert started["position"] == done["position"]
        await client.until("done", id="b")
    finally:
        await client.close()



async def test_test_client_sends_a_user_turn_between_turns(small_server, tmp_path, capsys):
    import asyncio

    import test_client as tc

    path = tmp_path / "caller.wav"
    path.write_bytes(wav_bytes(tone(3.0, 16_000), 16_000))
    argv = [AGENT, "--url", small_server.url, "--user-turn", str(path), CALLER, "--inject", ANSWER,
            "-o", str(tmp_path / "out.wav"), "--timeout", "120"]
    assert await asyncio.to_thread(tc.main, argv) == 0
    out = capsys.readouterr().out
    assert '"cmd": "user_turn"' in out and "user_turn_done" in out
    assert out.index("user_turn_done") < out.index('"id": "inject-1"')  # the answer follows the caller's turn


def test_an_inject_sent_right_behind_the_user_turn_waits_for_its_prefill(engine, call):
    got = call.test_events
    engine.submit(call, p.Start(text=AGENT, id="a"))
    collect(got, p.Done)
    send_user_turn(engine, call, user_turn(wav_bytes(tone(3.0, 16_000), 16_000), id="u"))
    engine.submit(call, p.Inject(text=ANSWER, id="b"))  # no wait for user_turn_done: an LLM's first words
    items = collect(got, p.Done)
    events = [i for i in items if not isinstance(i, AudioFrame)]
    assert isinstance(events[0], p.UserTurnDone) and isinstance(events[1], p.Started)
    assert events[1].position == events[0].position  # the answer begins after the caller's turn
    assert words(items) == ANSWER.split()


def test_two_caller_turns_in_a_row_append_one_after_the_other(engine, call):
    got = call.test_events
    engine.submit(call, p.Start(text=AGENT, id="a"))
    collect(got, p.Done)
    resume_at = call.turn.next_frame
    send_user_turn(engine, call, user_turn(wav_bytes(tone(3.0, 16_000), 16_000), transcript="hello there", id="u1"))
    send_user_turn(engine, call, user_turn(wav_bytes(tone(3.0, 8_000, freq=300.0), 8_000), transcript="are you",
                                           id="u2"))
    first, second = collect(got, p.UserTurnDone)[-1], collect(got, p.UserTurnDone)[-1]
    assert (first.id, second.id) == ("u1", "u2")
    assert first.position == resume_at + first.frames and second.position == first.position + second.frames
    assert [w for w, _ in call.machine.transcript][-4:] == ["hello", "there", "are", "you"]
    engine.submit(call, p.Inject(text=ANSWER, id="b"))
    assert words(collect(got, p.Done)) == ANSWER.split()
