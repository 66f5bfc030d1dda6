"""A GPU you can run on a CPU: the stepper and the codec as a measured GPU would time them.

`server.py --simulate-gpu profiles/h100-2b.json` runs the whole server (protocol, calls,
scheduling, host bookkeeping, encoders: all the real code) with these stand-ins for the frame
step and the Mimi decode. The stand-ins compute nothing of the model; they keep each slot's
positions, inputs and delayed codes exactly as `FrameStepper` does, pick actions by a seeded
counter rule, and spend the profile's time for every piece of GPU work:

- work is asynchronous to the host as CUDA is: `SimulatedDevice.launch` queues it behind
  earlier work and returns at once; a synchronisation (the action copy after a step, the PCM
  copy after a decode) waits until the simulated work is done;
- a step takes the profile's time for its padded batch size and lane (full, or decoder-only);
  a decode the profile's time for the rows it runs over (the first rows of the stream, padded as
  the real codec pads them); a prefill its time per frame; moving a call to another slot
  (`swap_rows`) the profile's `swap_ms`.

The model's shape that decides timing beyond the step (the 16-18 frame codebook delay, so the 18
steps before a turn's first audio) is the profiled preset's; the tokenizer and text ids are the
tiny checkpoint's. Figures measured this way are simulated and must be marked so.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vendor_dia2.codec import CodecStreamSnapshot
from vendor_dia2.config import FRAME_SAMPLES, MAX_TOP_K, Dia2Config, preset
from vendor_dia2.runtime import PrefillSpan, PrefixBoundary, SamplingParams, StepperSnapshot, default_batch_sizes
from vendor_dia2.row_swap import PAIR_GROUPS
from vendor_dia2.slots import SlotPlace

UNGENERATED = -1  # a delayed-buffer cell no step has written
# A slot swap on the GPU when a profile has no measured figure: ~60 small indexed copies (a few
# µs each to launch) and the filled decoder caches of two calls (~0.1 MB a position at 2b, cfg 2,
# bf16: ~100 MB for two calls 500 frames in, ~0.05 ms at H100/H200 bandwidth). An ESTIMATE.
SWAP_MS = 0.3
# Each pair after the first in one swap (`FrameStepper.swap_rows_many`, one graph replay for up to
# `row_swap.PAIR_GROUPS[-1]` pairs), for a profile that has no figure of its own: a graphed swap
# copies whole decoder-cache rows, ~0.4 GB a slot at 2b. Measured on the H200 (run 37, the moves
# bench): 1 to 8 pairs in one swap took 1.24 to 6.95 ms, 0.82 ms a further pair (the estimate
# from bytes alone had been 0.4).
SWAP_PAIR_MS = 0.82
# A decode on a stream of its own (`--decode-stream on`) shares the GPU with the frame step it
# overlaps: the share of the decode's time that step is slowed by. H200 run 20 (`gpu_idle`, one
# call, step in flight): the step went from 8.14 to 7.13 ms with the ~2.2 ms decode beside it, so
# about half of it is still paid.
SIDE_DECODE_SLOWDOWN = 0.5


# -- the profile -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuProfile:
    """Measured GPU costs, in milliseconds, by padded batch size (rows for the decode)."""

    gpu: str
    preset: str  # the model shape the figures were measured at (its delays are simulated too)
    full_step_ms: dict[int, float]  # the whole frame step (decoder and depformer)
    lite_step_ms: dict[int, float]  # the decoder-only lane (no codebook is read yet)
    decode_ms: dict[int, float]  # one batched Mimi decode over that many stream rows
    prefill_ms_per_frame: float = 0.11
    swap_ms: float = SWAP_MS  # exchanging two slots' device state (caches, buffers, Mimi rows)
    swap_pair_ms: float = SWAP_PAIR_MS  # each further pair exchanged in the same swap
    side_decode_slowdown: float = SIDE_DECODE_SLOWDOWN  # a step beside a decode is slowed by this share of it
    source: str = ""

    @classmethod
    def load(cls, path: str | Path) -> "GpuProfile":
        raw = json.loads(Path(path).read_text())
        try:
            return cls(gpu=raw["gpu"], preset=raw["preset"],
                       full_step_ms=_by_size(raw["full_step_ms"]), lite_step_ms=_by_size(raw["lite_step_ms"]),
                       decode_ms=_by_size(raw["decode_ms"]),
                       prefill_ms_per_frame=float(raw.get("prefill_ms_per_frame", cls.prefill_ms_per_frame)),
                       swap_ms=float(raw.get("swap_ms", cls.swap_ms)),
                       swap_pair_ms=float(raw.get("swap_pair_ms", cls.swap_pair_ms)),
                       side_decode_slowdown=float(raw.get("side_decode_slowdown", cls.side_decode_slowdown)),
                       source=raw.get("source", ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not a GPU profile ({exc}); see profiles/README.md") from None

    def step_seconds(self, batch: int, full: bool) -> float:
        return _interpolate(self.full_step_ms if full else self.lite_step_ms, batch) / 1000

    def decode_seconds(self, rows: int) -> float:
        return _interpolate(self.decode_ms, rows) / 1000


def _by_size(table: dict) -> dict[int, float]:
    out = {int(k): float(v) for k, v in table.items()}
    if not out or min(out) < 1 or min(out.values()) < 0:
        raise ValueError("a table of positive sizes to milliseconds")
    return dict(sorted(out.items()))


def _interpolate(table: dict[int, float], size: int) -> float:
    """Piecewise linear in the size, extended past the last point by the last segment's slope."""
    sizes = list(table)
    if size <= sizes[0] or len(sizes) == 1:
        return table[sizes[0]] if size <= sizes[0] else table[sizes[0]] * size / sizes[0]
    i = min(bisect.bisect_left(sizes, size), len(sizes) - 1)
    lo, hi = sizes[i - 1], sizes[i]
    slope = (table[hi] - table[lo]) / (hi - lo)
    return table[lo] + slope * (size - lo)


# -- the device ----------------------------------------------------------------------------------


class SimulatedDevice:
    """A GPU's main stream as the host sees it, and a side stream beside it (`launch_beside`).
    Thread-safe; `clock` and `sleep` are injectable."""

    def __init__(self, clock=time.monotonic, sleep=time.sleep):
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self.busy_until = 0.0
        self.side_busy_until = 0.0
        self.busy_seconds = 0.0  # simulated GPU work so far (idle time = wall - busy)
        self._stall = 0.0

    def launch(self, seconds: float) -> float:
        """Queue `seconds` of GPU work behind what is queued; returns when it will be done."""
        with self._lock:
            seconds += self._stall
            self._stall = 0.0
            start = max(self._clock(), self.busy_until)
            self.busy_until = start + seconds
            self.busy_seconds += seconds
            return self.busy_until

    def launch_beside(self, seconds: float, slowdown: float = 0.0) -> float:
        """Queue `seconds` of work on the side stream, after the main stream's work queued so far
        (and the side stream's); the main stream goes on at once, its next piece of work slowed
        by `slowdown` of this one (the two share the GPU). Returns when it will be done."""
        with self._lock:
            start = max(self._clock(), self.busy_until, self.side_busy_until)
            self.side_busy_until = start + seconds
            self.busy_seconds += seconds
            self._stall += slowdown * seconds
            return self.side_busy_until

    def join_side(self) -> None:
        """The main stream's next work waits for the side stream's (a stream wait, not the host's)."""
        with self._lock:
            self.busy_until = max(self.busy_until, self.side_busy_until)

    def synchronize(self) -> None:
        """Wait until every launched piece of work is done."""
        while (left := max(self.busy_until, self.side_busy_until) - self._clock()) > 0:
            self._sleep(left)

    def wait_until(self, done_at: float) -> None:
        """Wait until the work that ends at `done_at` (from `launch`) is done, as a CUDA event
        recorded after it would: work queued later does not hold the host up."""
        while (left := done_at - self._clock()) > 0:
            self._sleep(left)

    def stall_next(self, seconds: float) -> None:
        """Make the next piece of work this much slower (a test's injected hiccup)."""
        with self._lock:
            self._stall += seconds


# -- the stepper ----------------------------------------------------------------------------------


NEW_WORD_EVERY = 3  # free steps pick a new word about one time in this many (then the machine decides)


class SimulatedStepper:
    """`FrameStepper`'s host API with no model: positions, inputs and delayed codes are kept as
    the real stepper keeps them, so rollback, rollover and voices behave the same; each step
    costs the profile's time on the simulated device."""

    def __init__(self, config: Dia2Config, profile: GpuProfile, device: SimulatedDevice, *, n_calls: int = 1,
                 cfg: bool = True, max_positions: int | None = None, bos_token_id: int = 1,
                 batch_sizes: tuple[int, ...] | None = None, max_top_k: int = MAX_TOP_K, **_ignored):
        d = config.data
        self.config, self.profile, self.device_clock = config, profile, device
        self.device = torch.device("cpu")
        self.n, self.branches = n_calls, (2 if cfg else 1)
        self.max_positions = max_positions or config.runtime.max_context_steps
        self.max_top_k = max_top_k
        self.bos_token_id = int(bos_token_id)
        self.batch_sizes = tuple(sorted(set(batch_sizes or default_batch_sizes(n_calls))))
        self.num_codebooks, self.max_delay = d.num_codebooks, d.max_delay
        self.first_stage_delay = min(d.delay_pattern[1:], default=d.max_delay)
        self.delays = torch.tensor(d.delay_pattern, dtype=torch.long)
        self.buffer = torch.full((self.n, self.num_codebooks, self.max_positions + 2), UNGENERATED, dtype=torch.long)
        self.ready_codes = torch.zeros(self.n, self.num_codebooks, dtype=torch.long)
        self.text = [(0, 0)] * self.n  # (main, second) text inputs of each slot's next step
        self.seeds = [0] * self.n
        self.streams = list(range(self.n))  # what the action rule is keyed by besides seed and position: moves with the call
        self.actions = [0] * self.n  # each slot's last sampled action (two-level text choices pick by it first)
        self._positions = [0] * self.n
        self._prefix_frames = [0] * self.n
        self._cache_offset = [0] * self.n
        self.last_batch, self.last_full = 0, True
        self.launches = self.waits = 0  # steps launched, and action copies waited for (tests compare them)
        self.last_prefill = PrefillSpan(0, 0)
        self.compile_max_calls = 0
        self.kernels, self.weights = "simulated", "simulated"
        for call in range(self.n):
            self.reset_call(call)

    # -- per-slot state, as FrameStepper keeps it

    def set_sampling(self, call: int, params: SamplingParams) -> None:
        if params.cfg_scale != 1.0 and self.branches == 1:
            raise ValueError("this stepper runs without the unconditional branch; cfg_scale must be 1")
        if max(params.text_top_k, params.audio_top_k) > self.max_top_k:
            raise ValueError(f"top_k above {self.max_top_k} is not supported by this stepper")
        self.seeds[call] = params.seed

    def reset_call(self, call: int, position: int = 0) -> None:
        self._positions[call] = position
        self._prefix_frames[call] = 0
        self._cache_offset[call] = 0
        self.buffer[call].fill_(UNGENERATED)
        self.text[call] = (self.bos_token_id, self.config.data.text_pad_token_id)

    def position(self, call: int) -> int:
        return self._positions[call]

    def place(self, call: int) -> SlotPlace:
        return SlotPlace(self._positions[call], self._prefix_frames[call], self._cache_offset[call])

    def step_inputs(self, call: int) -> torch.Tensor:
        """The text inputs of the slot's next step (the audio inputs are not kept: nothing reads them)."""
        tokens = torch.zeros(self.branches, 2, dtype=torch.long)
        tokens[0] = torch.tensor(self.text[call])
        return tokens

    def needs_depformer(self, call: int) -> bool:
        return self._positions[call] + 1 >= self.first_stage_delay + self._prefix_frames[call]

    def batch_size_for(self, slots: int) -> int:
        for b in self.batch_sizes:
            if b >= slots:
                return b
        raise ValueError(f"slot {slots - 1} lies past the largest batch size {self.batch_sizes[-1]}")

    def ready_frame_index(self, call: int) -> int:
        return self._positions[call] - self.max_delay

    def text_inputs(self, call: int) -> tuple[int, int]:
        return self.text[call]

    def aligned_codes(self, call: int, start: int, stop: int) -> torch.Tensor:
        index = torch.arange(start, stop)[None, :] + self.delays[:, None]
        return self.buffer[call].gather(1, index)

    def written_codes(self, call: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.buffer[call, :, start:stop]

    # -- the step

    def step(self, choices, active=None) -> list[int]:
        return self.launch(choices, active).wait()

    def launch(self, choices, active=None) -> "SimulatedLaunch":
        """As `FrameStepper.launch`: the step is queued on the simulated device and the host goes
        on; `wait()` is the action copy's synchronisation. `choices[call]` holds a call's two
        outcomes, or those two for each action of its step before (a step in flight)."""
        active = [True] * self.n if active is None else list(active)
        live = [call for call, on in enumerate(active) if on]
        if not live:
            return SimulatedLaunch([0] * self.n, None, 0.0)
        b = self.batch_size_for(live[-1] + 1)
        full = any(self.needs_depformer(call) for call in live)
        done_at = self.device_clock.launch(self.profile.step_seconds(b, full))
        positions = [self._positions[call] for call in live]
        self._write_codes(live, positions)
        out = [0] * self.n
        for call, position in zip(live, positions):
            action = int(_mix(self.seeds[call], position, self.streams[call]) % NEW_WORD_EVERY == 0)
            choice = choices[call]
            if np.ndim(choice) == 3:
                choice = choice[self.actions[call]]  # [previous action][action]: by the step before first
            self.text[call] = tuple(int(t) for t in choice[action])
            self._positions[call] = position + 1
            self.actions[call] = out[call] = action
        self.last_batch, self.last_full = b, full
        self.launches += 1
        return SimulatedLaunch(out, self, done_at)

    def action_copy_waited(self, done_at: float) -> None:
        self.device_clock.wait_until(done_at)  # the action copy to the host, as on the GPU
        self.waits += 1

    def _write_codes(self, live: list[int], positions: list[int]) -> None:
        """What a step writes, for every live slot in a few tensor operations (on the GPU this is
        device work, so it must cost the host little here too): codes land in delayed column
        position + 1 wherever a codebook is sampled there (not teacher-forced), and each slot's
        ready frame is gathered for the decode."""
        # numpy views of the same storage: a step's dozen small array operations cost a few µs
        # each there, against ~20 µs each as torch operators (about 0.27 ms a 64-call step).
        buffer, ready_codes, delays = self.buffer.numpy(), self.ready_codes.numpy(), self.delays.numpy()
        slots = np.asarray(live)
        columns = np.asarray(positions) + 1
        forced = np.asarray([self._prefix_frames[call] for call in live])
        width = buffer.shape[2]
        sampled = (delays[None, :] + forced[:, None] <= columns[:, None]) & (columns[:, None] < width)
        codebooks = np.arange(self.num_codebooks)[None, :]
        cells = (slots[:, None], codebooks, np.minimum(columns, width - 1)[:, None])  # [L, Q] each, broadcast
        values = (np.asarray([self.seeds[c] for c in live])[:, None] * 7919 + columns[:, None] * 31 + codebooks) % 2048
        buffer[cells] = np.where(sampled, values, buffer[cells])
        frames = columns - self.max_delay
        ready = frames >= 0
        if ready.any():
            index = np.minimum(frames[ready][:, None] + delays[None, :], width - 1)
            ready_codes[slots[ready]] = buffer[slots[ready][:, None], codebooks, index]

    # -- moving calls between slots

    def swap_rows(self, a: int, b: int) -> None:
        self.swap_rows_many([(a, b)])

    def swap_rows_many(self, pairs: list[tuple[int, int]]) -> None:
        """Exchange the slots of each pair whole, as `FrameStepper.swap_rows_many` does: the
        profile's `swap_ms` on the device per replay, plus `swap_pair_ms` for each pair after the
        first in it (padded up to a group size; Mimi rows included)."""
        pairs = [(a, b) for a, b in pairs if a != b]
        largest = max(PAIR_GROUPS)
        for start in range(0, len(pairs), largest):
            padded = next(size for size in PAIR_GROUPS if size >= len(pairs[start:start + largest]))
            self.device_clock.launch((self.profile.swap_ms + (padded - 1) * self.profile.swap_pair_ms) / 1000)
        for a, b in pairs:
            self._swap_host(a, b)

    def _swap_host(self, a: int, b: int) -> None:
        pair, crossed = [a, b], [b, a]
        self.buffer[pair] = self.buffer[crossed]
        self.ready_codes[pair] = self.ready_codes[crossed]
        for per_slot in (self.text, self.seeds, self.streams, self.actions, self._positions, self._prefix_frames,
                         self._cache_offset):
            per_slot[a], per_slot[b] = per_slot[b], per_slot[a]

    # -- snapshots, rewinds, prefills

    def snapshot(self, call: int = 0) -> StepperSnapshot:
        position = self._positions[call]
        return StepperSnapshot(torch.tensor([position]), self.step_inputs(call), self.buffer[call:call + 1].clone(),
                               torch.tensor([self._prefix_frames[call]]), [], position + 1,
                               self._cache_offset[call])

    def restore(self, snap: StepperSnapshot, call: int = 0) -> None:
        self.buffer[call:call + 1].copy_(snap.buffer)
        self._positions[call] = int(snap.positions[0])
        self._prefix_frames[call] = int(snap.prefix_frames[0])
        self._cache_offset[call] = int(snap.cache_offset)
        main, second = snap.tokens[0, :2].tolist()
        self.text[call] = (main, second)

    def rewind(self, call: int, position: int, text: tuple[int, int]) -> None:
        self.text[call] = (int(text[0]), int(text[1]))
        self._positions[call] = position
        self._prefix_frames[call] = position

    def prefill(self, call: int, delayed: torch.Tensor, text: torch.Tensor, frames: int, chunk: int = 256, *,
                boundary: PrefixBoundary | str = "upstream", start: int = 0) -> None:
        """As `FrameStepper.prefill`, `start` included (an append keeps the cells of the frames
        before it), in the profile's time for `frames` frames."""
        boundary = PrefixBoundary.named(boundary)
        if start and boundary.repeat_last:
            raise ValueError("appending at a call's position continues with the clean boundary")
        self.device_clock.launch(frames * self.profile.prefill_ms_per_frame / 1000)
        width = delayed.shape[1]
        tail = self.buffer[call, :, start:]
        aligned = torch.arange(start, start + tail.shape[1])[None, :] - self.delays[:, None]
        new = torch.where(aligned[:, :width] >= start, delayed.cpu(), tail[:, :width])
        tail.masked_fill_(aligned >= start, UNGENERATED)
        tail[:, :width] = new
        self.text[call] = tuple(int(t) for t in text[frames].tolist())
        self._positions[call] = start + frames - 1 if boundary.repeat_last else start + frames
        self._prefix_frames[call] = start + frames if boundary.teacher_force else 0
        self._cache_offset[call] = 1 if boundary.repeat_last else (self._cache_offset[call] if start else 0)
        self.last_prefill = PrefillSpan(start, frames)
        self.device_clock.synchronize()


@dataclass(frozen=True)
class SimulatedLaunch:
    """A simulated step in flight: its actions are known to the simulation at once, but the host
    gets them only through `wait()`, which waits for the simulated device as the copy would."""

    actions: list[int]
    stepper: SimulatedStepper | None
    done_at: float  # when the simulated device finishes the step (SimulatedDevice.launch)

    def wait(self) -> list[int]:
        if self.stepper is not None:
            self.stepper.action_copy_waited(self.done_at)
        return self.actions


def _mix(seed: int, position: int, stream: int) -> int:
    """A counter-based hash: the same draw for the same (seed, position, slot), in any batch."""
    x = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & (2**64 - 1)
    return x ^ (x >> 32)


# -- the codec ------------------------------------------------------------------------------------


@dataclass
class SimulatedCodec:
    """Mimi's streaming API with no model: decodes cost the profile's time for the stream's rows
    and give quiet noise (audible as a hiss, never as speech); encodes give stable codes."""

    profile: GpuProfile
    device_clock: SimulatedDevice
    source: str = "simulated"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int | None = None
    decode_sizes: tuple[int, ...] = ()
    side_stream: bool = False  # decodes queued on the side stream (`open_stream`)
    states: dict = field(default_factory=dict)
    _hiss: torch.Tensor | None = None  # the PCM every decode returns (computing none is the point)

    def open_stream(self, batch_size: int = 1, decode_sizes=(), side_stream: bool = False) -> None:
        self.batch_size, self.side_stream = batch_size, side_stream
        self.decode_sizes = tuple(sorted({b for b in decode_sizes if 0 < b < batch_size} | {batch_size}))

    def decode_size_for(self, rows: int) -> int:
        return next(b for b in self.decode_sizes if b >= rows)

    def swap_rows(self, a: int, b: int) -> None:
        self.swap_rows_many([(a, b)])

    def swap_rows_many(self, pairs: list[tuple[int, int]]) -> None:
        self.device_clock.join_side()  # timed with the stepper's swap

    def close_stream(self) -> None:
        self.batch_size = None

    @property
    def stream_batch_size(self) -> int | None:
        return self.batch_size

    def decode_frame(self, codes: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        self.device_clock.join_side()
        pcm, _ = self._decode(codes, rows)
        self.device_clock.synchronize()  # the PCM copy to the host, as on the GPU
        return pcm

    def _decode(self, codes: torch.Tensor, rows: torch.Tensor | None,
                beside: bool = False) -> tuple[torch.Tensor, float]:
        """Queue a decode's time on the simulated device (`beside`: on the side stream, as
        `MimiCodec` does with a side stream); the PCM it will give, and when."""
        batch = codes.shape[0] if codes.dim() == 2 else 1
        if self.batch_size is not None:
            # the real codec runs over the first rows only, up to the highest one decoding
            on = torch.as_tensor(rows, dtype=torch.bool).nonzero() if rows is not None else None
            batch = self.decode_size_for(int(on[-1]) + 1) if on is not None and len(on) else self.batch_size
        seconds = self.profile.decode_seconds(batch)
        if beside:
            done_at = self.device_clock.launch_beside(seconds, self.profile.side_decode_slowdown)
        else:
            done_at = self.device_clock.launch(seconds)
        if self._hiss is None or self._hiss.shape[0] < batch:
            self._hiss = 0.01 * torch.randn(batch, FRAME_SAMPLES, generator=torch.Generator().manual_seed(0))
        return self._hiss[:batch], done_at

    def decode_frame_async(self, codes: torch.Tensor, rows: torch.Tensor | None = None) -> "SimulatedPcm":
        """As `MimiCodec.decode_frame_async`: the decode is queued on the simulated device and the
        host goes on; `wait` is the PCM copy's synchronisation."""
        if self.side_stream:
            self.device_clock.join_side()  # as the real codec, a decode is staged after the last one ends
        pcm, done_at = self._decode(codes, rows, beside=self.side_stream)
        return SimulatedPcm(pcm, self.device_clock, done_at)

    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        frames = -(-wav.shape[-1] // FRAME_SAMPLES)
        batch = wav.shape[0] if wav.dim() == 3 else 1
        return torch.arange(frames * 32).reshape(1, 32, frames).expand(batch, -1, -1) % 2048

    # Every use of the stream's state waits for the decodes queued beside, as `MimiCodec`'s does.

    def reset_stream(self, mask: torch.Tensor | None = None) -> None:
        self.device_clock.join_side()

    def snapshot_row(self, row: int) -> CodecStreamSnapshot:
        self.device_clock.join_side()
        return CodecStreamSnapshot(1, {})

    def snapshot_rows(self, rows: list[int]) -> list[CodecStreamSnapshot]:
        self.device_clock.join_side()
        return [CodecStreamSnapshot(1, {}) for _ in rows]

    def restore_row(self, row: int, snapshot: CodecStreamSnapshot) -> None:
        self.device_clock.join_side()

    def warmed_row(self, codes: torch.Tensor) -> CodecStreamSnapshot:
        self.device_clock.launch(self.profile.decode_seconds(1) * codes.shape[-1])
        self.device_clock.synchronize()
        return CodecStreamSnapshot(1, {})


@dataclass(frozen=True)
class SimulatedPcm:
    """PCM on its way to the host: `wait` waits for the simulated device, as a CUDA event would."""

    pcm: torch.Tensor
    device_clock: SimulatedDevice
    done_at: float  # when the simulated decode is done (work queued after it does not delay the PCM)

    def wait(self):
        self.device_clock.wait_until(self.done_at)
        return self.pcm.numpy()


# -- the model ------------------------------------------------------------------------------------


class SimulatedDia2:
    """What the engine uses of `vendor_dia2.Dia2`, over the simulated stepper and codec."""

    def __init__(self, profile: GpuProfile, checkpoint: str = "tiny"):
        from vendor_dia2.api import Dia2
        from vendor_dia2.checkpoint import resolve, tokenizer_location
        from vendor_dia2.tokenizer import Dia2Tokenizer

        files = resolve(checkpoint)
        base = Dia2Config.from_file(files.config)
        shape = preset(profile.preset)
        # the profiled shape's delays and context decide timing; the tiny checkpoint's text ids stay
        self.config = dataclasses.replace(base, data=dataclasses.replace(base.data,
                                                                         delay_pattern=shape.data.delay_pattern),
                                          runtime=shape.runtime)
        self.tokenizer = Dia2Tokenizer.from_dir(tokenizer_location(files, base))
        self.profile = profile
        self.device_clock = SimulatedDevice()
        self.codec = SimulatedCodec(profile, self.device_clock)
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.name = f"simulated {profile.gpu} {profile.preset}"
        self._machine_factory = Dia2.new_state_machine
        self.bos_token_id = Dia2.bos_token_id.fget(self)
        self.tail_frames = Dia2.tail_frames.fget(self)

    def new_state_machine(self):
        return self._machine_factory(self)

    def device_busy_seconds(self) -> float:
        """Simulated GPU work queued so far (steps, decodes, prefills, swaps), in seconds."""
        return self.device_clock.busy_seconds

    def new_stepper(self, *, n_calls: int = 1, cfg: bool, max_positions: int | None = None, **options):
        return SimulatedStepper(self.config, self.profile, self.device_clock, n_calls=n_calls, cfg=cfg,
                                max_positions=max_positions, bos_token_id=self.bos_token_id,
                                batch_sizes=options.get("batch_sizes"))
