"""The Dia2 networks: a causal decoder over frames and a depformer over codebooks.

One readable file in the spirit of gpt-fast: no framework layers, shapes written where they
change. Module and parameter names match the published checkpoint (DIA2_SPEC.md §3), so a
safetensors state dict loads with `load_state_dict(strict=True)`.

Notation: B rows (calls x CFG branches), T frames in a call of the decoder, L cache length,
D width, Hq/Hkv heads, Dh head dim, A audio vocab, Q codebooks.

Caches are static and preallocated (`setup_caches`), with a batch dimension and *per-row*
positions: writing is a scatter at each row's position and attention masks every slot past
it, so rolling back a row is just reusing an earlier position, and a snapshot is a copy.
RoPE is computed from the positions on the fly, so it is defined for any position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import Dia2Config, TransformerConfig

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # CPU's fused rms_norm is a slow composite; five plain ops are not
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # fp32 math inside, one kernel


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


class KVCache(nn.Module):
    """Static `[B, H, L, Dh]` key/value buffers written at per-row positions."""

    def __init__(self, batch: int, heads: int, length: int, head_dim: int, dtype: torch.dtype, device):
        super().__init__()
        shape = (batch, heads, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def write(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # positions [B, T]; k, v [B, H, T, Dh]
        index = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.k.scatter_(2, index, k)
        self.v.scatter_(2, index, v)


def causal_mask(positions: torch.Tensor, length: int) -> torch.Tensor:
    """Boolean `[B, 1, T, L]`: row b, query t may see slots 0..positions[b, t]."""
    slots = torch.arange(length, device=positions.device)
    return slots[None, None, None, :] <= positions[:, None, :, None]


class MLP(nn.Module):
    """Gated MLP: `wi` yields [gate | up], `wo(act0(gate) * act1(up))`."""

    def __init__(self, dim: int, hidden: int, activations: tuple[str, str]):
        super().__init__()
        self.hidden = hidden
        self.acts = activations
        self.wi = nn.Linear(dim, 2 * hidden, bias=False)
        self.wo = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.wi(x).split(self.hidden, dim=-1)
        return self.wo(_activate(gate, self.acts[0]) * _activate(up, self.acts[1]))


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
    def __init__(self, cfg: TransformerConfig, eps: float):
        super().__init__()
        self.hq, self.hkv, self.dh = cfg.gqa_query_heads, cfg.kv_heads, cfg.gqa_head_dim
        self.q_proj = nn.Linear(cfg.n_embd, self.hq * self.dh, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, self.hkv * self.dh, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, self.hkv * self.dh, bias=False)
        self.o_proj = nn.Linear(self.hq * self.dh, cfg.n_embd, bias=False)
        self.q_norm = RMSNorm(self.dh, eps)
        self.k_norm = RMSNorm(self.dh, eps)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, positions, mask):
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.hq, self.dh)).transpose(1, 2)  # [B, Hq, T, Dh]
        k = self.k_norm(self.k_proj(x).view(b, t, self.hkv, self.dh)).transpose(1, 2)  # [B, Hkv, T, Dh]
        v = self.v_proj(x).view(b, t, self.hkv, self.dh).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        self.cache.write(positions, k, v)
        # scale 1.0: the q/k norms take the place of 1/sqrt(Dh)
        out = F.scaled_dot_product_attention(q, self.cache.k, self.cache.v, attn_mask=mask, scale=1.0,
                                             enable_gqa=self.hq != self.hkv)  # [B, Hq, T, Dh]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.hq * self.dh))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig, activations: tuple[str, str], eps: float):
        super().__init__()
        self.pre_norm = RMSNorm(cfg.n_embd, eps)
        self.attn = DecoderAttention(cfg, eps)
        self.post_norm = RMSNorm(cfg.n_embd, eps)
        self.mlp = MLP(cfg.n_embd, cfg.n_hidden, activations)

    def forward(self, x, cos, sin, positions, mask):
        x = x + self.attn(self.pre_norm(x), cos, sin, positions, mask)
        return x + self.mlp(self.post_norm(x))


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
        self.layers = nn.ModuleList(DecoderLayer(dec, m.decoder_mlp_activations, eps) for _ in range(dec.n_layer))
        self.norm = RMSNorm(dec.n_embd, eps)
        self.action_head = nn.Linear(dec.n_embd, d.action_vocab_size, bias=False)
        self.cb0_head = nn.Linear(dec.n_embd, d.audio_vocab_size, bias=False)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens [B, T, 2 + Q] → [B, T, D]
        h = self.text_embed(tokens[..., 0], tokens[..., 1])
        for k, table in enumerate(self.audio_embeds):
            h = h + table(tokens[..., 2 + k])
        return h

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor):
        """tokens [B, T, C], positions [B, T] → action [B, T, Va], cb0 [B, T, A] (fp32), hidden [B, T, D]."""
        m = self.config.model
        h = self.embed(tokens)
        cos, sin = rope_cos_sin(positions, m.decoder.gqa_head_dim, m.rope_min_timescale, m.rope_max_timescale, h.dtype)
        mask = causal_mask(positions, self.layers[0].attn.cache.length)
        for layer in self.layers:
            h = layer(h, cos, sin, positions, mask)
        hn = self.norm(h)
        return self.action_head(hn).float(), self.cb0_head(hn).float(), hn


# -- depformer -----------------------------------------------------------------------------------

class DepformerAttention(nn.Module):
    """Self-attention over the stages of one frame; projections per weight set.

    Stage positions are fixed (stage s sits at position s), so the q/k norm weights and RoPE of
    each stage fold into one `[Dh, Dh]` map per stage (`qk_maps[s]`: for q and for k): the
    normalised heads go through one batched matmul instead of a dozen elementwise kernels.
    """

    def __init__(self, cfg: TransformerConfig, weight_sets: list[int], eps: float):
        super().__init__()
        self.h, self.dh, self.eps = cfg.gqa_query_heads, cfg.gqa_head_dim, eps
        inner = self.h * self.dh
        self.in_proj = nn.ModuleDict({str(w): nn.Linear(cfg.n_embd, 3 * inner, bias=False) for w in weight_sets})
        self.out_proj = nn.ModuleDict({str(w): nn.Linear(inner, cfg.n_embd, bias=False) for w in weight_sets})
        self.q_norm = RMSNorm(self.dh, eps)
        self.k_norm = RMSNorm(self.dh, eps)
        self.cache: KVCache | None = None
        self.qk_maps: torch.Tensor | None = None  # [S, 2, Dh, Dh], see setup_stage_tables

    def forward(self, x, weight_set: str, stage: int, mask):
        b = x.shape[0]
        qkv = self.in_proj[weight_set](x).view(b, 3, self.h, self.dh)  # x [B, 1, Dd]
        qk = _unit_rms(qkv[:, :2], self.eps)  # [B, 2, H, Dh]
        qk = torch.matmul(qk.transpose(0, 1).reshape(2, b * self.h, self.dh), self.qk_maps[stage])  # [2, B*H, Dh]
        qk = qk.view(2, b, self.h, 1, self.dh)
        # stage s writes slot s; slots past s hold the previous frame's values and are masked
        self.cache.k[:, :, stage] = qk[1, :, :, 0]
        self.cache.v[:, :, stage] = qkv[:, 2]
        out = F.scaled_dot_product_attention(qk[0], self.cache.k, self.cache.v, attn_mask=mask, scale=1.0)
        return self.out_proj[weight_set](out.transpose(1, 2).reshape(b, 1, self.h * self.dh))


def _unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


def rope_matrix(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`[Dh, Dh]` R with `x @ R == apply_rope(x, cos, sin)` for one position (cos, sin `[Dh]`)."""
    dh = cos.shape[-1]
    half = dh // 2
    r = torch.diag(cos)
    idx = torch.arange(half)
    r[idx + half, idx] = -sin[:half]
    r[idx, idx + half] = sin[half:]
    return r


class DepformerLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig, weight_sets: list[int], eps: float):
        super().__init__()
        self.pre_norm = RMSNorm(cfg.n_embd, eps)
        self.self_attention = DepformerAttention(cfg, weight_sets, eps)
        self.post_norm = RMSNorm(cfg.n_embd, eps)
        self.mlp = MLP(cfg.n_embd, cfg.n_hidden, cfg.mlp_activations)

    def forward(self, x, weight_set, stage, mask):
        x = x + self.self_attention(self.pre_norm(x), weight_set, stage, mask)
        return x + self.mlp(self.post_norm(x))


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
        self.real_codes = min(d.audio_pad, d.audio_bos)  # special ids are never sampled

    def stage(self, s: int, hidden: torch.Tensor, prev: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
        """One stage: hidden [B, 1, D], prev [B] (codebook s), text [B, 2] at stage 0 → logits [B, 2048] fp32."""
        w = self.schedule[s]
        x = self.depformer_in[w](hidden) + self.audio_embeds[s](prev)[:, None]  # [B, 1, Dd]
        if s == 0 and self.text_embed is not None:
            x = x + self.text_embed(text[:, None, 0], text[:, None, 1])
        mask = self._stage_masks[s]
        for layer in self.layers:
            x = layer(x, w, s, mask)
        return self.logits[s](self.norm(x))[:, 0, : self.real_codes].float()

    def setup_stage_tables(self, device, dtype) -> None:
        """Masks and q/k maps (norm weight x RoPE) of the fixed stage positions, made once after
        the weights are loaded, not per frame."""
        m = self.config.model
        dep = m.depformer
        stages = self.config.num_stages
        slots = torch.arange(stages, device=device)
        self._stage_masks = [(slots <= s)[None, None, None, :] for s in range(stages)]
        if dep.apply_rope:
            cos, sin = rope_cos_sin(slots.cpu()[:, None], dep.gqa_head_dim, m.rope_min_timescale,
                                    m.rope_max_timescale, torch.float32)  # [S, 1, 1, Dh]
            rot = torch.stack([rope_matrix(cos[s, 0, 0], sin[s, 0, 0]) for s in range(stages)])  # [S, Dh, Dh]
        else:
            rot = torch.eye(dep.gqa_head_dim).expand(stages, -1, -1)
        for layer in self.layers:
            attn = layer.self_attention
            norms = torch.stack([attn.q_norm.weight, attn.k_norm.weight]).float().cpu()  # [2, Dh]
            # diag(w) @ R: scale the rows of R by the norm weight
            maps = norms[None, :, :, None] * rot[:, None]  # [S, 2, Dh, Dh]
            attn.qk_maps = maps.to(device=device, dtype=dtype)


class Dia2Model(nn.Module):
    def __init__(self, config: Dia2Config):
        super().__init__()
        self.config = config
        self.transformer = Decoder(config)
        self.depformer = Depformer(config)

    def setup_caches(self, batch: int, length: int, dtype: torch.dtype | None = None) -> None:
        """Allocate static caches for `batch` rows and `length` decoder positions."""
        p = next(self.parameters())
        dtype = dtype or p.dtype
        dec, dep = self.config.model.decoder, self.config.model.depformer
        for layer in self.transformer.layers:
            layer.attn.cache = KVCache(batch, dec.kv_heads, length, dec.gqa_head_dim, dtype, p.device)
        for layer in self.depformer.layers:
            layer.self_attention.cache = KVCache(batch, dep.gqa_query_heads, self.config.num_stages,
                                                 dep.gqa_head_dim, dtype, p.device)
        self.depformer.setup_stage_tables(p.device, dtype)

    def decoder_caches(self) -> list[KVCache]:
        return [layer.attn.cache for layer in self.transformer.layers]
