"""Sampling and classifier-free guidance, written to run inside a CUDA graph.

No host synchronisation and no stateful RNG: the random numbers come from a counter-based hash
of (seed, frame position, stream, candidate), so a seeded run draws the same tokens eager or
graphed, batched or alone, and replays need no generator bookkeeping.

Sampling is "softmax(logits / T), keep the top-k, renormalise, draw one" (DIA2_SPEC.md §8),
done as a Gumbel-max draw over the top-k candidates, which is the same distribution.
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


def cfg_filter(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor, filter_k: int) -> torch.Tensor:
    """Guided candidate set, conditional ranking: cond logits with all but the top-k of the
    guided logits set to -inf. cond, uncond `[N, V]`; scale `[N]`."""
    guided = uncond + scale[:, None] * (cond - uncond)
    keep = torch.zeros_like(cond, dtype=torch.bool)
    keep.scatter_(1, guided.topk(min(filter_k, cond.shape[1]), dim=-1).indices, True)
    return cond.masked_fill(~keep, float("-inf"))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Draw one id per row. logits `[N, V]`; temperature, top_k `[N]`; noise `[N, K]` uniform
    (K = the static candidate count, for graph shapes; a row's own `top_k` masks past it).

    Rows with temperature <= 0 take the argmax.
    """
    k = min(noise.shape[1], logits.shape[1])
    values, ids = logits.float().topk(k, dim=-1)  # [N, k], sorted descending
    values = torch.nan_to_num(values, nan=float("-inf"))
    rank = torch.arange(k, device=logits.device)
    values = values.masked_fill(rank[None, :] >= top_k[:, None], float("-inf"))
    gumbel = -torch.log(-torch.log(noise[:, :k]))
    scaled = values / temperature.clamp_min(1e-6)[:, None] + gumbel
    choice = scaled.argmax(dim=-1, keepdim=True)
    drawn = ids.gather(1, choice)[:, 0]
    return torch.where(temperature > 0, drawn, ids[:, 0])
