"""Pipecat's own TTS services against our compatible endpoints, in a minimal pipeline (the
service and a collecting processor, no transport): ElevenLabs multi-context websocket,
Cartesia, Deepgram and ElevenLabs HTTP with timestamps. Loopback only; skipped without pipecat."""

from __future__ import annotations

import asyncio

import pytest

from compat_clients import need, start_server, ServerLog

need("pipecat.services.elevenlabs.tts", "websockets")

from pipecat.frames.frames import (EndFrame, InterruptionFrame, LLMFullResponseEndFrame,  # noqa: E402
                                   LLMFullResponseStartFrame, LLMTextFrame, TTSAudioRawFrame, TTSStoppedFrame,
                                   TTSTextFrame)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams, PipelineWorker  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

pytestmark = pytest.mark.slow

WAIT_S = 60.0  # the most any expected frame may take on a busy CPU
TOKENS = ["Hello", " there", ",", " how", " are", " you", " today", "?"]
LONG_TOKENS = [" one", " two", " three", " four", " five", " six", " seven", " eight", " nine", " ten", ".",
               " Eleven", " twelve", " thirteen", " fourteen", " fifteen", " sixteen", ".", " Seventeen",
               " eighteen", " nineteen", " twenty", "."] * 2


@pytest.fixture(scope="module")
def server():
    srv = start_server()
    yield srv
    srv.stop()


class Collector(FrameProcessor):
    """The end of the pipeline: keeps every downstream frame and wakes waiters."""

    def __init__(self):
        super().__init__()
        self.frames: list = []
        self.changed = asyncio.Event()

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self.frames.append(frame)
            self.changed.set()
        await self.push_frame(frame, direction)

    def of(self, kind) -> list:
        return [f for f in self.frames if isinstance(f, kind)]

    async def until(self, predicate, timeout: float = WAIT_S) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


class Harness:
    """A pipeline [service, collector] run by pipecat's own worker, fed like an LLM would."""

    def __init__(self, service, before=()):
        self.service, self.collector = service, Collector()
        self.worker = PipelineWorker(Pipeline([*before, service, self.collector]), params=PipelineParams(),
                                     cancel_on_idle_timeout=False)
        self.runner = WorkerRunner()
        self.word_times: list[tuple[str, float]] = []  # what the service computed from our alignment
        original = service.add_word_timestamps

        async def record(word_times, *args, **kwargs):
            self.word_times.extend(word_times)
            return await original(word_times, *args, **kwargs)

        service.add_word_timestamps = record

    async def __aenter__(self):
        started = asyncio.Event()

        @self.worker.event_handler("on_pipeline_started")
        async def _started(worker, frame):
            started.set()

        self.task = asyncio.create_task(self._run())
        await asyncio.wait_for(started.wait(), WAIT_S)
        return self

    async def _run(self):
        await self.runner.add_workers(self.worker)
        await self.runner.run()

    async def __aexit__(self, *exc):
        await self.worker.queue_frame(EndFrame())
        await asyncio.wait_for(self.task, WAIT_S)

    async def say(self, tokens: list[str]) -> None:
        await self.worker.queue_frame(LLMFullResponseStartFrame())
        for token in tokens:
            await self.worker.queue_frame(LLMTextFrame(token))
        await self.worker.queue_frame(LLMFullResponseEndFrame())

    async def interrupt(self) -> None:
        await self.worker.queue_frame(InterruptionFrame())

    def audio_bytes(self) -> int:
        return sum(len(f.audio) for f in self.collector.of(TTSAudioRawFrame))


def _elevenlabs(port: int):
    from pipecat.services.elevenlabs.tts import ElevenLabsTTSService

    return ElevenLabsTTSService(api_key="any-key", url=f"ws://127.0.0.1:{port}", sample_rate=24000,
                                settings=ElevenLabsTTSService.Settings(voice="default"))


def _deepgram(port: int):
    from pipecat.services.deepgram.tts import DeepgramTTSService

    return DeepgramTTSService(api_key="any-key", base_url=f"ws://127.0.0.1:{port}", sample_rate=24000,
                              settings=DeepgramTTSService.Settings(voice="aura-2-thalia-en"))


# First in the module, so that its own server is the only one running (the module's `server`
# fixture starts with the first test that asks for it).
async def test_after_the_engine_resets_the_call_the_next_turn_speaks(monkeypatch):
    """A call whose context fills with no rollover is reset by the engine (`context_full`) in
    the middle of a turn: the plugin hears the turn end (ElevenLabs `isFinal`, Deepgram
    `Flushed`), and its next turn speaks on the same connection (a fresh `start`, where an
    `inject` would be refused and every later turn would be silent)."""
    from dia2stream.wire import protocol as p
    from dia2stream.wire.compat.contexts import ContextAdapter

    errors = []
    translate = ContextAdapter.translate

    def noting_errors(adapter, item):
        if isinstance(item, p.ErrorEvent):
            errors.append(item.code)
        return translate(adapter, item)

    monkeypatch.setattr(ContextAdapter, "translate", noting_errors)
    srv = start_server(context_frames=100, rollover_frames=0)
    try:
        for make in (_elevenlabs, _deepgram):
            errors.clear()
            async with Harness(make(srv.port)) as h:
                await h.say(LONG_TOKENS)  # longer than 100 frames
                await h.collector.until(lambda: h.collector.of(TTSStoppedFrame))
                assert errors == ["context_full"], make.__name__
                before = h.audio_bytes()
                await h.say(TOKENS)
                await h.collector.until(lambda: len(h.collector.of(TTSStoppedFrame)) >= 2)
            assert h.audio_bytes() > before and errors == ["context_full"], make.__name__
    finally:
        srv.stop()


async def test_elevenlabs_words_and_audio(server):
    log = ServerLog.install()
    try:
        async with Harness(_elevenlabs(server.port)) as h:
            await h.say(TOKENS)
            await h.collector.until(lambda: h.collector.of(TTSStoppedFrame))
    finally:
        log.uninstall()
    words = [f.text for f in h.collector.of(TTSTextFrame)]
    assert words == ["Hello", "there,", "how", "are", "you", "today?"]
    times = [t for _, t in h.word_times]
    assert times == sorted(times) and len(set(times)) == len(times), times
    # Our own word events, placed on the context's clock (frames sent before them): pipecat's
    # times, built from the alignment, match them within one frame.
    ours = log.words_by_context()
    assert len(ours) == 1
    (context_words,) = ours.values()
    assert [w for w, _ in context_words] == [w for w, _ in h.word_times]
    for (word, ours_s), (_, theirs_s) in zip(context_words, h.word_times):
        assert abs(ours_s - theirs_s) < 0.08, (word, ours_s, theirs_s)
    frames = log.frames_by_context()
    (sent,) = frames.values()
    assert h.audio_bytes() == sent * 1920 * 2  # pcm_24000: every frame's audio, nothing else


async def test_elevenlabs_interruption_stops_and_next_turn_speaks(server):
    log = ServerLog.install()
    try:
        async with Harness(_elevenlabs(server.port)) as h:
            await h.say(LONG_TOKENS)
            await h.collector.until(lambda: len(h.collector.of(TTSAudioRawFrame)) >= 5)
            await h.interrupt()
            await log.until(lambda: log.barge_ins and log.paused_after(log.barge_ins[0].context))
            first = h.collector.of(TTSTextFrame)
            await h.say(TOKENS)
            await h.collector.until(lambda: [f for f in h.collector.of(TTSStoppedFrame)])
    finally:
        log.uninstall()
    (interrupted,) = log.barge_ins
    # Nothing of the interrupted context went out after the barge-in reached the adapter, and
    # the call stopped generating it: the next context's words are the next turn's.
    assert all(t <= interrupted.at for t in log.frame_times[interrupted.context])
    assert log.paused_after(interrupted.context)
    later = [f.text for f in h.collector.of(TTSTextFrame)][len(first):]
    assert later[-6:] == ["Hello", "there,", "how", "are", "you", "today?"]


async def test_cartesia_words_audio_and_interruption(server):
    from pipecat.services.cartesia.tts import CartesiaTTSService

    log = ServerLog.install()
    try:
        service = CartesiaTTSService(api_key="any-key", url=f"ws://127.0.0.1:{server.port}/tts/websocket",
                                     sample_rate=24000, settings=CartesiaTTSService.Settings(voice="default"))
        async with Harness(service) as h:
            await h.say(TOKENS)
            await h.collector.until(lambda: h.collector.of(TTSStoppedFrame))
            words = [f.text for f in h.collector.of(TTSTextFrame)]
            await h.say(LONG_TOKENS)
            await h.collector.until(lambda: h.audio_bytes() > 40 * 3840)
            await h.interrupt()
            await log.until(lambda: log.barge_ins and log.paused_after(log.barge_ins[0].context))
    finally:
        log.uninstall()
    assert words == ["Hello", "there,", "how", "are", "you", "today?"]
    times = [t for _, t in h.word_times]
    assert times[:6] == sorted(times[:6])
    (interrupted,) = log.barge_ins
    assert all(t <= interrupted.at for t in log.frame_times[interrupted.context])
    assert log.paused_after(interrupted.context)


async def test_deepgram_words_audio_and_clear(server):
    from pipecat.services.deepgram.tts import DeepgramTTSService

    log = ServerLog.install()
    try:
        service = DeepgramTTSService(api_key="any-key", base_url=f"ws://127.0.0.1:{server.port}", sample_rate=24000,
                                     settings=DeepgramTTSService.Settings(voice="aura-2-thalia-en"))
        async with Harness(service) as h:
            await h.say(TOKENS)
            await h.collector.until(lambda: h.collector.of(TTSStoppedFrame))  # after `Flushed`
            first, first_frames = h.audio_bytes(), log.frames["1"]
            await h.say(LONG_TOKENS)
            await h.collector.until(lambda: h.audio_bytes() > first + 5 * 3840)
            await h.interrupt()
            await log.until(lambda: log.barge_ins and log.paused_after("1"))
    finally:
        log.uninstall()
    assert first == first_frames * 3840  # linear16 at 24 kHz: every frame of the first turn, in raw binary
    (interrupted,) = log.barge_ins
    assert interrupted.context == "1"  # Deepgram's one stream


async def test_native_plugin_words_audio_and_barge_in(server):
    from dia2stream.integrations.pipecat import Dia2TTSService

    async with Harness(Dia2TTSService(url=f"ws://127.0.0.1:{server.port}/")) as h:
        await h.say(TOKENS)
        await h.collector.until(lambda: h.collector.of(TTSStoppedFrame))
        words = [f.text for f in h.collector.of(TTSTextFrame)]
        times = [t for _, t in h.word_times]
        await h.say(LONG_TOKENS)
        await h.collector.until(lambda: h.audio_bytes() > 40 * 3840)
        await h.interrupt()
        await h.say(TOKENS)
        await h.collector.until(lambda: len(h.collector.of(TTSStoppedFrame)) >= 2)
    assert words == ["Hello", "there,", "how", "are", "you", "today?"]
    assert times == sorted(times) and times[0] == pytest.approx(0.08)  # the lead-in frame, then the first word
    later = [f.text for f in h.collector.of(TTSTextFrame)]
    assert later[-6:] == ["Hello", "there,", "how", "are", "you", "today?"]


def _caller_audio(seconds: float, rate: int = 16_000) -> list[bytes]:
    """A voiced stretch between quiet ones, in 20 ms chunks of 16-bit PCM, as a transport sends them."""
    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    voiced = (t > 0.5) & (t < seconds - 0.5)
    pcm = (0.3 * 32767 * np.sin(2 * np.pi * 220 * t) * voiced).astype("<i2").tobytes()
    chunk = rate // 50 * 2
    return [pcm[i:i + chunk] for i in range(0, len(pcm), chunk)]


async def test_native_plugin_sends_the_callers_turns_between_agent_turns_and_after_a_barge_in(server):
    """The tap after the STT hands the caller's audio and final transcript to the service, which
    sends them as one `user_turn` before the agent's next turn: between turns, and after a barge-in."""
    from pipecat.frames.frames import InputAudioRawFrame, TranscriptionFrame

    from dia2stream.integrations.pipecat import Dia2CallerTap, Dia2TTSService

    service = Dia2TTSService(url=f"ws://127.0.0.1:{server.port}/")
    tap = service.caller_tap()
    assert isinstance(tap, Dia2CallerTap)
    h = Harness(service, before=[tap])

    async def caller_says(text: str) -> None:
        for chunk in _caller_audio(3.0):
            await h.worker.queue_frame(InputAudioRawFrame(audio=chunk, sample_rate=16_000, num_channels=1))
        await h.worker.queue_frame(TranscriptionFrame(text, "caller", "2026-01-01T00:00:00Z"))

    async with h:
        await caller_says("this was said before the call had a conversation")  # dropped: nowhere to put it
        await h.say(TOKENS)
        await h.collector.until(lambda: h.collector.of(TTSStoppedFrame))
        await caller_says("yes, it's Smith")
        await h.say(TOKENS)
        await h.collector.until(lambda: len(h.collector.of(TTSStoppedFrame)) >= 2)
        assert service.caller_turns_sent == 1 and len(service.caller_turns_done) == 1
        before = h.audio_bytes()
        await h.say(LONG_TOKENS)
        await h.collector.until(lambda: h.audio_bytes() > before + 30 * 3840)  # the long turn is speaking
        await h.interrupt()
        await caller_says("wait, stop")
        await h.say(["Sorry", ",", " go", " ahead", "."])
        # the answer's own words (the interrupted turn's stop frame may come first)
        await h.collector.until(lambda: [f.text for f in h.collector.of(TTSTextFrame)][-3:] == ["Sorry,", "go", "ahead."])
    first, second = service.caller_turns_done
    # 3 s heard, 2 s of it voiced: the quiet ends are trimmed to a 0.2 s margin each side
    assert (first["id"], second["id"]) == ("caller-1", "caller-2")
    assert first["frames"] == second["frames"] == 30
    assert second["position"] > first["position"] + first["frames"]
