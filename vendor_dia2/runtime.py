"""The per-frame step over static buffers, for many calls at once: decoder, CFG, sampling, 31
depformer stages, the delayed-buffer write and the next step's inputs, all on the device.

The text state machine lives on the host, but the step needs its answer mid-frame (the new text
tokens condition depformer stage 0). Instead of a round trip, the host previews both possible
answers (action = pad, action = new_word) before the frame and the device picks one after
sampling the action. The whole frame is therefore one function over persistent tensors — one
CUDA graph on GPU, the same code eager on CPU — and the only device-to-host copy per frame is
the sampled actions, read after the frame to advance the state machines.

`FrameStepper` owns every piece of per-call device state for `n_calls` *slots* (caches, inputs,
positions, delayed buffers, sampling parameters, an active mask), the way moshi keeps batched
streaming state with per-row reset: a slot is reset, snapshotted, restored and prefilled on its
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

import functools
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .config import Dia2Config
from . import fused_pick
from . import kernels as fused_kernels
from .model import (Dia2Model, KVCache, StageShape, StageWeights, decoder_layer, depformer_stage,
                    depformer_stage_fused, depformer_stage_logits_fused)
from .sampling import draw, draw_noise, guided_candidates, gumbel_noise, top_candidates

UNGENERATED = -2  # delayed-buffer cell not written yet
NEW_WORD_ACTION = 1  # upstream maps action index 1 to new_word and everything else to pad


@dataclass(frozen=True)
class SamplingParams:
    """Upstream GenerationConfig defaults (DIA2_SPEC.md §8)."""

    text_temperature: float = 0.6
    text_top_k: int = 50
    audio_temperature: float = 0.8
    audio_top_k: int = 50
    cfg_scale: float = 2.0
    seed: int = 0


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


PREFIX_BOUNDARIES = {
    "upstream": PrefixBoundary(repeat_last=True, teacher_force=False),  # the published runtime's (default)
    "clean": PrefixBoundary(repeat_last=False, teacher_force=True),  # spec §9's clean boundary; rollover needs it
}


@dataclass
class StepperSnapshot:
    """Copies of one slot's device state (row-sized), restorable into any slot of a stepper with the
    same CFG mode and context size (`FrameStepper.restore`)."""

    positions: torch.Tensor  # [1]
    tokens: torch.Tensor  # [branches, C]
    buffer: torch.Tensor  # [1, Q, max_positions + 2]
    prefix_frames: torch.Tensor  # [1]
    caches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per layer [branches, H, length, Dh]
    length: int = 0  # cache slots that hold data (0..length-1); only those are copied
    cache_offset: int = 0  # cache slot minus RoPE position (1 after an upstream-boundary prefill)


def pick(logits: torch.Tensor, inv_temp: torch.Tensor, noise: torch.Tensor, cfg_scale: torch.Tensor, *,
         branches: int, filter_k: int, max_top_k: int, banned: tuple[int, ...] = ()) -> torch.Tensor:
    """Rows [N * branches, V] → one id per call [N]: CFG candidates (two branches) or plain top-k,
    then a draw. `banned` ids are never drawn; with CFG, as upstream, they are removed only after
    the guided top-k has chosen the candidates, so one there takes a candidate's place."""
    if branches == 1:
        for token in banned:
            logits[:, token] = torch.finfo(logits.dtype).min
        values, ids = top_candidates(logits, max_top_k)
    else:
        pair = logits.view(-1, 2, logits.shape[-1])  # [N, (cond, uncond), V]
        values, ids = guided_candidates(pair[:, 0], pair[:, 1], cfg_scale, filter_k)
        if banned:
            for token in banned:
                values = values.masked_fill(ids == token, float("-inf"))
            values, order = values.sort(dim=-1, descending=True)  # keep the rank order top-k relies on
            ids = ids.gather(1, order)
    return draw(values, ids, inv_temp, noise)


def pick_forced(logits, inv_temp, noise, cfg_scale, forced, known, *, branches: int, filter_k: int,
                max_top_k: int) -> torch.Tensor:
    """A stage's draw, teacher-forced where the prefix is known: codes [N]."""
    code = pick(logits, inv_temp, noise, cfg_scale, branches=branches, filter_k=filter_k, max_top_k=max_top_k)
    return torch.where(forced, known, code)


def stage_and_pick(projected, embed, prev, layers, caches, norm, logits_w, mask, slot, inv_temp, noise, forced, known,
                   cfg_scale, *, shape: StageShape, branches: int, filter_k: int, max_top_k: int) -> torch.Tensor:
    """A depformer stage and its draw (teacher-forced where the prefix is known): codes [N];
    prev [N] are the previous codebook's codes, shared by both CFG branches."""
    logits = depformer_stage(projected, embed, prev.repeat_interleave(branches), layers, caches, norm, logits_w, mask,
                             slot, shape)
    return pick_forced(logits, inv_temp, noise, cfg_scale, forced, known, branches=branches, filter_k=filter_k,
                       max_top_k=max_top_k)


class FrameFunctions(NamedTuple):
    """The functions a frame calls per layer and per stage: eager, or their compiled twins."""

    layer: Callable
    stage: Callable
    pick_stage: Callable
    stage_logits: Callable  # the stage without its draw (the fused pick draws)


# Decoder cache lengths a bucketed batch may attend over (plus the whole cache): a turn's first
# 20 s, 41 s, then everything.
CACHE_BUCKETS = (256, 512)


def default_batch_sizes(n_calls: int) -> tuple[int, ...]:
    """Powers of two below `n_calls`, and `n_calls`: a step pads to the next one up."""
    sizes, b = [], 1
    while b < n_calls:
        sizes.append(b)
        b *= 2
    return tuple(sizes + [n_calls])


class FrameStepper:
    """Runs frame steps for up to `n_calls` independent calls (slots) sharing one model.

    `cfg` fixes whether an unconditional branch is run (two rows per call); the CFG scale itself
    is per call. `max_positions` bounds the decoder cache and the delayed buffer. `batch_sizes`
    are the padded batch sizes a step may run at (each captured once as CUDA graphs on GPU).
    """

    # Buffers must be normal tensors even when the stepper is built inside inference mode (as
    # `Dia2.generate` does): inference tensors cannot be updated in place outside it later.
    @torch.inference_mode(False)
    def __init__(self, model: Dia2Model, *, n_calls: int = 1, cfg: bool = True, max_positions: int | None = None,
                 max_top_k: int = 256, cfg_filter_k: int = 50, use_cuda_graph: bool | None = None,
                 compile: bool = False, bos_token_id: int = 1, batch_sizes: tuple[int, ...] | None = None,
                 kernels: str = "torch", weights: str = "bf16", compile_max_calls: int | None = None,
                 cache_buckets: tuple[int, ...] | None = None, sampler: str = "auto"):
        config: Dia2Config = model.config
        p = next(model.parameters())
        self.model, self.config = model, config
        self.device, self.dtype = p.device, p.dtype
        self.n, self.branches = n_calls, (2 if cfg else 1)
        self.rows = self.n * self.branches
        self.max_positions = max_positions or config.runtime.max_context_steps
        self.max_top_k, self.cfg_filter_k = max_top_k, cfg_filter_k
        self.bos_token_id = int(bos_token_id)
        self.batch_sizes = tuple(sorted(set(batch_sizes or default_batch_sizes(n_calls))))
        if self.batch_sizes[-1] > n_calls or self.batch_sizes[0] < 1:
            raise ValueError(f"batch sizes {self.batch_sizes} must lie in 1..{n_calls}")
        d = config.data
        self.num_codebooks, self.max_delay = d.num_codebooks, d.max_delay
        # the depformer's codes are read once a codebook other than 0 has started
        self.first_stage_delay = min(d.delay_pattern[1:], default=d.max_delay)
        if not model.transformer.layer_weights:
            model.prepare_tables()
        # one slot more than positions: after an upstream-boundary prefill the slot runs one ahead
        self.decoder_caches, self.depformer_caches = model.new_caches(self.rows, self.max_positions + 2)
        if self.device.type == "cpu":
            # random weights drive softmax tails into denormals, which make CPU matmuls ~10x slower
            torch.set_flush_denormal(True)

        dev = self.device
        long = dict(device=dev, dtype=torch.long)
        self.delays = torch.tensor(d.delay_pattern, **long)  # [Q]
        self.tokens = torch.zeros(self.rows, d.channels, **long)  # inputs of the current step
        self.positions = torch.zeros(self.n, **long)
        self.buffer = torch.full((self.n, self.num_codebooks, self.max_positions + 2), UNGENERATED, **long)
        self.prefix_frames = torch.zeros(self.n, **long)  # aligned frames teacher-forced (voice prefix, rollback)
        self.cache_offset = torch.zeros(self.n, **long)  # cache slot = position + offset (PrefixBoundary)
        self.text_choices = torch.zeros(self.n, 2, 2, **long)  # [call, action is new_word, (main, second)]
        self.active = torch.zeros(self.n, device=dev, dtype=torch.bool)
        self.seeds = torch.zeros(self.n, **long)
        f32 = dict(device=dev, dtype=torch.float32)
        # per draw stream: column 0 the action (text sampling), columns 1..Q the codebooks (audio)
        self.stream_temperature = torch.zeros(self.n, 1 + self.num_codebooks, **f32)
        self.stream_top_k = torch.ones(self.n, 1 + self.num_codebooks, **long)
        self.cfg_scale = torch.ones(self.n, **f32)
        # outputs of the step
        self.action = torch.zeros(self.n, **long)
        self.text_out = torch.zeros(self.n, 2, **long)
        self.codes = torch.zeros(self.n, self.num_codebooks, **long)
        self.ready_codes = torch.zeros(self.n, self.num_codebooks, **long)  # aligned frame pos+1-max_delay

        pinned = dev.type == "cuda"
        self._host_choices = torch.zeros(self.n, 2, 2, dtype=torch.long, pin_memory=pinned)
        self._host_active = torch.zeros(self.n, dtype=torch.bool, pin_memory=pinned)
        self._host_action = torch.zeros(self.n, dtype=torch.long, pin_memory=pinned)
        self.host_positions = [0] * self.n
        self.host_prefix_frames = [0] * self.n
        self.host_cache_offset = [0] * self.n
        self.last_batch, self.last_full = 0, True  # what the last step ran (for metrics and tests)
        self.skip_unread_stages = True  # the decoder-only lane (off only to compare against it)

        statics = dict(branches=self.branches, filter_k=cfg_filter_k, max_top_k=max_top_k)
        self._pick = functools.partial(pick, **statics)
        eager = FrameFunctions(layer=decoder_layer, pick_stage=functools.partial(pick_forced, **statics),
                               stage=functools.partial(stage_and_pick, shape=model.depformer.shape, **statics),
                               stage_logits=functools.partial(depformer_stage, shape=model.depformer.shape))
        self.kernels, self.weights = kernels, weights
        self._fused_stages = self._fused_stage_weights(kernels, weights)
        self.sampler = self._sampler(sampler, kernels)
        self._eager_fns = self._compiled_fns = eager
        # Batch sizes above `compile_max_calls` (default: none) run the eager functions inside
        # their CUDA graphs; compiled ones were measured faster at every size once the cache write
        # stayed out of the compiled code (model.write_cache; docs/benchmarks.md, runs 8-10).
        self.compile_max_calls = (compile_max_calls or n_calls) if compile else 0
        if compile:
            # One compiled graph serves all 31 stages and all layers (their weights are arguments),
            # fusing the elementwise work between matmuls; compiled at capture time, never per request.
            # Each batch size is another shape: let dynamo mark the batch dimension dynamic.
            from torch import _dynamo
            _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
            self._compiled_fns = FrameFunctions(layer=torch.compile(eager.layer), stage=torch.compile(eager.stage),
                                                pick_stage=torch.compile(eager.pick_stage),
                                                stage_logits=torch.compile(eager.stage_logits))
        for call in range(self.n):
            self.set_sampling(call, SamplingParams(cfg_scale=2.0 if cfg else 1.0))
            self.reset_call(call)
        self._graphs: dict[tuple[int, bool, int], torch.cuda.CUDAGraph] = {}
        if use_cuda_graph is None:
            use_cuda_graph = dev.type == "cuda"
        self.cache_length = self.decoder_caches[0].length
        # A step attends over the filled part of the cache only, rounded up to a bucket (one graph
        # per bucket; compiled code sees the length as a dynamic dimension): at 64 calls the
        # attention over all 1502 slots was 6.1 of 15.3 ms of GPU time (docs/benchmarks.md, run 10).
        # `cache_buckets` (default: CACHE_BUCKETS with CUDA graphs, none without) exists for tests.
        buckets = (CACHE_BUCKETS if use_cuda_graph else ()) if cache_buckets is None else cache_buckets
        self.length_buckets = tuple(sorted({l for l in buckets if l < self.cache_length} | {self.cache_length}))
        if use_cuda_graph:
            self._capture_all()

    # -- host API --------------------------------------------------------------------------------

    def set_sampling(self, call: int, params: SamplingParams) -> None:
        if params.cfg_scale != 1.0 and self.branches == 1:
            raise ValueError("this stepper runs without the unconditional branch; cfg_scale must be 1")
        if max(params.text_top_k, params.audio_top_k) > self.max_top_k:
            raise ValueError(f"top_k above {self.max_top_k} is not supported by this stepper")
        self.stream_temperature[call, 0] = params.text_temperature
        self.stream_temperature[call, 1:] = params.audio_temperature
        self.stream_top_k[call, 0] = params.text_top_k
        self.stream_top_k[call, 1:] = params.audio_top_k
        self.cfg_scale[call] = params.cfg_scale
        self.seeds[call] = params.seed

    def reset_call(self, call: int, position: int = 0) -> None:
        """Start a call afresh at `position` (its cache past that position is ignored): the step-0
        inputs of DIA2_SPEC.md §5."""
        d = self.config.data
        self.positions[call] = position
        self.host_positions[call] = position
        self.buffer[call].fill_(UNGENERATED)
        self.prefix_frames[call] = 0
        self.host_prefix_frames[call] = 0
        self.cache_offset[call] = 0
        self.host_cache_offset[call] = 0
        rows = self.tokens[self._rows(call)]
        rows[0, 0] = self.bos_token_id
        rows[0, 1] = d.text_pad_token_id
        if self.branches == 2:
            rows[1, 0] = d.text_zero_token_id
            rows[1, 1] = d.text_pad_token_id
        rows[:, 2:] = d.audio_bos

    def needs_depformer(self, call: int) -> bool:
        """Whether the next step of `call` samples codes that some output reads (else the
        decoder-only lane gives the same tokens). After an upstream-boundary prefill nothing is
        teacher-forced (prefix_frames 0), so the codes right after the prefix are read."""
        write_pos = self.host_positions[call] + 1
        return write_pos >= self.first_stage_delay + self.host_prefix_frames[call]

    def batch_size_for(self, slots: int) -> int:
        """The padded batch size a step over slots 0..slots-1 runs at."""
        for b in self.batch_sizes:
            if b >= slots:
                return b
        raise ValueError(f"slot {slots - 1} lies past the largest batch size {self.batch_sizes[-1]}: "
                         "it can be prefilled and snapshotted, not stepped")

    def step(self, choices, active=None) -> list[int]:
        """Run one frame for every active call. `choices[call]` = ((main, second) if the sampled
        action is pad, (main, second) if it is new_word); entries of inactive calls are ignored.
        `active` (default: all) lists which calls advance. Returns the sampled actions (0 pad,
        1 new_word; 0 for inactive calls)."""
        active = [True] * self.n if active is None else list(active)
        live = [call for call, on in enumerate(active) if on]
        if not live:
            return [0] * self.n
        b = self.batch_size_for(live[-1] + 1)
        full = not self.skip_unread_stages or any(self.needs_depformer(call) for call in live)
        self._host_active.zero_()
        for call in live:
            (pad_main, pad_second), (new_main, new_second) = choices[call]
            self._host_choices[call, 0, 0], self._host_choices[call, 0, 1] = pad_main, pad_second
            self._host_choices[call, 1, 0], self._host_choices[call, 1, 1] = new_main, new_second
            self._host_active[call] = True
        self.text_choices.copy_(self._host_choices, non_blocking=True)
        self.active.copy_(self._host_active, non_blocking=True)
        length = self.cache_length_for(b)
        graph = self._graphs.get((b, full, length))
        if graph is not None:
            graph.replay()
        else:
            with torch.inference_mode():
                self._frame(b, full, length)
        self._host_action.copy_(self.action)  # the one device-to-host copy (synchronises)
        self.last_batch, self.last_full = b, full
        actions = self._host_action.tolist()
        out = [0] * self.n
        for call in live:
            self.host_positions[call] += 1
            out[call] = int(actions[call] == NEW_WORD_ACTION)
        return out

    def ready_frame_index(self, call: int) -> int:
        """Aligned frame index whose codes are in `ready_codes[call]` after the last step."""
        return self.host_positions[call] - self.max_delay

    def written_codes(self, call: int, start: int, stop: int) -> torch.Tensor:
        """Delayed buffer columns [start, stop) of a call: `[Q, stop-start]`."""
        return self.buffer[call, :, start:stop]

    # -- snapshots (one slot, row-sized copies) ----------------------------------------------------

    def snapshot(self, call: int = 0) -> StepperSnapshot:
        offset = self.host_cache_offset[call]
        length = self.host_positions[call] + offset + 1
        rows = self._rows(call)
        caches = [(c.k[rows, :, :length].clone(), c.v[rows, :, :length].clone()) for c in self.decoder_caches]
        return StepperSnapshot(self.positions[call:call + 1].clone(), self.tokens[rows].clone(),
                               self.buffer[call:call + 1].clone(), self.prefix_frames[call:call + 1].clone(),
                               caches, length, offset)

    def restore(self, snap: StepperSnapshot, call: int = 0) -> None:
        rows = self._rows(call)
        self.positions[call:call + 1].copy_(snap.positions)
        self.tokens[rows] = snap.tokens.to(self.device)
        self.buffer[call:call + 1].copy_(snap.buffer)
        self.prefix_frames[call:call + 1].copy_(snap.prefix_frames)
        for cache, (k, v) in zip(self.decoder_caches, snap.caches):
            cache.k[rows, :, : snap.length].copy_(k)
            cache.v[rows, :, : snap.length].copy_(v)
        self.cache_offset[call] = snap.cache_offset
        self.host_positions[call] = int(snap.positions[0])
        self.host_prefix_frames[call] = int(snap.prefix_frames[0])
        self.host_cache_offset[call] = int(snap.cache_offset)

    # -- rewinding a slot (barge-in rollback) -----------------------------------------------------

    @torch.inference_mode()
    def rewind(self, call: int, position: int, text: tuple[int, int]) -> None:
        """Put a call back to stand before step `position`, keeping the codes of every aligned
        frame before `position` (already heard) as they are: they are teacher-forced, never
        sampled again. `text` are the (main, second) tokens the state machine gave at step
        `position - 1`. The cache past `position` is simply overwritten by the next steps, and the
        draws are keyed by position, so sampling picks up as it would have. The cache offset
        stays: after an upstream-boundary prefix the history fills slots 0..position + offset - 1."""
        d = self.config.data
        rows = self._rows(call)
        column = self.buffer[call, :, position]  # aligned frames position - delay_k: all written
        audio = torch.where(self.delays > position, d.audio_bos, column)
        self.tokens[rows, 2:] = audio[None, :]
        self.tokens[rows.start, 0], self.tokens[rows.start, 1] = int(text[0]), int(text[1])
        self.positions[call] = position
        self.prefix_frames[call] = position
        self.host_positions[call] = position
        self.host_prefix_frames[call] = position

    def text_inputs(self, call: int) -> tuple[int, int]:
        """The (main, second) text tokens the call's next step reads (conditional row)."""
        main, second = self.tokens[call * self.branches, :2].tolist()
        return main, second

    def aligned_codes(self, call: int, start: int, stop: int) -> torch.Tensor:
        """Aligned frames [start, stop) of a call, `[Q, stop - start]` (all must be complete)."""
        index = torch.arange(start, stop, device=self.device)[None, :] + self.delays[:, None]  # [Q, F]
        return self.buffer[call].gather(1, index)

    # -- prefill (voice prefix) ------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, call: int, delayed: torch.Tensor, text: torch.Tensor, frames: int, chunk: int = 256, *,
                boundary: PrefixBoundary | str = "upstream") -> None:
        """Run the decoder over `frames` known steps of one call in parallel, filling its cache
        rows, no sampling; the other calls' rows are not touched.

        delayed `[Q, frames + max_delay]`: the delayed grid of the prefix codes, bos in the cells
        before each codebook starts; it is written into the call's delayed buffer. text
        `[frames + 1, 2]`: the text tokens of steps 0..frames (row `frames` is what the state
        machine answered at the last prefix step).

        `boundary` (`PrefixBoundary` or a name of PREFIX_BOUNDARIES) says how generation goes on.
        "upstream" (the default, as the published runtime): the call stands at position
        frames - 1 again, with cache offset 1, and nothing is teacher-forced; the caller's state
        machine steps from frames - 1. "clean": the call stands at position `frames` and the
        prefix codes that the delay reaches past that position are teacher-forced (a context
        rollover needs this: its prefix is conversation already heard).
        """
        boundary = PrefixBoundary.named(boundary)
        if boundary.repeat_last and frames < 1:
            raise ValueError("repeating the last prefix position needs at least one prefix frame")
        d = self.config.data
        delayed, text = delayed.to(self.device), text.to(self.device)
        tokens = torch.empty(self.branches, frames + 1, d.channels, dtype=torch.long, device=self.device)
        tokens[:, :, 2:] = delayed[:, : frames + 1].T
        tokens[0, :, :2] = text
        if self.branches == 2:
            tokens[1, :, 0] = d.text_zero_token_id
            tokens[1, :, 1] = d.text_pad_token_id
        rows = self._rows(call)
        caches = [cache.rows(rows.start, rows.stop) for cache in self.decoder_caches]
        for start in range(0, frames, chunk):
            stop = min(frames, start + chunk)
            pos = torch.arange(start, stop, device=self.device)[None].expand(self.branches, -1)
            self.model.transformer(tokens[:, start:stop], pos, caches)
        position = frames - 1 if boundary.repeat_last else frames
        self.tokens[rows] = tokens[:, frames]  # the text of step `frames` either way ...
        self.tokens[rows, 2:] = tokens[:, position, 2:]  # ... with the audio of the column the step reads
        self.buffer[call].fill_(UNGENERATED)
        self.buffer[call, :, : delayed.shape[1]] = delayed
        forced = frames if boundary.teacher_force else 0
        offset = 1 if boundary.repeat_last else 0
        self.prefix_frames[call] = forced
        self.cache_offset[call] = offset
        self.positions[call] = position
        self.host_positions[call] = position
        self.host_prefix_frames[call] = forced
        self.host_cache_offset[call] = offset

    # -- the frame, on the device ----------------------------------------------------------------

    def cache_length_for(self, b: int) -> int:
        """The decoder cache slots a step over slots 0..b-1 reads: every slot any of them writes
        this step (its position plus cache offset), rounded up to a bucket."""
        if len(self.length_buckets) == 1:
            return self.cache_length
        need = max(self.host_positions[i] + self.host_cache_offset[i] for i in range(b)) + 1
        return next(l for l in self.length_buckets if l >= need)

    def _rows(self, call: int) -> slice:
        return slice(call * self.branches, (call + 1) * self.branches)

    def _frame(self, b: int, full: bool, length: int) -> None:
        """One frame for slots 0..b-1 (`full=False`: the decoder-only lane), attending over the
        first `length` cache slots."""
        br, q = self.branches, self.num_codebooks
        rows = b * br
        d = self.config.data
        pos, active = self.positions[:b], self.active[:b]
        tokens, buffer = self.tokens[:rows], self.buffer[:b]
        caches = [cache.window(rows, length) for cache in self.decoder_caches]
        slots = pos + self.cache_offset[:b]  # RoPE uses the position, the cache its slot
        action_logits, cb0_logits, hidden = self.model.transformer(
            tokens[:, None], pos.repeat_interleave(br)[:, None], caches, layer_fn=self._fns(b).layer,
            slots=slots.repeat_interleave(br)[:, None])
        noise, inv_temp = draw_noise(gumbel_noise(self.seeds[:b], pos, q + 1, self.max_top_k),
                                     self.stream_temperature[:b], self.stream_top_k[:b])  # [N, 1 + Q, K], [N, 1 + Q]
        cfg_scale = self.cfg_scale[:b]
        top_k = self.stream_top_k[:b]
        action = self._draw(action_logits[:, 0], 0, inv_temp, noise, cfg_scale, top_k)
        text = self.text_choices[:b][torch.arange(b, device=self.device), (action == NEW_WORD_ACTION).long()]  # [N, 2]

        write_pos = pos + 1  # step t fills delayed column t+1
        write_index = write_pos[:, None, None].expand(b, q, 1)
        known = buffer.gather(2, write_index)[:, :, 0]  # [N, Q]
        aligned_index = write_pos[:, None] - self.delays[None, :]  # [N, Q]
        forced = (aligned_index >= 0) & (aligned_index < self.prefix_frames[:b, None])  # teacher forcing

        code = self._draw(cb0_logits[:, 0], 1, inv_temp, noise, cfg_scale, top_k, banned=(d.audio_pad, d.audio_bos))
        code = torch.where(forced[:, 0], known[:, 0], code)
        if full:
            codes_t = self._depformer_codes(b, hidden, text, code, inv_temp, noise, forced, known, cfg_scale, top_k)
        else:
            codes_t = torch.cat([code[:, None], known[:, 1:]], dim=1)  # stages skipped: their cells keep what they hold

        # Cells before a codebook's first aligned frame are never read: both lanes leave them as they are.
        written = torch.where((aligned_index >= 0) & active[:, None], codes_t, known)
        buffer.scatter_(2, write_index, written[:, :, None])
        next_audio = torch.where(self.delays[None, :] > write_pos[:, None], d.audio_bos, codes_t)  # [N, Q]
        per_call = tokens.view(b, br, -1)
        per_call[:, 0, :2] = torch.where(active[:, None], text, per_call[:, 0, :2])
        per_call[:, :, 2:] = torch.where(active[:, None], next_audio, per_call[:, 0, 2:])[:, None, :]
        ready = (write_pos - self.max_delay)[:, None] + self.delays[None, :]  # [N, Q] delayed columns
        self.ready_codes[:b].copy_(buffer.gather(2, ready.clamp(min=0)[:, :, None])[:, :, 0])
        self.action[:b].copy_(action)
        self.text_out[:b].copy_(text)
        self.codes[:b].copy_(codes_t)
        self.positions[:b].add_(active.long())

    def _draw(self, logits, stream, inv_temp, noise, cfg_scale, top_k, banned=()) -> torch.Tensor:
        """One draw per call from stream `stream`'s logits [N * branches, V]: the sorted torch path
        or the fused kernel (`sampler`), which take the same tokens."""
        if self.sampler == "triton":
            return fused_pick.pick(logits, inv_temp[:, stream], noise[:, stream], cfg_scale, top_k[:, stream],
                                   branches=self.branches, filter_k=self.cfg_filter_k, banned=banned)
        return self._pick(logits, inv_temp[:, stream], noise[:, stream], cfg_scale, banned=banned)

    def _depformer_codes(self, b, hidden, text, code, inv_temp, noise, forced, known, cfg_scale,
                         top_k) -> torch.Tensor:
        """Codebooks 1..Q-1, stage after stage, after codebook 0's `code`: all codes [N, Q]."""
        dep = self.model.depformer
        rows = b * self.branches
        caches = tuple(cache.rows(0, rows) for cache in self.depformer_caches)
        # Depformer stage 0 reads this step's conditional text on both CFG branches, as upstream
        # does (the unconditional row is blanked in the decoder input only): docs/parity.md.
        dep_text = text.repeat_interleave(self.branches, dim=0)  # [N * branches, 2], rows [call, branch]
        projected = dep.first_stage_text(dep.project_inputs(hidden), dep_text)  # [S, R, Dd]
        codes = [code]
        fns = self._fns(b)
        fused = self._fused_stages and (rows <= fused_kernels.FUSED_MAX_ROWS or self.weights == "fp8")
        if self.sampler == "triton":
            draw = functools.partial(fused_pick.pick, cfg_scale=cfg_scale, branches=self.branches,
                                     filter_k=self.cfg_filter_k)
            stages = self._fused_stages if fused else dep.stage_weights
            if fused:  # every launch of the stages a Triton kernel, the next stage's input written by the draw
                x = projected[0] + F.embedding(code.repeat_interleave(self.branches), stages[0].embed)
            for s, w in enumerate(stages):
                if fused:
                    logits = depformer_stage_logits_fused(x, w.layers, caches, w.norm, w.logits, dep.shape, stage=s)
                else:
                    logits = fns.stage_logits(projected[s], w.embed, code.repeat_interleave(self.branches), w.layers,
                                              caches, w.norm, w.logits, w.mask, w.slot)
                following = None
                if fused and s + 1 < len(stages):
                    x = torch.empty_like(x)
                    following = (projected[s + 1], stages[s + 1].embed, x)
                code = draw(logits, inv_temp[:, 2 + s], noise[:, 2 + s], top_k=top_k[:, 2 + s],
                            forced=forced[:, s + 1], known=known[:, s + 1], next_embed=following)
                codes.append(code)
            return torch.stack(codes, dim=1)
        if fused:
            for s, w in enumerate(self._fused_stages):
                logits = depformer_stage_fused(projected[s], w.embed, code.repeat_interleave(self.branches), w.layers,
                                               caches, w.norm, w.logits, w.mask, w.slot, dep.shape, stage=s)
                code = fns.pick_stage(logits, inv_temp[:, 2 + s], noise[:, 2 + s], cfg_scale, forced[:, s + 1],
                                        known[:, s + 1])
                codes.append(code)
            return torch.stack(codes, dim=1)
        for s, w in enumerate(dep.stage_weights):
            code = fns.stage(projected[s], w.embed, code, w.layers, caches, w.norm, w.logits, w.mask, w.slot,
                                  inv_temp[:, 2 + s], noise[:, 2 + s], forced[:, s + 1], known[:, s + 1], cfg_scale)
            codes.append(code)
        return torch.stack(codes, dim=1)

    def _sampler(self, sampler: str, kernels: str) -> str:
        """"torch" (sorted candidates) or "triton" (`fused_pick`); "auto" follows the depformer kernels."""
        if sampler == "auto":
            return "triton" if kernels == "triton" else "torch"
        if sampler not in ("torch", "triton"):
            raise ValueError(f"sampler must be 'auto', 'torch' or 'triton', not {sampler!r}")
        if sampler == "triton" and not fused_kernels.available(self.device):
            raise ValueError(f"the fused sampler needs CUDA and triton; this stepper runs on {self.device}")
        return sampler

    def _fns(self, b: int) -> "FrameFunctions":
        return self._compiled_fns if b <= self.compile_max_calls else self._eager_fns

    def _fused_stage_weights(self, kernels: str, weights: str) -> list[StageWeights]:
        """The stage tables the Triton depformer reads (empty for the eager path): the model's
        own, or with every projection in FP8 (`weights="fp8"`; each tensor quantized once, so the
        MLP that all stages share stays one copy)."""
        if kernels not in ("torch", "triton"):
            raise ValueError(f"kernels must be 'torch' or 'triton', not {kernels!r}")
        if weights not in ("bf16", "fp8"):
            raise ValueError(f"weights must be 'bf16' or 'fp8', not {weights!r}")
        if kernels == "torch":
            if weights != "bf16":
                raise ValueError("fp8 weights need the triton kernels (kernels='triton')")
            return []
        if not fused_kernels.available(self.device):
            raise ValueError(f"the triton kernels need CUDA and triton; this stepper runs on {self.device}")
        if self.device.type == "cuda":
            fused_kernels.use_gpu_tilings(torch.cuda.get_device_name(self.device))
        stages = self.model.depformer.stage_weights
        if weights == "bf16":
            return list(stages)
        quantized: dict[int, fused_kernels.QuantWeight] = {}

        def fp8(t: torch.Tensor) -> fused_kernels.QuantWeight:
            key = t.data_ptr()  # stages share their MLP tensors' storage, not the tensor objects
            if key not in quantized:
                quantized[key] = fused_kernels.QuantWeight.quantize(t)
            return quantized[key]

        return [StageWeights(embed=w.embed, norm=w.norm, logits=fp8(w.logits), mask=w.mask, slot=w.slot,
                             layers=tuple(l._replace(in_proj=fp8(l.in_proj), out_proj=fp8(l.out_proj), wi=fp8(l.wi),
                                                     wo=fp8(l.wo)) for l in w.layers))
                for w in stages]

    def _capture_all(self) -> None:
        """Capture `_frame` as CUDA graphs, one per (batch size, lane, cache length), sharing one
        memory pool. Warm-up steps run first (on a side stream, as capture requires) with no slot
        active, so positions, buffers and inputs stay as they are."""
        self.active.zero_()
        pool = torch.cuda.graph_pool_handle()
        for b in self.batch_sizes:
            for full in (True, False):
                for length in self.length_buckets:
                    stream = torch.cuda.Stream()
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream), torch.inference_mode():
                        for _ in range(3):
                            self._frame(b, full, length)
                    torch.cuda.current_stream().wait_stream(stream)
                    graph = torch.cuda.CUDAGraph()
                    with torch.inference_mode(), torch.cuda.graph(graph, pool=pool):
                        self._frame(b, full, length)
                    self._graphs[(b, full, length)] = graph
        torch.cuda.synchronize()
