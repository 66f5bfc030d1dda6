"""Calls of any length (issue 11): a full context is rebuilt from the voice prefix and the most
recent conversation, again and again, with no error, no gap and the words still coming."""

from __future__ import annotations

import io
import queue

import numpy as np
import pytest
import soundfile as sf
import torch

from dia2stream.wire import protocol as p
from dia2stream.call.call import AudioFrame
from dia2stream.engine.engine import Engine

from helpers import engine_config
from dia2stream.voices.voice import VoiceRequest, VoiceSettings

pytestmark = pytest.mark.slow

# The long turn runs past a 200-frame context several times over, so it rolls over mid-utterance
# (about every 100 frames); 100 words are ~500 frames, 5 such rollovers. (300 words took 1,500
# frames and three quarters of this test's time to show the same thing 16 times.) Every short turn
# after a near-full context rolls over before it starts, so those add one rollover each.
LONG_TURN_WORDS = 100


def _tone_wav(seconds: float = 0.8) -> bytes:
    t = np.arange(int(seconds * 24000)) / 24000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 24000, format="WAV")
    return buf.getvalue()


def _turn(engine, call, got, command):
    engine.submit(call, command)
    items = []
    while True:
        item = got.get(timeout=120)
        assert not isinstance(item, p.ErrorEvent), item
        items.append(item)
        if isinstance(item, p.Done):
            return items


def test_a_long_call_rolls_over_repeatedly_and_keeps_its_voice(tiny_dir, tmp_path):
    from vendor_dia2 import Dia2

    tts = Dia2.from_pretrained(str(tiny_dir), device="cpu", mimi="random-small")
    # in process nothing acknowledges frames as a websocket sender does: no unsent-frames bound
    engine = Engine(tts, engine_config(tts, max_lead_ms=1e6, context_frames=200, rollover_frames=80, max_unsent_frames=10**9,
                                      voice=VoiceSettings(cache_dir=str(tmp_path))))
    try:
        got = queue.Queue()
        call = engine.open_call(got.put)
        voice = engine.preload_voice(VoiceRequest("v", audio=_tone_wav(), transcript="[S1] Hi there."), cache=False)
        prefix = voice.prefix_frames
        prefix_codes = engine.stepper.aligned_codes(engine.spare_slot, 0, prefix).clone()
        long_turn = "[S1] " + " ".join(f"w{i}" for i in range(LONG_TURN_WORDS)) + "."
        turns = [p.Start(text="[S1] Good morning, how are you?", voice="v", seed=3, id=0)]
        turns += [p.Inject(text=f" Turn {i} says a few more words here.", id=i) for i in range(1, 24)]
        turns.insert(6, p.Inject(text=long_turn.removeprefix("[S1]"), id="long"))
        total_frames = 0
        for command in turns:
            rollovers_before = call.rollovers
            items = _turn(engine, call, got, command)
            frames = [i for i in items if isinstance(i, AudioFrame)]
            assert [f.index for f in frames] == list(range(len(frames)))  # no frame lost or repeated
            words = [i.word for i in items if isinstance(i, p.Word)]
            assert words == command.text.split() if isinstance(command, p.Inject) else words
            assert all(w.id == command.id for w in items if isinstance(w, p.Word))
            done = items[-1]
            assert done.frames == len(frames) > 0
            total_frames += len(frames)
            if command.id == "long":  # rolled over again and again inside one utterance (and once before it)
                assert call.rollovers - rollovers_before >= 4, call.rollovers - rollovers_before
            # the voice prefix, as prepared, stays at the head of every rebuilt context (before the
            # first rollover, upstream's boundary, the default, has sampled over its delayed tail)
            if call.rollovers:
                assert torch.equal(engine.stepper.aligned_codes(call.slot.index, 0, prefix), prefix_codes)
            assert engine.stepper.position(call.slot.index) < 200
        assert call.rollovers >= 15, call.rollovers
        assert total_frames > 1000, total_frames  # five times the context
    finally:
        engine.close()
