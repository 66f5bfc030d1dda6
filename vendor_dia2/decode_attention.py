"""The decoder's attention for one new frame per row, over the slots each row has filled.

A step attends one query per row over its KV cache. `F.scaled_dot_product_attention` runs it as
a prefill-shaped flash kernel: the single query is padded to a tile, and every row reads the whole
cache window (the bucket chosen for the batch's furthest row), masked. The H200 profiles put
SDPA at 3.4 ms of a 64-call frame and 13.5 ms of a 256-call one (docs/benchmarks.md, runs 13 and
15), for work that reads a few MB.

Here the attention of a decoding step is split over the cache (flash decoding):

1. `_partial_kernel`, one program per (row, KV head, chunk of `CHUNK` slots): the query heads of
   that KV head (grouped-query attention: query head h reads KV head h // group) against the
   chunk's keys, stopping at the row's last filled slot, so an unfilled chunk costs a load of the
   row's slot and nothing more. It keeps the running max, the sum of exponentials and the
   weighted values, in fp32, as flash attention does (the probabilities meet the values in bf16,
   on tensor cores, as in cuDNN's kernel).
2. `_combine_kernel`, one program per (row, query head): rescales the chunks to one max and sums.

Same math as SDPA with the causal mask `slot <= last` and scale 1 (the q/k norms stand in for
1/sqrt(Dh)); the results agree within bf16 rounding, not bit for bit (tests/test_decode_attention.py).
Only for one query per row (the decode step); a prefill keeps SDPA.
"""

from __future__ import annotations

import torch

from .kernels import INTERPRETED, available, tl, triton
from .model import causal_mask, kept_out_of_compile

__all__ = ["ENABLED", "CHUNK", "attend", "available", "attend_reference"]

# Read as a stepper is built (like `persistent_stage.ENABLED`): None follows the depformer kernels
# (on where the Triton kernels run), True/False force it. Off by default: on the H200, compiled
# CUDA graphs of the tiny checkpoint (fp32) drew other tokens than its eager steps with this kernel
# on (from step ~30, once four calls stepped again after one alone), though graphs alone and compile alone
# agree with eager; until that is understood, SDPA stays the default (docs/benchmarks.md, run 21).
ENABLED: bool | None = False

CHUNK = 128  # cache slots per program: 2 rows × 4 KV heads × 4 chunks of a 512-slot window = 32 programs
BLOCK = 64  # slots per product inside a chunk
GROUP_ROWS = 16  # the query heads of a KV head padded to a tensor-core tile (tl.dot needs >= 16 rows)
# Under Triton's interpreter (triton 3.6-3.9 here) `tl.dot` of bf16 tiles returns garbage; there the
# products run in fp32 (`F32_DOT`), on the GPU in bf16 on tensor cores.


def wanted(kernels: str, device: torch.device) -> bool:
    """Whether a stepper with these depformer kernels on this device takes this attention."""
    use = (kernels == "triton") if ENABLED is None else ENABLED
    return bool(use) and available(device)


if triton is not None:

    @triton.jit
    def _partial_kernel(q_ptr, k_ptr, v_ptr, last_ptr, m_ptr, l_ptr, acc_ptr,
                        stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                        stride_lb, splits, group,
                        DH: tl.constexpr, GP: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                        F32_DOT: tl.constexpr, BF16_P: tl.constexpr, PRECISION: tl.constexpr):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        last = tl.load(last_ptr + b * stride_lb)
        g = tl.arange(0, GP)
        d = tl.arange(0, DH)
        heads = kvh * group + g
        real = g < group
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=real[:, None], other=0.0)
        if F32_DOT:
            q = q.to(tl.float32)
        m = tl.full([GP], float("-inf"), tl.float32)
        l = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DH], tl.float32)
        start = split * CHUNK
        stop = tl.minimum(start + CHUNK, last + 1)
        k_base = k_ptr + b * stride_kb + kvh * stride_kh
        v_base = v_ptr + b * stride_vb + kvh * stride_vh
        # a static loop with a guard, not range(start, stop): the interpreter cannot run a loop
        # bounded by a loaded value, and a chunk has only CHUNK // BLOCK blocks
        for i in tl.static_range(CHUNK // BLOCK):
            n0 = start + i * BLOCK
            if n0 < stop:
                n = n0 + tl.arange(0, BLOCK)
                filled = n < stop
                k = tl.load(k_base + n[:, None] * stride_ks + d[None, :], mask=filled[:, None], other=0.0)
                v = tl.load(v_base + n[:, None] * stride_vs + d[None, :], mask=filled[:, None], other=0.0)
                if F32_DOT:
                    k, v = k.to(tl.float32), v.to(tl.float32)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [GP, BLOCK] fp32
                s = tl.where(filled[None, :], s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, axis=1))
                p = tl.exp(s - m_new[:, None])
                rescale = tl.exp(m - m_new)
                l = l * rescale + tl.sum(p, axis=1)
                if BF16_P:  # with bf16 values the probabilities meet them in bf16, as in SDPA's kernels
                    p = p.to(tl.bfloat16)
                acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
                m = m_new
        out = (b * splits + split) * (tl.num_programs(1) * group) + heads  # [B, splits, Hq] flattened
        tl.store(m_ptr + out, m, mask=real)
        tl.store(l_ptr + out, l, mask=real)
        tl.store(acc_ptr + out[:, None] * DH + d[None, :], acc, mask=real[:, None])

    @triton.jit
    def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, stride_ob, stride_oh, splits, hq,
                        DH: tl.constexpr, SP: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        j = tl.arange(0, SP)
        d = tl.arange(0, DH)
        used = j < splits
        at = (b * splits + j) * hq + h
        m = tl.load(m_ptr + at, mask=used, other=float("-inf"))
        l = tl.load(l_ptr + at, mask=used, other=0.0)
        acc = tl.load(acc_ptr + at[:, None] * DH + d[None, :], mask=used[:, None], other=0.0)
        top = tl.max(m, axis=0)
        # a chunk past the row's last slot ran no block: its max is -inf and it weighs 0
        weight = tl.where(m == float("-inf"), 0.0, tl.exp(m - top))
        total = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l * weight, axis=0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, total.to(out_ptr.dtype.element_ty))


@kept_out_of_compile
def attend(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, 1, Dh] over caches [B, Hkv, L, Dh] (views are fine: the last dim contiguous),
    row b over slots 0..last[b] → [B, Hq, 1, Dh] in q's dtype. Kept out of torch.compile: the
    decoder layer around it is compiled, the launch is not traced."""
    b, hq, t, dh = q.shape
    hkv, length = cache_k.shape[1], cache_k.shape[2]
    if t != 1:
        raise ValueError(f"decode attention takes one query per row, not {t}")
    if hq % hkv:
        raise ValueError(f"{hq} query heads do not group over {hkv} key/value heads")
    if cache_k.stride(-1) != 1 or cache_v.stride(-1) != 1:
        raise ValueError("decode attention needs the caches' head dimension contiguous")
    q = q if q.stride(-1) == 1 else q.contiguous()
    group = hq // hkv
    splits = triton.cdiv(length, CHUNK)
    m = torch.empty(b * splits * hq, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(b * splits * hq, dh, device=q.device, dtype=torch.float32)
    _partial_kernel[(b, hkv, splits)](q, cache_k, cache_v, last, m, l, acc,
                                      q.stride(0), q.stride(1), cache_k.stride(0), cache_k.stride(1),
                                      cache_k.stride(2), cache_v.stride(0), cache_v.stride(1), cache_v.stride(2),
                                      last.stride(0), splits, group,
                                      DH=dh, GP=max(GROUP_ROWS, triton.next_power_of_2(group)), CHUNK=CHUNK,
                                      BLOCK=BLOCK, F32_DOT=INTERPRETED, BF16_P=q.dtype == torch.bfloat16,
                                      # fp32 products in full precision, not TF32 (an fp32 model's tokens)
                                      PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    out = torch.empty(b, hq, 1, dh, device=q.device, dtype=q.dtype)
    _combine_kernel[(b, hq)](m, l, acc, out, out.stride(0), out.stride(1), splits, hq,
                             DH=dh, SP=max(2, triton.next_power_of_2(splits)))
    return out


def attend_reference(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                     last: torch.Tensor) -> torch.Tensor:
    """What `attend` computes, as the decoder layer's SDPA call with its causal mask (for tests)."""
    mask = causal_mask(last[:, None], cache_k.shape[2])
    return torch.nn.functional.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=mask, scale=1.0,
                                                            enable_gqa=q.shape[1] != cache_k.shape[1])
