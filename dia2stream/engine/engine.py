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

import dataclasses
import functools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from vendor_dia2 import Dia2
from vendor_dia2.runtime import PrefixBoundary, default_batch_sizes

from dia2stream.wire import protocol as p
from dia2stream.call.call import FRAME_SECONDS, Call, Phase, Sink
from dia2stream.wire.protocol import ErrorCode
from dia2stream.voices.voice import LoadedVoice, VoiceCache, VoiceError, VoicePreparer, VoiceRequest, VoiceSettings, VoiceState

log = logging.getLogger(__name__)

URGENT_MARGIN_S = 2 * FRAME_SECONDS  # a call this close to running out of lead triggers a step
BEHIND_S = FRAME_SECONDS  # a call whose client would wait this long for audio counts as behind
RECOVER_S = 5.0  # no call behind for this long: take new calls again


@dataclass(frozen=True)
class EngineConfig:
    max_calls: int = 1
    max_lead_ms: float = 1000.0  # how far generation may run ahead of real-time playback, per call
    context_frames: int | None = None  # positions before `context_full`; None = the model's limit
    cfg_scale: float = 2.0  # the default; 1.0 runs a single branch (faster, no per-request CFG)
    seed: int = 0
    max_top_k: int = 256
    max_unsent_frames: int = 250  # frames generated but not yet taken by a slow client, per call
    voice: VoiceSettings = field(default_factory=VoiceSettings)
    min_turn_frames: int = 125  # context a voice prefix must leave free for speech
    lead_in_frames: int = 1  # frames sent before a turn's first word
    rollover_frames: int = 250  # recent conversation kept when a full context is rebuilt (20 s)
    compile: bool = False  # torch.compile inside the CUDA graphs
    compile_max_calls: int | None = None  # largest padded batch run compiled (None: all); larger ones run eager
    kernels: str = "torch"  # depformer kernels: "torch" (eager/compiled) or "triton" (fused, CUDA)
    weights: str = "bf16"  # depformer projections: "bf16" or "fp8" (triton kernels only)
    batch_sizes: tuple[int, ...] | None = None  # padded step sizes (default: powers of two, and max_calls)
    max_pending_text_chars: int = 16_384  # text queued on a call but not yet spoken (limits.check_call_text)
    prefix_boundary: str = "upstream"  # how a turn continues a voice prefix: "upstream" or "clean" (docs/parity.md)


class Engine:
    def __init__(self, tts: Dia2, config: EngineConfig = EngineConfig(), metrics=None):
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
                                       max_top_k=config.max_top_k, kernels=config.kernels, weights=config.weights,
                                       compile_max_calls=config.compile_max_calls)
        self.codec = tts.codec
        self.codec.open_stream(config.max_calls)
        self.preparer = VoicePreparer(tts, config.voice)
        self.voices: dict[str, VoiceState] = {}  # written on the generation thread only
        self.default_voice: str | None = None  # the first preloaded voice

        self._calls: list[Call | None] = [None] * config.max_calls
        self._lock = threading.Lock()
        self._commands: queue.Queue = queue.Queue()
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
        self._commands.put((call, _Attach(), call.epoch, time.monotonic()))
        return call

    def close_call(self, call: Call) -> None:
        """The client left: its call stops within one frame. The slot is free at once: the queue
        is ordered, so the call's reset runs before a next call's attach on that slot."""
        with self._lock:
            if self._calls[call.slot] is not call:
                return  # closed already: a second reset could hit the slot's next call
            self._calls[call.slot] = None
        call.epoch += 1
        self._commands.put((call, _Detach(), call.epoch, time.monotonic()))

    def submit(self, call: Call, command: object) -> None:
        # Pause and reset silence audio already queued for the client; start does not (after
        # `done` the queue may still hold the previous utterance's last frames, which must be heard).
        if isinstance(command, (p.Pause, p.Reset)):
            call.epoch += 1
        self._commands.put((call, command, call.epoch, time.monotonic()))

    def drain_call(self, call: Call) -> None:
        """The server is draining: `call` finishes the utterance it is speaking and begins no new
        one; its sink gets `call.Drained` once it has nothing more to say (`Call.drain`)."""
        self._commands.put((call, _Drain(), call.epoch, time.monotonic()))

    @property
    def running(self) -> bool:
        """The generation thread is alive: calls can be served."""
        return self._thread.is_alive() and not self._closed

    def reply(self, call: Call, event: object) -> None:
        """An event the event loop answers itself (ping, parse errors), sent in command order."""
        self._commands.put((call, _Reply(event), call.epoch, time.monotonic()))

    def preload_voice(self, request: VoiceRequest, cache: bool = True, timeout: float | None = None) -> VoiceState:
        """Prepare a voice on the generation thread and wait for it (server start-up). The first
        preloaded voice becomes the default voice. Raises VoiceError."""
        import concurrent.futures

        done: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((None, _PrepareVoice(request, done, cache), 0, time.monotonic()))
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
        self._commands.put((None, None, 0, 0.0))
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

    def _only(self, slot: int) -> torch.Tensor:
        mask = torch.zeros(self.max_calls, dtype=torch.bool)
        mask[slot] = True
        return mask

    # -- the generation thread -------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        if self.tts.device.type == "cuda" and self.tts.device.index is not None:
            # The current device is per thread: kernels launched here without one (Triton's, CUDA
            # graph capture and replay streams) must land on the model's GPU, cuda:N for any N.
            torch.cuda.set_device(self.tts.device)
        while not self._closed:
            try:
                item = self._next_command()
                if item is not None:
                    self._dispatch(*item)
                    continue  # drain every pending command before the next frame
                due = self._due_calls()
                if due:
                    self._step(due)
            except Exception:  # a bug outside any one call: report it and go on
                log.exception("engine loop error")

    def _next_command(self):
        timeout = self._wait_seconds()
        try:
            return self._commands.get(timeout=timeout) if timeout else self._commands.get_nowait()
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
        if behind:
            self._last_behind = now
            if not self.overloaded:
                self.overloaded = True
                log.warning("falling behind real time: %d of %d calls are more than %.0f ms late (last step %.1f ms "
                            "for %d calls); refusing new calls until caught up", len(behind), len(eligible),
                            BEHIND_S * 1000, self.last_step_ms, self.last_step_calls)
        elif self.overloaded and now - self._last_behind > RECOVER_S:
            self.overloaded = False
            log.info("caught up with real time; taking new calls again")

    def _dispatch(self, call: Call | None, command, epoch: int, received_at: float) -> None:
        if command is None:
            return  # close() wake-up
        if isinstance(command, _PrepareVoice):
            self._on_prepare_voice(command)
            return
        try:
            if isinstance(command, _Attach):
                call.attach()
            elif isinstance(command, _Detach):
                call.detach()
            elif not call.attached:
                return  # a command that raced with a disconnect
            elif isinstance(command, _Reply):
                call.emit(command.event)
            elif isinstance(command, _Drain):
                call.drain()
            elif isinstance(command, p.SetVoice):
                self._on_set_voice(call, command, epoch, received_at)
            else:
                call.handle(command, received_at, epoch)
        except Exception as exc:
            log.exception("call %d: error handling %s", call.slot, getattr(command, "cmd", type(command).__name__))
            call.fail(exc)
        if call.draining:
            call.note_drained()

    def _step(self, calls: list[Call]) -> None:
        stepping = []
        for call in calls:
            if call.context_left() or call.roll_over():
                stepping.append(call)
            else:
                call.context_full()
                call.note_drained()
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
            if call.draining:
                call.note_drained()

    def _guarded(self, call: Call, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:
            log.exception("call %d: error in %s", call.slot, getattr(fn, "__name__", "frame"))
            call.fail(exc)

    # -- voices ----------------------------------------------------------------------------------

    def _on_set_voice(self, call: Call, cmd: p.SetVoice, epoch: int, received_at: float) -> None:
        """The model part of a set_voice (encode, prefill, warm on the spare slot). Its audio and
        transcript were loaded off this thread (`load_voice`, then `submit_voice`): decoding and
        whisper here would stall every call (finding 11)."""
        assert isinstance(cmd, LoadedSetVoice), "set_voice reaches the engine through submit_voice"
        if call.phase in (Phase.GENERATING, Phase.HOLDING):
            call.emit(p.ErrorEvent(code=ErrorCode.BUSY, message="an utterance is being generated; set_voice is "
                                   "accepted when idle or paused", cmd="set_voice", id=cmd.id))
            return
        try:
            state = self.build_voice(cmd.loaded, cmd.key)
        except VoiceError as err:
            log.info("set_voice %s failed: %s %s", cmd.name, err.code, err.message)
            call.emit(p.ErrorEvent(code=err.code, message=err.message, cmd="set_voice", id=cmd.id))
            return
        call.emit(p.VoiceReady(name=cmd.name, prefix_s=state.prefix_s, prepare_ms=state.prepare_ms,
                               speakers=state.speakers, id=cmd.id))

    def _on_prepare_voice(self, command: "_PrepareVoice") -> None:
        if isinstance(command, _ForgetVoices):
            for key in command.keys:
                self.voices.pop(key, None)
            return
        try:
            state = self.prepare_voice(command.request, cache=command.cache)
        except BaseException as exc:
            command.future.set_exception(exc)
        else:
            if self.default_voice is None:
                self.default_voice = state.name
                with self._lock:
                    for call in self._calls:
                        if call is not None and call.current_voice is None and call.phase is Phase.NONE:
                            call.current_voice = state.name
            command.future.set_result(state)

    def prepare_voice(self, request: VoiceRequest, cache: bool = True) -> VoiceState:
        """Load and build a voice on this thread: the operator's preloads at start-up, before any
        call (serving uses `load_voice` in a worker thread, then `submit_voice`)."""
        return self.build_voice(self.preparer.load(request), request.name, cache)

    # -- voices: the parts that run off the generation thread, and the disk cache -----------------

    def load_voice(self, cmd: p.SetVoice, key: str) -> LoadedVoice:
        """Decode a set_voice's audio and find its words (whisper, if no transcript): blocking,
        no model work. Call it in a worker thread, never the generation thread. VoiceError."""
        return self.preparer.load(dataclasses.replace(VoiceRequest.from_command(cmd), name=key))

    def submit_voice(self, call: Call, cmd: p.SetVoice, loaded: LoadedVoice, key: str) -> None:
        """Queue the model part of a loaded set_voice for `call`, in its command order; the voice
        is stored under `key` and announced to the client as `cmd.name`."""
        self.submit(call, LoadedSetVoice(name=cmd.name, id=cmd.id, loaded=loaded, key=key))

    def forget_voices(self, keys: list[str]) -> None:
        """Drop voices (a connection's own, when it leaves), after every command queued before."""
        if keys:
            self._commands.put((None, _ForgetVoices(request=None, future=None, keys=tuple(keys)), 0,
                                time.monotonic()))

    @functools.cached_property
    def voice_cache(self) -> VoiceCache:
        return self.config.voice.state_cache()

    def build_voice(self, loaded: LoadedVoice, name: str, cache: bool = True) -> VoiceState:
        """Build (or load from the disk cache) a loaded voice on the spare slot and store it as
        `name` (generation thread only)."""
        t0 = time.perf_counter()
        key = self.preparer.state_key(loaded, self.stepper, self.config.prefix_boundary)
        state = self.voice_cache.load(key, self.tts.device) if cache else None
        if state is not None:
            state.name = name
            state.speakers = loaded.distinct
            state.prepare_ms = round((time.perf_counter() - t0) * 1000 + loaded.load_ms, 1)
            log.info("voice %s loaded from the cache in %.0f ms", name, state.prepare_ms)
        else:
            try:
                state = self.preparer.build(loaded, self.stepper, self.tts.new_state_machine(), self.codec,
                                            max_frames=self.max_prefix_frames, slot=self.spare_slot,
                                            boundary=self.config.prefix_boundary)
            except VoiceError:
                raise
            except Exception as exc:
                log.exception("voice preparation failed")
                raise VoiceError(ErrorCode.VOICE_ERROR, f"voice preparation failed: {exc}") from None
            state.name = name
            state.key = key
            if cache:
                try:
                    self.voice_cache.save(key, state)
                except OSError as exc:
                    log.warning("could not save voice %s to the cache: %s", name, exc)
            log.info("voice %s prepared: %.2f s prefix (%d frames), %d speaker(s), %.0f ms", name,
                     state.prefix_s, state.prefix_frames, state.speakers, state.prepare_ms)
        self.voices[name] = state
        return state


class _Attach:
    """Internal: a client holds the call from now on (its slot is reset first)."""

    cmd = "attach"


class _Detach:
    """Internal: the client is gone; reset and free the slot."""

    cmd = "detach"


class _Drain:
    """Internal: the server is draining; the call finishes its utterance and begins none."""

    cmd = "drain"


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


@dataclass(frozen=True)
class LoadedSetVoice(p.SetVoice):
    """A set_voice whose audio and words were loaded off the generation thread (`submit_voice`):
    only model work is left. A SetVoice, so the engine routes it like the command it answers."""

    loaded: LoadedVoice | None = None
    key: str = ""  # the name the engine stores it under (a connection's own voices are private)


@dataclass(frozen=True)
class _ForgetVoices(_PrepareVoice):
    """Internal: drop these voices (a connection left)."""

    keys: tuple[str, ...] = ()
    cmd = "forget_voices"
