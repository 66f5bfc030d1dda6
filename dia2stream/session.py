"""The long-lived streaming session: one conversation driven frame by frame.

`StreamingSession` keeps the model's KV cache, the delayed audio buffer, the text state machine
and Mimi's streaming decoder warm across turns. All model work runs on one dedicated generation
thread; callers hand it typed commands (`submit`) and receive typed events and PCM frames
through a sink. The thread checks for commands between frames, so `pause` lands within one
frame, and it never runs more than `max_lead_ms` ahead of real time.

Frames carry an *epoch*. Commands that must silence stale audio (pause, reset, start) raise the
epoch the moment they are submitted, so a sender can drop frames generated before them even if
they are already queued; the thread stamps later frames with the epoch of the last command it
processed. Nothing here knows JSON or sockets.

The client's sink changes hands through the same command queue (`_Attach`/`_Detach`), so
everything the thread emits for one connection's commands, and nothing else, reaches that
connection's sink, whatever the timing of a disconnect and the next connect.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import numpy as np
import torch

from vendor_dia2 import Dia2
from vendor_dia2.config import FRAME_RATE
from vendor_dia2.runtime import SamplingParams
from vendor_dia2.script import ScriptError, parse_script

from . import protocol as p
from .protocol import ErrorCode
from .voice import VoiceError, VoicePreparer, VoiceRequest, VoiceSettings, VoiceState, restore_voice

log = logging.getLogger(__name__)

FRAME_SECONDS = 1.0 / FRAME_RATE


@dataclass(frozen=True)
class SessionConfig:
    max_lead_ms: float = 1000.0  # how far generation may run ahead of real-time playback
    context_frames: int | None = None  # positions before `context_full`; None = the model's limit
    cfg_scale: float = 2.0  # the default; 1.0 runs a single branch (faster, no per-request CFG)
    seed: int = 0
    max_top_k: int = 256
    max_unsent_frames: int = 250  # frames generated but not yet sent (slow client) before waiting
    voice: VoiceSettings = VoiceSettings()
    min_turn_frames: int = 125  # context a voice prefix must leave free for speech


@dataclass(frozen=True)
class AudioFrame:
    pcm: np.ndarray  # float32 [1920] in [-1, 1]
    epoch: int
    index: int  # frame index within the utterance


Item = object  # an event dataclass from `protocol`, or an AudioFrame
Sink = Callable[[Item], None]


class Phase(Enum):
    NONE = "none"  # nothing started since attach/reset
    GENERATING = "generating"
    HOLDING = "holding"  # words ran out, more text of the turn is expected
    PAUSED = "paused"
    IDLE = "idle"  # utterance done, warm


@dataclass
class _Submitted:
    command: object
    epoch: int
    at: float = 0.0  # time.monotonic() when the command was received


@dataclass
class Turn:
    """Bookkeeping of the utterance being spoken."""

    id: p.ClientId | None
    start_position: int
    first_frame: int  # aligned frame index of the utterance's first frame
    started_at: float
    next_frame: int  # next aligned frame index to decode and send
    frames_sent: int = 0
    first_audio_at: float | None = None
    word_ids: deque = field(default_factory=deque)  # [count, id] per text command, in order
    words_emitted: int = 0
    pace_origin: float = 0.0  # wall time that frame `pace_frames` of playback corresponds to
    pace_frames: int = 0


class StreamingSession:
    """One conversation at a time on one model instance (see `attach`)."""

    def __init__(self, tts: Dia2, config: SessionConfig = SessionConfig()):
        self.tts, self.config = tts, config
        model_limit = tts.config.runtime.max_context_steps
        self.context_frames = min(config.context_frames or model_limit, model_limit)
        self.stepper = tts.stepper(cfg=config.cfg_scale != 1.0, max_positions=self.context_frames)
        self.machine = tts.new_state_machine()
        self.codec = tts.codec
        self.codec.open_stream(1)
        self.tail_frames = tts.tail_frames
        self.defaults = SamplingParams(cfg_scale=config.cfg_scale, seed=config.seed)
        self.preparer = VoicePreparer(tts, config.voice)
        self.voices: dict[str, VoiceState] = {}  # written on the generation thread only
        self.default_voice: str | None = None  # the first preloaded voice
        self.current_voice: str | None = None  # per connection: reset to the default on attach
        self._floor_frame = 0  # aligned frames before this belong to the voice prefix (never decoded)

        self._commands: queue.Queue[_Submitted] = queue.Queue()
        self._lock = threading.Lock()
        self._sink: Sink | None = None  # the client holding the session (event-loop side)
        self._out: Sink | None = None  # where the generation thread emits (thread side)
        self._received_at = 0.0  # receive time of the command being handled
        self._epoch = 0  # raised by barrier commands at submit time
        self._out_epoch = 0  # stamped on frames by the generation thread
        self.frames_acked = 0  # frames the sender has written to the socket (set by the server)
        self._frames_emitted = 0
        self.phase = Phase.NONE
        self._resume_phase = Phase.GENERATING  # what `resume` returns to
        self.turn: Turn | None = None
        self._last_turn: Turn | None = None
        self._closed = False
        self._clean_reset()
        self._thread = threading.Thread(target=self._run, name="dia2-generation", daemon=True)
        self._thread.start()

    # -- called from the server's event loop ---------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._sink is not None

    @property
    def min_epoch(self) -> int:
        return self._epoch

    def attach(self, sink: Sink) -> bool:
        """Give the session to a client. False if another client holds it."""
        with self._lock:
            if self._sink is not None:
                return False
            self._sink = sink
            self.frames_acked = 0
        # Queued after the previous client's detach (and its clean reset): the thread only emits
        # to the new sink once everything of the previous client is over.
        self.submit(_Attach(sink))
        return True

    def detach(self, sink: Sink) -> None:
        """The client left: stop within one frame and free the session."""
        with self._lock:
            if self._sink is not sink:
                return
            self._sink = None
        self.submit(_Detach())

    def reply(self, event: object) -> None:
        """An event the event loop answers itself (ping, parse errors), sent in command order."""
        self.submit(_Reply(event))

    def submit(self, command: object) -> None:
        # Not start: it is refused while generating, and after `done` the queue may still hold the
        # previous utterance's last frames, which must be heard.
        if isinstance(command, (p.Pause, p.Reset, _Detach)):
            self._epoch += 1  # frames already queued for the client are now stale
        self._commands.put(_Submitted(command, self._epoch, time.monotonic()))

    def close(self) -> None:
        self._closed = True
        self._commands.put(_Submitted(_Detach(), self._epoch))
        self._thread.join(timeout=5)
        self.codec.close_stream()

    def preload_voice(self, request: VoiceRequest, cache: bool = True, timeout: float | None = None) -> VoiceState:
        """Prepare a voice on the generation thread and wait for it (server start-up). The first
        preloaded voice becomes the default voice. Raises VoiceError."""
        import concurrent.futures

        done: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(_Submitted(_PrepareVoice(request, done, cache), self._epoch, time.monotonic()))
        return done.result(timeout=timeout)

    @property
    def max_prefix_frames(self) -> int:
        return max(0, self.context_frames - self.config.min_turn_frames)

    # -- the generation thread -----------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._closed:
            try:
                timeout = self._wait_seconds()
                try:
                    sub = self._commands.get(timeout=timeout) if timeout else self._commands.get_nowait()
                except queue.Empty:
                    sub = None
                if sub is not None:
                    self._out_epoch = max(self._out_epoch, sub.epoch)
                    self._received_at = sub.at
                    self._handle(sub.command)
                    continue  # drain every pending command before the next frame
                if self.phase is Phase.GENERATING and self._may_generate():
                    self._generate_frame()
            except Exception as exc:  # a bug must not kill the thread: report, reset, go on
                log.exception("generation thread error")
                self._emit(p.ErrorEvent(code=ErrorCode.INTERNAL_ERROR, message=f"internal error: {exc}",
                                        id=self.turn.id if self.turn else None))
                self._clean_reset()
                self.phase = Phase.NONE

    def _wait_seconds(self) -> float | None:
        """How long to block for a command: 0 means do not block (a frame is due)."""
        if self.phase is not Phase.GENERATING:
            return 0.5
        lead = self._lead_seconds()
        excess = lead - self.config.max_lead_ms / 1000.0
        if excess > 0:
            return min(excess, 0.5)
        if self._frames_emitted - self.frames_acked > self.config.max_unsent_frames:
            return 0.02
        return 0.0

    def _may_generate(self) -> bool:
        return (self._lead_seconds() <= self.config.max_lead_ms / 1000.0
                and self._frames_emitted - self.frames_acked <= self.config.max_unsent_frames)

    def _lead_seconds(self) -> float:
        turn = self.turn
        if turn is None or turn.first_audio_at is None:
            return 0.0
        played = time.monotonic() - turn.pace_origin
        return (turn.frames_sent - turn.pace_frames) * FRAME_SECONDS - played

    # -- commands ------------------------------------------------------------------------------

    def _handle(self, cmd: object) -> None:
        if isinstance(cmd, _Detach):
            self._out = None
            self._clean_reset()
            self._last_turn = None  # the next client must not see this client's utterance
            self.phase = Phase.NONE
            return
        if isinstance(cmd, _Attach):
            self._out = cmd.sink
            self._frames_emitted = 0
            self.current_voice = self.default_voice
            return
        if isinstance(cmd, _PrepareVoice):
            try:
                state = self._prepare_voice(cmd.request, cache=cmd.cache)
            except BaseException as exc:
                cmd.future.set_exception(exc)
            else:
                if self.default_voice is None:
                    self.default_voice = self.current_voice = state.name
                cmd.future.set_result(state)
            return
        if self._out is None:
            return  # a command that raced with a disconnect
        if isinstance(cmd, _Reply):
            self._emit(cmd.event)
            return
        handler = {p.Start: self._on_start, p.Inject: self._on_inject, p.Flush: self._on_flush,
                   p.Pause: self._on_pause, p.Resume: self._on_resume, p.Reset: self._on_reset,
                   p.SetVoice: self._on_set_voice, p.ListVoices: self._on_list_voices}.get(type(cmd))
        if handler is None:
            raise TypeError(f"session cannot handle {type(cmd).__name__}")
        try:
            handler(cmd)
        except p.ProtocolError as err:
            self._emit(err.to_event())

    def _on_start(self, cmd: p.Start) -> None:
        if self.phase in (Phase.GENERATING, Phase.HOLDING):
            raise p.ProtocolError(ErrorCode.BUSY, "an utterance is being generated; send pause or reset first",
                                  cmd="start", id=cmd.id)
        self._check_voice(cmd)
        params = self._sampling(cmd)
        entries = self._parse(cmd.text, cmd, leading_speaker="[S1]")
        if cmd.voice is not None:
            self.current_voice = cmd.voice
        self._voice_reset()
        self.stepper.set_sampling(0, params)
        self._begin_turn(cmd.id)
        self._push(entries, cmd.final, cmd.id)

    def _on_inject(self, cmd: p.Inject) -> None:
        if self.phase is Phase.NONE:
            raise p.ProtocolError(ErrorCode.NOT_STARTED, "nothing to continue: send start first", cmd="inject",
                                  id=cmd.id)
        entries = self._parse(cmd.text, cmd, leading_speaker=None)
        if self.phase is Phase.IDLE:
            self._begin_turn(cmd.id)  # the next turn, from the warm state
        elif self.phase is Phase.PAUSED:
            self.phase = self._resume_phase
            self._emit(p.Resumed(id=cmd.id if cmd.id is not None else self.turn.id))
            self._restart_pacing()
        if cmd.id is not None:
            self.turn.id = cmd.id
        self._push(entries, cmd.final, cmd.id)

    def _on_flush(self, cmd: p.Flush) -> None:
        if self.phase is Phase.NONE:
            raise p.ProtocolError(ErrorCode.NOT_STARTED, "nothing to flush: send start first", cmd="flush", id=cmd.id)
        self.machine.finish()
        if self.phase is Phase.HOLDING:
            self._leave_hold()  # speak the tail, then done
        elif self.phase is Phase.PAUSED and self._resume_phase is Phase.HOLDING:
            self._resume_phase = Phase.GENERATING  # else resume would hold forever, with no done

    def _on_pause(self, cmd: p.Pause) -> None:
        turn = self.turn or self._last_turn
        if self.phase in (Phase.GENERATING, Phase.HOLDING):
            self._resume_phase = self.phase
            self.phase = Phase.PAUSED
        frames = turn.frames_sent if turn else 0
        self._emit(p.Paused(id=cmd.id if cmd.id is not None else (turn.id if turn else None), frames_sent=frames,
                            position=self.stepper.host_positions[0], audio_s=round(frames * FRAME_SECONDS, 3)))

    def _on_resume(self, cmd: p.Resume) -> None:
        if self.phase is Phase.NONE:
            raise p.ProtocolError(ErrorCode.NOT_STARTED, "nothing to resume: send start first", cmd="resume", id=cmd.id)
        if self.phase is not Phase.PAUSED:
            raise p.ProtocolError(ErrorCode.NOT_PAUSED, f"nothing is paused (session is {self.phase.value})",
                                  cmd="resume", id=cmd.id)
        self.phase = self._resume_phase
        self._restart_pacing()
        self._emit(p.Resumed(id=cmd.id if cmd.id is not None else self.turn.id))

    def _on_reset(self, cmd: p.Reset) -> None:
        self._check_voice(cmd)
        if cmd.voice is not None:
            self.current_voice = cmd.voice
        self._voice_reset()
        self.phase = Phase.NONE
        self._emit(p.ResetDone(voice=self.current_voice, id=cmd.id))

    # -- voices --------------------------------------------------------------------------------

    def _check_voice(self, cmd) -> None:
        if cmd.voice is not None and cmd.voice not in self.voices:
            known = ", ".join(sorted(self.voices)) or "none"
            raise p.ProtocolError(ErrorCode.UNKNOWN_VOICE, f"no voice named {cmd.voice!r} has been prepared "
                                  f"(prepared: {known}); send set_voice first", cmd=cmd.cmd, id=cmd.id)

    def _on_set_voice(self, cmd: p.SetVoice) -> None:
        if self.phase in (Phase.GENERATING, Phase.HOLDING):
            raise p.ProtocolError(ErrorCode.BUSY, "an utterance is being generated; set_voice is accepted "
                                  "when idle or paused", cmd="set_voice", id=cmd.id)
        try:
            state = self._prepare_voice(VoiceRequest.from_command(cmd))
        except VoiceError as err:
            log.info("set_voice %s failed: %s %s", cmd.name, err.code, err.message)
            raise p.ProtocolError(err.code, err.message, cmd="set_voice", id=cmd.id) from None
        self._emit(p.VoiceReady(name=state.name, prefix_s=state.prefix_s, prepare_ms=state.prepare_ms,
                                speakers=state.speakers, id=cmd.id))

    def _on_list_voices(self, cmd: p.ListVoices) -> None:
        self._emit(p.Voices(voices=[v.info() for v in self.voices.values()], id=cmd.id))

    def _prepare_voice(self, request: VoiceRequest, cache: bool = True) -> VoiceState:
        """Build (or load from the disk cache) a voice; the live conversation state is kept."""
        t0 = time.perf_counter()
        loaded = self.preparer.load(request)
        key = self.preparer.state_key(loaded, self.stepper)
        directory = self.config.voice.cache_path() / "states" / key[:32]
        state = None
        if cache and (directory / "voice.json").is_file():
            try:
                state = VoiceState.load(directory, self.tts.device)
                if state.key != key:
                    state = None
            except Exception as exc:
                log.warning("voice cache %s unreadable (%s); preparing again", directory, exc)
                state = None
        if state is not None:
            state.name = request.name
            state.speakers = loaded.distinct
            state.prepare_ms = round((time.perf_counter() - t0) * 1000, 1)
            log.info("voice %s loaded from %s in %.0f ms", request.name, directory, state.prepare_ms)
        else:
            live = (self.stepper.snapshot(), self.machine.snapshot(), self.codec.snapshot_stream())
            try:
                state = self.preparer.build(loaded, self.stepper, self.machine, self.codec,
                                            max_frames=self.max_prefix_frames)
            except VoiceError:
                raise
            except Exception as exc:
                log.exception("voice preparation failed")
                raise VoiceError(ErrorCode.VOICE_ERROR, f"voice preparation failed: {exc}") from None
            finally:
                self.stepper.restore(live[0])
                self.machine.restore(live[1])
                self.codec.restore_stream(live[2])
            state.key = key
            state.prepare_ms = round((time.perf_counter() - t0) * 1000, 1)
            if cache:
                try:
                    state.save(directory)
                except OSError as exc:
                    log.warning("could not save voice %s to %s: %s", request.name, directory, exc)
            log.info("voice %s prepared: %.2f s prefix (%d frames), %d speaker(s), %.0f ms", request.name,
                     state.prefix_s, state.prefix_frames, state.speakers, state.prepare_ms)
        self.voices[request.name] = state
        return state

    def _voice_reset(self) -> None:
        """Back to the current voice's prepared state by copy (the clean state without a voice)."""
        self._clean_reset()
        state = self.voices.get(self.current_voice) if self.current_voice else None
        if state is not None:
            restore_voice(state, self.stepper, self.machine, self.codec)
            self._floor_frame = state.prefix_frames

    # -- turn helpers --------------------------------------------------------------------------

    def _sampling(self, cmd: p.Start) -> SamplingParams:
        d = self.defaults
        params = SamplingParams(
            text_temperature=_first(cmd.text_temperature, cmd.temperature, d.text_temperature),
            audio_temperature=_first(cmd.audio_temperature, cmd.temperature, d.audio_temperature),
            text_top_k=_first(cmd.text_top_k, cmd.top_k, d.text_top_k),
            audio_top_k=_first(cmd.audio_top_k, cmd.top_k, d.audio_top_k),
            cfg_scale=_first(cmd.cfg_scale, d.cfg_scale), seed=_first(cmd.seed, d.seed))
        if params.cfg_scale != 1.0 and self.stepper.branches == 1:
            raise p.ProtocolError(ErrorCode.INVALID_FIELD, "cfg_scale: this server runs without guidance "
                                  "(started with --cfg-scale 1); only 1.0 is accepted", cmd="start", id=cmd.id)
        if max(params.text_top_k, params.audio_top_k) > self.config.max_top_k:
            raise p.ProtocolError(ErrorCode.INVALID_FIELD, f"top_k: at most {self.config.max_top_k} on this server",
                                  cmd="start", id=cmd.id)
        return params

    def _parse(self, text: str, cmd, leading_speaker: str | None):
        try:
            return parse_script(text, self.tts.tokenizer, leading_speaker=leading_speaker, keep_own_speaker=True)
        except ScriptError as exc:
            raise p.ProtocolError(ErrorCode.INVALID_FIELD, f"text: {exc}", cmd=cmd.cmd, id=cmd.id) from None

    def _begin_turn(self, client_id) -> None:
        position = self.stepper.host_positions[0]
        first = max(0, position + 1 - self.stepper.max_delay)  # first aligned frame this turn decodes
        first = max(first, self._floor_frame)  # prefix frames: already in Mimi's stream, never sent
        self.turn = Turn(id=client_id, start_position=position, first_frame=first, started_at=self._received_at,
                         next_frame=first, words_emitted=len(self.machine.transcript))
        self.phase = Phase.GENERATING
        self._emit(p.Started(id=client_id, voice=self.current_voice if self._floor_frame else None, position=position))

    def _push(self, entries, final: bool, client_id) -> None:
        words = sum(1 for e in entries if e.tokens)
        if words:
            self.turn.word_ids.append([words, client_id])
        self.machine.push(entries, final=final)
        if self.phase is Phase.HOLDING and (entries or final):
            self._leave_hold()

    def _leave_hold(self) -> None:
        # The client played on while we held: without re-pacing, the hold's duration would be
        # credited as lead and the generator could run that far ahead of real time. Keep only
        # the lead the client still has buffered (none after a long hold).
        self.phase = Phase.GENERATING
        self._restart_pacing(lead=max(0.0, self._lead_seconds()))

    def _restart_pacing(self, lead: float = 0.0) -> None:
        turn = self.turn
        turn.pace_origin, turn.pace_frames = time.monotonic() + lead, turn.frames_sent

    def _clean_reset(self) -> None:
        self._floor_frame = 0
        self.stepper.reset_call(0)
        self.machine.reset()
        self.codec.reset_stream()
        if self.turn is not None:
            self._last_turn = self.turn
        self.turn = None

    # -- one frame -----------------------------------------------------------------------------

    def _generate_frame(self) -> None:
        t = self.stepper.host_positions[0]
        if t + 1 >= self.context_frames:
            self._context_full()
            return
        action = self.stepper.step([self.machine.preview(t)])[0]
        self.machine.process(t, action)
        turn = self.turn
        ready = self.stepper.ready_frame_index(0)
        if ready >= turn.next_frame:
            pcm = self.codec.decode_frame(self.stepper.ready_codes)[0].float().cpu().numpy()
            self._emit_words_up_to(ready)
            self._emit(AudioFrame(pcm, self._out_epoch, turn.frames_sent))
            if turn.first_audio_at is None:
                turn.first_audio_at = turn.pace_origin = time.monotonic()
                turn.pace_frames = 0
            turn.frames_sent += 1
            turn.next_frame = ready + 1
            self._frames_emitted += 1
        self._check_end(t + 1)

    def _emit_words_up_to(self, frame: int) -> None:
        turn = self.turn
        transcript = self.machine.transcript
        while turn.words_emitted < len(transcript) and transcript[turn.words_emitted][1] <= frame:
            word, step = transcript[turn.words_emitted]
            index = max(0, step - turn.first_frame)
            self._emit(p.Word(id=self._word_owner(), word=word, start_s=round(index * FRAME_SECONDS, 3), frame=index))
            turn.words_emitted += 1

    def _word_owner(self):
        ids = self.turn.word_ids
        if not ids:
            return self.turn.id
        owner = ids[0][1]
        ids[0][0] -= 1
        if ids[0][0] == 0:
            ids.popleft()
        return owner

    def _check_end(self, position: int) -> None:
        m = self.machine
        if m.end_step is not None and position >= m.end_step + self.tail_frames:
            turn = self.turn
            self._emit_words_up_to(1 << 60)
            now = time.monotonic()
            ttfa = None if turn.first_audio_at is None else round((turn.first_audio_at - turn.started_at) * 1000, 1)
            self._emit(p.Done(id=turn.id, frames=turn.frames_sent, audio_s=round(turn.frames_sent * FRAME_SECONDS, 3),
                              wall_s=round(now - turn.started_at, 3), ttfa_ms=ttfa))
            log.info("utterance done: %d frames, ttfa %s ms, %.2f s wall", turn.frames_sent, ttfa, now - turn.started_at)
            self.phase = Phase.IDLE
        elif m.starved and position >= _first(m.last_word_step, self.turn.start_position) + self.tail_frames:
            self.phase = Phase.HOLDING  # every consumed word is out; wait for more text

    def _context_full(self) -> None:
        turn_id = self.turn.id if self.turn else None
        self._emit(p.ErrorEvent(code=ErrorCode.CONTEXT_FULL, id=turn_id,
                                message=f"the context limit of {self.context_frames} frames was reached; "
                                        "the session was reset"))
        self._voice_reset()
        self.phase = Phase.NONE
        self._emit(p.ResetDone(voice=self.current_voice))

    def _emit(self, item: Item) -> None:
        sink = self._out
        if sink is not None:
            sink(item)


class _Detach:
    """Internal: the client is gone."""

    cmd = "detach"


@dataclass(frozen=True)
class _Attach:
    """Internal: a client holds the session from now on; emit to its sink."""

    sink: Sink
    cmd = "attach"


@dataclass(frozen=True)
class _PrepareVoice:
    """Internal: prepare a voice for the operator (start-up preload); the future gets the state."""

    request: VoiceRequest
    future: object
    cache: bool = True
    cmd = "prepare_voice"


@dataclass(frozen=True)
class _Reply:
    """Internal: an event answered by the event loop, queued so it keeps command order."""

    event: object
    cmd = "reply"


def _first(*values):
    return next(v for v in values if v is not None)
