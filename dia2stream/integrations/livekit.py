"""`TTS`: a LiveKit Agents TTS speaking our native protocol (docs/protocol.md).

    from dia2stream.integrations.livekit import TTS
    session = AgentSession(tts=TTS(url="ws://127.0.0.1:8765/", voice="alice"), ...)

One websocket per `TTS` is one call, shared by its streams one at a time, so the conversation
stays warm across turns. A stream's text goes out as `start` (when the call has no utterance: the
first turn, or after a refused `start`, a `reset` or an error that reset the call) or `inject`
with `final: false`, its end as `flush`. The LLM's pieces are buffered and sent as whole words
(up to the last whitespace; the server does not join a word across fragments), at most one
command every 50 ms. While a stream's input is open the server may hold silently for more text,
so the connection timeout counts only once the input has ended. Server errors are `APIError`s
(`retryable` for transient ones such as `busy`, not for `unknown_voice`), a lost connection an
`APIConnectionError`; frames become PCM (24 kHz) and our `word` events timed
words (each ends where the next begins). A stream closed while it is speaking (an interruption)
sends `pause` with `played_ms` = the audio of the turn it received (the plugin does not see
playback, so that is what it knows): the call rolls back to it and the next turn's `inject`
replaces the words not sent. `synthesize(text)` is one turn with all its text. Install with
`pip install dia2stream[livekit]`.

The caller's turns (`user_turn`, issue 21): LiveKit hands a TTS only text, never the session, so
the application tells the plugin which session to listen to, after starting it:

    await session.start(agent=..., room=...)
    tts.hear_caller(session)

That chains a tap onto the session's audio input (as LiveKit's own recorder does: every frame
goes on to the STT unchanged) and follows its final `user_input_transcribed` events. Before the
first text of each agent turn after the first, what was heard since the last turn goes out as one
`user_turn` (see `caller.CallerSpeech`): after an interruption's `pause`, or between turns. The
transcription events carry no word times, so the server spreads the words over the voiced audio.
What the caller says before the agent's first turn is dropped: the call has no conversation yet
to put it in. Without `hear_caller` nothing is sent and the call keeps only the agent's side.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct

from livekit.agents import APIConnectionError, APIConnectOptions, APIError, tts, utils
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS
from livekit.agents.voice.io import AudioInput, TimedString
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.protocol import State

from dia2stream.clock import FRAME_SECONDS, SAMPLE_RATE
from dia2stream.integrations.caller import CallerSpeech
from dia2stream.integrations.native import WholeWords, answers_pause, still_started

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<I")
SEND_INTERVAL_S = 0.05  # at most one text command this often (the server allows 50 a second, 100 at once)
# Errors worth another attempt (LiveKit retries an `APIError` with `retryable` before any audio
# went out); the others (`unknown_voice`, `invalid_field`, ...) would fail the same way again.
_RETRYABLE = frozenset({"busy", "rate_limited", "internal_error", "context_full", "not_started", "draining",
                        "shutting_down", "pending_text_full"})


class TTS(tts.TTS):
    def __init__(self, *, url: str = "ws://127.0.0.1:8765/", voice: str | None = None,
                 auth_token: str | None = None, max_user_turn_seconds: float = 30.0) -> None:
        super().__init__(capabilities=tts.TTSCapabilities(streaming=True, aligned_transcript=True),
                         sample_rate=SAMPLE_RATE, num_channels=1)
        self._call = _Call(url, voice, auth_token, CallerSpeech(max_seconds=max_user_turn_seconds))

    def hear_caller(self, session) -> None:
        """Send the caller's turns of this `AgentSession` (see the module docstring); call it
        after `session.start`, once the session has its audio input."""
        if session.input.audio is None:
            raise RuntimeError("the session has no audio input yet: call hear_caller after session.start")
        caller = self._call.caller
        session.input.audio = _CallerAudioTap(caller, session.input.audio)
        session.on("user_input_transcribed", lambda ev: caller.add_transcript(ev.transcript) if ev.is_final else None)

    @property
    def caller_turns_done(self) -> list[dict]:
        """The server's `user_turn_done` answers, in order."""
        return self._call.caller_turns_done

    @property
    def model(self) -> str:
        return "dia2"

    @property
    def provider(self) -> str:
        return "dia2stream"

    def synthesize(self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
                   ) -> "ChunkedStream":
        return ChunkedStream(tts=self, input_text=text, conn_options=conn_options)

    def stream(self, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS) -> "SynthesizeStream":
        return SynthesizeStream(tts=self, conn_options=conn_options)

    async def aclose(self) -> None:
        await self._call.close()


class ChunkedStream(tts.ChunkedStream):
    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        output_emitter.initialize(request_id=utils.shortuuid(), sample_rate=SAMPLE_RATE, num_channels=1,
                                  mime_type="audio/pcm")

        async def text():
            yield self._input_text

        await self._tts._call.speak(text(), output_emitter, self._conn_options.timeout)


class SynthesizeStream(tts.SynthesizeStream):
    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        request_id = utils.shortuuid()
        output_emitter.initialize(request_id=request_id, sample_rate=SAMPLE_RATE, num_channels=1,
                                  mime_type="audio/pcm", stream=True)
        output_emitter.start_segment(segment_id=request_id)

        async def text():
            async for data in self._input_ch:
                if isinstance(data, str) and data:
                    self._mark_started()
                    yield data  # flush sentinels: one turn per stream, ended by `flush` at end_input

        await self._tts._call.speak(text(), output_emitter, self._conn_options.timeout)
        output_emitter.end_segment()


class _Call:
    """The shared connection: one stream speaks at a time."""

    def __init__(self, url: str, voice: str | None, token: str | None, caller: CallerSpeech) -> None:
        self.url, self.voice, self.token, self.caller = url, voice, token, caller
        self.caller_turns_sent = 0
        self.caller_turns_done: list[dict] = []
        self.ws: ClientConnection | None = None
        self.lock = asyncio.Lock()
        self.started = False  # the call has an utterance: a turn `inject`s (see `native.still_started`)
        self.turns = 0
        self.turn_frames = 0  # frames of the call's utterance (it spans a resumed barge-in)
        # An interruption's `pause` went out: until its `paused` comes back, what arrives is the
        # interrupted turn's tail (frames and words generated before the server took the pause).
        self.pause_pending = False

    async def _connection(self, timeout: float) -> ClientConnection:
        if self.ws is not None and self.ws.state is State.OPEN:
            return self.ws
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            self.ws = await connect(self.url, additional_headers=headers, open_timeout=timeout)
            ready = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        except (OSError, asyncio.TimeoutError, WebSocketException) as exc:
            raise APIConnectionError(f"dia2stream at {self.url}: {exc}") from exc
        if ready.get("event") != "ready":
            raise APIConnectionError(f"dia2stream refused the call: {ready.get('code')}: {ready.get('message')}",
                                     retryable=ready.get("code") in _RETRYABLE)
        self.started, self.turn_frames, self.pause_pending = False, 0, False
        return self.ws

    async def speak(self, texts, emitter: tts.AudioEmitter, timeout: float) -> None:
        async with self.lock:
            ws = await self._connection(timeout)
            self.turns += 1
            turn = f"lk-{self.turns}"  # every command of the turn carries it: errors of an earlier turn's are stale
            sent = asyncio.Event()  # some text went out: a `done` will come
            sender = asyncio.create_task(self._send(ws, texts, sent, turn))
            try:
                await self._receive(ws, emitter, sender, sent, timeout, turn)
            except (asyncio.CancelledError, APIError):
                if self.started and ws.state is State.OPEN:  # interrupted mid-turn: roll back to what we got
                    try:
                        await ws.send(json.dumps({"cmd": "pause", "played_ms": self.turn_frames * FRAME_SECONDS * 1000,
                                                  "id": turn}))
                        self.pause_pending = True
                    except (ConnectionClosed, OSError):
                        pass
                raise
            except (ConnectionClosed, OSError) as exc:  # LiveKit reports (and retries) only its own errors
                raise APIConnectionError(f"dia2stream at {self.url}: the connection was lost: {exc}") from exc
            finally:
                await utils.aio.gracefully_cancel(sender)

    async def _send(self, ws: ClientConnection, texts, sent: asyncio.Event, turn: str) -> None:
        """The turn's text as whole words (`WholeWords`), at most one command per `SEND_INTERVAL_S`
        (what came in between goes out together), then `flush`."""
        words, more = WholeWords(), asyncio.Event()
        ended = False

        async def read() -> None:
            nonlocal ended
            try:
                async for text in texts:
                    words.add(text)
                    more.set()
            finally:
                ended = True
                more.set()

        reader = asyncio.create_task(read())
        loop = asyncio.get_running_loop()
        last = -SEND_INTERVAL_S
        try:
            while True:
                await more.wait()
                if not ended and (wait := last + SEND_INTERVAL_S - loop.time()) > 0:
                    await asyncio.sleep(wait)  # coalesce: a fast LLM's tokens go out together
                more.clear()
                final = ended
                text = words.take(final=final)
                if text:
                    await self._send_text(ws, text, sent, turn)
                    last = loop.time()
                if final:
                    break
            await reader  # its error, if any
        finally:
            await utils.aio.gracefully_cancel(reader)
        if sent.is_set():
            await ws.send(json.dumps({"cmd": "flush", "id": turn}))

    async def _send_text(self, ws: ClientConnection, text: str, sent: asyncio.Event, turn: str) -> None:
        if not sent.is_set() and not self.started:  # the call has no utterance: this turn begins one
            self.started = True  # until the server refuses it (see `still_started`)
            self.caller.clear()  # said before the conversation existed: nowhere to put it
            command = {"cmd": "start", "text": text, "final": False, "id": turn}
            if self.voice:
                command["voice"] = self.voice
        else:
            if not sent.is_set():  # the turn's first text: the caller's turn goes before it
                await self._send_caller_turn(ws)
            command = {"cmd": "inject", "text": text, "final": False, "id": turn}
        await ws.send(json.dumps(command))
        sent.set()

    async def _send_caller_turn(self, ws: ClientConnection) -> None:
        command = self.caller.take_turn(f"caller-{self.caller_turns_sent + 1}")
        if command is not None:
            self.caller_turns_sent += 1
            await ws.send(json.dumps(command))

    async def _receive(self, ws, emitter, sender: asyncio.Task, sent: asyncio.Event, timeout: float,
                       turn: str) -> None:
        origin = None  # utterance frames before this turn's first frame
        last: tuple[str, float] | None = None
        while True:
            if sender.done() and (not sent.is_set() or sender.exception() is not None):
                sender.result()  # the sender's error (a lost connection), if any
                return  # no text: nothing to speak
            # While the turn's input is open the server holds silently for more text (an LLM
            # pausing): the timeout counts only once the input is finished.
            try:
                message = await asyncio.wait_for(ws.recv(), timeout if sender.done() else min(timeout, 0.5))
            except asyncio.TimeoutError:
                if not sender.done():
                    continue
                if not sent.is_set():
                    return
                raise APIConnectionError("dia2stream sent nothing for the timeout") from None
            event = None if isinstance(message, bytes) else json.loads(message)
            if event is not None:
                self.started = still_started(event, self.started)
            if self.pause_pending:
                self.pause_pending = not answers_pause(message)
                continue
            if event is None:
                if origin is None:
                    origin = self.turn_frames
                self.turn_frames += 1
                emitter.push(message[_HEADER.size:])
                continue
            kind = event.get("event")
            if kind == "started":
                self.turn_frames = 0
                origin = None
            elif kind == "word":
                start = event["frame"] * FRAME_SECONDS - (origin or 0) * FRAME_SECONDS
                if last is not None:
                    emitter.push_timed_transcript(TimedString(text=last[0] + " ", start_time=last[1], end_time=start))
                last = (event["word"], start)
            elif kind == "done":
                if last is not None:
                    end = (self.turn_frames - (origin or 0)) * FRAME_SECONDS
                    emitter.push_timed_transcript(TimedString(text=last[0] + " ", start_time=last[1], end_time=end))
                emitter.flush()
                return
            elif kind == "user_turn_done":
                self.caller_turns_done.append(event)
            elif kind == "error" and event.get("cmd") == "user_turn":  # the agent's turn goes on without it
                log.warning("the caller's turn was refused: %s: %s", event.get("code"), event.get("message"))
            elif kind == "error" and event.get("cmd") in ("start", "inject", "flush") and event.get("id") != turn:
                log.debug("dia2stream error for an earlier turn: %s", event)  # e.g. after a refused start
            elif kind == "error":
                code = event.get("code")
                raise APIError(f"dia2stream {code}: {event.get('message')}", body=event,
                               retryable=code in _RETRYABLE)

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
            self.ws = None


class _CallerAudioTap(AudioInput):
    """Chained onto a session's audio input: every frame goes on, a copy to the caller's turn."""

    def __init__(self, caller: CallerSpeech, source: AudioInput) -> None:
        super().__init__(label="dia2stream-caller", source=source)
        self._caller = caller

    async def __anext__(self):
        frame = await self.source.__anext__()
        self._caller.add_audio(bytes(frame.data), frame.sample_rate, frame.num_channels)
        return frame
