"""The engine: one per model, stepping its calls in batched frame steps, in the manner of
vLLM's `EngineCore.step` (plan, run, apply).

The engine owns the generation thread, the `FrameStepper` (one slot per call, plus a spare slot
where voices are prepared, so preparing one never disturbs a live call), the batched Mimi stream
(one row per call) and the inbox. Calls (`call.Call`) hold the per-conversation logic and no
thread; each reaches its own device state through a `SlotHandle` only. The loop:

    drain the inbox (each command handled by its call, between frames)
    plan    the scheduler picks the calls to step by deadline (engine/scheduler.py), and any
            planned model work (a caller's turn's prefill, a codec re-decode) when nothing is
            urgent; a call's commands behind its planned prefill wait for it
    run     the runner launches a step for those slots and the decode of the ready frames
            (engine/runner.py)
    apply   each call takes its action and its PCM row and emits frames and events; with
            `step_in_flight` a step is applied only once the next one is launched, so this host
            work overlaps the device's next step (`_step_once`)

Pacing is per call: a call runs at most `max_lead_ms` ahead of a client playing its audio in
real time. When calls keep falling behind real time, or one more call would not fit the measured
step cost in a frame, the engine says so (log, `health`) and refuses new calls.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from vendor_dia2 import Dia2
from vendor_dia2.config import Kernels, PrefixBoundaryName, Sampler, Weights
from vendor_dia2.runtime import PrefixBoundary, default_batch_sizes

from dia2stream.wire import protocol as p
from dia2stream.call.call import Call, CallModel, Sink
from dia2stream.call.phases import Phase
from dia2stream.call.slot import CallSettings, SlotHandle
from dia2stream.call.user_turn import LoadedUserTurn, load_user_turn
from dia2stream.engine.runner import Runner
from dia2stream.engine.scheduler import (BEHIND_S, SUSTAINED_BEHIND_S, Scheduler, behind, compacting_moves,
                                         is_starting)
from dia2stream.engine.step_trace import StepTrace
from dia2stream.wire.protocol import ErrorCode
from dia2stream.voices.registry import VoiceRegistry
from dia2stream.voices.voice import LoadedVoice, VoiceError, VoiceRequest, VoiceSettings, VoiceState

log = logging.getLogger(__name__)

PLANNED_WORK_EVERY = 3  # deadline steps in a row after which a waiting re-decode gets one frame anyway
STEP_MARK = "dia2.engine_step"  # the profiler range around each frame step the engine runs



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
    sampler: Sampler
    voice: VoiceSettings
    overload_refusal_s: float  # refuse new calls this long after one fell behind real time; 0 = never
    max_user_turn_seconds: float  # longest caller's turn (user_turn audio)
    step_in_flight: bool  # launch the next step before the last one's outputs are applied (see `_step_once`)
    decode_stream: bool  # each frame's decode on a CUDA stream of its own, beside the next step
    max_unsent_frames: int = 250  # frames generated but not yet taken by a slow client, per call
    min_turn_frames: int = 125  # context a voice prefix must leave free for speech
    batch_sizes: tuple[int, ...] | None = None  # padded step sizes (default: powers of two, and max_calls)
    move_slots: bool = True  # move starting calls to the lowest slots before they step (off: to measure it)
    split_start_lanes: bool = True  # starting calls in the decoder-only lane step alone between full steps
    step_trace: str | None = None  # a file: one JSON line per step, slot moves, planned work (engine/step_trace.py)


class Engine:
    def __init__(self, tts: Dia2, config: EngineConfig, metrics=None, flush: Callable[[], None] | None = None):
        """`metrics`: where frame steps are recorded (`metrics.Metrics`, or anything with its
        `frame_step_ms`). `flush`: called on the generation thread when what it emitted so far is
        complete, after each frame step and before it waits for the inbox; an engine in its own
        process (`serve/engine_process.py`) sends its calls' items across then, one message a step."""
        self.metrics = metrics
        self._flush = flush
        if config.max_calls < 1:
            raise ValueError("max_calls must be at least 1")
        self.tts, self.config = tts, config
        PrefixBoundary.named(config.prefix_boundary)  # an unknown name fails here, not at the first voice
        model_limit = tts.config.runtime.max_context_steps
        self.context_frames = min(config.context_frames or model_limit, model_limit)
        self.max_calls = config.max_calls
        self.spare_slot = config.max_calls  # voice preparation; never stepped
        t0 = time.perf_counter()
        self.stepper = tts.new_stepper(n_calls=config.max_calls + 1, cfg=config.cfg_scale != 1.0,
                                       max_positions=self.context_frames, compile=config.compile,
                                       batch_sizes=config.batch_sizes or default_batch_sizes(config.max_calls),
                                       kernels=config.kernels, weights=config.weights, sampler=config.sampler,
                                       compile_max_calls=config.compile_max_calls)
        log.info("frame stepper for %d slots ready in %.1f s", config.max_calls + 1, time.perf_counter() - t0)
        self.codec = tts.codec
        t0 = time.perf_counter()
        # a decode runs over the stream's first rows, padded as a step is (the calls it needs sit lowest)
        self.codec.open_stream(config.max_calls, decode_sizes=self.stepper.batch_sizes, side_stream=config.decode_stream)
        log.info("Mimi stream for %d rows open in %.1f s", config.max_calls, time.perf_counter() - t0)
        self.voices = VoiceRegistry(tts, self.stepper, self.codec, config.voice, spare_slot=self.spare_slot,
                                    max_prefix_frames=self.max_prefix_frames, boundary=config.prefix_boundary)
        self.runner = Runner(self.stepper, self.codec, config.max_calls)
        self.trace = StepTrace.to_file(config.step_trace)
        self.scheduler = Scheduler(max_lead_s=config.max_lead_ms / 1000, max_unsent_frames=config.max_unsent_frames,
                                   batch_size_for=self.stepper.batch_size_for, split_lanes=config.split_start_lanes)
        self._call_settings = CallSettings(
            context_frames=self.context_frames, max_lead_ms=config.max_lead_ms, lead_in_frames=config.lead_in_frames,
            rollover_frames=config.rollover_frames, min_turn_frames=config.min_turn_frames,
            max_pending_text_chars=config.max_pending_text_chars, cfg_scale=config.cfg_scale, seed=config.seed,
            tail_frames=tts.tail_frames, text_pad_token_id=tts.config.data.text_pad_token_id)
        self._call_model = CallModel(tokenizer=tts.tokenizer, new_state_machine=tts.new_state_machine,
                                     data=tts.config.data)

        self._calls: list[Call | None] = [None] * config.max_calls
        self._lock = threading.Lock()
        self._inbox: queue.Queue[Envelope] = queue.Queue()
        self._deferred: dict[Call, list[Envelope]] = {}  # a call's commands behind its planned prefill
        # One step in flight (`step_in_flight`): the step launched and not applied yet, and the
        # commands held for its slots until it is (a call's text state changes between two of its
        # launched steps only by applying the first), by slot, in the order they came.
        self._in_flight: LaunchedStep | None = None
        self._held: dict[Call, list[Envelope]] = {}  # by call, not slot: calls move while held
        self._closed = False
        # Liveness (issue 19): why the engine cannot serve any more (a sticky device error, the
        # thread gone), and the last moment it was known to keep up: a step or a command
        # completed, or no call needed a step. Read from other threads (`health`), written only
        # by this one.
        self.failure: str | None = None
        self._last_progress = time.monotonic()
        self.last_step_ms = 0.0
        self.last_step_calls = 0
        self._deadline_steps = 0  # deadline steps in a row while planned work waited
        self._planned_work_ran = False  # a piece of planned work ran since the last step
        self.host_ms = 0.0  # moving average of a step's generation-thread work outside the stepper and codec
        self.steps = 0
        self.slot_moves = 0  # calls moved to a lower slot so that a step ran smaller
        self.slot_moves_in_flight = 0  # ... of them, of a call whose step was in flight
        self.steps_ahead = 0  # calls launched while their step before was still in flight (step_in_flight)
        self.commands_held = 0  # commands that waited for their call's step in flight to be applied
        self.commands_beside = 0  # text applied beside its call's step in flight (it could not read it)
        self.overloaded = False
        self._behind_since: float | None = None
        self._last_behind = 0.0
        if tts.device.type == "cuda":
            self._warm_prefill()
        self._thread = threading.Thread(target=self._run, name="dia2-engine", daemon=True)
        self._thread.start()

    # -- called from the server's event loop -----------------------------------------------------

    @property
    def calls(self) -> int:
        with self._lock:
            return sum(c is not None for c in self._calls)

    def open_call(self, sink: Sink, admitted: bool = False) -> Call | None:
        """A new call on the lowest free slot, or None when every slot is taken or the engine
        cannot take one more call in real time. `admitted`: without the admission check (an
        engine process's parent admitted the call from the figures this engine published). The
        slot is the engine's to choose, never the caller's: calls move between slots (`_compact`),
        so only the engine knows which slot a closed call left free."""
        with self._lock:
            free = [index for index, occupant in enumerate(self._calls) if occupant is None]
            if not free:
                if admitted:
                    raise RuntimeError("a call was admitted with every slot taken")
                return None
            if not admitted and not self._admits_one_more(len(self._calls) - len(free)):
                return None
            slot = free[0]  # the lowest free slot: a step is padded to the highest slot it runs
            handle = SlotHandle(self.stepper, self.codec, slot)
            call = self._calls[slot] = Call(handle, self._call_settings, self._call_model, self.voices, sink)
        self._post(call, Attach(), call.epoch)
        return call

    def admits_calls(self) -> int:
        """How many calls in all the engine would take now (the admission rule of `open_call`,
        as a figure another process can check against)."""
        if self.overloaded:
            return 0
        if self.config.overload_refusal_s <= 0:
            return self.max_calls
        return next((n for n in range(self.max_calls, 0, -1) if self.scheduler.admits(n)), 0)

    def _admits_one_more(self, taken: int) -> bool:
        if self.overloaded:
            return False
        return self.config.overload_refusal_s <= 0 or self.scheduler.admits(taken + 1)

    def close_call(self, call: Call) -> None:
        """The client left: its call stops within one frame. The slot is free at once: the queue
        is ordered, so the call's reset runs before a next call's attach on that slot."""
        with self._lock:
            if self._calls[call.slot.index] is not call:
                return  # closed already: a second reset could hit the slot's next call
            self._calls[call.slot.index] = None
        call.epoch += 1
        self._post(call, Detach(), call.epoch)

    def submit(self, call: Call, command: object) -> None:
        # Pause and reset silence audio already queued for the client; start does not (after
        # `done` the queue may still hold the previous utterance's last frames, which must be heard).
        if isinstance(command, (p.Pause, p.Reset)):
            call.epoch += 1
        self._post(call, command, call.epoch)

    def drain_call(self, call: Call) -> None:
        """The server is draining: `call` finishes the utterance it is speaking and begins no new
        one; its sink gets `call.Drained` once it has nothing more to say (`Call.drain`)."""
        self._post(call, Drain(), call.epoch)

    @property
    def running(self) -> bool:
        """The generation thread is alive and not failed: calls can be served."""
        return self._thread.is_alive() and not self._closed and self.failure is None

    def failure_reason(self) -> str | None:
        """Why the engine cannot serve (its thread recorded a device error, or is gone), or None."""
        if self.failure is None and not self._closed and not self._thread.is_alive():
            return "the generation thread stopped"
        return self.failure

    def stalled_s(self) -> float:
        """While calls are generating: seconds since the generation thread last showed progress
        (a frame step or a command completed, or no call needed a step); 0 with no call
        generating. Grows without bound while calls wait on a hung or failing step; a watchdog
        on another thread compares it with its limit."""
        if not self._active_calls():
            return 0.0
        return max(0.0, time.monotonic() - self._last_progress)

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
        """`step_ms`: the last step's time on the generation thread (its launch and its
        application, device waits included; without a step in flight, the whole step). `host_ms`:
        a moving average of that less the launches and the waits for the device. On the
        simulated GPU also `simulated_gpu_busy_s`, the device's work so far (its idle share over
        a window is 1 - the busy time's growth over the wall time's)."""
        calls = self.calls
        out = {"calls": calls, "max_calls": self.max_calls, "busy": calls >= self.max_calls or self.overloaded,
               "overloaded": self.overloaded, "step_ms": round(self.last_step_ms, 2),
               "step_calls": self.last_step_calls, "host_ms": round(self.host_ms, 2),
               "stalled_s": round(self.stalled_s(), 2), "failure": self.failure_reason()}
        busy = getattr(self.tts, "device_busy_seconds", None)
        if busy is not None:
            out["simulated_gpu_busy_s"] = round(busy(), 4)
        return out

    @property
    def max_prefix_frames(self) -> int:
        return max(0, self.context_frames - self.config.min_turn_frames)

    def close(self) -> None:
        self._closed = True
        self._post(None, Wake())
        self._thread.join(timeout=5)
        self.codec.close_stream()
        self.trace.close()

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

    def _post(self, call: Call | None, message: object, epoch: int = 0) -> None:
        self._inbox.put(Envelope(call, message, epoch, time.monotonic()))

    # -- the generation thread -------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        if self.tts.device.type == "cuda" and self.tts.device.index is not None:
            # The current device is per thread: kernels launched here without one (Triton's, CUDA
            # graph capture and replay streams) must land on the model's GPU, cuda:N for any N.
            torch.cuda.set_device(self.tts.device)
        try:
            while not self._closed:
                try:
                    envelope = self._next_envelope()
                    if envelope is not None:
                        self._dispatch(envelope)
                        self._last_progress = time.monotonic()
                        continue  # drain every pending command before the next frame
                    self._step_once()
                    if self._flush is not None:
                        self._flush()
                except Exception as exc:
                    if is_device_fault(exc):
                        raise
                    log.exception("engine loop error")  # a bug outside any one call: report it and go on
        except BaseException as exc:
            # A device error poisons the process (every later kernel fails or lies): stop here
            # and say why; the server turns this into /health 503 and a restart.
            self.failure = f"{type(exc).__name__}: {exc}"
            log.critical("engine failed, no call can be served any more: %s", self.failure, exc_info=True)

    def _next_envelope(self) -> "Envelope | None":
        active = None
        if self._in_flight is not None or self._planned_work_waiting():
            timeout = 0.0  # a step in flight is applied (or the next one launched) before any wait
        else:
            active = self._active_calls()
            timeout = self.scheduler.wait_seconds(active)
        try:
            if not timeout:
                return self._inbox.get_nowait()  # a step is due: what was emitted goes out after it
            if self._flush is not None:
                self._flush()  # nothing is due: what the commands answered goes out before the wait
            if not active:
                self.trace.flush()  # idle: the trace so far can be read (and copied) while the server runs
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def _planned_work_waiting(self) -> bool:
        """Some call (generating or not: a paused or idle call's work is planned too) waits for
        planned model work."""
        with self._lock:
            return any(c is not None and (c.slot.pending_prefill is not None or c.slot.pending_replay is not None)
                       for c in self._calls)

    def _active_calls(self) -> list[Call]:
        with self._lock:
            return [c for c in self._calls if c is not None and c.generating]

    def _step_once(self) -> None:
        """Plan, run, apply: one frame step if the scheduler wants one, else planned work.

        With `step_in_flight`, a step is applied (`_process`) only after the next one is launched
        (`_launch`), so the host's work on its outputs overlaps the device's next step. A call in
        the step in flight steps again only when nothing that step's actions can do would change
        its next step (`Call.may_step_ahead`) and no command waits for it; anything that needs
        the device idle or a call's text state known (planned work, slot moves, a rollover, a
        step plan with nothing in it) applies the step in flight first."""
        calls = self._active_calls()
        self._watch_load(calls)
        flight = self._in_flight
        ahead = frozenset(call for call, entry in flight.entries.items() if entry.decodes) if flight else frozenset()
        plan = self.scheduler.plan([call for call in calls if not self._sits_out(call)], ahead)
        if plan is None:
            self._last_progress = time.monotonic()  # nothing is waiting for a step
        # Planned work goes before anything but a call running dry, and at least every few steps
        # even then: at 128 calls on the H200 the playing calls were short often enough to starve a
        # rollback's re-decode for seconds (run 14: 5 s after-barge-in onset at p95). A starting
        # step with a short call riding in it (`plan.urgent`) alternates with planned work, one
        # piece each: a whole re-decode first (15 frames, one a loop) drained a turn that had just
        # sent its first frame; holding planned work back for such steps, which at 128 calls come
        # one after another, starved it for seconds (simulated).
        rider_waits = plan is not None and plan.urgent and self._planned_work_ran
        if (plan is None or plan.reason != "deadline") and not rider_waits:
            if self._planned_work_waiting():
                self._drain()
            if self._prefill_one() or self._replay_one_frame():
                self._deadline_steps = 0
                self._planned_work_ran = True
                self._last_progress = time.monotonic()
                return
        elif plan.reason == "deadline" and self._deadline_steps >= PLANNED_WORK_EVERY and self._replay_waiting():
            self._drain()
            if self._replay_one_frame():
                self._deadline_steps = 0  # one re-decoded frame (a decode's cost), never a whole prefill
                self._last_progress = time.monotonic()
                return
        if plan is None:
            self._drain()  # nothing to launch: apply the step in flight before waiting
            return
        if plan.reason == "starting" and plan.compact and self.config.move_slots:
            self._compact(self._compacting_moves(plan.calls))
        self._deadline_steps = self._deadline_steps + 1 if plan.reason == "deadline" else 0
        self._planned_work_ran = False
        if self.trace.on:
            self._trace_step(plan)
        with torch.profiler.record_function(STEP_MARK):  # a profile's frame steps (tools/gpu_idle.py)
            self._step(list(plan.calls))

    def _trace_step(self, plan) -> None:
        slots = max(call.slot.index for call in plan.calls) + 1
        full = any(call.slot.needs_depformer() for call in plan.calls)
        self.trace.step(plan.reason, plan.calls, self.stepper.batch_size_for(slots), full)

    def _sits_out(self, call: Call) -> bool:
        """A call in the step in flight that may not be launched again before that step is
        applied: commands wait for it, or that step's actions may change what it does next."""
        flight = self._in_flight
        if flight is None or call not in flight.entries:
            return False
        return call in self._held or not call.may_step_ahead()

    def _drain(self) -> None:
        """Apply the step in flight, if any (the device's work is waited for)."""
        flight, self._in_flight = self._in_flight, None
        if flight is not None:
            self._process(flight)

    def _replay_waiting(self) -> bool:
        return bool(self._calls_replaying())

    def _calls_replaying(self) -> list[Call]:
        """Calls whose rollback's codec re-decode is not done yet."""
        with self._lock:
            return [c for c in self._calls if c is not None and c.slot.pending_replay is not None]

    def _compact(self, moves: list[tuple[int, int]]) -> None:
        """Move the starting calls about to step into the lowest slots (`moves`, from
        `_compacting_moves`): a step is padded to the highest slot it runs, so a new turn on slot 50 would pay a 64-slot step for each of its
        ~18 start-up steps while the playing calls coast. Each move swaps places with an attached
        call that does not step now (never with a free slot: a closed call's reset may still be
        queued for it), and costs one copy of both calls' state, not one per step. Steps of
        playing calls move nobody: a swap never changes which slots are taken, and moving them
        down would push the starting calls up again (one swap back and forth per step).

        A step in flight stays in flight: the device orders each swap after it (and after the
        decode beside it: the codec's swap joins that stream), and the host reads its outputs by
        the slots it ran on (`LaunchedCall.slot`). Draining it first cost every move the step's
        whole latency: ~29 moves beside each of the slowest tenth of lock-step starts
        (simulated H200, 64 calls).

        The moves go to the device together (`swap_rows_many`: one graph replay for up to eight),
        since a move's cost is mostly its launches."""
        if not moves:
            return
        flight = self._in_flight
        swapped = []
        with self._lock:
            for a, b in moves:
                call_a, call_b = self._calls[a], self._calls[b]
                if call_a is None or call_b is None:
                    continue  # closed meanwhile: its reset is queued for the slot it held
                self._calls[a], self._calls[b] = call_b, call_a
                call_a.slot.moved_to(b)
                call_b.slot.moved_to(a)
                swapped.append((a, b))
                self.slot_moves_in_flight += flight is not None and (call_a in flight.entries or call_b in flight.entries)
        # after the bookkeeping: a close from now on queues its reset behind this thread's swaps
        self.stepper.swap_rows_many(swapped)
        self.codec.swap_rows_many(swapped)
        self.slot_moves += len(swapped)
        self.trace.moves(len(swapped))

    def _compacting_moves(self, calls) -> list[tuple[int, int]]:
        stepping = sorted(call.slot.index for call in calls)
        with self._lock:
            others = [(slot, c) for slot, c in enumerate(self._calls)
                      if c is not None and c.attached and slot not in stepping]
        # Calls starting a turn themselves go up last: one moved up for a lite step of others is
        # moved down again at the next full step (`Scheduler.lite_between`), two moves for nothing.
        movable = [slot for slot, c in sorted(others, key=lambda sc: (is_starting(sc[1]), sc[0]))]
        return compacting_moves(stepping, movable, self.stepper.batch_sizes)

    def _prefill_one(self) -> bool:
        """One planned prefill (a caller's turn), for the first slot that has one."""
        with self._lock:
            call = next((c for c in self._calls if c is not None and c.slot.pending_prefill is not None
                         and c.slot.pending_replay is None), None)
        if call is None:
            return False
        self._run_prefill(call)
        return True

    def _run_prefill(self, call: Call) -> None:
        while call.slot.pending_replay is not None:  # a rollback's re-decode first (at most a few frames)
            self._replay_frame(call)
        work = call.slot.take_prefill()
        if work is None:
            return
        self.trace.planned(work.what)
        try:
            work.run()
        except Exception as exc:
            if is_device_fault(exc):
                raise
            log.exception("call %d: error in planned work (%s)", call.slot.index, work.what)
            call.fail(exc)
        for envelope in self._deferred.pop(call, []):  # in the order they came
            self._dispatch(envelope)

    def _replay_one_frame(self) -> bool:
        """One frame of a rollback's codec re-decode, for the first slot that has one pending."""
        for call in self._calls_replaying():
            self._replay_frame(call)
            return True
        return False

    def _replay_frame(self, call: Call) -> None:
        codes = call.slot.next_replay_codes()
        self.trace.planned("replay")
        try:
            self.runner.replay(call.slot.index, codes)
            call.slot.replay_frame_done()
        except Exception as exc:
            if is_device_fault(exc):
                raise
            log.exception("call %d: error re-decoding after a rollback", call.slot.index)
            call.fail(exc)

    def _watch_load(self, calls: list[Call]) -> None:
        """Overloaded: calls have been behind real time for SUSTAINED_BEHIND_S (not one slow
        step); it ends once none has been behind for `overload_refusal_s`."""
        now = time.monotonic()
        late = behind(calls)
        refusing = self.config.overload_refusal_s > 0
        if late:
            if self._behind_since is None:
                self._behind_since = now
            self._last_behind = now
            sustained = now - self._behind_since >= SUSTAINED_BEHIND_S
            if sustained and not self.overloaded and refusing:
                self.overloaded = True
                log.warning("falling behind real time: %d of %d calls more than %.0f ms late for %.1f s (last step "
                            "%.1f ms for %d calls); refusing new calls until caught up", len(late), len(calls),
                            BEHIND_S * 1000, now - self._behind_since, self.last_step_ms, self.last_step_calls)
        else:
            self._behind_since = None
            if self.overloaded and now - self._last_behind > self.config.overload_refusal_s:
                self.overloaded = False
                log.info("caught up with real time; taking new calls again")

    def _dispatch(self, envelope: "Envelope") -> None:
        call, message = envelope.call, envelope.message
        if isinstance(message, (PrepareVoice, ForgetVoices, BuildVoice)) and not self._holds(call):
            self._drain()  # voice work runs on the spare slot and the codec: not beside a step in flight
        match message:
            case Wake():
                return
            case PrepareVoice():
                self._on_prepare_voice(message)
                return
            case ForgetVoices(names=names):
                self.voices.forget(names)
                return
        if self._holds(call, message):
            self._held.setdefault(call, []).append(envelope)  # after the step in flight
            self.commands_held += 1
            return
        if call.slot.pending_prefill is not None and not isinstance(message, (Attach, Detach)):
            # the call's next commands wait for its planned prefill (they must see the caller's
            # turn in the context), which still waits for a moment no call is near running dry
            self._deferred.setdefault(call, []).append(envelope)
            return
        if isinstance(message, Detach):
            self._deferred.pop(call, None)
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
                case Drain():
                    call.drain()
                case BuildVoice():
                    self._on_build_voice(call, message)
                case CallerTurn(loaded=loaded, id=client_id):
                    call.plan_user_turn(loaded, client_id)
                case _ if call.plan_rollover_before(message):
                    self._deferred.setdefault(call, []).append(envelope)  # handled once the rollover ran
                case _:
                    call.handle(message, envelope.received_at, envelope.epoch)
        except Exception as exc:
            if is_device_fault(exc):
                raise
            log.exception("call %d: error handling %s", call.slot.index, getattr(message, "cmd", type(message).__name__))
            call.fail(exc)
        if call.draining:
            call.note_drained()

    def _holds(self, call: Call | None, message: object = None) -> bool:
        """Commands for `call` wait: its slot is in the step in flight (or has commands waiting),
        unless `message` is text that step cannot read (`Call.takes_text_beside_step_in_flight`)."""
        if call is None:
            return False
        if call in self._held:
            return True
        if self._in_flight is None or call not in self._in_flight.entries:
            return False
        if message is not None and call.takes_text_beside_step_in_flight(message):
            self.commands_beside += 1
            return False
        return True

    def _step(self, calls: list[Call]) -> None:
        """Launch a step for `calls`; apply the step launched before it (with `step_in_flight`),
        or this one at once."""
        launched = self._launch(calls)
        if launched is None:
            return
        previous, self._in_flight = self._in_flight, launched
        if previous is not None:
            self._process(previous)
        if not self.config.step_in_flight:
            self._drain()

    def _launch(self, calls: list[Call]) -> "LaunchedStep | None":
        """Queue a step on the device for `calls` (with its text choices, its decode of the
        frames that are ready from positions alone, and the copy of its actions) and return it
        unapplied. A call in the step in flight gets the choices for either action of that step
        (`Call.preview_after`); the others' text state is known."""
        flight = self._in_flight
        if flight is not None and any(call not in flight.entries and not call.context_left() for call in calls):
            self._drain()  # a rollover is model work on a call's context: none with a step in flight
            flight = None
        t0 = time.perf_counter()
        stepping, choices = [], {}
        for call in calls:
            if flight is not None and call in flight.entries:
                choices[call.slot.index] = call.preview_after(flight.entries[call].step)
                self.steps_ahead += 1
            elif call.context_left() or call.roll_over():
                known = call.preview()
                choices[call.slot.index] = (known, known)  # the same whichever action came before
            else:
                call.context_full()
                call.note_drained()
                continue
            stepping.append(call)
        if not stepping:
            return None
        pending = self.runner.launch(choices)
        device_s = pending.launch_seconds
        # Which calls have a frame is known from positions alone, before the text state machines
        # take the step's actions: the decode is queued first and runs while they do.
        entries = {call: LaunchedCall(call.slot.index, call.position - 1, call.slot.ready_frame, call.frame_ready())
                   for call in stepping}
        decode = None
        if any(entry.decodes for entry in entries.values()):
            due = [call for call, entry in entries.items() if entry.decodes and call.codec_mark_due()]
            for call, snapshot in zip(due, self.runner.snapshot_codec_rows([call.slot.index for call in due])):
                call.add_codec_mark(snapshot)
            # A rolled-back call's re-decode takes a frame in this decode too: under load its own
            # decodes come only every few steps (PLANNED_WORK_EVERY), each a decode of its own.
            replaying = [call for call in self._calls_replaying() if call not in entries]
            decode = self.runner.decode_later([entry.slot for entry in entries.values() if entry.decodes],
                                              {call.slot.index: call.slot.next_replay_codes() for call in replaying})
            for call in replaying:
                call.slot.replay_frame_done()
            device_s += decode.launch_seconds
        return LaunchedStep(entries, pending, decode, launched_at=t0,
                            host_s=time.perf_counter() - t0 - device_s)

    def _process(self, step: "LaunchedStep") -> None:
        """Apply a launched step: each call takes its action (`Call.advance`) and its PCM row
        (`Call.deliver`), then its end check; stats; the commands held for its slots go on."""
        t0 = time.perf_counter()
        result = step.pending.wait()
        # The step's cost as the engine runs it: from its launch until its actions are here. With a
        # step in flight that includes the host's work on the step before, done meanwhile.
        self.scheduler.costs.observe(result.batch, result.full, time.perf_counter() - step.launched_at)
        newer = self._in_flight  # launched after this one, with choices for either action of it
        failed = set()
        for call, entry in step.entries.items():
            try:
                call.advance(result.actions[entry.slot], entry.step)
                if newer is not None and call in newer.entries:
                    call.record_step_before(entry.step + 1)  # no command reached the call in between
            except Exception as exc:
                if is_device_fault(exc):
                    raise
                log.exception("call %d: error after a frame step", call.slot.index)
                call.fail(exc)
                failed.add(call)
        device_s = result.seconds - step.pending.launch_seconds  # the wait; the launch is counted in host_s
        if step.decode is not None:
            pcm, seconds = step.decode.wait()
            self.scheduler.costs.observe_decode(seconds)
            device_s += seconds - step.decode.launch_seconds
            for call, entry in step.entries.items():
                if entry.decodes and call not in failed and not self._guarded(call, call.deliver, pcm[entry.slot],
                                                                              entry.frame):
                    failed.add(call)
        for call, entry in step.entries.items():
            if call.turn is not None and call not in failed and not self._guarded(call, call.check_end, entry.step + 1):
                failed.add(call)
            if call.draining:
                call.note_drained()
        if newer is not None:
            newer.forget(failed)  # reset: whatever the newer step did for them is void
            past_end = [call for call in newer.entries if not call.generating]
            if past_end:  # `Call.may_step_ahead` should make this impossible; never leave a step half-applied
                log.error("calls %s were launched ahead past their turn's end: that step is not applied for them",
                          [call.slot.index for call in past_end])
                newer.forget(past_end)
        elapsed = time.perf_counter() - t0
        self._last_progress = time.monotonic()  # the liveness watchdog's clock: a step completed
        # A step's time on the generation thread: its launch and its application, device waits
        # included (without a step in flight, the whole step as before); host_ms the same less
        # the launches and the waits for the device.
        self.last_step_ms = (step.host_s + step.device_launch_s + elapsed) * 1000
        self.last_step_calls = len(step.entries)
        host_s = step.host_s + elapsed - device_s
        self.host_ms += 0.1 * (host_s * 1000 - self.host_ms)
        self.trace.applied(result.batch, result.full, time.perf_counter() - step.launched_at, device_s, host_s)
        self.steps += 1
        if self.metrics is not None:
            self.metrics.frame_step_ms(self.last_step_ms, self.last_step_calls)
        self._release_held()

    def _release_held(self) -> None:
        """Dispatch the commands held for calls that no step in flight holds any more, in order."""
        busy = self._in_flight.entries if self._in_flight is not None else {}
        for call in [call for call in self._held if call not in busy]:
            for envelope in self._held.pop(call, []):  # a voice command among them may apply the next step
                self._dispatch(envelope)

    def _guarded(self, call: Call, fn, *args) -> bool:
        """`fn(*args)`; an error fails the call alone (False)."""
        try:
            fn(*args)
        except Exception as exc:
            if is_device_fault(exc):
                raise
            log.exception("call %d: error in %s", call.slot.index, getattr(fn, "__name__", "frame"))
            call.fail(exc)
            return False
        return True

    # -- voices ----------------------------------------------------------------------------------

    def load_voice(self, cmd: p.SetVoice, key: str) -> LoadedVoice:
        """Decode a set_voice's audio and find its words: blocking, no model work. Call it in a
        worker thread, never the generation thread. VoiceError."""
        return self.voices.load(cmd, key)

    def submit_voice(self, call: Call, cmd: p.SetVoice, loaded: LoadedVoice, key: str) -> None:
        """Queue the model part of a loaded set_voice for `call`, in its command order; the voice
        is stored under `key` and announced to the client as `cmd.name`."""
        self._post(call, BuildVoice(cmd.name, cmd.id, loaded, key), call.epoch)

    def load_user_turn(self, cmd: p.UserTurn) -> LoadedUserTurn:
        """Decode a user_turn's audio and place its words: blocking host work, no model work. Call
        it in a worker thread, never the generation thread. p.ProtocolError."""
        return load_user_turn(cmd, self.tts.tokenizer, self.config.max_user_turn_seconds)

    def submit_user_turn(self, call: Call, cmd: p.UserTurn, loaded: LoadedUserTurn) -> None:
        """Queue a loaded caller's turn for `call`, in its command order; the call plans its model
        work (Mimi encode, prefill) and answers `user_turn_done`."""
        self._post(call, CallerTurn(loaded, cmd.id), call.epoch)

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


# -- device faults ------------------------------------------------------------------------------------

# How CUDA errors read when torch raises them as plain RuntimeErrors (before torch.AcceleratorError,
# and from libraries that wrap them). Once one happened, the context is unusable: later kernels
# fail too, or return garbage.
_DEVICE_FAULT_TEXT = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "device-side assert", "illegal memory access",
                      "unspecified launch failure", "ECC error")


def is_device_fault(exc: BaseException) -> bool:
    """A sticky device error: the process cannot serve any more. Out-of-memory is not one (the
    allocator recovers); a call's own bug is not one (it stays in its call)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8 raises CUDA errors as this
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _DEVICE_FAULT_TEXT)


# -- a launched step -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchedCall:
    """One call's part of a launched step, as it stood at launch: `slot` is the row its outputs
    are read from, even when the call has moved since (its position moves on at the next launch)."""

    slot: int
    step: int  # the position the step ran
    frame: int  # the aligned frame the step made ready
    decodes: bool  # that frame is decoded with the step


@dataclass
class LaunchedStep:
    """A step on the device, not applied yet (`Engine._process`)."""

    entries: dict  # Call -> LaunchedCall
    pending: object  # runner.PendingStep
    decode: object | None  # runner.PendingDecode
    launched_at: float  # perf_counter at the launch's start
    host_s: float  # the launch's host work, without the stepper's and the codec's launches

    @property
    def device_launch_s(self) -> float:
        return self.pending.launch_seconds + (self.decode.launch_seconds if self.decode is not None else 0.0)

    def forget(self, calls) -> None:
        """These calls were reset after the launch: their part of the step is not applied."""
        for call in calls:
            self.entries.pop(call, None)


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
class Drain:
    """The server is draining: the call finishes its utterance and begins none."""


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
class CallerTurn:
    """A user_turn whose audio and words were loaded off this thread."""

    loaded: LoadedUserTurn
    id: p.ClientId | None


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
