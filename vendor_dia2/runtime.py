"""The per-frame step over static buffers, for many calls at once: decoder, CFG, sampling, 31
depformer stages, the delayed-buffer write and the next step's inputs, all on the device.

The text state machine lives on the host, but the step needs its answer mid-frame (the new text
tokens condition depformer stage 0). Instead of a round trip, the host previews both possible
answers (action = pad, action = new_word) before the frame and the device picks one after
sampling the action. The whole frame is therefore one function over persistent tensors — one
CUDA graph on GPU, the same code eager on CPU — and the only device-to-host copy per frame is
the sampled actions, read after the frame to advance the state machines.

`FrameStepper` drives three parts: the per-slot device state for `n_calls` *slots* and its host
mirrors (`slots.SlotTable`: caches, inputs, positions, delayed buffers, sampling parameters, an
active mask), the frame function over it (`frame.Frame`, each stage's weights passed whole), and
the shapes a frame runs at with their captured graphs (`graphs.FrameGraphs`). It keeps batched
streaming state the way moshi does, with per-row reset: a slot is reset, snapshotted, restored and prefilled on its
own rows, and `step(active=...)` advances only the active slots. Rows of the model batch are
laid out `[slot, branch]` (row `slot * branches + branch`; branch 1 is the unconditional CFG
twin), so the first `b` slots are one contiguous view: a step runs over the smallest captured
batch size that covers the highest active slot, and inactive slots inside it are computed but
never advance (their cache write lands past their position, where their next real step writes
again).

Two lanes per batch size: the full frame, and a decoder-only frame for steps whose depformer
codes no output reads (DIA2_SPEC.md §5: before a codebook's delay has passed, or where a prefix
teacher-forces the codes). Both write the same tokens.

After a prefill (voice prefix, context rollover) generation continues in one of two ways
(`PrefixBoundary`, docs/parity.md P5-P6): as the published runtime does (the default), or our
clean way, which the rollover needs. Upstream's way runs the last prefix position a second time as
a new cache entry, so a slot's cache index can be one past its RoPE position: each slot has a
cache offset (0 or 1), read inside the frame like every other per-slot setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import decode_attention, row_swap
from .config import MAX_TOP_K, Dia2Config
from .frame import Frame, FrameFunctions, PickRule, eager_functions, fused_stage_weights, pick, resolve_sampler
from .graphs import CACHE_BUCKETS, FrameGraphs, default_batch_sizes
from .model import Dia2Model
from .slots import NEW_WORD_ACTION, UNGENERATED, SamplingParams, SlotPlace, SlotTable, StepperSnapshot

__all__ = ["CACHE_BUCKETS", "FrameFunctions", "FrameStepper", "LaunchedFrame", "NEW_WORD_ACTION", "PREFIX_BOUNDARIES", "PrefillSpan",
           "PrefixBoundary", "SamplingParams", "SlotPlace", "StepperSnapshot", "UNGENERATED", "default_batch_sizes", "pick"]


@dataclass(frozen=True)
class LaunchedFrame:
    """A frame launched on the device; `wait()` gives its sampled actions (0 pad, 1 new_word; 0
    for slots that did not step), waiting for the device where it has not finished."""

    actions: object  # slots.PendingActions, or None when no slot stepped
    live: np.ndarray
    n: int

    def wait(self) -> list[int]:
        out = [0] * self.n
        if self.actions is None:
            return out
        sampled = self.actions.wait()
        for call in self.live.tolist():
            out[call] = int(sampled[call] == NEW_WORD_ACTION)
        return out


@dataclass(frozen=True)
class PrefixBoundary:
    """How generation continues after `FrameStepper.prefill` over F known frames.

    repeat_last (upstream): the first generated step runs position F - 1 again, as a new cache
    entry (slot F), reading the text the state machine answered at the last prefix step and
    delayed column F - 1 again; the caller's state machine processes step F - 1 a second time.
    Every later step at position p writes cache slot p + 1. Off: the first generated step is
    position F, reading column F.

    teacher_force (ours): the prefix codes the delay carries past the prefix end (delayed
    columns F .. F + max_delay - 1) are kept instead of sampled. Off (upstream): the generation
    samples those cells and writes over the prefix codes there.
    """

    repeat_last: bool
    teacher_force: bool

    @classmethod
    def named(cls, boundary: "PrefixBoundary | str") -> "PrefixBoundary":
        if isinstance(boundary, PrefixBoundary):
            return boundary
        try:
            return PREFIX_BOUNDARIES[boundary]
        except KeyError:
            raise ValueError(f"prefix boundary {boundary!r}: expected one of {', '.join(PREFIX_BOUNDARIES)}") from None


@dataclass(frozen=True)
class PrefillSpan:
    """The positions a prefill ran through the decoder: `frames` of them from `start`."""

    start: int
    frames: int


PREFIX_BOUNDARIES = {
    "upstream": PrefixBoundary(repeat_last=True, teacher_force=False),  # the published runtime's (default)
    "clean": PrefixBoundary(repeat_last=False, teacher_force=True),  # spec §9's clean boundary; rollover needs it
}


class FrameStepper:
    """Runs frame steps for up to `n_calls` independent calls (slots) sharing one model.

    `cfg` fixes whether an unconditional branch is run (two rows per call); the CFG scale itself
    is per call. `max_positions` bounds the decoder cache and the delayed buffer. `batch_sizes`
    are the padded batch sizes a step may run at (each captured once as CUDA graphs on GPU).
    """

    @torch.inference_mode(False)
    def __init__(self, model: Dia2Model, *, n_calls: int = 1, cfg: bool = True, max_positions: int | None = None,
                 max_top_k: int = MAX_TOP_K, cfg_filter_k: int = 50, use_cuda_graph: bool | None = None,
                 compile: bool = False, bos_token_id: int = 1, batch_sizes: tuple[int, ...] | None = None,
                 kernels: str = "torch", weights: str = "bf16", compile_max_calls: int | None = None,
                 cache_buckets: tuple[int, ...] | None = None, sampler: str = "torch"):
        config: Dia2Config = model.config
        p = next(model.parameters())
        self.model, self.config = model, config
        self.device, self.dtype = p.device, p.dtype
        self.n, self.branches = n_calls, (2 if cfg else 1)
        self.rows = self.n * self.branches
        self.max_positions = max_positions or config.runtime.max_context_steps
        self.max_top_k, self.cfg_filter_k = max_top_k, cfg_filter_k
        self.bos_token_id = int(bos_token_id)
        d = config.data
        self.num_codebooks, self.max_delay = d.num_codebooks, d.max_delay
        # the depformer's codes are read once a codebook other than 0 has started
        self.first_stage_delay = min(d.delay_pattern[1:], default=d.max_delay)
        self.kernels, self.weights = kernels, weights
        if not model.transformer.layer_weights:
            model.prepare_tables()
        fused = fused_stage_weights(model, self.device, kernels, weights)  # checks the options before allocating
        if self.device.type == "cpu":
            # random weights drive softmax tails into denormals, which make CPU matmuls ~10x slower
            torch.set_flush_denormal(True)
        self.slots = SlotTable(model, n=self.n, branches=self.branches, max_positions=self.max_positions,
                               bos_token_id=self.bos_token_id)
        rule = PickRule(branches=self.branches, filter_k=cfg_filter_k, max_top_k=max_top_k)
        # The fused draw (`sampler="triton"`, or "auto" with the Triton kernels) takes the sorted
        # draw's tokens (GPU tests, run 22); the server asks for "auto" (`--sampler`).
        self.sampler = resolve_sampler(sampler, kernels, self.device)
        self.frame = Frame(model, self.slots, rule, fused, weights, self.sampler)
        if use_cuda_graph is None:
            use_cuda_graph = self.device.type == "cuda"
        # the decoder's attention over each row's filled slots, where the Triton kernels run
        self.decode_attention = decode_attention.wanted(kernels, self.device)
        fns = eager_functions(rule, model.depformer.shape,
                              decode_attend=decode_attention.attend if self.decode_attention else None)
        self.graphs = FrameGraphs(fns, n_calls=self.n,
                                  cache_length=self.slots.decoder_caches[0].length, batch_sizes=batch_sizes,
                                  compile=compile, compile_max_calls=compile_max_calls,
                                  use_cuda_graph=use_cuda_graph, cache_buckets=cache_buckets)
        self.last_batch, self.last_full = 0, True  # what the last step ran (for metrics and tests)
        self.last_prefill = PrefillSpan(0, 0)  # the positions the last prefill ran (for tests)
        self.skip_unread_stages = True  # the decoder-only lane (off only to compare against it)
        for call in range(self.n):
            self.set_sampling(call, SamplingParams(cfg_scale=2.0 if cfg else 1.0))
            self.reset_call(call)
        self.slots.active.zero_()  # the warm-up frames of a capture must not move any slot
        self.graphs.capture_all(self.frame)
        self.slots.capture_swap(graph=use_cuda_graph and row_swap.GRAPHED)

    # -- what the stepper runs at ------------------------------------------------------------------

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return self.graphs.batch_sizes

    @property
    def compile_max_calls(self) -> int:
        return self.graphs.compile_max_calls

    @property
    def length_buckets(self) -> tuple[int, ...]:
        return self.graphs.length_buckets

    @property
    def cache_length(self) -> int:
        return self.graphs.cache_length

    # -- outputs of the last step (device tensors, one row per slot) ---------------------------------

    @property
    def codes(self) -> torch.Tensor:
        """[n, Q] the codes each slot sampled (or was forced to) in the last step."""
        return self.slots.codes

    @property
    def text_out(self) -> torch.Tensor:
        """[n, 2] the (main, second) text tokens each slot's last step chose."""
        return self.slots.text_out

    @property
    def ready_codes(self) -> torch.Tensor:
        """[n, Q] the aligned frame `ready_frame_index(call)` of each slot, complete after the last step."""
        return self.slots.ready_codes

    # -- host API --------------------------------------------------------------------------------

    def set_sampling(self, call: int, params: SamplingParams) -> None:
        if params.cfg_scale != 1.0 and self.branches == 1:
            raise ValueError("this stepper runs without the unconditional branch; cfg_scale must be 1")
        if max(params.text_top_k, params.audio_top_k) > self.max_top_k:
            raise ValueError(f"top_k above {self.max_top_k} is not supported by this stepper")
        self.slots.set_sampling(call, params)

    def reset_call(self, call: int, position: int = 0) -> None:
        """Start a call afresh at `position` (its cache past that position is ignored): the step-0
        inputs of DIA2_SPEC.md §5."""
        self.slots.reset(call, position)

    def position(self, call: int) -> int:
        """The position the call's next step runs (host mirror: no device read)."""
        return int(self.slots.places.position[call])  # no SlotPlace: this is read per call per step

    def place(self, call: int) -> SlotPlace:
        """Where the call stands: position, teacher-forced prefix frames, cache offset."""
        return self.slots.places[call]

    def needs_depformer(self, call: int) -> bool:
        """Whether the next step of `call` samples codes that some output reads (else the
        decoder-only lane gives the same tokens). After an upstream-boundary prefill nothing is
        teacher-forced (prefix_frames 0), so the codes right after the prefix are read."""
        return self.slots.places.need_codes(np.array([call]), self.first_stage_delay)

    def batch_size_for(self, slots: int) -> int:
        """The padded batch size a step over slots 0..slots-1 runs at."""
        return self.graphs.batch_size_for(slots)

    def cache_length_for(self, b: int) -> int:
        """The decoder cache slots a step over slots 0..b-1 reads: every slot any of them writes
        this step (its position plus cache offset), rounded up to a bucket."""
        return self.graphs.length_for(self.slots.places.furthest_cache_slot(b) + 1)

    def step(self, choices, active=None) -> list[int]:
        """Run one frame for every active call. `choices[call]` = ((main, second) if the sampled
        action is pad, (main, second) if it is new_word); entries of inactive calls are ignored.
        `active` (default: all) lists which calls advance. Returns the sampled actions (0 pad,
        1 new_word; 0 for inactive calls)."""
        return self.launch(choices, active).wait()

    def launch(self, choices, active=None) -> "LaunchedFrame":
        """`step`, queued: the frame and the copy of its actions are launched and this returns at
        once (positions are advanced on the host mirror already); `wait()` gives the actions.
        `choices[call]` may also hold both outcomes for each action of the call's step before
        (`SlotTable.stage_step`): the next step can be launched before the host has applied the
        actions of this one."""
        live = np.arange(self.n) if active is None else np.flatnonzero(np.asarray(active, dtype=bool))
        if not len(live):
            return LaunchedFrame(None, live, self.n)
        b = self.batch_size_for(int(live[-1]) + 1)
        full = not self.skip_unread_stages or self.slots.places.need_codes(live, self.first_stage_delay)
        staging = self.slots.stage_step(choices, live)
        self.graphs.run(self.frame, b, full, self.cache_length_for(b))
        actions = self.slots.read_actions_later(staging)
        self.slots.advanced(live)
        self.last_batch, self.last_full = b, full
        return LaunchedFrame(actions, live, self.n)

    def ready_frame_index(self, call: int) -> int:
        """Aligned frame index whose codes are in `ready_codes[call]` after the last step."""
        return self.position(call) - self.max_delay

    def written_codes(self, call: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Delayed buffer columns [start, stop) of a call (default: all of them): `[Q, stop-start]`."""
        return self.slots.buffer[call, :, start:stop]

    def step_inputs(self, call: int) -> torch.Tensor:
        """A copy of the tokens the call's next step reads: `[branches, 2 + Q]` (text, then audio)."""
        return self.slots.tokens[self.slots.row_slice(call)].clone()

    def text_inputs(self, call: int) -> tuple[int, int]:
        """The (main, second) text tokens the call's next step reads (conditional row)."""
        main, second = self.slots.tokens[call * self.branches, :2].tolist()
        return main, second

    def aligned_codes(self, call: int, start: int, stop: int) -> torch.Tensor:
        """Aligned frames [start, stop) of a call, `[Q, stop - start]` (all must be complete)."""
        index = torch.arange(start, stop, device=self.device)[None, :] + self.slots.delays[:, None]  # [Q, F]
        return self.slots.buffer[call].gather(1, index)

    def slot_tensors(self, call: int) -> dict[str, torch.Tensor]:
        """Copies of every device tensor the call's slot owns (see `SlotTable.tensors`)."""
        return self.slots.tensors(call)

    # -- moving calls between slots ----------------------------------------------------------------

    @torch.inference_mode()
    def swap_rows(self, a: int, b: int) -> None:
        """Exchange slots `a` and `b` whole (caches, inputs, positions, delayed buffers, sampling
        settings, last outputs): each call steps on as it would have on its old slot, token for
        token. A step runs over slots 0..b-1, so moving the calls a step needs to the lowest
        slots makes the step small (one copy per move, none per step)."""
        self.slots.swap([(a, b)])

    @torch.inference_mode()
    def swap_rows_many(self, pairs: list[tuple[int, int]]) -> None:
        """`swap_rows` of each pair (no slot in two pairs), in one go (one replay with graphs)."""
        self.slots.swap(pairs)

    # -- snapshots (one slot, row-sized copies) ----------------------------------------------------

    def snapshot(self, call: int = 0) -> StepperSnapshot:
        return self.slots.snapshot(call)

    def restore(self, snap: StepperSnapshot, call: int = 0) -> None:
        self.slots.restore(call, snap)

    # -- rewinding a slot (barge-in rollback) -----------------------------------------------------

    @torch.inference_mode()
    def rewind(self, call: int, position: int, text: tuple[int, int]) -> None:
        """Put a call back to stand before step `position`, keeping the codes of every aligned
        frame before `position` (already heard) as they are: they are teacher-forced, never
        sampled again. `text` are the (main, second) tokens the state machine gave at step
        `position - 1`. The cache past `position` is simply overwritten by the next steps, and the
        draws are keyed by position, so sampling picks up as it would have. The cache offset
        stays: after an upstream-boundary prefix the history fills slots 0..position + offset - 1."""
        d, s = self.config.data, self.slots
        rows = s.row_slice(call)
        column = s.buffer[call, :, position]  # aligned frames position - delay_k: all written
        audio = torch.where(s.delays > position, d.audio_bos, column)
        s.tokens[rows, 2:] = audio[None, :]
        s.tokens[rows.start, 0].fill_(int(text[0]))  # fills: an element assignment waits for the stream
        s.tokens[rows.start, 1].fill_(int(text[1]))
        s.place(call, position, prefix_frames=position)

    # -- prefill (voice prefix) ------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, call: int, delayed: torch.Tensor, text: torch.Tensor, frames: int, chunk: int = 256, *,
                boundary: PrefixBoundary | str = "upstream", start: int = 0) -> None:
        """Run the decoder over `frames` known steps of one call in parallel, filling its cache
        rows, no sampling; the other calls' rows are not touched.

        delayed `[Q, frames + max_delay]`: the delayed grid of the prefix codes, bos in the cells
        before each codebook starts; it is written into the call's delayed buffer. text
        `[frames + 1, 2]`: the text tokens of steps 0..frames (row `frames` is what the state
        machine answered at the last prefix step). `chunk` frames run at once (1: frame by frame).

        `boundary` (`PrefixBoundary` or a name of PREFIX_BOUNDARIES) says how generation goes on.
        "upstream" (the default, as the published runtime): the call stands at position
        frames - 1 again, with cache offset 1, and nothing is teacher-forced; the caller's state
        machine steps from frames - 1. "clean": the call stands at position `frames` and the
        prefix codes that the delay reaches past that position are teacher-forced (a context
        rollover needs this: its prefix is conversation already heard).

        `start` > 0 appends known frames to a call at its position `start` (a caller's turn): the
        call's cache before `start` and its cache offset are kept and only the `frames` new steps
        run, so the work is the new frames', not the context's. `delayed` then holds delayed
        columns start .. start + frames + max_delay - 1 and `text` the text tokens of steps
        start .. start + frames; the cells of those columns that hold aligned frames before
        `start` are the call's own (already in its buffer) and are kept. Appending needs the clean
        boundary: the frames before `start` were generated, not prefilled.
        """
        boundary = PrefixBoundary.named(boundary)
        if boundary.repeat_last and frames < 1:
            raise ValueError("repeating the last prefix position needs at least one prefix frame")
        if start and boundary.repeat_last:
            raise ValueError("appending at a call's position continues with the clean boundary")
        d, s = self.config.data, self.slots
        width = delayed.shape[1]
        if start + width > s.buffer.shape[2]:
            raise ValueError(f"{frames} frames at position {start} do not fit the call's {self.max_positions} positions")
        delayed, text = delayed.to(self.device), text.to(self.device)
        offset = s.places[call].cache_offset if start else 0
        columns = torch.arange(start, start + width, device=self.device)
        aligned = columns[None, :] - s.delays[:, None]  # [Q, width] aligned frame of each delayed cell
        if start:  # the call's own cells (aligned frames before `start`) stay as they are
            own = (aligned < start) & (aligned >= 0)
            kept = s.buffer[call, :, start:start + width]
            if bool((kept[own] == UNGENERATED).any()):  # one read; an unwritten cell would embed as a wrong code
                raise ValueError(f"appending at {start}: the aligned frames before it are not complete yet "
                                 f"(the call must have run to position {start + self.max_delay - 1} at least)")
            delayed = torch.where(aligned >= start, delayed, kept)
        tokens = torch.empty(self.branches, frames + 1, d.channels, dtype=torch.long, device=self.device)
        tokens[:, :, 2:] = torch.where(aligned < 0, d.audio_bos, delayed)[:, : frames + 1].T
        tokens[0, :, :2] = text
        if self.branches == 2:
            tokens[1, :, 0] = d.text_zero_token_id
            tokens[1, :, 1] = d.text_pad_token_id
        rows = s.row_slice(call)
        caches = [cache.rows(rows.start, rows.stop) for cache in s.decoder_caches]
        for first in range(0, frames, chunk):
            stop = min(frames, first + chunk)
            pos = torch.arange(start + first, start + stop, device=self.device)[None].expand(self.branches, -1)
            self.model.transformer(tokens[:, first:stop], pos, caches, slots=pos + offset if offset else None)
        position = start + frames - 1 if boundary.repeat_last else start + frames
        s.tokens[rows] = tokens[:, frames]  # the text of step `start + frames` either way ...
        s.tokens[rows, 2:] = tokens[:, position - start, 2:]  # ... with the audio of the column the step reads
        tail = s.buffer[call, :, start:]  # every cell of an aligned frame from `start` on is rewritten
        tail.masked_fill_(torch.arange(start, start + tail.shape[1], device=self.device)[None, :]
                          - s.delays[:, None] >= start, UNGENERATED)
        tail[:, :width] = delayed
        s.place(call, position, prefix_frames=start + frames if boundary.teacher_force else 0,
                cache_offset=1 if boundary.repeat_last else offset)
        self.last_prefill = PrefillSpan(start, frames)
