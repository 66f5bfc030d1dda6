"""One draw per call in one Triton launch: CFG guidance, the top-k filter and the draw, with no sort.

`runtime.pick` reaches its token through a dozen launches (lerp, a radix-select top-k that sorts
its output, a gather, a second sort by the conditional logits, the draw's argmax, the teacher
forcing); in a frame that is 33 draws, 0.66 ms of the H100's 7.5 ms step (docs/benchmarks.md).
Here one program per call does the same arithmetic over the logits row(s):

1. guided = lerp(uncond, cond, scale) with CFG (torch.lerp's formula), else the logits;
2. the k-th largest guided value by a bisection over order-preserving 32-bit keys, SELECT_BITS
   bits a pass (a threshold select: 32 / SELECT_BITS rounds of counts over the row, no sort),
   k = the CFG filter or the stream's top-k; ties at the threshold go to the lower ids, the
   sorted path's rule (`sampling.top_candidates`);
3. the candidates (at most `KP`) compacted in id order through a small scratch row, each ranked
   by (conditional logit desc, guided desc, id asc): the order the sorted path's two stable
   sorts leave them in;
4. score = logit * inverse temperature + noise[rank] (the frame's counter-based Gumbel noise,
   `sampling.draw_noise`, so a seeded draw takes the same token), argmax with the lowest rank
   winning ties; teacher-forced rows take the known code.

With `next_embed` the kernel also writes the next depformer stage's input rows
(`projected + embed[code]` on both CFG branches), which the stage would otherwise spend three
launches on. Tokens equal `runtime.pick`'s, ties included (bf16 logits tie at the top in about
one draw in fifty): tests/test_fused_pick.py (with whole frames after the torch depformer), and
whole frames on the GPU in tests/test_fused_frame.py.
"""

from __future__ import annotations

import torch

from . import kernels

triton, tl = kernels.triton, kernels.tl

# Rows of candidates ranked against each other per step of the pairwise count (registers).
RANK_CHUNK = 64
# Warps per draw (by CFG) and bits of the threshold decided per counting pass (1, 2 or 4: 32 /
# SELECT_BITS dependent block reductions a draw, each of 2^SELECT_BITS counts). Measured on the
# H200 (docs/bench/run15-h200/pick.log: the draw alone in a CUDA graph, µs at 1 / 64 calls with
# CFG, and 1 call without; the sorted path 39.7 / 59.7 and 47.7):
#   4 warps, 1 bit 17.2 / 17.8 and 139; 4 warps, 4 bits 39.6 / 40.4 and 186 (spilled counts);
#   8 warps, 1 bit 14.3 / 14.6 and 22.7; 8 warps, 2 bits 11.5 / 11.8 and 19.9; 8 warps, 4 bits
#   15.0 / 15.2 and 27.1.
# Without CFG the pairwise rank of up to 256 candidates needs the 8 warps' registers.
PICK_WARPS = {True: 8, False: 8}
SELECT_BITS = 2

if triton is not None:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def _order_key(x):
        """fp32 → uint32 whose unsigned order is the float order (NaN above +inf, as torch's top-k)."""
        bits = x.to(tl.uint32, bitcast=True)
        flip = tl.where((bits >> 31) != 0, tl.full(bits.shape, 0xFFFFFFFF, tl.uint32),
                        tl.full(bits.shape, 0x80000000, tl.uint32))
        return bits ^ flip

    @triton.jit
    def _pick_kernel(logits_ptr, stride_l, V, scale_ptr, inv_temp_ptr, stride_it, noise_ptr, stride_nn, noise_width,
                     top_k_ptr, stride_tk, forced_ptr, stride_f, known_ptr, stride_kn, out_ptr, scratch_ptr,
                     proj_ptr, stride_p, embed_ptr, stride_e, x_next_ptr, stride_x,
                     banned0, banned1, filter_k,
                     CFG: tl.constexpr, BR: tl.constexpr, DIGIT: tl.constexpr, HAS_FORCED: tl.constexpr,
                     HAS_NEXT: tl.constexpr, PDL: tl.constexpr,
                     VB: tl.constexpr, KP: tl.constexpr, CHUNK: tl.constexpr, D: tl.constexpr, DB: tl.constexpr):
        n = tl.program_id(0)
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        offs = tl.arange(0, VB)
        valid = offs < V
        cond = tl.load(logits_ptr + (n * BR) * stride_l + offs, mask=valid, other=float("-inf")).to(tl.float32)
        if CFG:
            uncond = tl.load(logits_ptr + (n * BR + 1) * stride_l + offs, mask=valid, other=float("-inf")).to(tl.float32)
            w = tl.load(scale_ptr + n)
            diff = cond - uncond
            # torch.lerp(uncond, cond, w), both of its branches
            guided = tl.where(tl.abs(w) < 0.5, uncond + w * diff, cond - diff * (1.0 - w))
            k = tl.minimum(filter_k, V)
        else:
            # plain top-k: banned ids are set to the lowest float before the selection
            guided = tl.where((offs == banned0) | (offs == banned1), -3.4028234663852886e38, cond)
            k = tl.minimum(tl.load(top_k_ptr + n * stride_tk).to(tl.int32), V)
        key = _order_key(guided)
        # the k-th largest key: the largest t with at least k keys >= t, DIGIT bits at a time (each
        # pass counts the keys above all 2^DIGIT trial values at once: one reduction, not DIGIT)
        t = tl.zeros([], dtype=tl.uint32)
        digit = tl.arange(0, 1 << DIGIT).to(tl.uint32)
        for i in tl.static_range(32 // DIGIT):
            trial = t | (digit << (32 - DIGIT * (i + 1)))  # [2^DIGIT], non-decreasing
            counts = tl.sum(((key[:, None] >= trial[None, :]) & valid[:, None]).to(tl.int32), axis=0)
            # counts do not increase with the digit, and digit 0 (t itself) always has k keys
            t = tl.max(tl.where(counts >= k, trial, t), axis=0)
        above = valid & (key > t)
        tied = valid & (key == t)
        need = k - tl.sum(above.to(tl.int32), axis=0)
        chosen = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= need))
        # compact the candidates, in id order, into this program's scratch row
        slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
        tl.store(scratch_ptr + n * KP + slot, offs, mask=chosen)
        tl.debug_barrier()
        c = tl.arange(0, KP)
        c_valid = c < k
        c_id = tl.load(scratch_ptr + n * KP + c, mask=c_valid, other=0)
        c_cond = tl.load(logits_ptr + (n * BR) * stride_l + c_id, mask=c_valid, other=0.0).to(tl.float32)
        if CFG:
            c_unc = tl.load(logits_ptr + (n * BR + 1) * stride_l + c_id, mask=c_valid, other=0.0).to(tl.float32)
            c_diff = c_cond - c_unc
            c_guided = tl.where(tl.abs(w) < 0.5, c_unc + w * c_diff, c_cond - c_diff * (1.0 - w))
            # with CFG the banned ids are dropped after the candidates are chosen
            c_cond = tl.where((c_id == banned0) | (c_id == banned1), float("-inf"), c_cond)
        else:
            c_cond = tl.where((c_id == banned0) | (c_id == banned1), -3.4028234663852886e38, c_cond)
            c_guided = c_cond
        c_cond = tl.where(c_cond != c_cond, float("-inf"), c_cond)  # NaN ranks last and never wins
        c_key = _order_key(c_cond)
        g_key = _order_key(c_guided)
        rank = tl.zeros([KP], dtype=tl.int32)
        for j0 in tl.static_range(0, KP, CHUNK):
            o = j0 + tl.arange(0, CHUNK)
            o_valid = o < k
            o_id = tl.load(scratch_ptr + n * KP + o, mask=o_valid, other=0)
            o_cond = tl.load(logits_ptr + (n * BR) * stride_l + o_id, mask=o_valid, other=0.0).to(tl.float32)
            if CFG:
                o_unc = tl.load(logits_ptr + (n * BR + 1) * stride_l + o_id, mask=o_valid, other=0.0).to(tl.float32)
                o_diff = o_cond - o_unc
                o_guided = tl.where(tl.abs(w) < 0.5, o_unc + w * o_diff, o_cond - o_diff * (1.0 - w))
                o_cond = tl.where((o_id == banned0) | (o_id == banned1), float("-inf"), o_cond)
            else:
                o_cond = tl.where((o_id == banned0) | (o_id == banned1), -3.4028234663852886e38, o_cond)
                o_guided = o_cond
            o_cond = tl.where(o_cond != o_cond, float("-inf"), o_cond)
            o_key = _order_key(o_cond)
            og_key = _order_key(o_guided)
            better = (o_key[None, :] > c_key[:, None]) | ((o_key[None, :] == c_key[:, None]) & (
                (og_key[None, :] > g_key[:, None]) | ((og_key[None, :] == g_key[:, None]) & (o_id[None, :] < c_id[:, None]))))
            rank += tl.sum((better & o_valid[None, :]).to(tl.int32), axis=1)
        inv_t = tl.load(inv_temp_ptr + n * stride_it)
        noise = tl.load(noise_ptr + n * stride_nn + rank, mask=c_valid & (rank < noise_width), other=float("-inf"))
        score = tl.where(c_valid, c_cond * inv_t + noise, float("-inf"))
        best = tl.max(score, axis=0)
        win_rank = tl.min(tl.where(score == best, rank, KP), axis=0)
        code = tl.sum(tl.where(c_valid & (rank == win_rank), c_id, 0), axis=0).to(tl.int64)
        if HAS_FORCED:
            forced = tl.load(forced_ptr + n * stride_f) != 0
            code = tl.where(forced, tl.load(known_ptr + n * stride_kn), code)
        tl.store(out_ptr + n, code)
        if HAS_NEXT:
            d = tl.arange(0, DB)
            for b in tl.static_range(BR):
                for d0 in range(0, D, DB):
                    dm = (d0 + d) < D
                    p = tl.load(proj_ptr + (n * BR + b) * stride_p + d0 + d, mask=dm, other=0.0).to(tl.float32)
                    e = tl.load(embed_ptr + code * stride_e + d0 + d, mask=dm, other=0.0).to(tl.float32)
                    tl.store(x_next_ptr + (n * BR + b) * stride_x + d0 + d, (p + e).to(x_next_ptr.dtype.element_ty),
                             mask=dm)


def pick(logits: torch.Tensor, inv_temp: torch.Tensor, noise: torch.Tensor, cfg_scale: torch.Tensor,
         top_k: torch.Tensor, *, branches: int, filter_k: int, banned: tuple[int, ...] = (),
         forced: torch.Tensor | None = None, known: torch.Tensor | None = None,
         next_embed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """`runtime.pick` (then `torch.where(forced, known, code)`) in one launch: codes [N] int64.

    logits [N * branches, V] (any float dtype, rows [call, branch]); inv_temp [N]; noise [N, W]
    from `sampling.draw_noise`; cfg_scale [N]; top_k [N] (the stream's; read without CFG, where
    it bounds the candidates, as the noise's -inf lanes do). `next_embed` = (projected [R, D],
    embed table [A, D], x_next [R, D]): also write x_next = projected + embed[code] per row."""
    if len(banned) > 2:
        raise ValueError("the fused pick bans at most two ids")
    rows, v = logits.shape
    n = rows // branches
    if out is None:
        out = torch.empty(n, device=logits.device, dtype=torch.long)
    cap = filter_k if branches == 2 else noise.shape[1]
    kp = max(RANK_CHUNK, triton.next_power_of_2(cap))
    scratch = torch.empty(n, kp, device=logits.device, dtype=torch.int32)
    b0, b1 = (tuple(banned) + (-1, -1))[:2]
    dummy = out
    proj, table, x_next = next_embed if next_embed is not None else (logits, logits, logits)
    d = proj.shape[1] if next_embed is not None else 1
    # no fused multiply-add: the draw's `logit * inverse temperature + noise` rounds twice, as eager torch does
    opts = {} if kernels.INTERPRETED else dict(num_warps=PICK_WARPS[branches == 2], launch_pdl=kernels.pdl_enabled(),
                                               enable_fp_fusion=False)
    _pick_kernel[(n,)](logits, logits.stride(0), v, cfg_scale, inv_temp, inv_temp.stride(0), noise, noise.stride(0),
                       noise.shape[1], top_k, top_k.stride(0),
                       forced if forced is not None else dummy, forced.stride(0) if forced is not None else 0,
                       known if known is not None else dummy, known.stride(0) if known is not None else 0,
                       out, scratch, proj, proj.stride(0), table, table.stride(0), x_next, x_next.stride(0),
                       b0, b1, filter_k, CFG=branches == 2, BR=branches, DIGIT=SELECT_BITS,
                       HAS_FORCED=forced is not None,
                       HAS_NEXT=next_embed is not None, PDL=kernels.pdl_enabled(),
                       VB=triton.next_power_of_2(v), KP=kp, CHUNK=RANK_CHUNK, D=d,
                       DB=min(1024, triton.next_power_of_2(d)), **opts)
    return out
