"""`Dia2TTSService`: a Pipecat TTS service speaking our native protocol (docs/protocol.md).

    from dia2stream.integrations.pipecat import Dia2TTSService
    tts = Dia2TTSService(url="ws://127.0.0.1:8765/", voice="alice", auth_token="...")

One websocket is one call: the conversation stays warm across turns. An LLM response's text goes
out as `start` (when the call has no utterance: the first turn, or after a refused `start`, a
`reset` or an error that reset the call) or `inject` with `final: false`, its end as `flush`;
streamed tokens (`TextAggregationMode.TOKEN`) go out as whole words (up to the last whitespace:
the server does not join a word across fragments). A `ping` every `keepalive_s` (60 s) keeps a
quiet call from the server's idle timeout; audio frames
become `TTSAudioRawFrame`s and our `word` events become word timestamps (seconds from the
turn's first frame), so the context aggregator gets the words as they are played. An
interruption is a `pause` with `played_ms` = the audio of the turn handed on so far (Pipecat's
TTS does not see the transport's playback, so that is what it knows): the call rolls back to it,
and the next turn's `inject` replaces the words that were not sent. Install with
`pip install dia2stream[pipecat]`.

The caller's turns (`user_turn`, issue 21): a TTS service sees neither what the caller said nor
(in the usual pipeline) the final transcript, which the user context aggregator consumes. Place
the service's tap right after the STT service, where both pass:

    pipeline = Pipeline([transport.input(), stt, tts.caller_tap(), user_aggregator, llm, tts,
                         transport.output(), assistant_aggregator])

It hands the service the caller's `InputAudioRawFrame`s (the STT passes them on) and final
`TranscriptionFrame`s and passes every frame on unchanged. Before the first text of each agent
turn after the first, what was heard since the last turn goes out as one `user_turn` (see
`caller.CallerSpeech`): after a barge-in's `pause`, or between turns. Pipecat's transcription
frames carry no word times (only the STT's raw result), so the server spreads the words over the
voiced audio. What the caller says before the agent's first turn is dropped: the call has no
conversation yet to put it in. Without the tap nothing is sent and the call keeps only the
agent's side, as before.
"""

from __future__ import annotations

import json
import struct

from loguru import logger
from websockets.protocol import State

from pipecat.frames.frames import ErrorFrame, InputAudioRawFrame, TranscriptionFrame, TTSAudioRawFrame, TTSStoppedFrame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor, FrameProcessorSetup
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import WebsocketTTSService

from dia2stream.clock import FRAME_SECONDS, SAMPLE_RATE  # the plugins ask for pcm_24000, the native format
from dia2stream.integrations.caller import CallerSpeech
from dia2stream.integrations.native import WholeWords, answers_pause, ends_turn, still_started

_HEADER = struct.Struct("<I")
KEEPALIVE_S = 60.0  # a `ping` this often keeps a quiet call from the server's idle timeout (300 s by default)


class Dia2TTSService(WebsocketTTSService):
    def __init__(self, *, url: str = "ws://127.0.0.1:8765/", voice: str | None = None,
                 auth_token: str | None = None, max_user_turn_seconds: float = 30.0,
                 keepalive_s: float | None = KEEPALIVE_S, **kwargs):
        super().__init__(sample_rate=SAMPLE_RATE, push_start_frame=True, push_stop_frames=False, push_text_frames=False,
                         pause_frame_processing=True,
                         append_trailing_space=True, settings=TTSSettings(model="dia2", voice=voice, language=None),
                         **kwargs)
        self._url, self._voice, self._token = url, voice, auth_token
        self._receive_task = None
        self._started = False  # the call has an utterance: later turns `inject` (see `native.still_started`)
        self._keepalive_s = keepalive_s
        self._words, self._words_context = WholeWords(), None  # the turn's text not yet sent: part of a word
        self._pause_pending = False  # an interruption's `pause` is not answered yet
        self._turn_frames = 0  # frames of the call's utterance received (the utterance spans a resumed barge-in)
        self._context_origin: dict[str, int] = {}  # context -> utterance frames before its first frame
        self.caller = CallerSpeech(max_seconds=max_user_turn_seconds)  # filled by `caller_tap()`
        self.caller_turns_sent = 0
        self.caller_turns_done: list[dict] = []  # the server's `user_turn_done` answers, in order

    def caller_tap(self) -> "Dia2CallerTap":
        """The processor to place right after the STT service (see the module docstring)."""
        return Dia2CallerTap(self.caller)

    def can_generate_metrics(self) -> bool:
        return True

    async def setup(self, setup: FrameProcessorSetup):
        await super().setup(setup)
        await self._connect()

    async def _connect(self):
        await super()._connect()
        await self._connect_websocket()
        if self._websocket and not self._receive_task:
            self._receive_task = self.create_task(self._receive_task_handler(self._report_error))
        if self._websocket and self._keepalive_s:
            self._create_keepalive_task(self._keepalive_s)

    async def _disconnect(self):
        await super()._disconnect()
        await self._cancel_keepalive_task()
        if self._receive_task:
            await self.cancel_task(self._receive_task)
            self._receive_task = None
        await self._disconnect_websocket()

    async def _connect_websocket(self):
        if self._websocket and self._websocket.state is State.OPEN:
            return
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        try:
            self._websocket = await self._websocket_connect(self._url, additional_headers=headers)
            ready = json.loads(await self._websocket.recv())
            if ready.get("event") != "ready":
                raise RuntimeError(f"dia2stream refused the call: {ready.get('code')}: {ready.get('message')}")
            self._started, self._pause_pending = False, False
            await self._call_event_handler("on_connected")
        except Exception as e:
            self._websocket = None
            await self.push_error(error_msg=f"{self}: {e}", exception=e)
            await self._call_event_handler("on_connection_error", f"{e}")

    async def _disconnect_websocket(self):
        try:
            if self._websocket:
                await self._websocket.close()
        finally:
            self._websocket = None
            await self._call_event_handler("on_disconnected")

    async def _send(self, command: dict) -> None:
        await self._websocket.send(json.dumps(command))

    async def _send_keepalive(self):
        """Pipecat's keepalive hook: a `ping` counts as activity for the server's idle timeout,
        so a quiet call between turns keeps its warm conversation."""
        await self._send({"cmd": "ping"})

    async def run_tts(self, text: str, context_id: str):
        if not self._websocket or self._websocket.state is State.CLOSED:
            await self._connect()
        if self._websocket is None:
            yield ErrorFrame(error="dia2stream is not connected")
            return
        if context_id != self._words_context:
            self._words, self._words_context = WholeWords(), context_id
        self._words.add(text)
        ready = self._words.take()  # streamed tokens (TextAggregationMode.TOKEN): whole words only
        if ready:
            await self._send_text(ready, context_id)
        await self.start_tts_usage_metrics(text)
        yield None

    async def _send_text(self, text: str, context_id: str) -> None:
        new_turn = context_id not in self._context_origin
        self._context_origin.setdefault(context_id, -1)  # set at its first frame
        if new_turn and not self._started:  # the call has no utterance: this turn begins one
            self._started = True  # until the server refuses it
            self.caller.clear()  # said before the conversation existed: nowhere to put it
            command = {"cmd": "start", "text": text, "final": False, "id": context_id}
            if self._voice:
                command["voice"] = self._voice
        else:
            if new_turn:
                await self._send_caller_turn()
            command = {"cmd": "inject", "text": text, "final": False, "id": context_id}
        await self._send(command)

    async def _send_caller_turn(self) -> None:
        """What the caller said since the last agent turn, as one `user_turn`, before the agent's
        answer (the server prefills it while the LLM writes on)."""
        command = self.caller.take_turn(f"caller-{self.caller_turns_sent + 1}")
        if command is not None:
            self.caller_turns_sent += 1
            await self._send(command)

    async def flush_audio(self, context_id: str | None = None):
        if self._websocket and self._words_context is not None:
            rest = self._words.take(final=True)  # the turn's last word
            if rest:
                await self._send_text(rest, self._words_context)
        if self._websocket and self._started:
            await self._send({"cmd": "flush"})

    async def on_audio_context_interrupted(self, context_id: str):
        """Barge-in: roll the call back to what was handed on (see the module docstring)."""
        await self.stop_all_metrics()
        if self._websocket and self._started:
            await self._send({"cmd": "pause", "played_ms": self._turn_frames * FRAME_SECONDS * 1000})
            # until `paused` comes back, what arrives is the interrupted turn's tail (generated
            # before the server took the pause): it must not play in the next turn's context
            self._pause_pending = True
        self._context_origin.pop(context_id, None)
        if context_id == self._words_context:
            self._words, self._words_context = WholeWords(), None
        await super().on_audio_context_interrupted(context_id)

    async def _receive_messages(self):
        async for message in self._websocket:
            event = None if isinstance(message, bytes) else json.loads(message)
            was_started = self._started
            if event is not None:
                self._started = still_started(event, self._started)
            if self._pause_pending:
                self._pause_pending = not answers_pause(message)
                continue
            context_id = self.get_active_audio_context_id()
            if isinstance(message, bytes):
                (count,) = _HEADER.unpack_from(message)
                if context_id and self._context_origin.get(context_id) == -1:
                    self._context_origin[context_id] = self._turn_frames
                self._turn_frames += 1
                if context_id:
                    await self.append_to_audio_context(
                        context_id, TTSAudioRawFrame(message[_HEADER.size:], SAMPLE_RATE, 1, context_id=context_id))
                continue
            kind = event.get("event")
            if kind == "started":
                self._turn_frames = 0
            elif kind == "word" and context_id:
                origin = max(self._context_origin.get(context_id, 0), 0)
                await self.add_word_timestamps([(event["word"], event["frame"] * FRAME_SECONDS - origin * FRAME_SECONDS)],
                                               context_id)
            elif kind == "done" and context_id:
                await self.stop_ttfb_metrics()
                await self.append_to_audio_context(context_id, TTSStoppedFrame(context_id=context_id))
                await self.remove_audio_context(context_id)
                self._context_origin.pop(context_id, None)
            elif kind == "user_turn_done":
                self.caller_turns_done.append(event)
            elif kind == "error" and event.get("cmd") == "user_turn":  # the agent's turn goes on without it
                logger.warning(f"{self}: the caller's turn was refused: {event.get('code')}: {event.get('message')}")
            elif kind == "error" and event.get("code") == "not_started" and not was_started:
                # the rest of a turn whose `start` was refused, or of an utterance the server reset
                # (its cause was reported): the next turn sends `start`
                logger.debug(f"{self}: dia2stream error {event.get('code')}: {event.get('message')}")
            elif kind == "error":
                logger.warning(f"{self}: dia2stream error {event.get('code')}: {event.get('message')}")
                if context_id and (ends_turn(event) or not self._started):
                    # no `done` will come for this turn (a refused `start`, a reset call): end it. Its
                    # context stays known, so the rest of its text is not a new `start`.
                    await self.append_to_audio_context(context_id, TTSStoppedFrame(context_id=context_id))
                    await self.remove_audio_context(context_id)
                await self.push_error(error_msg=f"dia2stream {event.get('code')}: {event.get('message')}")


class Dia2CallerTap(FrameProcessor):
    """Hands the caller's audio and final transcripts to a `Dia2TTSService` (its `caller_tap()`);
    every frame goes on unchanged. Place it right after the STT service."""

    def __init__(self, caller: CallerSpeech, **kwargs):
        super().__init__(**kwargs)
        self._caller = caller

    async def process_frame(self, frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            if isinstance(frame, InputAudioRawFrame):
                self._caller.add_audio(frame.audio, frame.sample_rate, frame.num_channels)
            elif isinstance(frame, TranscriptionFrame):
                self._caller.add_transcript(frame.text)
        await self.push_frame(frame, direction)
