"""Delay and undelay of codebook grids (spec §6).

Codebook k lags the text by `delays[k]` frames. Delayed position p of codebook k holds aligned
frame p − delays[k]:
    delay:   aligned [..., Q, T]  → delayed [..., Q, T + max_delay], out[k, delays[k] + i] = aligned[k, i]
    undelay: delayed [..., Q, L]  → aligned [..., Q, L − max_delay], aligned[k, i] = delayed[k, i + delays[k]]
Both are one gather over the time axis (no Python loop over time or codebooks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def max_delay(delays: Sequence[int] | torch.Tensor) -> int:
    """Largest delay (0 for no codebooks)."""
    values = [int(d) for d in (delays.tolist() if isinstance(delays, torch.Tensor) else delays)]
    return max(values, default=0)


def delay_codes(aligned: torch.Tensor, delays: Sequence[int] | torch.Tensor, pad_id: int) -> torch.Tensor:
    """Aligned [Q, T] or [B, Q, T] → delayed [..., Q, T + max_delay]; cells before/after a
    codebook's stream are `pad_id`."""
    d = _delay_tensor(aligned, delays)
    q, t = aligned.shape[-2], aligned.shape[-1]
    length = t + max_delay(delays)
    if t == 0:
        return aligned.new_full((*aligned.shape[:-1], length), pad_id)
    src = torch.arange(length, device=aligned.device)[None, :] - d[:, None]  # [Q, L]
    valid = (src >= 0) & (src < t)
    index = src.clamp(0, t - 1).expand(*aligned.shape[:-2], q, length)
    gathered = torch.gather(aligned, -1, index)
    return torch.where(valid, gathered, torch.full_like(gathered, pad_id))


def undelay_codes(delayed: torch.Tensor, delays: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Delayed [Q, L] or [B, Q, L] → aligned [..., Q, L − max_delay]."""
    d = _delay_tensor(delayed, delays)
    q, length = delayed.shape[-2], delayed.shape[-1]
    t = length - max_delay(delays)
    if t < 0:
        raise ValueError(f"delayed grid has {length} frames, fewer than the max delay {max_delay(delays)}")
    index = torch.arange(t, device=delayed.device)[None, :] + d[:, None]  # [Q, T]
    return torch.gather(delayed, -1, index.expand(*delayed.shape[:-2], q, t))


def _delay_tensor(grid: torch.Tensor, delays: Sequence[int] | torch.Tensor) -> torch.Tensor:
    if grid.dim() not in (2, 3):
        raise ValueError(f"expected a [Q, T] or [B, Q, T] grid, got shape {tuple(grid.shape)}")
    d = torch.as_tensor(delays, dtype=torch.long, device=grid.device).reshape(-1)
    if d.numel() != grid.shape[-2]:
        raise ValueError(f"{d.numel()} delays for {grid.shape[-2]} codebooks")
    if d.numel() and int(d.min()) < 0:
        raise ValueError(f"delays must be >= 0, got {d.tolist()}")
    return d
