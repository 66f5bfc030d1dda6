"""Voice cloning (issue 5): prefix plan + parallel prefill, the turn boundary, restore by copy,
save/load, and the set_voice/voices/start-with-voice protocol over a real server.

Everything runs on the tiny random checkpoint with a few hundred ms of synthetic audio written
with soundfile; transcripts are always supplied (nothing downloads whisper weights)."""

from __future__ import annotations

import base64
import io
import json
import queue
import time
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from dia2stream.wire import protocol as p
from dia2stream.serve.config import parse_args
from dia2stream.serve.build import parse_voice_spec
from dia2stream.call.call import AudioFrame
from dia2stream.engine.engine import Engine
from helpers import Client, ServerThread, engine_config, server_config
from dia2stream.voices.voice import (VoiceError, VoicePreparer, VoiceRequest, VoiceSettings, VoiceState, align_transcript,
                              read_audio, resolve_path, restore_voice)
from vendor_dia2.prefix import PrefixSpeaker, build_prefix_plan, warm_up_text
from vendor_dia2.tokenizer import step0_bos_id
from dia2stream.voices import voice as v
from dia2stream.voices.voice import VoiceCache


TRANSCRIPT = "[S1] Hi there."


def tone(seconds: float = 0.6, rate: int = 16_000, amp: float = 0.3, seed: int = 0, channels: int = 1) -> np.ndarray:
    """A 'voiced' tone burst with a little noise, short silences at both ends."""
    n = int(seconds * rate)
    t = np.arange(n) / rate
    rng = np.random.default_rng(seed)
    wav = amp * np.sin(2 * np.pi * (180 + 40 * seed) * t) + 0.02 * rng.standard_normal(n)
    edge = int(0.08 * rate)
    wav[:edge] = 0
    wav[-edge:] = 0
    wav = wav.astype(np.float32)
    return np.stack([wav] * channels, axis=1) if channels > 1 else wav


def wav_bytes(wav: np.ndarray, rate: int = 16_000, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wav, rate, format=fmt)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Audio and alignment
# ---------------------------------------------------------------------------------------------


def test_read_audio_mono_resample_and_errors(tmp_path):
    wav = read_audio(wav_bytes(tone(0.5, channels=2)), 30.0)
    assert wav.dtype == np.float32 and abs(len(wav) - 12_000) <= 1  # 0.5 s at 24 kHz
    flac = read_audio(wav_bytes(tone(0.5, rate=48_000), rate=48_000, fmt="FLAC"), 30.0)
    assert abs(len(flac) - 12_000) <= 1
    cases = {b"": "empty", b"RIFF\x00\x00garbage-not-audio" * 10: "unreadable",
             wav_bytes(np.zeros(8000, np.float32)): "silent", wav_bytes(np.zeros(0, np.float32)): "no samples",
             wav_bytes(tone(3.0)): "longer"}
    for data, words in cases.items():
        with pytest.raises(VoiceError) as err:
            read_audio(data, 2.0)
        assert err.value.code == "bad_audio" and words in err.value.message, err.value.message


def test_resolve_path_inside_allowed_folder_only(tmp_path):
    allowed = tmp_path / "voices"
    allowed.mkdir()
    (allowed / "a.wav").write_bytes(wav_bytes(tone()))
    (tmp_path / "secret.wav").write_bytes(wav_bytes(tone()))
    assert resolve_path("a.wav", str(allowed)) == (allowed / "a.wav").resolve()
    assert resolve_path(str(allowed / "a.wav"), str(allowed)) == (allowed / "a.wav").resolve()
    for bad, folder in [("../secret.wav", str(allowed)), (str(tmp_path / "secret.wav"), str(allowed)),
                        ("a.wav", None)]:
        with pytest.raises(VoiceError) as err:
            resolve_path(bad, folder)
        assert err.value.code == "path_not_allowed"


def test_supplied_transcript_spreads_words_over_the_voiced_span():
    wav = read_audio(wav_bytes(tone(1.0)), 30.0)
    words = align_transcript("[S1] Hello there, friend.", wav)
    assert [w.word for w in words] == ["Hello", "there,", "friend."]
    assert words[0].start_s == pytest.approx(0.08, abs=0.03) and words[-1].end_s == pytest.approx(0.92, abs=0.03)
    assert all(a.end_s == pytest.approx(b.start_s) for a, b in zip(words, words[1:]))
    assert words[1].end_s - words[1].start_s > words[0].end_s - words[0].start_s  # longer word, longer span


def test_no_transcript_and_no_whisper_weights_is_transcript_required(tiny_tts, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    prep = VoicePreparer(tiny_tts, VoiceSettings(cache_dir=str(tmp_path)))
    with pytest.raises(VoiceError) as err:
        prep.load(VoiceRequest("x", audio=wav_bytes(tone())))
    assert err.value.code == "transcript_required" and "transcript" in err.value.message


def test_server_voice_spec_and_flags(tmp_path):
    req = parse_voice_spec("alice=/v/a.wav,Hi, I am Alice.")
    assert (req.name, req.path, req.transcript, req.trusted) == ("alice", "/v/a.wav", "Hi, I am Alice.", True)
    assert parse_voice_spec("bob=/v/b.wav").transcript is None
    cfg = parse_args(["--voice", "a=x.wav", "--voice", "b=y.wav,Yo.", "--voice-dir", str(tmp_path)], environ={})
    assert cfg.voices == ("a=x.wav", "b=y.wav,Yo.") and cfg.voice_dir == str(tmp_path)
    assert parse_args([], environ={"DIA2_VOICE": "a=x.wav;b=y.wav", "DIA2_VOICE_DIR": str(tmp_path)}).voices == ("a=x.wav", "b=y.wav")
    assert parse_args([], environ={}).prefix_boundary == "upstream"
    assert parse_args(["--prefix-boundary", "clean"], environ={}).prefix_boundary == "clean"
    assert parse_args([], environ={"DIA2_PREFIX_BOUNDARY": "clean"}).prefix_boundary == "clean"
    with pytest.raises(SystemExit):
        parse_args(["--prefix-boundary", "forced"], environ={})


# ---------------------------------------------------------------------------------------------
# Prefill over a real prefix plan
# ---------------------------------------------------------------------------------------------


def _plan(tts, seconds=(0.5, 0.4)):
    d = tts.config.data
    speakers = []
    for i, (sec, tag) in enumerate(zip(seconds, ("[S1]", "[S2]"))):
        wav = read_audio(wav_bytes(tone(sec, seed=i)), 30.0)
        codes = tts.codec.encode(torch.from_numpy(wav))[0].cpu()
        speakers.append(PrefixSpeaker(codes, align_transcript("Hi there." if i == 0 else "Yes.", wav), tag))
    return build_prefix_plan(speakers, tts.tokenizer, d.delay_pattern, d.audio_bos, d.audio_pad, fit_words=True)


def test_prefix_plan_consumes_every_word_during_warm_up(tiny_tts):
    d = tiny_tts.config.data
    plan = _plan(tiny_tts)
    assert plan.frames == sum(plan.speaker_frames) and plan.delayed.shape[1] == plan.frames + d.max_delay
    for k, delay in enumerate(d.delay_pattern):
        assert (plan.delayed[k, :delay] == d.audio_bos).all()
        assert torch.equal(plan.delayed[k, delay:delay + plan.frames], plan.aligned[k])
    assert plan.steps == sorted(plan.steps) and plan.steps[0] >= 3  # speaker 1 shifted by +3
    machine = tiny_tts.new_state_machine()
    text = warm_up_text(machine, plan, d.text_pad_token_id, step0_bos_id(tiny_tts.tokenizer))
    assert text.shape == (plan.frames + 1, 2)
    assert text[0].tolist() == [step0_bos_id(tiny_tts.tokenizer), d.text_pad_token_id]  # a fresh call's step 0
    assert machine.remaining_entries == 0 and not machine.state.pending
    assert [w for w, _ in machine.transcript] == [e.text for e in plan.entries]
    assert [s for _, s in machine.transcript] == plan.steps


def test_prefill_matches_frame_by_frame_warm_up_over_a_prefix_plan(tiny_tts):
    d = tiny_tts.config.data
    plan = _plan(tiny_tts)
    text = warm_up_text(tiny_tts.new_state_machine(), plan, d.text_pad_token_id, step0_bos_id(tiny_tts.tokenizer))
    frames = plan.frames
    stepper = tiny_tts.stepper(cfg=True)
    model = tiny_tts.model

    def next_logits(tokens, caches):
        with torch.inference_mode():
            action, cb0, _ = model.transformer(tokens[:, None].clone(), torch.full((2, 1), frames), caches)
        return action.clone(), cb0.clone()

    def own_caches():
        return model.new_caches(2, stepper.max_positions + 2)[0]

    stepper.reset_call(0)
    stepper.prefill(0, plan.delayed, text, frames, chunk=16)  # several chunks
    caches = [(k[:, :, :frames], v[:, :, :frames]) for k, v in stepper.snapshot(0).caches]
    tokens = stepper.step_inputs(0)
    prefilled = own_caches()
    for cache, (k, v) in zip(prefilled, caches):
        cache.k[:, :, :frames], cache.v[:, :, :frames] = k, v
    parallel = next_logits(tokens, prefilled)

    stepped = own_caches()
    with torch.inference_mode():
        for t in range(frames):
            toks = torch.empty(2, 1, d.channels, dtype=torch.long)
            toks[:, 0, 2:] = plan.delayed[:, t]
            toks[0, 0, :2] = text[t]
            toks[1, 0, :2] = torch.tensor([d.text_zero_token_id, d.text_pad_token_id])
            model.transformer(toks, torch.full((2, 1), t), stepped)
    for (k1, v1), cache in zip(caches, stepped):
        torch.testing.assert_close(k1, cache.k[:, :, :frames], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(v1, cache.v[:, :, :frames], atol=1e-4, rtol=1e-4)
    sequential = next_logits(tokens, stepped)
    for a, b in zip(parallel, sequential):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# The session: turn boundary, restore by copy, save/load
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["upstream", "clean"])
def voiced_session(tiny_tts, tmp_path_factory, request):
    """An engine with one call and a prepared voice, under either prefix boundary (the default
    first: upstream's)."""
    cache = tmp_path_factory.mktemp("voices")
    engine = Engine(tiny_tts, engine_config(tiny_tts, max_lead_ms=1e6, voice=VoiceSettings(cache_dir=str(cache)),
                                           prefix_boundary=request.param))
    got: queue.Queue = queue.Queue()
    call = engine.open_call(got.put)
    assert call is not None
    state = engine.preload_voice(VoiceRequest("v", audio=wav_bytes(tone(0.8)), transcript="[S1] Hi there."), cache=False)
    yield (engine, call), got, state
    engine.close()


def _turn(session, got, text="[S1] Good morning.", seed=7, voice="v"):
    engine, call = session
    engine.submit(call, p.Start(text=text, voice=voice, seed=seed, id="t"))
    items = []
    while True:
        item = got.get(timeout=60)
        items.append(item)
        assert not isinstance(item, p.ErrorEvent), item
        if isinstance(item, p.Done):
            break
    # the generation thread is idle now; its buffer holds this turn
    frames = [i.pcm for i in items if isinstance(i, AudioFrame)]
    words = [i.word for i in items if isinstance(i, p.Word)]
    started = next(i for i in items if isinstance(i, p.Started))
    first_word = next(i for i in items if isinstance(i, p.Word))
    # silence before the first word is not sent (the lead-in cannot reach back into the prefix)
    assert first_word.frame <= engine.config.lead_in_frames
    return started, frames, words, engine.stepper.written_codes(call.slot.index).clone(), engine.stepper.position(call.slot.index)


def test_turn_speaks_only_its_words_and_continues_the_prefix(voiced_session, tiny_tts):
    session, got, state = voiced_session
    d = tiny_tts.config.data
    upstream = session[0].config.prefix_boundary == "upstream"
    started, frames, words, buffer, end = _turn(session, got)
    F = state.prefix_frames
    # upstream's boundary runs position F-1 again (docs/parity.md P6)
    assert started.voice == "v" and started.position == (F - 1 if upstream else F)
    assert words == ["Good", "morning."]  # no prefix word is spoken again
    assert frames
    aligned = torch.stack([buffer[k, delay:delay + end + 1 - d.max_delay] for k, delay in enumerate(d.delay_pattern)])
    prefix = torch.stack([state.stepper.buffer[0, k, delay:delay + F] for k, delay in enumerate(d.delay_pattern)])
    for k, delay in enumerate(d.delay_pattern):
        # prefix frames whose delayed column lies before F are never written again; the clean
        # boundary teacher-forces the rest, upstream's samples them (docs/parity.md P5)
        assert torch.equal(aligned[k, :F - delay], prefix[k, :F - delay])
        assert torch.equal(aligned[k, F - delay:F], prefix[k, F - delay:F]) != upstream
    assert (aligned[:, F - d.max_delay:F + 8] < 2048).all() and (aligned[:, F - d.max_delay:F + 8] >= 0).all()
    # the turn's audio starts at its first word less the lead-in, after the prefix end: one frame
    # per aligned frame from there on
    send_from = session[1].turn.send_from
    assert send_from >= F
    assert len(frames) == aligned.shape[1] - send_from


def test_restore_is_a_copy(voiced_session):
    session, got, state = voiced_session
    before = [t.clone() for t in (state.stepper.buffer, *state.stepper.caches[0])]
    _, frames1, words1, buf1, end1 = _turn(session, got, seed=11)
    _, frames2, words2, buf2, end2 = _turn(session, got, seed=11)
    assert end1 == end2 and words1 == words2 and torch.equal(buf1[:, :end1 + 1], buf2[:, :end2 + 1])
    assert len(frames1) == len(frames2) and all(np.array_equal(a, b) for a, b in zip(frames1, frames2))
    for a, b in zip(before, (state.stepper.buffer, *state.stepper.caches[0])):
        assert torch.equal(a, b)  # generation never writes into the prepared state


def test_a_restored_voice_tells_the_slots_next_text_inputs_from_the_host(voiced_session, tmp_path):
    """A call's start takes its next step's text inputs from the voice's host copy (row F of
    `text_tokens`), not by reading the slot on the device, which would wait for the step in
    flight; and the snapshot's place is on the host for the same reason."""
    session, got, state = voiced_session
    engine, call = session
    state.save(tmp_path / "v")
    for voice in (state, VoiceState.load(tmp_path / "v")):
        assert voice.stepper.positions.device.type == voice.stepper.prefix_frames.device.type == "cpu"
        assert voice.text_tokens.device.type == "cpu"
        restore_voice(voice, engine.stepper, call.machine, engine.codec, call.slot.index)
        assert tuple(int(t) for t in voice.text_tokens[voice.prefix_frames]) == \
            engine.stepper.text_inputs(call.slot.index)
        assert engine.stepper.position(call.slot.index) == int(voice.stepper.positions[0])


def test_restore_time_and_save_load_round_trip(voiced_session, tmp_path, capsys):
    session, got, state = voiced_session
    state.save(tmp_path / "v")
    loaded = VoiceState.load(tmp_path / "v")
    assert (loaded.name, loaded.prefix_frames, loaded.prefix_s, loaded.speakers, loaded.words) == \
        (state.name, state.prefix_frames, state.prefix_s, state.speakers, state.words)
    for f in ("positions", "tokens", "buffer", "prefix_frames"):
        assert torch.equal(getattr(loaded.stepper, f), getattr(state.stepper, f)), f
    assert loaded.stepper.length == state.stepper.length
    upstream = session[0].config.prefix_boundary == "upstream"
    assert loaded.stepper.cache_offset == state.stepper.cache_offset == int(upstream)
    for (k1, v1), (k2, v2) in zip(loaded.stepper.caches, state.stepper.caches):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    assert loaded.text == state.text
    # an entry saved before the cache offset existed (a clean-boundary state) still loads, offset 0
    meta = json.loads((tmp_path / "v" / "voice.json").read_text())
    del meta["stepper"]["cache_offset"]
    (tmp_path / "v" / "voice.json").write_text(json.dumps(meta))
    assert VoiceState.load(tmp_path / "v").stepper.cache_offset == 0
    assert loaded.codec.states.keys() == state.codec.states.keys()
    for module, fields in state.codec.states.items():
        for name, value in fields.items():
            other = loaded.codec.states[module][name]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), (module, name)
            elif isinstance(value, dict):
                assert all(torch.equal(value[s], other[s]) for s in value)
            else:
                assert value == other
    # restore cost (on the generation thread's objects; the session is idle)
    t0 = time.perf_counter()
    for _ in range(5):
        engine, call = session
        restore_voice(loaded, engine.stepper, call.machine, engine.codec, call.slot.index)
    ms = (time.perf_counter() - t0) * 200
    with capsys.disabled():
        print(f"\n[voice] prefix {state.prefix_s} s ({state.prefix_frames} frames): prepare {state.prepare_ms} ms, "
              f"restore {ms:.2f} ms")


# ---------------------------------------------------------------------------------------------
# Over the real server
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def voice_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("voice-server")
    allowed = root / "allowed"
    allowed.mkdir()
    (allowed / "bob.wav").write_bytes(wav_bytes(tone(0.6, seed=1)))
    (root / "outside.wav").write_bytes(wav_bytes(tone(0.6, seed=2)))
    srv = ServerThread(server_config(log_level="WARNING",
                                    voice_dir=str(allowed), voice_cache=str(root / "cache"), max_voice_seconds=2.0,
                                    voices=(f"alice={allowed / 'bob.wav'},[S1] Hello there.",))).start()
    srv.root = root
    yield srv
    srv.stop()


async def test_ready_lists_preloaded_voice_and_start_uses_it(voice_server):
    client, ready = await Client.open(voice_server.url)
    try:
        assert ready["voices"] == ["alice"]
        await client.send(cmd="voices", id=1)
        listing = await client.until("voices", id=1)
        assert [v["name"] for v in listing["voices"]] == ["alice"] and listing["voices"][0]["speakers"] == 1
        await client.send(cmd="start", text="[S1] Hi.", id="a")
        started = await client.until("started", id="a")
        assert started["voice"] == "alice" and started["position"] > 0
        await client.until("done", id="a")
        words = [e["word"] for e in client.events("word")]
        assert words == ["Hi."]
    finally:
        await client.close()


async def test_set_voice_errors_leave_the_current_voice_untouched(voice_server):
    client, _ = await Client.open(voice_server.url)
    good = base64.b64encode(wav_bytes(tone(0.5, seed=3))).decode()
    cases = [
        (dict(audio=base64.b64encode(b"not audio at all" * 20).decode(), transcript="Hi."), "bad_audio"),
        (dict(audio=base64.b64encode(wav_bytes(np.zeros(0, np.float32))).decode(), transcript="Hi."), "bad_audio"),
        (dict(audio=base64.b64encode(wav_bytes(np.zeros(8000, np.float32))).decode(), transcript="Hi."), "bad_audio"),
        (dict(audio=base64.b64encode(wav_bytes(tone(2.5))).decode(), transcript="Hi."), "bad_audio"),
        (dict(path=str(voice_server.root / "outside.wav"), transcript="Hi."), "path_not_allowed"),
        (dict(path="../outside.wav", transcript="Hi."), "path_not_allowed"),
        (dict(audio=good), "transcript_required"),
    ]
    try:
        for i, (fields, code) in enumerate(cases):
            await client.send(cmd="set_voice", name="alice", id=i, **fields)
            err = await client.event()
            assert err["event"] == "error" and err["code"] == code and err["id"] == i, err
            assert err["cmd"] == "set_voice"
        await client.send(cmd="start", text="[S1] Hi.", voice="nobody", id="u")
        err = await client.event()
        assert err["code"] == "unknown_voice" and err["id"] == "u"
        await client.send(cmd="reset", voice="nobody", id="r")
        assert (await client.event())["code"] == "unknown_voice"
        await client.send(cmd="voices", id="l")
        listing = await client.until("voices", id="l")
        assert [v["name"] for v in listing["voices"]] == ["alice"]
        # alice is still the voice it was: the same start gives the same audio as before the errors
        await client.send(cmd="reset", id="r2")
        assert (await client.until("reset", id="r2"))["voice"] == "alice"
        await client.send(cmd="start", text="[S1] Hi.", seed=5, id="s")
        assert (await client.until("started", id="s"))["voice"] == "alice"
        await client.until("done", id="s")
    finally:
        await client.close()


async def test_set_voice_then_switch_by_start_and_reset(voice_server):
    client, _ = await Client.open(voice_server.url)
    try:
        audio = base64.b64encode(wav_bytes(tone(0.5, seed=4))).decode()
        await client.send(cmd="set_voice", name="carol", audio=audio, transcript="[S1] Hey.", id="sv")
        ready = await client.until("voice_ready", id="sv", timeout=120)
        assert ready["name"] == "carol" and ready["speakers"] == 1 and ready["prefix_s"] > 0 and ready["prepare_ms"] > 0
        await client.send(cmd="set_voice", name="dave", path="bob.wav", transcript="Yo.",
                          speaker2_audio=audio, speaker2_transcript="Hey.", id="sv2")
        ready2 = await client.until("voice_ready", id="sv2", timeout=120)
        assert ready2["speakers"] == 2
        await client.send(cmd="voices", id="l")
        names = [v["name"] for v in (await client.until("voices", id="l"))["voices"]]
        assert names == ["alice", "carol", "dave"]
        await client.send(cmd="start", text="[S1] Hi.", voice="carol", id="c")
        started = await client.until("started", id="c")
        # the server's default boundary (upstream's) starts the turn at the last prefix position again
        assert started["voice"] == "carol" and started["position"] == round(ready["prefix_s"] * 12.5) - 1
        await client.until("done", id="c")
        await client.send(cmd="reset", voice="dave", id="r")
        assert (await client.until("reset", id="r"))["voice"] == "dave"
        await client.send(cmd="start", text="[S1] Hi.", id="d")
        assert (await client.until("started", id="d"))["voice"] == "dave"
        await client.until("done", id="d")
    finally:
        await client.close()


# --- voice input under abuse: refused from the header, a bounded disk cache -------------------------

def constant_flac(seconds: float, channels: int, rate: int = 48_000) -> bytes:
    """A constant signal compresses to almost nothing in FLAC: small on the wire, huge decoded."""
    buf = io.BytesIO()
    block = np.full((rate, channels), 0.25, dtype=np.float32)
    with sf.SoundFile(buf, "w", samplerate=rate, channels=channels, format="FLAC", subtype="PCM_16") as f:
        for _ in range(int(seconds)):
            f.write(block)
    return buf.getvalue()


def short_wav(seconds=0.5, channels=1, rate=16_000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    wav = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, np.stack([wav] * channels, axis=1), rate, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = constant_flac(60, 8)  # 60 s x 8 ch x 48 kHz: 92 MB as float32, ~30 KB as FLAC
    assert len(data) < 200_000
    return data


def no_decode(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the audio was decoded before its header was checked")

    monkeypatch.setattr(v.sf, "read", refuse)


def test_long_many_channel_flac_is_refused_from_the_header_without_decoding(bomb, monkeypatch):
    no_decode(monkeypatch)
    with pytest.raises(VoiceError) as info:
        read_audio(bomb, 30.0, max_channels=8)  # channels allowed: the length alone refuses it
    assert info.value.code == "bad_audio" and "longer than" in info.value.message
    with pytest.raises(VoiceError) as info:
        read_audio(bomb, 300.0)  # long enough: the channel count refuses it
    assert info.value.code == "bad_audio" and "8 channels" in info.value.message


def test_refusing_a_bomb_costs_little_memory(bomb):
    tracemalloc.start()
    try:
        with pytest.raises(VoiceError):
            read_audio(bomb, 30.0, max_channels=8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024  # the old code decoded all of it first: ~92 MB


@pytest.mark.parametrize("data, words", [
    (short_wav(channels=3), "3 channels"),
    (short_wav(seconds=3.0), "longer than"),
    (short_wav(rate=4_000), "sample rate 4000"),
])
def test_header_checks(data, words, monkeypatch):
    no_decode(monkeypatch)
    with pytest.raises(VoiceError) as info:
        read_audio(data, 2.0)
    assert info.value.code == "bad_audio" and words in info.value.message


def test_decode_is_bounded_even_if_the_header_understates(monkeypatch):
    seen = {}
    real = v.sf.read

    def spy(file, *args, **kwargs):
        seen.update(kwargs)
        return real(file, *args, **kwargs)

    monkeypatch.setattr(v.sf, "read", spy)
    wav = read_audio(short_wav(seconds=0.5, channels=2), 2.0)
    assert abs(len(wav) - 12_000) <= 1 and wav.dtype == np.float32
    assert seen["frames"] == 2 * 16_000 + 1  # at most max_seconds (+1 to detect more) decoded


def test_unreadable_and_empty_are_bad_audio():
    for data in (b"", b"not audio at all", b"RIFF\x00\x00\x00\x00WAVE"):
        with pytest.raises(VoiceError) as info:
            read_audio(data, 30.0)
        assert info.value.code == "bad_audio"
        assert "object at 0x" not in info.value.message, info.value.message  # no Python repr for a client


# --- VoiceCache ---------------------------------------------------------------------------


class FakeState:
    """Stands in for VoiceState: save() writes a marker and a blob of a given size."""

    def __init__(self, key: str, size: int) -> None:
        self.key, self.size = key, size

    def save(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "state.safetensors").write_bytes(b"\x00" * self.size)
        (directory / "voice.json").write_text(json.dumps({"key": self.key}))


@pytest.fixture
def fake_load(monkeypatch):
    def load(directory, device="cpu"):
        meta = json.loads((Path(directory) / "voice.json").read_text())
        if "broken" in meta:
            raise ValueError("truncated")
        return FakeState(meta["key"], 0)

    monkeypatch.setattr(v.VoiceState, "load", staticmethod(load))


def age(cache: VoiceCache, key: str, seconds_ago: float) -> None:
    t = 1_700_000_000 - seconds_ago
    os.utime(cache.directory(key) / "voice.json", (t, t))


def key(i: int) -> str:
    return f"{i:032x}" + "0" * 32  # entries are named by the first 32 hex digits


def test_cache_evicts_least_recently_used_past_the_limit(tmp_path, fake_load):
    cache = VoiceCache(tmp_path / "states", max_bytes=3_500)
    for i in range(3):
        cache.save(key(i), FakeState(key(i), 1_000))
        age(cache, key(i), 100 - i)  # 0 oldest, 2 newest
    assert cache.load(key(0)) is not None  # a load is a use: 0 becomes the newest
    cache.save(key(3), FakeState(key(3), 1_000))  # 4 x ~1 KB > 3.5 KB: one must go
    present = {i for i in range(4) if cache.directory(key(i)).exists()}
    assert present == {0, 2, 3}  # 1 was the least recently used
    assert cache.size() <= 3_500


def test_cache_never_evicts_the_entry_just_saved(tmp_path, fake_load):
    cache = VoiceCache(tmp_path / "states", max_bytes=500)
    cache.save(key(0), FakeState(key(0), 100))
    cache.save(key(1), FakeState(key(1), 2_000))  # alone over the limit: kept, the other goes
    assert not cache.directory(key(0)).exists()
    assert cache.load(key(1)).key == key(1)


def test_cache_miss_wrong_key_and_broken_entries(tmp_path, fake_load):
    cache = VoiceCache(tmp_path / "states", max_bytes=None)
    assert cache.load(key(5)) is None
    cache.save(key(5), FakeState(key(5), 10))
    assert cache.load(key(5)[:32] + "f" * 32) is None  # same folder, other full key
    (cache.directory(key(5)) / "voice.json").write_text(json.dumps({"key": key(5), "broken": 1}))
    assert cache.load(key(5)) is None and not cache.directory(key(5)).exists()
    assert cache.prune() == []  # no limit: nothing evicted
    assert not [p for p in cache.root.iterdir() if p.name.startswith(".partial-")]
