"""The caller's side of a conversation, as the plugins collect it for `user_turn` (issue 21).

    caller = CallerSpeech()
    caller.add_audio(pcm16, sample_rate=16_000, channels=1)   # every input audio chunk the framework hands on
    caller.add_transcript("yes, it's Smith")                   # every final transcript
    command = caller.take_turn("caller-1")                     # before the agent's next turn: user_turn, or None

A framework hands its TTS plugin only text; the caller's audio and transcript reach it through a
tap the application places (Pipecat: a processor after the STT; LiveKit: the session's audio
input and its `user_input_transcribed` events). What is heard between two caller's turns goes out
as one `user_turn`: the audio as a WAV file (any rate the framework uses; the server resamples),
without its quiet ends, and the transcripts joined. Neither framework gives a TTS word times
for the caller, so `words` is left out and the server spreads the words over the voiced audio.
At most `max_seconds` (the server's `--max-user-turn-seconds`, 30 by default) of the most recent
audio is kept.
"""

from __future__ import annotations

import base64
import io
import wave
from collections import deque
from dataclasses import dataclass, field

import numpy as np

QUIET_PEAK = 328  # int16 peak below which a block counts as quiet (-40 dBFS)
BLOCK_S = 0.02  # quiet ends are trimmed in blocks of this length
MARGIN_S = 0.2  # kept on each side of the voiced part (a word's soft start and tail)


@dataclass
class CallerSpeech:
    """The caller's audio and final transcripts heard since the last caller's turn went out."""

    max_seconds: float = 30.0
    sample_rate: int = 0
    chunks: deque = field(default_factory=deque)  # int16 mono arrays, oldest first
    samples: int = 0
    transcripts: list[str] = field(default_factory=list)

    def add_audio(self, pcm16: bytes, sample_rate: int, channels: int = 1) -> None:
        """One chunk of 16-bit PCM; a change of rate starts over (the older audio cannot be joined)."""
        audio = np.frombuffer(pcm16, dtype="<i2")
        if channels > 1:
            audio = audio[: len(audio) // channels * channels].reshape(-1, channels).mean(axis=1).astype(np.int16)
        if sample_rate != self.sample_rate:
            self.chunks.clear()
            self.samples, self.sample_rate = 0, sample_rate
        self.chunks.append(audio)
        self.samples += len(audio)
        limit = int(self.max_seconds * sample_rate)
        while self.samples - len(self.chunks[0]) >= limit:  # keep the most recent max_seconds
            self.samples -= len(self.chunks.popleft())

    def add_transcript(self, text: str) -> None:
        if text.strip():
            self.transcripts.append(text.strip())

    def clear(self) -> None:
        """Forget what was heard (said before the call had a conversation to put it in)."""
        self.chunks.clear()
        self.samples = 0
        self.transcripts.clear()

    def take_turn(self, command_id: str) -> dict | None:
        """The `user_turn` command for what was heard, and forget it; None when there is no
        transcript or no voiced audio (nothing the server could place)."""
        transcript = " ".join(self.transcripts)
        audio = self._voiced()
        self.clear()
        if not transcript or audio is None:
            return None
        return {"cmd": "user_turn", "audio": base64.b64encode(_wav(audio, self.sample_rate)).decode("ascii"),
                "format": "wav", "transcript": transcript, "id": command_id}

    def _voiced(self) -> np.ndarray | None:
        """The kept audio from its first loud block to its last, with a margin; None if all quiet."""
        if not self.chunks:
            return None
        audio = np.concatenate(list(self.chunks))
        block = max(1, int(BLOCK_S * self.sample_rate))
        blocks = len(audio) // block
        if blocks == 0:
            return None
        peaks = np.abs(audio[: blocks * block].astype(np.int32)).reshape(blocks, block).max(axis=1)
        loud = np.nonzero(peaks >= QUIET_PEAK)[0]
        if loud.size == 0:
            return None
        margin = int(MARGIN_S * self.sample_rate)
        return audio[max(0, loud[0] * block - margin): (loud[-1] + 1) * block + margin]


def _wav(audio: np.ndarray, sample_rate: int) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(audio.astype("<i2").tobytes())
    return out.getvalue()
