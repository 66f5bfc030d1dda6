"""A caller's turn (`user_turn`, issue 21), loaded: the host work done before any model work.

    loaded = load_user_turn(cmd, tokenizer, max_seconds=30.0)   # a worker thread: decode, resample, place words
    call.plan_user_turn(loaded, cmd.id)                         # the generation thread: planned prefill

Loading decodes the audio (a telephony wire format, or a WAV/FLAC file whose header is checked
before decoding, as a voice's is), resamples it to 24 kHz, and places the transcript's words on
its frames: at the STT's word times when `words` came with it, else spread over the voiced part
as voice preparation does (`voices.voice.align_transcript`). Everything a client can get wrong
is refused here with a coded error, before the call is touched: corrupt, silent, too long or
non-finite audio is `bad_audio`; a words list that does not match the transcript or the audio's
length, or a transcript with more words than the audio has room for, is `invalid_field` with a
message that says so. The model work (Mimi encode, text warm-up, prefill) is the call's
(`Call.plan_user_turn`), planned by the engine between frames.
"""

from __future__ import annotations

import io
import math
import re
import time
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from vendor_dia2.prefix import TimedWord, turn_word_steps
from vendor_dia2.script import ScriptEntry

from dia2stream.clock import FRAME_SAMPLES, SAMPLE_RATE
from dia2stream.voices.voice import (SILENCE_PEAK, VoiceError, align_transcript, audio_error_reason, read_audio, resample,
                                     transcript_words)
from dia2stream.wire import protocol as p
from dia2stream.wire.formats import FORMATS, decode_samples
from dia2stream.wire.protocol import ErrorCode

CALLER_TAG = "[S2]"  # the caller is speaker 2; the agent speaks as [S1]
WORD_TIME_SLACK_S = 0.25  # STT word times may run this far past the audio's end (rounding, padding)
_CONTAINERS = {"wav": "WAV", "flac": "FLAC"}  # user_turn format -> soundfile's name for the container
_NOT_SPELLING = re.compile(r"[^\w']")  # what `_spelling` ignores: punctuation, symbols, spaces


@dataclass(frozen=True)
class LoadedUserTurn:
    """A caller's turn ready for the model: 24 kHz audio and its words placed on its frames."""

    wav: np.ndarray  # float32 mono 24 kHz
    frames: int  # Mimi frames of the audio (12.5 per second, the last one zero-padded)
    entries: tuple[ScriptEntry, ...]  # the caller's words, the first one tagged [S2]
    steps: tuple[int, ...]  # new-word step of each entry, counted from the turn's first frame
    load_ms: float

    @property
    def words(self) -> list[str]:
        return [e.text for e in self.entries]


def load_user_turn(cmd: p.UserTurn, tokenizer, max_seconds: float) -> LoadedUserTurn:
    """Decode, check and place a `user_turn` (blocking host work: run it in a worker thread).
    Raises `p.ProtocolError` (bad_audio, invalid_field); nothing is changed by a refusal."""
    t0 = time.perf_counter()

    def refuse(code: str, message: str) -> p.ProtocolError:
        return p.ProtocolError(code, message, cmd=cmd.cmd, id=cmd.id)

    try:
        wav = decode_audio(cmd.audio_bytes(), cmd.format, max_seconds)
    except VoiceError as err:
        raise refuse(err.code, err.message) from None
    frames = math.ceil(len(wav) / FRAME_SAMPLES)
    seconds = len(wav) / SAMPLE_RATE
    if cmd.words is not None:
        words = _stt_words(cmd, seconds, refuse)
    else:
        words = align_transcript(cmd.transcript, wav) if transcript_words(cmd.transcript) else []
        if not words:
            raise refuse(ErrorCode.INVALID_FIELD, "transcript: it has no words")
    entries, steps, dropped = turn_word_steps(words, tokenizer, CALLER_TAG, frames)
    if dropped:
        raise refuse(ErrorCode.INVALID_FIELD,
                     f"transcript: {len(words)} words do not fit {seconds:.2f} s of audio ({frames} frames): "
                     f"{len(dropped)} word(s) would not be out by its end ({' '.join(dropped[:5])}"
                     f"{' ...' if len(dropped) > 5 else ''}); send the audio they were said in, or a shorter transcript")
    return LoadedUserTurn(wav, frames, tuple(entries), tuple(steps), (time.perf_counter() - t0) * 1000)


def decode_audio(raw: bytes, fmt: str, max_seconds: float) -> np.ndarray:
    """float32 mono 24 kHz from a wire format's samples or a WAV/FLAC file; VoiceError bad_audio."""
    if fmt in _CONTAINERS:
        _check_container(raw, fmt)
        return read_audio(raw, max_seconds, "user_turn audio")
    wire = FORMATS[fmt]
    samples = len(raw) // wire.bytes_per_sample
    if samples > max_seconds * wire.sample_rate:  # checked before decoding: memory bounded by the limit
        raise VoiceError(ErrorCode.BAD_AUDIO, f"user_turn audio: {samples / wire.sample_rate:.1f} s is longer than "
                         f"the {max_seconds:g} s limit")
    try:
        pcm = decode_samples(raw, wire)
    except ValueError as exc:
        raise VoiceError(ErrorCode.BAD_AUDIO, f"user_turn audio: {exc}") from None
    if pcm.size == 0:
        raise VoiceError(ErrorCode.BAD_AUDIO, "user_turn audio: no samples")
    wav = pcm.astype(np.float32) / 32768.0
    if float(np.abs(wav).max()) < SILENCE_PEAK:
        raise VoiceError(ErrorCode.BAD_AUDIO, "user_turn audio: the audio is silent")
    return resample(wav, wire.sample_rate, SAMPLE_RATE)


def _check_container(raw: bytes, fmt: str) -> None:
    """The file is the container `format` names (a WAV sent as `flac` is refused, not guessed)."""
    try:
        found = sf.info(io.BytesIO(raw)).format
    except Exception as exc:  # libsndfile's errors vary by format and version
        raise VoiceError(ErrorCode.BAD_AUDIO, f"user_turn audio: unreadable or corrupt audio ({audio_error_reason(exc)})") from None
    if found != _CONTAINERS[fmt]:
        raise VoiceError(ErrorCode.BAD_AUDIO, f"user_turn audio: format says {fmt} but the file is {found}")


def _spelling(word: str) -> str:
    """A word as an STT and a transcript of the same speech both spell it: STTs give words
    without punctuation and case (Deepgram's `word` beside its `punctuated_word`)."""
    return _NOT_SPELLING.sub("", word.replace("\u2019", "'").casefold())


def _stt_words(cmd: p.UserTurn, seconds: float, refuse) -> list[TimedWord]:
    """The STT's word times, checked against the transcript and the audio's length."""
    said = transcript_words(cmd.transcript)
    if len(cmd.words) != len(said):
        raise refuse(ErrorCode.INVALID_FIELD, f"words: {len(cmd.words)} words but the transcript has {len(said)}; "
                     "send the STT's words for this transcript, or leave 'words' out to spread them over the audio")
    for i, (want, got) in enumerate(zip(said, cmd.words)):
        if _spelling(want) != _spelling(got.word):
            raise refuse(ErrorCode.INVALID_FIELD, f"words[{i}]: {got.word!r} is not the transcript's word {i + 1}, "
                         f"{want!r}; send the STT's words for this transcript, in its order")
    last = cmd.words[-1]
    if last.end_s > seconds + WORD_TIME_SLACK_S:
        raise refuse(ErrorCode.INVALID_FIELD, f"words: {last.word!r} ends at {last.end_s:g} s, after the end of the "
                     f"{seconds:.2f} s of audio")
    return [TimedWord(w, min(t.start_s, seconds), min(t.end_s, seconds)) for w, t in zip(said, cmd.words)]
