"""One frame for slots 0..b-1, on the device, as one function over a `SlotTable`: decoder, CFG,
sampling, 31 depformer stages, the delayed-buffer write and the next step's inputs.

The frame reads and writes only persistent tensors (the slot table's), so the same code runs
eager on CPU and is captured once per shape as a CUDA graph on GPU (`graphs.FrameGraphs`). The
per-layer and per-stage functions it calls come in as `FrameFunctions` (eager, or compiled);
each takes one layer's or one stage's weights whole (`DecoderLayerWeights`, `StageWeights`), so
one compiled graph serves every layer and every stage.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from . import fused_pick
from . import kernels as fused_kernels
from . import persistent_stage
from .model import (Dia2Model, KVCache, StageShape, StageWeights, batched_stage_attention, decoder_layer,
                    depformer_stage, depformer_stage_fused, depformer_stage_kernel_attention,
                    depformer_stage_logits_fused)
from .sampling import draw, draw_noise, guided_candidates, gumbel_noise, top_candidates
from .slots import NEW_WORD_ACTION, SlotTable


class FrameFunctions(NamedTuple):
    """The functions a frame calls per layer and per stage: eager, or their compiled twins."""

    layer: Callable
    stage: Callable
    pick_stage: Callable
    stage_logits: Callable  # a torch depformer stage without its draw (the fused draw draws)
    # `stage` and `stage_logits` with the attention in one Triton launch a layer (they take the
    # stage's slot as `index=`): the torch path's stages under `--batched-stage-attention`
    attn_stage: Callable
    attn_stage_logits: Callable


@dataclass(frozen=True)
class StageDraw:
    """What the draw of one codebook reads, one row per call: the stream's inverse temperature
    [N], its noise [N, K], and where the prefix teacher-forces the code (`forced` [N] bool) with
    the code it forces (`known` [N])."""

    inv_temp: torch.Tensor
    noise: torch.Tensor
    forced: torch.Tensor
    known: torch.Tensor
    top_k: torch.Tensor  # [N] the stream's top-k (the fused draw reads it; the noise already carries it)


@dataclass(frozen=True)
class PickRule:
    """The static numbers of every draw in a stepper."""

    branches: int
    filter_k: int
    max_top_k: int


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
            values, order = values.sort(dim=-1, descending=True, stable=True)  # keep the rank order top-k relies on
            ids = ids.gather(1, order)
    return draw(values, ids, inv_temp, noise)


def pick_forced(logits: torch.Tensor, draw_in: StageDraw, cfg_scale: torch.Tensor, *, branches: int, filter_k: int,
                max_top_k: int) -> torch.Tensor:
    """A stage's draw, teacher-forced where the prefix is known: codes [N]."""
    code = pick(logits, draw_in.inv_temp, draw_in.noise, cfg_scale, branches=branches, filter_k=filter_k,
                max_top_k=max_top_k)
    return torch.where(draw_in.forced, draw_in.known, code)


def stage_and_pick(projected: torch.Tensor, stage: StageWeights, prev: torch.Tensor, caches: Sequence[KVCache],
                   draw_in: StageDraw, cfg_scale: torch.Tensor, *, shape: StageShape, branches: int, filter_k: int,
                   max_top_k: int, stage_fn: Callable = depformer_stage, **stage_args) -> torch.Tensor:
    """A depformer stage and its draw (teacher-forced where the prefix is known): codes [N];
    prev [N] are the previous codebook's codes, shared by both CFG branches. `stage_fn` (with
    `stage_args`) runs the stage: `depformer_stage`, or `depformer_stage_kernel_attention` (index=)."""
    logits = stage_fn(projected, stage, prev.repeat_interleave(branches), caches, shape, **stage_args)
    return pick_forced(logits, draw_in, cfg_scale, branches=branches, filter_k=filter_k, max_top_k=max_top_k)


def eager_functions(rule: PickRule, shape: StageShape, decode_attend: Callable | None = None) -> FrameFunctions:
    """The frame's functions, eager. `decode_attend`: the decoder's attention for one frame per row
    (`decode_attention.attend`), else SDPA."""
    statics = dataclasses.asdict(rule)
    layer = decoder_layer if decode_attend is None else functools.partial(decoder_layer, decode_attend=decode_attend)
    return FrameFunctions(layer=layer, pick_stage=functools.partial(pick_forced, **statics),
                          stage=functools.partial(stage_and_pick, shape=shape, **statics),
                          stage_logits=functools.partial(depformer_stage, shape=shape),
                          attn_stage=functools.partial(stage_and_pick, shape=shape,
                                                       stage_fn=depformer_stage_kernel_attention, **statics),
                          attn_stage_logits=functools.partial(depformer_stage_kernel_attention, shape=shape))


def resolve_sampler(sampler: str, kernels: str, device: torch.device) -> str:
    """"torch" (sorted candidates) or "triton" (`fused_pick`: one launch a draw, the same tokens);
    "auto" follows the depformer kernels."""
    if sampler == "auto":
        return "triton" if kernels == "triton" else "torch"
    if sampler not in ("torch", "triton"):
        raise ValueError(f"sampler must be 'auto', 'torch' or 'triton', not {sampler!r}")
    if sampler == "triton" and not fused_kernels.available(device):
        raise ValueError(f"the fused sampler needs CUDA and triton; this stepper runs on {device}")
    return sampler


def pick_text(choices: torch.Tensor, previous: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """Each slot's (main, second) text tokens [N, 2] out of its candidates `choices` [N, 2, 2, 2]
    (previous action, action, token): by the action its step before sampled (`previous` [N],
    read before this step overwrites it), then by this step's `action` [N]."""
    rows = torch.arange(choices.shape[0], device=choices.device)
    return choices[rows, (previous == NEW_WORD_ACTION).long(), (action == NEW_WORD_ACTION).long()]


class Frame:
    """The frame function of one stepper: its model, slot table, draw rule and (for the Triton
    depformer) its stage tables. Calling it runs one frame for slots 0..b-1 (`full=False`: the
    decoder-only lane), attending over the first `length` cache slots."""

    def __init__(self, model: Dia2Model, slots: SlotTable, rule: PickRule, fused_stages: list[StageWeights],
                 weights: str, sampler: str = "torch"):
        self.model, self.slots, self.rule = model, slots, rule
        self.fused_stages, self.weights, self.sampler = fused_stages, weights, sampler
        self.max_delay = model.config.data.max_delay
        self._pick = functools.partial(pick, **dataclasses.asdict(rule))
        # each Triton stage as one launch (`--persistent-stage`), read once here: the graphs
        # captured from this frame keep the choice
        self.stage_counters = None
        if persistent_stage.ENABLED and fused_stages:
            self.stage_counters = persistent_stage.StageCounters(len(fused_stages), slots.positions.device)
        # the torch stages' attention as one Triton launch a layer (`--batched-stage-attention`),
        # also read once here
        self.kernel_attention = batched_stage_attention(bool(fused_stages), slots.positions.device)

    def _one_launch(self, stage: StageWeights, rows: int) -> bool:
        """Whether this stage runs as one persistent launch at this many rows."""
        return self.stage_counters is not None and persistent_stage.supported(stage, rows)

    def __call__(self, fns: FrameFunctions, b: int, full: bool, length: int) -> None:
        s, br = self.slots, self.rule.branches
        d = self.model.config.data
        q = d.num_codebooks
        rows = b * br
        pos, active = s.positions[:b], s.active[:b]
        tokens, buffer = s.tokens[:rows], s.buffer[:b]
        caches = [cache.window(rows, length) for cache in s.decoder_caches]
        slots = pos + s.cache_offset[:b]  # RoPE uses the position, the cache its slot
        action_logits, cb0_logits, hidden = self.model.transformer(
            tokens[:, None], pos.repeat_interleave(br)[:, None], caches, layer_fn=fns.layer,
            slots=slots.repeat_interleave(br)[:, None])
        noise, inv_temp = draw_noise(gumbel_noise(s.seeds[:b], pos, q + 1, self.rule.max_top_k),
                                     s.stream_temperature[:b], s.stream_top_k[:b])  # [N, 1 + Q, K], [N, 1 + Q]
        cfg_scale, top_k = s.cfg_scale[:b], s.stream_top_k[:b]
        action = self._draw(action_logits[:, 0], inv_temp[:, 0], noise[:, 0], cfg_scale, top_k[:, 0])
        text = pick_text(s.text_choices[:b], s.action[:b], action)  # [N, 2]

        write_pos = pos + 1  # step t fills delayed column t+1
        write_index = write_pos[:, None, None].expand(b, q, 1)
        known = buffer.gather(2, write_index)[:, :, 0]  # [N, Q]
        aligned_index = write_pos[:, None] - s.delays[None, :]  # [N, Q]
        forced = (aligned_index >= 0) & (aligned_index < s.prefix_frames[:b, None])  # teacher forcing

        code = self._draw(cb0_logits[:, 0], inv_temp[:, 1], noise[:, 1], cfg_scale, top_k[:, 1],
                          banned=(d.audio_pad, d.audio_bos))
        code = torch.where(forced[:, 0], known[:, 0], code)
        if full:
            draws = [StageDraw(inv_temp[:, 1 + k], noise[:, 1 + k], forced[:, k], known[:, k], top_k[:, 1 + k])
                     for k in range(q)]
            codes_t = self._depformer_codes(fns, b, hidden, text, code, draws, cfg_scale)
        else:
            codes_t = torch.cat([code[:, None], known[:, 1:]], dim=1)  # stages skipped: their cells keep what they hold

        # Cells before a codebook's first aligned frame are never read: both lanes leave them as they are.
        written = torch.where((aligned_index >= 0) & active[:, None], codes_t, known)
        buffer.scatter_(2, write_index, written[:, :, None])
        next_audio = torch.where(s.delays[None, :] > write_pos[:, None], d.audio_bos, codes_t)  # [N, Q]
        per_call = tokens.view(b, br, -1)
        per_call[:, 0, :2] = torch.where(active[:, None], text, per_call[:, 0, :2])
        per_call[:, :, 2:] = torch.where(active[:, None], next_audio, per_call[:, 0, 2:])[:, None, :]
        ready = (write_pos - self.max_delay)[:, None] + s.delays[None, :]  # [N, Q] delayed columns
        s.ready_codes[:b].copy_(buffer.gather(2, ready.clamp(min=0)[:, :, None])[:, :, 0])
        s.action[:b].copy_(torch.where(active, action, s.action[:b]))  # a slot sitting out keeps its last action
        s.text_out[:b].copy_(text)
        s.codes[:b].copy_(codes_t)
        s.positions[:b].add_(active.long())

    def _depformer_codes(self, fns: FrameFunctions, b: int, hidden: torch.Tensor, text: torch.Tensor,
                         code: torch.Tensor, draws: list[StageDraw], cfg_scale: torch.Tensor) -> torch.Tensor:
        """Codebooks 1..Q-1, stage after stage, after codebook 0's `code`: all codes [N, Q]."""
        dep = self.model.depformer
        br = self.rule.branches
        rows = b * br
        caches = tuple(cache.rows(0, rows) for cache in self.slots.depformer_caches)
        # Depformer stage 0 reads this step's conditional text on both CFG branches, as upstream
        # does (the unconditional row is blanked in the decoder input only): docs/parity.md.
        dep_text = text.repeat_interleave(br, dim=0)  # [N * branches, 2], rows [call, branch]
        projected = dep.first_stage_text(dep.project_inputs(hidden), dep_text)  # [S, R, Dd]
        codes = [code]
        fused = bool(self.fused_stages) and (rows <= fused_kernels.FUSED_MAX_ROWS or self.weights == "fp8")
        if self.sampler == "triton":
            return self._depformer_codes_fused_draw(fns, fused, projected, caches, codes, draws, cfg_scale)
        if fused:
            for s, stage in enumerate(self.fused_stages):
                if self._one_launch(stage, rows):
                    logits = persistent_stage.stage_logits(projected[s], stage, caches, dep.shape, index=s,
                                                           counters=self.stage_counters.of(s), code=code,
                                                           branches=br).float()
                else:
                    logits = depformer_stage_fused(projected[s], stage, code.repeat_interleave(br), caches,
                                                   dep.shape, index=s)
                code = fns.pick_stage(logits, draws[s + 1], cfg_scale)
                codes.append(code)
            return torch.stack(codes, dim=1)
        for s, stage in enumerate(dep.stage_weights):
            if self.kernel_attention:
                code = fns.attn_stage(projected[s], stage, code, caches, draws[s + 1], cfg_scale, index=s)
            else:
                code = fns.stage(projected[s], stage, code, caches, draws[s + 1], cfg_scale)
            codes.append(code)
        return torch.stack(codes, dim=1)


    def _draw(self, logits: torch.Tensor, inv_temp: torch.Tensor, noise: torch.Tensor, cfg_scale: torch.Tensor,
              top_k: torch.Tensor, banned: tuple[int, ...] = ()) -> torch.Tensor:
        """One draw per call: the sorted torch path, or the fused kernel (`sampler`): the same tokens."""
        if self.sampler == "triton":
            return fused_pick.pick(logits, inv_temp, noise, cfg_scale, top_k, branches=self.rule.branches,
                                   filter_k=self.rule.filter_k, banned=banned)
        return self._pick(logits, inv_temp, noise, cfg_scale, banned=banned)

    def _depformer_codes_fused_draw(self, fns: FrameFunctions, fused: bool, projected: torch.Tensor, caches,
                                    codes: list[torch.Tensor], draws: list[StageDraw],
                                    cfg_scale: torch.Tensor) -> torch.Tensor:
        """The stages with the fused draw: each draw also applies the teacher forcing and, with the
        Triton stages, writes the next stage's input rows, so no torch kernel runs between stages."""
        dep, br = self.model.depformer, self.rule.branches
        stages = self.fused_stages if fused else dep.stage_weights
        code = codes[-1]
        x = projected[0] + F.embedding(code.repeat_interleave(br), stages[0].embed) if fused else None
        for s, stage in enumerate(stages):
            if fused and self._one_launch(stage, x.shape[0]):
                logits = persistent_stage.stage_logits(x, stage, caches, dep.shape, index=s,
                                                       counters=self.stage_counters.of(s))
            elif fused:
                logits = depformer_stage_logits_fused(x, stage, caches, dep.shape, index=s)
            elif self.kernel_attention:
                logits = fns.attn_stage_logits(projected[s], stage, code.repeat_interleave(br), caches, index=s)
            else:
                logits = fns.stage_logits(projected[s], stage, code.repeat_interleave(br), caches)
            following = None
            if fused and s + 1 < len(stages):
                x = torch.empty_like(x)
                following = (projected[s + 1], stages[s + 1].embed, x)
            d = draws[s + 1]
            code = fused_pick.pick(logits, d.inv_temp, d.noise, cfg_scale, d.top_k, branches=br,
                                   filter_k=self.rule.filter_k, forced=d.forced, known=d.known, next_embed=following)
            codes.append(code)
        return torch.stack(codes, dim=1)


def fused_stage_weights(model: Dia2Model, device: torch.device, kernels: str, weights: str) -> list[StageWeights]:
    """The stage tables the Triton depformer reads (empty for the eager path): the model's own,
    or with every projection in FP8 (`weights="fp8"`; each tensor quantized once, so the MLP that
    all stages share stays one copy)."""
    if kernels not in ("torch", "triton"):
        raise ValueError(f"kernels must be 'torch' or 'triton', not {kernels!r}")
    if weights not in ("bf16", "fp8"):
        raise ValueError(f"weights must be 'bf16' or 'fp8', not {weights!r}")
    if kernels == "torch":
        if weights != "bf16":
            raise ValueError("fp8 weights need the triton kernels (kernels='triton')")
        return []
    if not fused_kernels.available(device):
        raise ValueError(f"the triton kernels need CUDA and triton; this stepper runs on {device}")
    fused_kernels.load_tilings(device)
    stages = model.depformer.stage_weights
    if weights == "bf16":
        return list(stages)
    quantized: dict[int, fused_kernels.QuantWeight] = {}

    def fp8(t: torch.Tensor) -> fused_kernels.QuantWeight:
        key = t.data_ptr()  # stages share their MLP tensors' storage, not the tensor objects
        if key not in quantized:
            quantized[key] = fused_kernels.QuantWeight.quantize(t)
        return quantized[key]

    return [dataclasses.replace(w, logits=fp8(w.logits), layers=tuple(
                dataclasses.replace(l, in_proj=fp8(l.in_proj), out_proj=fp8(l.out_proj), wi=fp8(l.wi), wo=fp8(l.wo))
                for l in w.layers))
            for w in stages]
