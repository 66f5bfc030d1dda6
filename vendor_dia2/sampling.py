"""Sampling and classifier-free guidance, written to run inside a CUDA graph.

No host synchronisation and no stateful RNG: the random numbers come from a counter-based hash
of (seed, frame position, stream, candidate), so a seeded run draws the same tokens eager or
graphed, batched or alone, and replays need no generator bookkeeping.

Sampling is "softmax(logits / T), keep the top-k, renormalise, draw one" (DIA2_SPEC.md §8),
done as a Gumbel-max draw over the sorted candidates, which is the same distribution.
CFG picks the candidate set from the guided logits and lets the conditional logits rank it.
"""

from __future__ import annotations

import torch

_MASK_64 = (1 << 64) - 1


def _i64(x: int) -> int:
    """A 64-bit constant as a signed int64 (torch has no uint64 arithmetic)."""
    x &= _MASK_64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_MIX1 = _i64(0xBF58476D1CE4E5B9)
_MIX2 = _i64(0x94D049BB133111EB)
_STREAM = _i64(0xD6E8FEB86659FD93)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift on int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniform_noise(seed: torch.Tensor, position: torch.Tensor, streams: int, width: int) -> torch.Tensor:
    """Uniform (0, 1) floats `[N, streams, width]` from a splitmix64-style hash of
    (seed, position, stream, lane); seed, position `[N]` int64. One call covers a whole frame."""
    stream = torch.arange(1, streams + 1, device=seed.device, dtype=torch.int64) * _STREAM
    lane = torch.arange(width, device=seed.device, dtype=torch.int64) * _GOLDEN
    x = (seed * _GOLDEN + position * _MIX1)[:, None, None] + stream[None, :, None] + lane[None, None, :]
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    x = x ^ _shift_right(x, 31)
    return (_shift_right(x, 40).float() + 0.5) * (1.0 / (1 << 24))


def gumbel_noise(seed: torch.Tensor, position: torch.Tensor, streams: int, width: int) -> torch.Tensor:
    """Gumbel(0, 1) noise `[N, streams, width]` for a frame's draws."""
    return -torch.log(-torch.log(uniform_noise(seed, position, streams, width)))


def top_candidates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best (values, ids), sorted descending, equal values lowest id first (bf16 logits tie
    at the top in about one draw in fifty, and the fused draw, `fused_pick`, follows this rule).
    logits `[N, V]`."""
    logits = logits.float()
    k = min(k, logits.shape[1])
    if logits.device.type == "cpu" or k <= 32:
        # CPU's top-k orders equal values as its partial sort leaves them, and CUDA's orders up to
        # 32 of them by a sorting network: a stable sort keeps the rule
        values, ids = logits.sort(dim=-1, descending=True, stable=True)
        return values[:, :k], ids[:, :k]
    # CUDA's top-k keeps it for more: its radix select gathers the candidates in id order and a
    # stable sort orders them (whole greedy frames against the fused draw: tests/test_fused_frame.py)
    return logits.topk(k, dim=-1)


def guided_candidates(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor,
                      filter_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CFG: the top-`filter_k` ids of `uncond + scale * (cond - uncond)`, ranked (sorted) by the
    conditional logits, equal ones in the guided order. cond, uncond `[N, V]`; scale `[N]`."""
    guided = torch.lerp(uncond.float(), cond.float(), scale[:, None])
    _, ids = top_candidates(guided, filter_k)
    values, order = cond.float().gather(1, ids).sort(dim=-1, descending=True, stable=True)
    return values, ids.gather(1, order)


def draw(values: torch.Tensor, ids: torch.Tensor, inv_temperature: torch.Tensor,
         noise: torch.Tensor) -> torch.Tensor:
    """One id per row from sorted candidates. values, ids `[N, C]`; inv_temperature `[N]`;
    noise `[N, >= C]` from `draw_noise` (Gumbel noise with the top-k mask folded in, zero for
    greedy rows, whose inverse temperature is 1, so they take the best candidate)."""
    c = values.shape[1]
    scores = torch.nan_to_num(values, nan=float("-inf")) * inv_temperature[:, None] + noise[:, :c]
    return ids.gather(1, scores.argmax(dim=-1, keepdim=True))[:, 0]


def draw_noise(gumbel: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame preparation of every draw: gumbel `[N, streams, K]`, temperature and top_k
    `[N, streams]` → (noise `[N, streams, K]`, inverse temperature `[N, streams]`). Candidates
    ranked at or past top_k get -inf; temperature <= 0 (greedy) gets no noise."""
    rank = torch.arange(gumbel.shape[-1], device=gumbel.device)
    sampled = temperature > 0
    noise = torch.where(sampled[..., None], gumbel, 0.0)
    noise = noise.masked_fill(rank >= top_k[..., None], float("-inf"))
    inv_temperature = torch.where(sampled, 1.0 / temperature.clamp_min(1e-6), 1.0)
    return noise, inv_temperature
