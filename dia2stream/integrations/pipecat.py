"""`Dia2TTSService`: a Pipecat TTS service speaking our native protocol (docs/protocol.md).

    from dia2stream.integrations.pipecat import Dia2TTSService
    tts = Dia2TTSService(url="ws://127.0.0.1:8765/", voice="alice", auth_token="...")

One websocket is one call: the conversation stays warm across turns. An LLM response's text goes
out as `start` (the first ever) or `inject` with `final: false`, its end as `flush`; audio frames
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
from dia2stream.integrations.native import answers_pause

_HEADER = struct.Struct("<I")


class Dia2TTSService(WebsocketTTSService):
    def __init__(self, *, url: str = "ws://127.0.0.1:8765/", voice: str | None = None,
                 auth_token: str | None = None, max_user_turn_seconds: float = 30.0, **kwargs):
        super().__init__(sample_rate=SAMPLE_RATE, push_start_frame=True, push_stop_frames=False, push_text_frames=False,
                         pause_frame_processing=True,
                         append_trailing_space=True, settings=TTSSettings(model="dia2", voice=voice, language=None),
                         **kwargs)
        self._url, self._voice, self._token = url, voice, auth_token
        self._receive_task = None
        self._started = False  # a `start` went out on this connection: later turns `inject`
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

    async def _disconnect(self):
        await super()._disconnect()
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

    async def run_tts(self, text: str, context_id: str):
        if not self._websocket or self._websocket.state is State.CLOSED:
            await self._connect()
        if self._websocket is None:
            yield ErrorFrame(error="dia2stream is not connected")
            return
        new_turn = context_id not in self._context_origin
        self._context_origin.setdefault(context_id, -1)  # set at its first frame
        if not self._started:
            self._started = True
            self.caller.clear()  # said before the conversation existed: nowhere to put it
            command = {"cmd": "start", "text": text, "final": False}
            if self._voice:
                command["voice"] = self._voice
        else:
            if new_turn:
                await self._send_caller_turn()
            command = {"cmd": "inject", "text": text, "final": False}
        await self._send(command)
        await self.start_tts_usage_metrics(text)
        yield None

    async def _send_caller_turn(self) -> None:
        """What the caller said since the last agent turn, as one `user_turn`, before the agent's
        answer (the server prefills it while the LLM writes on)."""
        command = self.caller.take_turn(f"caller-{self.caller_turns_sent + 1}")
        if command is not None:
            self.caller_turns_sent += 1
            await self._send(command)

    async def flush_audio(self, context_id: str | None = None):
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
        await super().on_audio_context_interrupted(context_id)

    async def _receive_messages(self):
        async for message in self._websocket:
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
            event = json.loads(message)
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
            elif kind == "error":
                logger.warning(f"{self}: dia2stream error {event.get('code')}: {event.get('message')}")
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
