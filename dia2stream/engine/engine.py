"""The engine: one per model, stepping every active call together in one batched frame step.

The engine owns the generation thread, the `FrameStepper` (one slot per call, plus a spare slot
where voices are prepared, so preparing one never disturbs a live call), the batched Mimi stream
(one row per call) and the command queue. Calls (`call.Call`) hold the per-conversation logic and
no thread; all their model work runs here:

    loop:
        drain every queued command (each handled by its call, between frames)
        if a call needs a frame soon: one step over every call that may run ahead,
            then one batched decode of the calls whose frame is ready

Pacing is per call: a call runs at most `max_lead_ms` ahead of a client playing its audio in real
time. To batch, a step is triggered when some call needs a frame soon (its lead fell below
`max_lead_ms` minus two frames, or its first audio is not out yet) and then takes along every
call that is below `max_lead_ms`: calls fall into step with each other instead of each asking
for its own step every 80 ms.

When the GPU cannot keep every call ahead of real time, the engine says so (log, `health`) and
refuses new calls until it has caught up, rather than letting every call stutter.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass

import torch

from vendor_dia2 import Dia2
from vendor_dia2.config import Kernels, PrefixBoundaryName, Weights
from vendor_dia2.runtime import PrefixBoundary, default_batch_sizes

from dia2stream.wire import protocol as p
from dia2stream.call.call import Call, Phase, Sink
from dia2stream.clock import FRAME_SECONDS
from dia2stream.wire.protocol import ErrorCode
from dia2stream.voices.registry import VoiceRegistry
from dia2stream.voices.voice import LoadedVoice, VoiceError, VoiceRequest, VoiceSettings, VoiceState

log = logging.getLogger(__name__)

URGENT_MARGIN_S = 2 * FRAME_SECONDS  # a call this close to running out of lead triggers a step
BEHIND_S = FRAME_SECONDS  # a call whose client would wait this long for audio counts as behind


@dataclass(frozen=True)
class EngineConfig:
    """The engine's settings. Built from the server's (`ServerConfig.engine_config`), which is
    where every default lives; only the engine's own tuning below has defaults here."""

    max_calls: int
    max_lead_ms: float  # how far generation may run ahead of real-time playback, per call
    context_frames: int | None  # positions before `context_full`; None = the model's limit
    cfg_scale: float  # the default; 1.0 runs a single branch (faster, no per-request CFG)
    seed: int
    lead_in_frames: int  # frames sent before a turn's first word
    rollover_frames: int  # recent conversation kept when a full context is rebuilt
    prefix_boundary: PrefixBoundaryName  # how a turn continues a voice prefix (docs/parity.md)
    max_pending_text_chars: int  # text queued on a call but not yet spoken
    compile: bool  # torch.compile inside the CUDA graphs
    compile_max_calls: int | None  # largest padded batch run compiled (None: all); larger ones run eager
    kernels: Kernels
    weights: Weights
    voice: VoiceSettings
    overload_refusal_s: float  # refuse new calls this long after one fell behind real time; 0 = never
    max_unsent_frames: int = 250  # frames generated but not yet taken by a slow client, per call
    min_turn_frames: int = 125  # context a voice prefix must leave free for speech
    batch_sizes: tuple[int, ...] | None = None  # padded step sizes (default: powers of two, and max_calls)


class Engine:
    def __init__(self, tts: Dia2, config: EngineConfig, metrics=None):
        self.metrics = metrics  # a metrics.Metrics: frame steps are recorded there
        if config.max_calls < 1:
            raise ValueError("max_calls must be at least 1")
        self.tts, self.config = tts, config
        PrefixBoundary.named(config.prefix_boundary)  # an unknown name fails here, not at the first voice
        model_limit = tts.config.runtime.max_context_steps
        self.context_frames = min(config.context_frames or model_limit, model_limit)
        self.max_calls = config.max_calls
        self.spare_slot = config.max_calls  # voice preparation; never stepped
        self.stepper = tts.new_stepper(n_calls=config.max_calls + 1, cfg=config.cfg_scale != 1.0,
                                       max_positions=self.context_frames, compile=config.compile,
                                       batch_sizes=config.batch_sizes or default_batch_sizes(config.max_calls),
                                       kernels=config.kernels, weights=config.weights,
                                       compile_max_calls=config.compile_max_calls)
        self.codec = tts.codec
        self.codec.open_stream(config.max_calls)
        self.voices = VoiceRegistry(tts, self.stepper, self.codec, config.voice, spare_slot=self.spare_slot,
                                    max_prefix_frames=self.max_prefix_frames, boundary=config.prefix_boundary)

        self._calls: list[Call | None] = [None] * config.max_calls
        self._lock = threading.Lock()
        self._inbox: queue.Queue[Envelope] = queue.Queue()
        self._closed = False
        self.last_step_ms = 0.0
        self.last_step_calls = 0
        self.steps = 0
        self.overloaded = False
        self._behind_since: float | None = None
        self._last_behind = 0.0
        self._decode_rows = torch.zeros(config.max_calls, dtype=torch.bool)
        if tts.device.type == "cuda":
            self._warm_prefill()
        self._thread = threading.Thread(target=self._run, name="dia2-engine", daemon=True)
        self._thread.start()

    # -- called from the server's event loop -----------------------------------------------------

    @property
    def calls(self) -> int:
        with self._lock:
            return sum(c is not None for c in self._calls)

    def open_call(self, sink: Sink) -> Call | None:
        """A new call on a free slot, or None when every slot is taken or the engine is behind."""
        with self._lock:
            if self.overloaded:
                return None
            for slot, taken in enumerate(self._calls):
                if taken is None:
                    call = Call(self, slot, sink)
                    self._calls[slot] = call
                    break
            else:
                return None
        self._post(call, Attach(), call.epoch)
        return call

    def close_call(self, call: Call) -> None:
        """The client left: its call stops within one frame. The slot is free at once: the queue
        is ordered, so the call's reset runs before a next call's attach on that slot."""
        with self._lock:
            if self._calls[call.slot] is not call:
                return  # closed already: a second reset could hit the slot's next call
            self._calls[call.slot] = None
        call.epoch += 1
        self._post(call, Detach(), call.epoch)

    def submit(self, call: Call, command: object) -> None:
        # Pause and reset silence audio already queued for the client; start does not (after
        # `done` the queue may still hold the previous utterance's last frames, which must be heard).
        if isinstance(command, (p.Pause, p.Reset)):
            call.epoch += 1
        self._post(call, command, call.epoch)

    def reply(self, call: Call, event: object) -> None:
        """An event the event loop answers itself (ping, parse errors), sent in command order."""
        self._post(call, Reply(event), call.epoch)

    def preload_voice(self, request: VoiceRequest, cache: bool = True, timeout: float | None = None) -> VoiceState:
        """Prepare a voice on the generation thread and wait for it (server start-up). The first
        preloaded voice becomes the default voice. Raises VoiceError."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._post(None, PrepareVoice(request, done, cache))
        return done.result(timeout=timeout)

    def health(self) -> dict:
        calls = self.calls
        return {"calls": calls, "max_calls": self.max_calls, "busy": calls >= self.max_calls or self.overloaded,
                "overloaded": self.overloaded, "step_ms": round(self.last_step_ms, 2),
                "step_calls": self.last_step_calls}

    @property
    def max_prefix_frames(self) -> int:
        return max(0, self.context_frames - self.config.min_turn_frames)

    def close(self) -> None:
        self._closed = True
        self._post(None, Wake())
        self._thread.join(timeout=5)
        self.codec.close_stream()

    def _warm_prefill(self) -> None:
        """One prefill of a rollover's size on the spare slot at start-up: the first use of those
        shapes pays one-off costs (seen: >1 s on an H100) that must not stall live calls."""
        d = self.tts.config.data
        frames = min(self.config.rollover_frames, self.context_frames // 2)
        if frames < 1:
            return
        delayed = torch.full((d.num_codebooks, frames + d.max_delay), d.audio_bos, dtype=torch.long)
        text = torch.full((frames + 1, 2), d.text_pad_token_id, dtype=torch.long)
        self.stepper.prefill(self.spare_slot, delayed, text, frames)
        self.stepper.reset_call(self.spare_slot)

    # -- used by calls (generation thread) -------------------------------------------------------

    def reset_codec_row(self, slot: int) -> None:
        self.codec.reset_stream(self._only(slot))

    def restore_codec_row(self, slot: int, snapshot, codes: torch.Tensor) -> None:
        """Put a call's Mimi row back to `snapshot`, then decode aligned frames `codes` [Q, F] into
        it (that row alone advances): the decoder stands where those frames left it."""
        self.codec.restore_row(slot, snapshot)
        batch = torch.zeros(self.max_calls, codes.shape[0], dtype=torch.long, device=codes.device)
        rows = self._only(slot)
        for i in range(codes.shape[1]):
            batch[slot] = codes[:, i]
            self.codec.decode_frame(batch, rows)

    def _post(self, call: Call | None, message: object, epoch: int = 0) -> None:
        self._inbox.put(Envelope(call, message, epoch, time.monotonic()))

    def _only(self, slot: int) -> torch.Tensor:
        mask = torch.zeros(self.max_calls, dtype=torch.bool)
        mask[slot] = True
        return mask

    # -- the generation thread -------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._closed:
            try:
                envelope = self._next_envelope()
                if envelope is not None:
                    self._dispatch(envelope)
                    continue  # drain every pending command before the next frame
                due = self._due_calls()
                if due:
                    self._step(due)
            except Exception:  # a bug outside any one call: report it and go on
                log.exception("engine loop error")

    def _next_envelope(self) -> "Envelope | None":
        timeout = self._wait_seconds()
        try:
            return self._inbox.get(timeout=timeout) if timeout else self._inbox.get_nowait()
        except queue.Empty:
            return None

    def _active_calls(self) -> list[Call]:
        with self._lock:
            return [c for c in self._calls if c is not None and c.generating]

    def _wait_seconds(self) -> float:
        """How long to block for a command: 0 means a step is due now."""
        max_lead = self.config.max_lead_ms / 1000.0
        wait = 0.5
        for call in self._active_calls():
            if call.unsent_frames > self.config.max_unsent_frames:
                wait = min(wait, 0.02)  # the client is not reading: look again soon
                continue
            lead = call.lead_seconds()
            if call.needs_frames_now(lead, max_lead - URGENT_MARGIN_S):
                return 0.0
            wait = min(wait, lead - (max_lead - URGENT_MARGIN_S))
        return max(0.0, wait)

    def _due_calls(self) -> list[Call]:
        """The calls to step now: every call that may run ahead, when one of them needs a frame
        soon. When only calls in their decoder-only stretch (a cold start, a rollback or rollover
        replaying heard frames) need frames, just those: that lane costs a fraction of a full step,
        and the others are not short of audio."""
        max_lead = self.config.max_lead_ms / 1000.0
        eligible, urgent_full, urgent_lite = [], False, False
        for call in self._active_calls():
            if call.unsent_frames > self.config.max_unsent_frames:
                continue
            lead = call.lead_seconds()
            if lead >= max_lead:
                continue
            eligible.append(call)
            if call.needs_frames_now(lead, max_lead - URGENT_MARGIN_S):
                if self.stepper.needs_depformer(call.slot):
                    urgent_full = True
                else:
                    urgent_lite = True
        self._watch_load(eligible)
        # Playing calls come first: when one of them needs frames, every eligible call steps (the
        # full lane). Giving cold starts the cheap lane ahead of them lowered onset at 8 calls but
        # made 64 calls underrun on the H100 (docs/benchmarks.md, runs 3-5).
        if urgent_full:
            return eligible
        if urgent_lite:
            return [c for c in eligible if not self.stepper.needs_depformer(c.slot)]
        return []

    def _watch_load(self, eligible: list[Call]) -> None:
        now = time.monotonic()
        behind = [c for c in eligible if not c.awaiting_first_audio and c.lead_seconds() < -BEHIND_S]
        refusing = self.config.overload_refusal_s > 0
        if behind:
            if now - self._last_behind > 1.0 or (refusing and not self.overloaded):
                log.warning("falling behind real time: %d of %d calls are more than %.0f ms late (last step %.1f ms "
                            "for %d calls)%s", len(behind), len(eligible), BEHIND_S * 1000, self.last_step_ms,
                            self.last_step_calls, "; refusing new calls until caught up" if refusing else "")
            self._last_behind = now
            self.overloaded = refusing
        elif self.overloaded and now - self._last_behind > self.config.overload_refusal_s:
            self.overloaded = False
            log.info("caught up with real time; taking new calls again")

    def _dispatch(self, envelope: "Envelope") -> None:
        call, message = envelope.call, envelope.message
        match message:
            case Wake():
                return
            case PrepareVoice():
                self._on_prepare_voice(message)
                return
            case ForgetVoices(names=names):
                self.voices.forget(names)
                return
        try:
            match message:
                case Attach():
                    call.attach()
                case Detach():
                    call.detach()
                case _ if not call.attached:
                    return  # a command that raced with a disconnect
                case Reply(event=event):
                    call.emit(event)
                case BuildVoice():
                    self._on_build_voice(call, message)
                case _:
                    call.handle(message, envelope.received_at, envelope.epoch)
        except Exception as exc:
            log.exception("call %d: error handling %s", call.slot, getattr(message, "cmd", type(message).__name__))
            call.fail(exc)

    def _step(self, calls: list[Call]) -> None:
        stepping = []
        for call in calls:
            if call.context_left() or call.roll_over():
                stepping.append(call)
            else:
                call.context_full()
        if not stepping:
            return
        choices = [None] * self.stepper.n
        active = [False] * self.stepper.n
        for call in stepping:
            choices[call.slot] = call.preview()
            active[call.slot] = True
        t0 = time.perf_counter()
        actions = self.stepper.step(choices, active)
        decode = []
        for call in stepping:
            try:
                if call.advance(actions[call.slot]):
                    decode.append(call)
            except Exception as exc:
                log.exception("call %d: error after a frame step", call.slot)
                call.fail(exc)
        if decode:
            self._decode_rows.zero_()
            for call in decode:
                self._decode_rows[call.slot] = True
                if call.wants_codec_mark():
                    call.add_codec_mark(self.codec.snapshot_row(call.slot))
            pcm = self.codec.decode_frame(self.stepper.ready_codes[: self.max_calls], self._decode_rows)
            pcm = pcm.cpu().numpy()
            for call in decode:
                self._guarded(call, call.deliver, pcm[call.slot])
        self.last_step_ms = (time.perf_counter() - t0) * 1000
        self.last_step_calls = len(stepping)
        self.steps += 1
        if self.metrics is not None:
            self.metrics.frame_step_ms(self.last_step_ms, self.last_step_calls)
        for call in stepping:
            if call.turn is not None:
                self._guarded(call, call.check_end)

    def _guarded(self, call: Call, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:
            log.exception("call %d: error in %s", call.slot, getattr(fn, "__name__", "frame"))
            call.fail(exc)

    # -- voices ----------------------------------------------------------------------------------

    def load_voice(self, cmd: p.SetVoice, key: str) -> LoadedVoice:
        """Decode a set_voice's audio and find its words: blocking, no model work. Call it in a
        worker thread, never the generation thread. VoiceError."""
        return self.voices.load(cmd, key)

    def submit_voice(self, call: Call, cmd: p.SetVoice, loaded: LoadedVoice, key: str) -> None:
        """Queue the model part of a loaded set_voice for `call`, in its command order; the voice
        is stored under `key` and announced to the client as `cmd.name`."""
        self._post(call, BuildVoice(cmd.name, cmd.id, loaded, key), call.epoch)

    def forget_voices(self, keys: list[str]) -> None:
        """Drop voices (a connection's own, when it leaves), after every command queued before."""
        if keys:
            self._post(None, ForgetVoices(tuple(keys)))

    def _on_build_voice(self, call: Call, message: "BuildVoice") -> None:
        """The model part of a set_voice (encode, prefill, warm on the spare slot). Its audio and
        transcript were loaded off this thread (`load_voice`): decoding and whisper here would
        stall every call (finding 11)."""
        if call.phase in (Phase.GENERATING, Phase.HOLDING):
            call.emit(p.ErrorEvent(code=ErrorCode.BUSY, message="an utterance is being generated; set_voice is "
                                   "accepted when idle or paused", cmd="set_voice", id=message.id))
            return
        try:
            state = self.voices.build(message.loaded, message.key)
        except VoiceError as err:
            log.info("set_voice %s failed: %s %s", message.name, err.code, err.message)
            call.emit(p.ErrorEvent(code=err.code, message=err.message, cmd="set_voice", id=message.id))
            return
        call.emit(p.VoiceReady(name=message.name, prefix_s=state.prefix_s, prepare_ms=state.prepare_ms,
                               speakers=state.speakers, id=message.id))

    def _on_prepare_voice(self, message: "PrepareVoice") -> None:
        try:
            state = self.voices.prepare(message.request, cache=message.cache)
        except BaseException as exc:
            message.future.set_exception(exc)
            return
        if self.voices.default is None:
            self.voices.default = state.name
            with self._lock:
                for call in self._calls:
                    if call is not None and call.current_voice is None and call.phase is Phase.NONE:
                        call.current_voice = state.name
        message.future.set_result(state)


# -- the inbox: what the event loop hands the generation thread -----------------------------------


@dataclass(frozen=True)
class Envelope:
    """One message for the generation thread, in the order it was posted. `epoch` is the call's
    when posted (audio of older epochs is silenced); `received_at` times the command."""

    call: Call | None
    message: object  # a protocol command, or one of the internal messages below
    epoch: int
    received_at: float


@dataclass(frozen=True)
class Attach:
    """A client holds the call from now on (its slot is reset first)."""


@dataclass(frozen=True)
class Detach:
    """The client is gone: reset and free the slot."""


@dataclass(frozen=True)
class Reply:
    """An event answered by the event loop, queued so it keeps command order."""

    event: object


@dataclass(frozen=True)
class BuildVoice:
    """The model part of a set_voice whose audio and words were loaded off this thread."""

    name: str  # as the client named it
    id: p.ClientId | None
    loaded: LoadedVoice
    key: str  # the name it is stored under (a connection's own voices are private)


@dataclass(frozen=True)
class PrepareVoice:
    """Prepare a voice for the operator (start-up preload); the future gets the state."""

    request: VoiceRequest
    future: concurrent.futures.Future
    cache: bool = True


@dataclass(frozen=True)
class ForgetVoices:
    """Drop these voices (a connection left)."""

    names: tuple[str, ...]


@dataclass(frozen=True)
class Wake:
    """Wakes the generation thread so it sees `close()`."""
