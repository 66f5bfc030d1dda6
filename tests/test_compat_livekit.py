"""LiveKit Agents' own TTS plugins against our compatible endpoints: `elevenlabs.TTS` (pcm_24000
and its default mp3_22050_32) and `cartesia.TTS`, with `tts.stream()` standalone. Loopback
only; skipped without the plugins."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from compat_clients import need, start_server
from livekit_streams import speak

need("livekit.plugins.elevenlabs", "livekit.plugins.cartesia", "aiohttp")

import aiohttp  # noqa: E402
from livekit.agents import APIConnectOptions  # noqa: E402
from livekit.plugins import cartesia, elevenlabs  # noqa: E402

pytestmark = pytest.mark.slow

WAIT_S = 60.0
# Generous: the plugins fail a context that is silent for `timeout` seconds, and a shared CPU can be slow.
OPTIONS = APIConnectOptions(timeout=WAIT_S, max_retry=0)
PIECES = ["Hello there, ", "how are ", "you today? ", "I am fine."]
WORDS = ["Hello", "there,", "how", "are", "you", "today?", "I", "am", "fine."]


@pytest.fixture(scope="module")
def server():
    srv = start_server()
    yield srv
    srv.stop()


async def _speak(tts) -> tuple[list, list]:
    """`PIECES` as an LLM would send them; (frames, timed words)."""
    return await speak(tts, PIECES, OPTIONS, WAIT_S * 2)


def _seconds(frames) -> float:
    return sum(f.samples_per_channel for f in frames) / frames[0].sample_rate


async def test_elevenlabs_pcm_timed_words_in_order(server):
    async with aiohttp.ClientSession() as session:
        tts = elevenlabs.TTS(api_key="any-key", voice_id="default", base_url=f"http://127.0.0.1:{server.port}/v1",
                             encoding="pcm_24000", http_session=session)
        frames, words = await _speak(tts)
        await tts.aclose()
    assert frames and frames[0].sample_rate == 24000
    assert [w.strip() for w in words] == WORDS
    starts = [w.start_time for w in words]
    assert starts == sorted(starts) and starts[0] >= 0
    assert all(w.end_time >= w.start_time for w in words)
    assert words[-1].start_time < _seconds(frames)
    # whole 80 ms frames: the audio is a multiple of 1920 samples at 24 kHz
    assert sum(f.samples_per_channel for f in frames) % 1920 == 0


async def test_elevenlabs_default_mp3_decodes_to_the_right_length(server):
    async with aiohttp.ClientSession() as session:
        pcm_tts = elevenlabs.TTS(api_key="k", voice_id="default", base_url=f"http://127.0.0.1:{server.port}/v1",
                                 encoding="pcm_24000", http_session=session)
        mp3_tts = elevenlabs.TTS(api_key="k", voice_id="default", base_url=f"http://127.0.0.1:{server.port}/v1",
                                 http_session=session)  # its default encoding: mp3_22050_32
        pcm_frames, _ = await _speak(pcm_tts)
        mp3_frames, mp3_words = await _speak(mp3_tts)
        await pcm_tts.aclose()
        await mp3_tts.aclose()
    assert mp3_frames[0].sample_rate == 22050  # decoded by LiveKit's own MP3 decoder
    assert [w.strip() for w in mp3_words] == WORDS
    # Same text, same seed, same server: the same number of frames; MP3 adds at most an
    # encoder frame of padding (1152 samples) and the resampler's tail.
    assert abs(_seconds(mp3_frames) - _seconds(pcm_frames)) < 0.1, (_seconds(mp3_frames), _seconds(pcm_frames))
    audio = np.concatenate([np.frombuffer(f.data, np.int16) for f in mp3_frames])
    assert np.abs(audio).max() > 0


async def test_cartesia_stream_words_and_audio(server):
    async with aiohttp.ClientSession() as session:
        tts = cartesia.TTS(api_key="any-key", voice="default", base_url=f"http://127.0.0.1:{server.port}",
                           sample_rate=24000, http_session=session)
        frames, words = await _speak(tts)
        await tts.aclose()
    assert frames and frames[0].sample_rate == 24000
    assert [w.strip() for w in words] == WORDS
    starts = [w.start_time for w in words]
    assert starts == sorted(starts)


async def test_native_plugin_stream_and_synthesize(server):
    from dia2stream.integrations.livekit import TTS

    tts = TTS(url=f"ws://127.0.0.1:{server.port}/")
    frames, words = await _speak(tts)
    async with tts.synthesize("Second turn, same call.", conn_options=OPTIONS) as chunked:
        more = [ev.frame async for ev in chunked]
    await tts.aclose()
    assert frames and frames[0].sample_rate == 24000
    assert [w.strip() for w in words] == WORDS
    starts = [w.start_time for w in words]
    assert starts == sorted(starts) and all(w.end_time >= w.start_time for w in words)
    assert more and sum(f.samples_per_channel for f in more) > 1920


class _Microphone:
    """What a session's audio input hands on: 20 ms `rtc.AudioFrame`s of a voiced stretch
    between quiet ones (built per test: LiveKit's `AudioInput` is the base class)."""

    @staticmethod
    def frames(seconds: float, rate: int = 16_000) -> list:
        from livekit import rtc

        t = np.arange(int(seconds * rate)) / rate
        voiced = (t > 0.5) & (t < seconds - 0.5)
        pcm = (0.3 * 32767 * np.sin(2 * np.pi * 220 * t) * voiced).astype("<i2")
        step = rate // 50
        return [rtc.AudioFrame(data=pcm[i:i + step].tobytes(), sample_rate=rate, num_channels=1,
                               samples_per_channel=len(pcm[i:i + step])) for i in range(0, len(pcm), step)]


async def test_native_plugin_sends_the_callers_turns_it_hears_from_the_session(server):
    """`hear_caller` taps a real AgentSession's audio input and follows its transcription events;
    the caller's turn goes out before the agent's next turn, between turns and after an interruption."""
    from livekit.agents import AgentSession
    from livekit.agents.voice.events import UserInputTranscribedEvent
    from livekit.agents.voice.io import AudioInput

    from dia2stream.integrations.livekit import TTS

    class Microphone(AudioInput):
        def __init__(self):
            super().__init__(label="test-microphone")
            self.queue: asyncio.Queue = asyncio.Queue()

        async def __anext__(self):
            return await self.queue.get()

    session, microphone = AgentSession(), Microphone()
    tts = TTS(url=f"ws://127.0.0.1:{server.port}/")
    with pytest.raises(RuntimeError, match="after session.start"):
        tts.hear_caller(session)
    session.input.audio = microphone  # what session.start does with the room's audio
    tts.hear_caller(session)
    assert session.input.audio.source is microphone

    async def caller_says(text: str) -> None:
        frames = _Microphone.frames(3.0)
        for frame in frames:
            microphone.queue.put_nowait(frame)
        for frame in frames:  # the session's STT forwarding pulls them through the chain, unchanged
            assert await session.input.audio.__anext__() is frame
        session.emit("user_input_transcribed", UserInputTranscribedEvent(transcript=text + " and", is_final=False))
        session.emit("user_input_transcribed", UserInputTranscribedEvent(transcript=text, is_final=True))

    await caller_says("said before the call had a conversation")  # dropped: nowhere to put it
    await _speak(tts)
    await caller_says("yes, it's Smith")
    _, words = await _speak(tts)
    assert [w.strip() for w in words] == WORDS
    assert len(tts.caller_turns_done) == 1
    # an interruption: the stream is closed while it speaks, then the caller's turn, then the answer
    async with tts.stream(conn_options=OPTIONS) as stream:
        stream.push_text("One two three four five six seven eight nine ten eleven twelve. " * 3)
        stream.end_input()
        async with asyncio.timeout(WAIT_S * 2):
            got = 0
            async for ev in stream:
                got += ev.frame.samples_per_channel
                if got > 20 * 1920:
                    break
    await caller_says("wait, stop")
    _, words = await _speak(tts)
    await tts.aclose()
    assert [w.strip() for w in words] == WORDS
    first, second = tts.caller_turns_done
    assert (first["id"], second["id"]) == ("caller-1", "caller-2")
    assert first["frames"] == second["frames"] == 30  # 2 s voiced of 3 s heard, 0.2 s kept each side
    assert second["position"] > first["position"] + first["frames"]
