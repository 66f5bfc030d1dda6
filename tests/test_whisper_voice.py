"""A set_voice without a transcript, through real openai-whisper plumbing: a randomly initialised
tiny whisper built from its dimensions (its words are gibberish; audio → mel → decode with word
timestamps is the real code), then our alignment, transcript cache, prefix plan and prefill.
A garbled transcript must give a clear VoiceError or a voice a turn can use, never a crash."""

from __future__ import annotations

import dataclasses
import io
import json
import queue

import numpy as np
import pytest
import soundfile as sf

from dia2stream.engine.engine import Engine
from dia2stream.voices.voice import (Transcriber, VoiceError, VoicePreparer, VoiceRequest, VoiceSettings, audio_digest,
                                     read_audio)
from dia2stream.wire import protocol as p
from dia2stream.wire.frames import AudioFrame

from helpers import engine_config

whisper = pytest.importorskip("whisper", reason="openai-whisper is not installed (make test installs it)")

RATE = 16_000


def tone_wav(seconds: float = 1.2, seed: int = 0) -> bytes:
    """A voiced tone burst with a little noise and short silences at both ends, as WAV bytes."""
    t = np.arange(int(seconds * RATE)) / RATE
    rng = np.random.default_rng(seed)
    wav = 0.3 * np.sin(2 * np.pi * 180 * t) + 0.02 * rng.standard_normal(t.size)
    edge = int(0.08 * RATE)
    wav[:edge] = wav[-edge:] = 0
    buf = io.BytesIO()
    sf.write(buf, wav.astype(np.float32), RATE, format="WAV")
    return buf.getvalue()


def write_random_whisper(path, seed: int, *, deaf: bool = False):
    """A whisper checkpoint file with random weights: the multilingual vocabulary and the 30 s
    audio window of the real models (both fixed by whisper's code), everything else tiny. A
    short text context keeps each decode to 16 tokens (random weights never stop on their own).
    The decoder's positional table, which whisper leaves uninitialised, is drawn like the rest.
    The decoder's last norm is scaled up so its token choices are confident: whisper falls back
    to sampling at higher temperatures when a transcript looks poor (a random one always does),
    and confident logits make those draws the same whatever the global RNG holds. `deaf`: a
    model that can say no word at all."""
    import torch
    from whisper.model import ModelDimensions, Whisper

    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=1,
                           n_vocab=51865, n_text_ctx=32, n_text_state=32, n_text_head=2, n_text_layer=2)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        model = Whisper(dims)
        model.decoder.positional_embedding.normal_(std=0.02)  # whisper leaves it torch.empty (checkpoints fill it)
        model.decoder.ln.weight.mul_(1000.0)
        if deaf:  # every text token's row zeroed: only timestamps and end-of-text can win
            eot = whisper.tokenizer.get_tokenizer(multilingual=True).eot
            model.decoder.token_embedding.weight[:eot].zero_()
    torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": model.state_dict()}, path)
    return path


HEARS_WORDS = 2  # the seed whose gibberish for the test tone is 45 words ('Prose' over and over), most of them 0-20 ms long


@pytest.fixture(scope="module")
def random_whisper(tmp_path_factory):
    return write_random_whisper(tmp_path_factory.mktemp("whisper") / "random-tiny.pt", HEARS_WORDS)


@dataclasses.dataclass
class WhisperEngine:
    engine: Engine
    settings: VoiceSettings
    call: object
    events: queue.Queue


@pytest.fixture(scope="module")
def whisper_engine(tiny_tts, random_whisper, tmp_path_factory):
    """An engine whose voices are transcribed by the random whisper, with one call open."""
    cache = tmp_path_factory.mktemp("voice-cache")
    settings = VoiceSettings(whisper_model=str(random_whisper), cache_dir=str(cache), allow_download=False)
    engine = Engine(tiny_tts, engine_config(tiny_tts, max_lead_ms=1e6, voice=settings))
    events: queue.Queue = queue.Queue()
    call = engine.open_call(events.put)
    assert call is not None
    yield WhisperEngine(engine, settings, call, events)
    engine.close()


def speak_with(session: WhisperEngine, voice: str) -> list:
    """One turn of the session's call with `voice`: every event up to Done (fails on an error)."""
    session.engine.submit(session.call, p.Start(text="[S1] Good morning.", voice=voice, seed=1, id="t"))
    items = []
    while not items or not isinstance(items[-1], p.Done):
        items.append(session.events.get(timeout=120))
        assert not isinstance(items[-1], p.ErrorEvent), items[-1]
    return items


def prepare_or_refuse(session: WhisperEngine, name: str, audio: bytes):
    """A voice, or the VoiceError that says why not: never another exception."""
    import torch

    torch.manual_seed(0)  # whisper's fallback draws use the global generator (the test's choice of seed holds anyway)
    try:
        return session.engine.preload_voice(VoiceRequest(name, audio=audio, transcript=None), cache=False, timeout=600)
    except VoiceError as exc:
        assert exc.code in {"transcript_required", "voice_error", "bad_audio"} and str(exc), exc
        return exc


@pytest.mark.slow
def test_whisper_transcribes_with_word_timestamps_and_the_voice_speaks(whisper_engine):
    settings = whisper_engine.settings
    audio = tone_wav()
    state = prepare_or_refuse(whisper_engine, "heard", audio)
    # the transcript whisper gave is cached by the audio's content, with word timings in the clip
    cached = list((settings.cache_path() / "transcripts").glob("*.json"))
    assert len(cached) == 1, state
    entry = json.loads(cached[0].read_text())
    assert entry["model"] == settings.whisper_model and entry["words"]
    for word, start, end in entry["words"]:
        assert word.strip() and 0.0 <= start <= end <= 1.2 + 0.5, (word, start, end)
    # gibberish words, real plumbing: this seed's words give a usable voice
    assert not isinstance(state, VoiceError), state
    assert state.words and state.prefix_frames > 0
    items = speak_with(whisper_engine, "heard")
    assert any(isinstance(i, AudioFrame) for i in items)
    assert [i.word for i in items if isinstance(i, p.Word)] == ["Good", "morning."]


@pytest.mark.slow
def test_whisper_that_hears_no_words_asks_for_a_transcript(tiny_tts, tmp_path):
    path = write_random_whisper(tmp_path / "deaf.pt", HEARS_WORDS, deaf=True)
    settings = VoiceSettings(whisper_model=str(path), cache_dir=str(tmp_path / "cache"), allow_download=False)
    with pytest.raises(VoiceError) as refused:
        VoicePreparer(tiny_tts, settings).load(VoiceRequest("deaf", audio=tone_wav(), transcript=None))
    assert refused.value.code == "transcript_required" and "supply 'transcript'" in str(refused.value)
    assert not (settings.cache_path() / "transcripts").exists()  # nothing heard, nothing cached


@pytest.mark.slow
def test_a_cached_transcript_needs_no_whisper(whisper_engine, tiny_tts, tmp_path):
    """The second preparation of the same audio reads the transcript cache: it works with the
    whisper weights gone."""
    settings = whisper_engine.settings
    audio = tone_wav()
    prepare_or_refuse(whisper_engine, "first", audio)  # fills the cache (or finds it filled)
    gone = dataclasses.replace(settings, whisper_model=str(tmp_path / "no-such-whisper.pt"))
    loaded = VoicePreparer(tiny_tts, gone).load(VoiceRequest("again", audio=audio, transcript=None))
    cached = json.loads(next((settings.cache_path() / "transcripts").glob("*.json")).read_text())
    assert [[w.word, w.start_s, w.end_s] for w in loaded.speakers[0].words] == cached["words"]


GARBLED = {
    "all at zero": [["a", 0.0, 0.0]] * 6,
    "past the end": [["late", 5.0, 6.0], ["later", 7.0, 9.0]],
    "backwards": [["two", 0.9, 0.3], ["one", 0.5, 0.1]],
    "negative": [["before", -1.0, -0.5], ["now", 0.2, 0.4]],
    "punctuation only": [["...", 0.1, 0.3], ["?!", 0.3, 0.6], ["—", 0.6, 0.9]],
    "scripts and emoji": [["마음에", 0.1, 0.3], ["ческих", 0.3, 0.6], ["🙂🙂", 0.6, 0.9], ["ٌ", 0.9, 1.0]],
    "one endless word": [["x" * 2000, 0.1, 1.0]],
    "thousands of words": [[f"w{i}", i * 1e-3, i * 1e-3 + 1e-4] for i in range(3000)],
    "speaker tags": [["[S2]", 0.1, 0.2], ["[S1]", 0.2, 0.3], ["(laughs)", 0.3, 0.9]],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(GARBLED))
def test_a_garbled_transcript_gives_a_clear_error_or_a_voice_that_speaks(whisper_engine, case):
    """Whatever words and timings a recogniser hands back (planted in the transcript cache the
    whisper path reads), preparing the voice ends in a VoiceError or a voice a turn can use."""
    settings = whisper_engine.settings
    audio = tone_wav(seed=1 + sorted(GARBLED).index(case))  # audio of its own: its own cache entry
    path = Transcriber(settings).cache_file(audio_digest(read_audio(audio, settings.max_seconds)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": settings.whisper_model, "words": GARBLED[case]}))
    state = prepare_or_refuse(whisper_engine, f"garbled{sorted(GARBLED).index(case)}", audio)
    if not isinstance(state, VoiceError):
        items = speak_with(whisper_engine, state.name)
        assert any(isinstance(i, AudioFrame) for i in items)
