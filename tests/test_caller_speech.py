"""What the plugins send as the caller's turn (`integrations.caller.CallerSpeech`): the voiced part
of what was heard, at most the limit, with the final transcripts; nothing when there is nothing
the server could place."""

from __future__ import annotations

import base64
import io

import numpy as np
import soundfile as sf

from dia2stream.integrations.caller import CallerSpeech


def pcm(seconds: float, rate: int, level: float = 0.3, channels: int = 1) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    wave = (level * 32767 * np.sin(2 * np.pi * 200 * t)).astype("<i2")
    return np.repeat(wave[:, None], channels, axis=1).tobytes()


def decoded(command: dict) -> tuple[np.ndarray, int]:
    audio, rate = sf.read(io.BytesIO(base64.b64decode(command["audio"])), dtype="int16")
    return audio, rate


def test_the_voiced_part_goes_out_as_wav_with_the_transcripts_joined_and_is_then_forgotten():
    caller = CallerSpeech()
    caller.add_audio(pcm(1.0, 16_000, level=0.0), 16_000)
    caller.add_audio(pcm(2.0, 16_000), 16_000)
    caller.add_audio(pcm(1.0, 16_000, level=0.0), 16_000)
    caller.add_transcript("yes, it's Smith")
    caller.add_transcript("  ")
    caller.add_transcript("S-M-I-T-H")
    command = caller.take_turn("c1")
    audio, rate = decoded(command)
    assert (command["cmd"], command["format"], command["id"]) == ("user_turn", "wav", "c1")
    assert command["transcript"] == "yes, it's Smith S-M-I-T-H" and "words" not in command
    assert rate == 16_000 and len(audio) == int(2.4 * 16_000)  # 2 s voiced, 0.2 s kept on each side
    assert caller.take_turn("c2") is None  # sent once


def test_stereo_is_mixed_down_and_only_the_most_recent_seconds_are_kept():
    caller = CallerSpeech(max_seconds=3.0)
    for _ in range(5):
        caller.add_audio(pcm(1.0, 8_000, channels=2), 8_000, channels=2)
    caller.add_transcript("hello")
    audio, rate = decoded(caller.take_turn("c1"))
    assert rate == 8_000 and audio.ndim == 1 and 3 * 8_000 <= len(audio) < 4 * 8_000


def test_a_change_of_rate_starts_over():
    caller = CallerSpeech()
    caller.add_audio(pcm(2.0, 8_000), 8_000)
    caller.add_audio(pcm(1.0, 48_000), 48_000)
    caller.add_transcript("hello")
    audio, rate = decoded(caller.take_turn("c1"))
    assert rate == 48_000 and len(audio) == 48_000


def test_nothing_goes_out_without_a_transcript_or_without_voiced_audio():
    caller = CallerSpeech()
    caller.add_audio(pcm(2.0, 16_000), 16_000)
    assert caller.take_turn("c1") is None  # heard, but no transcript: forgotten too
    caller.add_transcript("hello")
    assert caller.take_turn("c2") is None  # a transcript, no audio
    caller.add_audio(pcm(2.0, 16_000, level=0.001), 16_000)
    caller.add_transcript("hello")
    assert caller.take_turn("c3") is None  # only quiet audio: the server would refuse it as silent
