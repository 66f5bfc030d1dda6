"""The Dia2 networks: a causal decoder over frames and a depformer over codebooks.

One readable file in the spirit of gpt-fast: no framework layers, shapes written where they
change. Module and parameter names match the published checkpoint (DIA2_SPEC.md §3), so a
safetensors state dict loads with `load_state_dict(strict=True)`.

Notation: B rows (calls x CFG branches), T frames in a call of the decoder, L cache length,
D width, Hq/Hkv heads, Dh head dim, A audio vocab, Q codebooks.

Caches are static and preallocated (`new_caches`, owned by the runtime), with a batch dimension and *per-row*
positions: writing is a scatter at each row's position and attention masks every slot past
it, so rolling back a row is just reusing an earlier position, and a snapshot is a copy.
RoPE is computed from the positions on the fly, so it is defined for any position. A row's cache
slot may differ from its RoPE position (`Decoder.forward(slots=...)`): upstream's voice-prefix
boundary runs one position twice, as two cache entries (docs/parity.md P6).

Modules only hold parameters (their names are the checkpoint's); the math lives in two plain
functions, `decoder_layer` and `depformer_stage`, that take a layer's or a stage's tensors as
arguments. That keeps one code path for CPU, CUDA graphs and torch.compile, and lets one
compiled graph serve all 24 layers and all 31 stages.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import Dia2Config, TransformerConfig

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms(x, self.weight, self.eps)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, min_ts: float, max_ts: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[B, 1, T, Dh]` for positions `[B, T]` ("rotate half" layout)."""
    half = head_dim // 2
    frac = 2.0 * torch.arange(half, device=positions.device, dtype=torch.float32) / head_dim
    timescale = min_ts * (max_ts / min_ts) ** frac  # [Dh/2]
    angles = positions.float()[..., None] / timescale  # [B, T, Dh/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, T, Dh]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache(NamedTuple):
    """Static `[B, H, L, Dh]` key/value buffers written at per-row positions. The model owns no
    cache: the runtime that owns the per-call state passes them in, so one model serves several
    batch layouts and a row range is just a view (`rows`)."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, batch: int, heads: int, length: int, head_dim: int, dtype: torch.dtype, device) -> "KVCache":
        shape = (batch, heads, length, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def rows(self, start: int, stop: int) -> "KVCache":
        return KVCache(self.k[start:stop], self.v[start:stop])

    def window(self, rows: int, length: int) -> "KVCache":
        """The first `rows` rows and `length` slots: a view, so writes land in the full cache."""
        return KVCache(self.k[:rows, :, :length], self.v[:rows, :, :length])


def causal_mask(positions: torch.Tensor, length: int) -> torch.Tensor:
    """Boolean `[B, 1, T, L]`: row b, query t may see slots 0..positions[b, t]."""
    slots = torch.arange(length, device=positions.device)
    return slots[None, None, None, :] <= positions[:, None, :, None]


class MLP(nn.Module):
    """Parameters of the gated MLP; the math is `gated_mlp`."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.wi = nn.Linear(dim, 2 * hidden, bias=False)
        self.wo = nn.Linear(hidden, dim, bias=False)


def gated_mlp(x: torch.Tensor, wi: torch.Tensor, wo: torch.Tensor, hidden: int,
              activations: tuple[str, str]) -> torch.Tensor:
    """`wi` yields [gate | up]; `wo(act0(gate) * act1(up))`."""
    gate, up = F.linear(x, wi).split(hidden, dim=-1)
    return F.linear(_activate(gate, activations[0]) * _activate(up, activations[1]), wo)


def _activate(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "relu":
        return F.relu(x)
    return x  # "linear"


class MultiStreamEmbedding(nn.Module):
    """Text embedding of the main and second text streams: one table, two projections."""

    def __init__(self, vocab: int, table_dim: int, out_dim: int, pad_id: int):
        super().__init__()
        self.pad_id = pad_id
        self.embedding = nn.Embedding(vocab, table_dim)
        self.main_proj = nn.Linear(table_dim, out_dim, bias=False)
        self.second_proj = nn.Linear(table_dim, out_dim, bias=False)

    def forward(self, main: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        has_second = (second != self.pad_id).unsqueeze(-1)
        out = self.main_proj(self.embedding(main))
        return out + self.second_proj(self.embedding(second)) * has_second.to(out.dtype)


# -- decoder -------------------------------------------------------------------------------------

class DecoderAttention(nn.Module):
    """Parameters of the decoder attention; the math is in `decoder_layer`."""

    def __init__(self, cfg: TransformerConfig, eps: float):
        super().__init__()
        hq, hkv, dh = cfg.gqa_query_heads, cfg.kv_heads, cfg.gqa_head_dim
        self.q_proj = nn.Linear(cfg.n_embd, hq * dh, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, hkv * dh, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, hkv * dh, bias=False)
        self.o_proj = nn.Linear(hq * dh, cfg.n_embd, bias=False)
        self.q_norm = RMSNorm(dh, eps)
        self.k_norm = RMSNorm(dh, eps)


@dataclass(frozen=True)
class DecoderLayerWeights:
    """One decoder layer as plain tensors (no module, so one compiled graph serves every layer:
    only the tensors differ). Caches are passed on their own."""

    pre_norm: torch.Tensor
    qkv: torch.Tensor  # q, k and v projections fused: [(Hq + 2 Hkv) Dh, D]
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    o_proj: torch.Tensor
    post_norm: torch.Tensor
    wi: torch.Tensor
    wo: torch.Tensor


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig, eps: float):
        super().__init__()
        self.pre_norm = RMSNorm(cfg.n_embd, eps)
        self.attn = DecoderAttention(cfg, eps)
        self.post_norm = RMSNorm(cfg.n_embd, eps)
        self.mlp = MLP(cfg.n_embd, cfg.n_hidden)

    def weights(self) -> DecoderLayerWeights:
        a = self.attn
        qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach()
        return DecoderLayerWeights(pre_norm=self.pre_norm.weight.detach(), qkv=qkv, q_norm=a.q_norm.weight.detach(),
                                   k_norm=a.k_norm.weight.detach(), o_proj=a.o_proj.weight.detach(),
                                   post_norm=self.post_norm.weight.detach(), wi=self.mlp.wi.weight.detach(),
                                   wo=self.mlp.wo.weight.detach())


@dataclass(frozen=True)
class DecoderShape:
    q_heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    eps: float
    activations: tuple[str, str]


def kept_out_of_compile(fn):
    """`torch.compiler.disable(fn)`, made on the first call instead of at import: the decorator
    imports torch._dynamo (~1.3 s), which a process that imports this module but never runs a
    model (the server's own process beside its engine process, `server.py --help`) need not pay.
    Traced by torch.compile, the call still reaches the disabled function: a graph break."""
    disabled = None

    @functools.wraps(fn)
    def call(*args):
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args)

    return call


@kept_out_of_compile
def write_cache(cache_k: torch.Tensor, cache_v: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> None:
    """Scatter k, v [B, Hkv, T, Dh] into the caches at `slots` [B, T], in place. Kept out of
    torch.compile: compiled, the write became a copy of the whole cache (48 copies a frame, 8 of
    30 ms at 64 calls; docs/benchmarks.md, run 8); eager, it touches only the written slots."""
    index = slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
    cache_k.scatter_(2, index, k)
    cache_v.scatter_(2, index, v)


def decoder_layer(x: torch.Tensor, weights: DecoderLayerWeights, cache: KVCache, cos: torch.Tensor, sin: torch.Tensor,
                  positions: torch.Tensor, mask: torch.Tensor, shape: DecoderShape,
                  decode_attend: Callable | None = None) -> torch.Tensor:
    """One pre-norm decoder layer over x [B, T, D] with the static cache: cos/sin carry the RoPE
    positions, `positions` [B, T] are the cache slots the keys/values are written to.
    `decode_attend(q, cache_k, cache_v, last_slot)` replaces the masked SDPA for one frame per row
    (`decode_attention.attend`: reads only the filled slots); a prefill always takes SDPA."""
    w = weights
    cache_k, cache_v = cache
    b, t, _ = x.shape
    hq, hkv, dh = shape.q_heads, shape.kv_heads, shape.head_dim
    qkv = F.linear(_rms(x, w.pre_norm, shape.eps), w.qkv)
    q, k, v = qkv.split([hq * dh, hkv * dh, hkv * dh], dim=-1)
    q = _rms(q.view(b, t, hq, dh), w.q_norm, shape.eps).transpose(1, 2)  # [B, Hq, T, Dh]
    k = _rms(k.view(b, t, hkv, dh), w.k_norm, shape.eps).transpose(1, 2)  # [B, Hkv, T, Dh]
    v = v.view(b, t, hkv, dh).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    write_cache(cache_k, cache_v, positions, k, v)
    # scale 1.0: the q/k norms take the place of 1/sqrt(Dh)
    if decode_attend is not None and t == 1:
        att = decode_attend(q, cache_k, cache_v, positions[:, 0])
    else:
        att = F.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=mask, scale=1.0,
                                             enable_gqa=hq != hkv)  # [B, Hq, T, Dh]
    x = x + F.linear(att.transpose(1, 2).reshape(b, t, hq * dh), w.o_proj)
    return x + gated_mlp(_rms(x, w.post_norm, shape.eps), w.wi, w.wo, shape.hidden, shape.activations)


class Decoder(nn.Module):
    """Causal transformer over frames: tokens of step t → action logits, codebook-0 logits, hidden."""

    def __init__(self, config: Dia2Config):
        super().__init__()
        d, m = config.data, config.model
        dec = m.decoder
        eps = m.normalization_layer_epsilon
        self.config = config
        self.text_embed = MultiStreamEmbedding(d.text_vocab_size, dec.low_rank_dim or dec.n_embd, dec.n_embd,
                                               d.text_pad_token_id)
        self.audio_embeds = nn.ModuleList(nn.Embedding(d.audio_vocab_size, dec.n_embd) for _ in range(d.num_codebooks))
        self.layers = nn.ModuleList(DecoderLayer(dec, eps) for _ in range(dec.n_layer))
        self.norm = RMSNorm(dec.n_embd, eps)
        self.action_head = nn.Linear(dec.n_embd, d.action_vocab_size, bias=False)
        self.cb0_head = nn.Linear(dec.n_embd, d.audio_vocab_size, bias=False)
        self.shape = DecoderShape(dec.gqa_query_heads, dec.kv_heads, dec.gqa_head_dim, dec.n_hidden, eps,
                                  tuple(m.decoder_mlp_activations))
        self.layer_weights: list[DecoderLayerWeights] = []

    def setup_tables(self) -> None:
        """Plain-tensor views of the layers (and one stacked audio table), after the weights are loaded."""
        self.layer_weights = [layer.weights() for layer in self.layers]
        self._audio_stack = torch.stack([t.weight.detach() for t in self.audio_embeds])  # [Q, A, D]
        self._codebook = torch.arange(len(self.audio_embeds), device=self._audio_stack.device)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens [B, T, 2 + Q] → [B, T, D]: one gather over the stacked audio tables, then a sum
        h = self.text_embed(tokens[..., 0], tokens[..., 1])
        return h + self._audio_stack[self._codebook, tokens[..., 2:]].sum(dim=-2)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, caches: Sequence[KVCache], layer_fn=decoder_layer,
                slots: torch.Tensor | None = None):
        """tokens [B, T, C], positions [B, T], one cache per layer with B rows → action [B, T, Va],
        cb0 [B, T, A] (fp32), hidden [B, T, D]. `layer_fn` may be a compiled `decoder_layer`.
        `slots` [B, T]: the cache slots written and attended up to (default: the positions; RoPE
        always uses the positions)."""
        m = self.config.model
        h = self.embed(tokens)
        slots = positions if slots is None else slots
        cos, sin = rope_cos_sin(positions, m.decoder.gqa_head_dim, m.rope_min_timescale, m.rope_max_timescale, h.dtype)
        mask = causal_mask(slots, caches[0].length)
        for weights, cache in zip(self.layer_weights, caches):
            h = layer_fn(h, weights, cache, cos, sin, slots, mask, self.shape)
        hn = self.norm(h)
        return self.action_head(hn).float(), self.cb0_head(hn).float(), hn


# -- depformer -----------------------------------------------------------------------------------

class DepformerAttention(nn.Module):
    """Parameters of the depformer self-attention (projections per weight set); the math is in
    `depformer_stage`.

    Stage positions are fixed (stage s sits at position s), so the q/k norm weights and RoPE of
    each stage fold into one `[Dh, Dh]` map per stage (`qk_maps[s]`: for q and for k): the
    normalised heads go through one batched matmul instead of a dozen elementwise kernels.
    """

    def __init__(self, cfg: TransformerConfig, weight_sets: list[int], eps: float):
        super().__init__()
        inner = cfg.gqa_query_heads * cfg.gqa_head_dim
        self.in_proj = nn.ModuleDict({str(w): nn.Linear(cfg.n_embd, 3 * inner, bias=False) for w in weight_sets})
        self.out_proj = nn.ModuleDict({str(w): nn.Linear(inner, cfg.n_embd, bias=False) for w in weight_sets})
        self.q_norm = RMSNorm(cfg.gqa_head_dim, eps)
        self.k_norm = RMSNorm(cfg.gqa_head_dim, eps)
        self.qk_maps: torch.Tensor | None = None  # [S, 2, Dh, Dh], see setup_stage_tables


class DepformerLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig, weight_sets: list[int], eps: float):
        super().__init__()
        self.pre_norm = RMSNorm(cfg.n_embd, eps)
        self.self_attention = DepformerAttention(cfg, weight_sets, eps)
        self.post_norm = RMSNorm(cfg.n_embd, eps)
        self.mlp = MLP(cfg.n_embd, cfg.n_hidden)


@dataclass(frozen=True)
class StageShape:
    """The static numbers of a depformer stage (the same for every stage)."""

    heads: int
    head_dim: int
    hidden: int
    eps: float
    activations: tuple[str, str]
    real_codes: int


@dataclass(frozen=True)
class StageLayerWeights:
    """One depformer layer as stage s sees it (its weight set's projections, its q/k map).
    Projections may be `kernels.QuantWeight` for the fused FP8 path."""

    pre_norm: torch.Tensor
    in_proj: torch.Tensor
    qk_map: torch.Tensor
    out_proj: torch.Tensor
    post_norm: torch.Tensor
    wi: torch.Tensor
    wo: torch.Tensor


@dataclass(frozen=True)
class StageWeights:
    """Everything stage s reads, as plain tensors, so one function (and one compiled graph)
    serves all 31 stages: which weight set, embedding or cache slot is only a different argument."""

    embed: torch.Tensor  # [A, Dd] audio embedding of the previous codebook
    layers: tuple[StageLayerWeights, ...]
    norm: torch.Tensor
    logits: torch.Tensor  # [A, Dd]
    mask: torch.Tensor  # [1, 1, 1, S] slots 0..s
    slot: torch.Tensor  # [1] long: s


def depformer_stage(projected: torch.Tensor, stage: StageWeights, prev: torch.Tensor, caches: Sequence[KVCache],
                    shape: StageShape) -> torch.Tensor:
    """One depformer stage with its weights `stage` and one `[R, H, S, Dh]` cache per layer: its
    projected input [R, Dd] plus the embedding of the previous codebook's codes prev [R] →
    logits [R, 2048] fp32. Writes the stage's keys/values into cache slot s; later slots hold the
    previous frame's and are masked."""
    x = (projected + F.embedding(prev, stage.embed))[:, None]  # [R, 1, Dd]
    r, h, dh = x.shape[0], shape.heads, shape.head_dim
    for w, (cache_k, cache_v) in zip(stage.layers, caches):
        qkv = F.linear(_rms(x, w.pre_norm, shape.eps), w.in_proj).view(r, 3, h, dh)
        qk = _rms(qkv[:, :2], None, shape.eps)  # [R, 2, H, Dh]
        qk = torch.matmul(qk.transpose(0, 1).reshape(2, r * h, dh), w.qk_map).view(2, r, h, 1, dh)
        cache_k.index_copy_(2, stage.slot, qk[1])
        cache_v.index_copy_(2, stage.slot, qkv[:, 2, :, None])
        att = F.scaled_dot_product_attention(qk[0], cache_k, cache_v, attn_mask=stage.mask, scale=1.0)  # [R, H, 1, Dh]
        x = x + F.linear(att.transpose(1, 2).reshape(r, 1, h * dh), w.out_proj)
        x = x + gated_mlp(_rms(x, w.post_norm, shape.eps), w.wi, w.wo, shape.hidden, shape.activations)
    return F.linear(_rms(x, stage.norm, shape.eps), stage.logits)[:, 0, : shape.real_codes].float()


def depformer_stage_fused(projected: torch.Tensor, stage: StageWeights, prev: torch.Tensor,
                          caches: Sequence[KVCache], shape: StageShape, *, index: int) -> torch.Tensor:
    """`depformer_stage` through the Triton kernels (`kernels.py`), five launches a layer: same
    arguments (weights may be `kernels.QuantWeight`), same result within bf16 tolerance. `index`
    is the stage's slot as a Python int, fixed per launch (the kernels take it as a scalar and
    mask by it, so `stage.mask` and `stage.slot` are not read)."""
    x = projected + F.embedding(prev, stage.embed)  # [R, Dd]
    return depformer_stage_logits_fused(x, stage, caches, shape, index=index).float()


def depformer_stage_logits_fused(x: torch.Tensor, stage: StageWeights, caches: Sequence[KVCache], shape: StageShape,
                                 *, index: int) -> torch.Tensor:
    """The Triton stage from its input rows x [R, Dd] (projected input plus the previous codebook's
    embedding) to its logits [R, real codes], in the weights' dtype: 5 launches a layer and one
    for the logits, each a Triton kernel (so each may launch programmatically dependent)."""
    for w, (cache_k, cache_v) in zip(stage.layers, caches):
        qkv = kernels.linear(x, w.in_proj, norm=w.pre_norm, eps=shape.eps, kind="in_proj")
        att = kernels.stage_attention(qkv, w.qk_map, cache_k, cache_v, index, shape.heads, shape.eps)
        x = kernels.linear(att, w.out_proj, residual=x, kind="out_proj")
        h = kernels.gated_mlp_in(x, w.wi, w.post_norm, shape.eps, shape.hidden, shape.activations)
        x = kernels.linear(h, w.wo, residual=x, kind="mlp_out")
    return kernels.linear(x, stage.logits, norm=stage.norm, eps=shape.eps, n=shape.real_codes, kind="logits")


# Whether a stepper's torch depformer stages take their attention from one Triton launch a layer
# (`depformer_stage_kernel_attention`, `--batched-stage-attention`), read when its frame is built:
# None (auto) where the stepper runs the Triton depformer, True/False force it.
BATCHED_STAGE_ATTENTION: bool | None = None


def batched_stage_attention(triton_depformer: bool, device: torch.device | str) -> bool:
    """Whether the torch depformer of a stepper on `device` takes its attention from the Triton
    kernel, by `BATCHED_STAGE_ATTENTION`; `triton_depformer`: the stepper runs the Triton depformer
    (`kernels="triton"`) at few rows. Never where the kernels cannot run (a CPU without Triton's
    interpreter)."""
    use = triton_depformer if BATCHED_STAGE_ATTENTION is None else BATCHED_STAGE_ATTENTION
    return bool(use) and kernels.available(device)


def depformer_stage_kernel_attention(projected: torch.Tensor, stage: StageWeights, prev: torch.Tensor,
                                     caches: Sequence[KVCache], shape: StageShape, *, index: int) -> torch.Tensor:
    """`depformer_stage` with each layer's attention in one Triton launch (`kernels.stage_attention`:
    q/k RMS, the stage's map, the cache write at slot `index`, attention over slots 0..index)
    where the torch stage spends ~6 (two norms, the map, two cache copies, SDPA, which pads the
    single query to a tile); the projections stay cuBLAS GEMMs and the norms around them are
    left to torch.compile. For the batched rows (more than `kernels.FUSED_MAX_ROWS`), where
    the Triton matrix kernels lose to cuBLAS. Same arguments and result (within bf16
    tolerance) as `depformer_stage_fused`: `index` is the stage's slot as a Python int.

    The loop over layers stays outside torch.compile's reach on purpose: a graph break inside a
    loop makes dynamo run the whole function eagerly, so each piece the loop calls (input, layer,
    logits) is its own compiled frame, and only the launch inside a layer breaks its graph."""
    x = _stage_input(projected, prev, stage.embed)
    for w, (cache_k, cache_v) in zip(stage.layers, caches):
        x = _kernel_attention_layer(x, w, cache_k, cache_v, shape, index)
    return _stage_logits(x, stage.norm, stage.logits, shape)


def _stage_input(projected: torch.Tensor, prev: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    return projected + F.embedding(prev, embed)  # [R, Dd]


def _kernel_attention_layer(x: torch.Tensor, w: StageLayerWeights, cache_k: torch.Tensor, cache_v: torch.Tensor,
                            shape: StageShape, index: int) -> torch.Tensor:
    """One depformer layer over rows x [R, Dd], its attention in one Triton launch."""
    qkv = F.linear(_rms(x, w.pre_norm, shape.eps), w.in_proj)  # [R, 3 H Dh]
    att = _stage_attention_launch(qkv, w.qk_map, cache_k, cache_v, index, shape.heads, shape.eps)  # [R, H Dh]
    x = x + F.linear(att, w.out_proj)
    return x + gated_mlp(_rms(x, w.post_norm, shape.eps), w.wi, w.wo, shape.hidden, shape.activations)


def _stage_logits(x: torch.Tensor, norm: torch.Tensor, logits: torch.Tensor, shape: StageShape) -> torch.Tensor:
    return F.linear(_rms(x, norm, shape.eps), logits)[:, : shape.real_codes].float()


@kept_out_of_compile
def _stage_attention_launch(qkv: torch.Tensor, qk_map: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                            index: int, heads: int, eps: float) -> torch.Tensor:
    """`kernels.stage_attention`, kept out of torch.compile (Triton's launch is not traced; the
    graph break costs nothing when the frame replays from a CUDA graph). The kernel steps a head's
    slots by Dh and a row's qkv by one: each `[S, Dh]` block of the cache must be rows of
    contiguous head dims (the frame's row views are), and each qkv row contiguous."""
    for cache in (cache_k, cache_v):
        if cache.stride(3) != 1 or cache.stride(2) != cache.shape[3]:
            raise ValueError(f"the stage attention needs each row's [S, Dh] cache contiguous, not strides "
                             f"{cache.stride()} for shape {tuple(cache.shape)}")
    if qkv.stride(1) != 1:
        raise ValueError(f"the stage attention needs contiguous qkv rows, not strides {qkv.stride()}")
    return kernels.stage_attention(qkv, qk_map, cache_k, cache_v, index, heads, eps,
                                   rows_per_program=kernels.BATCHED_ATTENTION_ROWS)


def _rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:  # CPU's fused rms_norm is a slow composite; plain ops are not
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return out if weight is None else out * weight
    return F.rms_norm(x, (x.shape[-1],), weight, eps)  # fp32 math inside, one kernel


def rope_matrix(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`[Dh, Dh]` R with `x @ R == apply_rope(x, cos, sin)` for one position (cos, sin `[Dh]`)."""
    dh = cos.shape[-1]
    half = dh // 2
    r = torch.diag(cos)
    idx = torch.arange(half)
    r[idx + half, idx] = -sin[:half]
    r[idx, idx + half] = sin[half:]
    return r


class Depformer(nn.Module):
    """Generates codebooks 1..Q-1 of one frame, one stage after the other."""

    def __init__(self, config: Dia2Config):
        super().__init__()
        d, m = config.data, config.model
        dep = m.depformer
        eps = m.normalization_layer_epsilon
        self.config = config
        self.schedule = [str(w) for w in config.runtime.weights_schedule]
        weight_sets = sorted(set(config.runtime.weights_schedule))
        stages = config.num_stages
        self.audio_embeds = nn.ModuleList(nn.Embedding(d.audio_vocab_size, dep.n_embd) for _ in range(stages))
        self.text_embed = (MultiStreamEmbedding(d.text_vocab_size, dep.n_embd, dep.n_embd, d.text_pad_token_id)
                           if dep.text_embedding else None)
        self.depformer_in = nn.ModuleDict({str(w): nn.Linear(m.decoder.n_embd, dep.n_embd, bias=False)
                                           for w in weight_sets})
        self.layers = nn.ModuleList(DepformerLayer(dep, weight_sets, eps) for _ in range(dep.n_layer))
        self.norm = RMSNorm(dep.n_embd, eps)
        self.logits = nn.ModuleList(nn.Linear(dep.n_embd, d.audio_vocab_size, bias=False) for _ in range(stages))
        self.shape = StageShape(dep.gqa_query_heads, dep.gqa_head_dim, dep.n_hidden, eps, tuple(dep.mlp_activations),
                                min(d.audio_pad, d.audio_bos))  # special ids are never sampled
        self.stage_weights: list[StageWeights] = []

    def project_inputs(self, hidden: torch.Tensor) -> torch.Tensor:
        """depformer_in of every stage at once: hidden [R, 1, D] → [S, R, Dd] (one batched matmul
        over the weight sets, then a gather by schedule)."""
        per_set = torch.matmul(hidden[None, :, 0], self._in_stack)  # [W, R, Dd]
        return per_set[self._schedule_index]

    def first_stage_text(self, projected: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Stage 0 also sees this step's new text tokens: projected [S, R, Dd], text [R, 2]."""
        if self.text_embed is None:
            return projected
        return torch.cat([projected[:1] + self.text_embed(text[:, 0], text[:, 1]), projected[1:]])

    def setup_stage_tables(self, device, dtype) -> None:
        """Per-stage weights, masks and q/k maps (norm weight x RoPE), made once after the weights
        are loaded, not per frame."""
        m = self.config.model
        dep = m.depformer
        stages = self.config.num_stages
        slots = torch.arange(stages, device=device)
        if dep.apply_rope:
            cos, sin = rope_cos_sin(slots.cpu()[:, None], dep.gqa_head_dim, m.rope_min_timescale,
                                    m.rope_max_timescale, torch.float32)  # [S, 1, 1, Dh]
            rot = torch.stack([rope_matrix(cos[s, 0, 0], sin[s, 0, 0]) for s in range(stages)])  # [S, Dh, Dh]
        else:
            rot = torch.eye(dep.gqa_head_dim).expand(stages, -1, -1)
        for layer in self.layers:
            attn = layer.self_attention
            norms = torch.stack([attn.q_norm.weight, attn.k_norm.weight]).float().cpu()  # [2, Dh]
            attn.qk_maps = (norms[None, :, :, None] * rot[:, None]).to(device=device, dtype=dtype)  # diag(w) @ R
        sets = list(self.depformer_in.keys())
        self._in_stack = torch.stack([self.depformer_in[k].weight.detach().T for k in sets])  # [W, D, Dd]
        self._schedule_index = torch.tensor([sets.index(w) for w in self.schedule], device=device)
        plain = lambda t: t.detach()  # noqa: E731  (parameters as plain tensors: one compiled graph)
        self.stage_weights = []
        for s in range(stages):
            w = self.schedule[s]
            layers = tuple(
                StageLayerWeights(pre_norm=plain(l.pre_norm.weight), in_proj=plain(l.self_attention.in_proj[w].weight),
                                  qk_map=l.self_attention.qk_maps[s], out_proj=plain(l.self_attention.out_proj[w].weight),
                                  post_norm=plain(l.post_norm.weight), wi=plain(l.mlp.wi.weight), wo=plain(l.mlp.wo.weight))
                for l in self.layers)
            self.stage_weights.append(StageWeights(
                embed=plain(self.audio_embeds[s].weight), layers=layers, norm=plain(self.norm.weight),
                logits=plain(self.logits[s].weight), mask=(slots <= s)[None, None, None, :],
                slot=slots[s: s + 1].clone()))


class Dia2Model(nn.Module):
    def __init__(self, config: Dia2Config):
        super().__init__()
        self.config = config
        self.transformer = Decoder(config)
        self.depformer = Depformer(config)

    def prepare_tables(self) -> None:
        """Plain-tensor tables of the loaded weights for the frame functions (once, after loading)."""
        p = next(self.parameters())
        self.transformer.setup_tables()
        self.depformer.setup_stage_tables(p.device, p.dtype)

    def new_caches(self, rows: int, length: int, dtype: torch.dtype | None = None) -> tuple[list[KVCache], list[KVCache]]:
        """Empty static caches for `rows` batch rows: (decoder, `length` positions per layer;
        depformer, one slot per stage per layer)."""
        p = next(self.parameters())
        dtype = dtype or p.dtype
        dec, dep = self.config.model.decoder, self.config.model.depformer
        decoder = [KVCache.empty(rows, dec.kv_heads, length, dec.gqa_head_dim, dtype, p.device)
                   for _ in self.transformer.layers]
        depformer = [KVCache.empty(rows, dep.gqa_query_heads, self.config.num_stages, dep.gqa_head_dim, dtype, p.device)
                     for _ in self.depformer.layers]
        return decoder, depformer
