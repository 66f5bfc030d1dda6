"""A whole depformer stage in one Triton launch: every layer, the logits, and no kernel boundary.

The five-launch layers of `kernels.py` leave a stage as 21 dependent launches (4 layers × 5 and
the logits); at 1-4 rows each reads a few MB and costs a few µs of launch and ramp however few
bytes it moves, so the 31 stages of a frame spend more time between kernels than reading
weights (docs/benchmarks.md, issue 24). Here one grid of at most one program per SM runs the
same phases in order,

    rms + in_proj → q/k norm, map, cache write, attention → out_proj + residual
    → rms + gated MLP in → MLP out + residual        (per layer)     → rms + logits

each phase spread over all programs (`for tile in range(pid, tiles, P)`), with a grid-wide
barrier between dependent phases instead of a kernel boundary. The residual stream and the
phases' small results (qkv, attention, the gated hidden rows) stay in scratch rows that live in
L2; each program reads the first weight tile of its next phase while it waits at the barrier,
and the next tile while it multiplies the current one.

The barrier is two counters in global memory per stage (`StageCounters`): arrive is a release
add, the wait spins on an acquire read until every program of the grid has arrived; the
counter only grows within a launch (barrier b waits for b × P), and the last program to leave
resets both counters to 0, after every program has passed its last wait, so the next launch
(stream-ordered, or under PDL after `griddepcontrol.wait`) starts from zero. The grid must be
resident all at once: at most one program per SM, 4 warps each. Loads of rows written inside
the launch bypass L1 (`.cg`), which is not coherent across SMs.

The products are the few-rows CUDA-core tiles of `kernels.py` (same helpers, the tile widths of
the active table, `kernels.CONFIGS`; 4 warps), so each phase rounds where the five-launch path does: qkv, the attention
output, x after each residual add, the gated hidden rows and the logits, each once to bf16.
Under Triton's interpreter (`TRITON_INTERPRET=1`) the grid is one program, whose barrier is
trivial: that is how the CPU checks it (tests/test_persistent_stage.py).

Measured on the H200 (docs/benchmarks.md, run 17): correct, the same greedy tokens as the five
launches, but slower: 201 µs a stage against ~107 µs of kernel time (one call's step 9.60 ms
against 6.86), because inside a program each phase is a chain of dependent latencies (barrier,
input rows from L2, one weight tile ahead) that the five-launch path overlaps across hundreds
of programs. So it stays behind `--persistent-stage` (off).
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import kernels
from .model import StageShape, StageWeights

triton, tl = kernels.triton, kernels.tl

# Whether the Triton depformer runs each stage as one persistent launch (`--persistent-stage`);
# read when a stepper's frame is built.
ENABLED = False
MAX_LAYERS = 4  # the kernel takes each layer's tensors as its own arguments
MAX_PROGRAMS = 128  # divides the phases' tile counts at the 2b shape (in_proj 384, out_proj 256, gated 1024, ...)
WARPS = 4  # as most of the five-launch path's few-rows tiles (in_proj and logits there take 8 on the H100 table)


if triton is not None:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    _weight_tile = kernels._weight_tile
    _tile_product = kernels._tile_product
    _activate = kernels._activate

    # -- the grid barrier -------------------------------------------------------------------

    @triton.jit
    def _arrive(counter_ptr):
        tl.debug_barrier()  # every thread's stores of this phase come before the program's arrival
        tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")

    @triton.jit
    def _wait(counter_ptr, target):
        while tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < target:
            pass
        tl.debug_barrier()

    @triton.jit
    def _leave(counter_ptr, P: tl.constexpr):
        """Count this program out; the last one out resets both counters for the next launch."""
        gone = tl.atomic_add(counter_ptr + 1, 1, sem="acq_rel", scope="gpu")
        if gone == P - 1:
            tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(counter_ptr + 1, 0, sem="release", scope="gpu")

    # -- rows written inside the launch ------------------------------------------------------

    @triton.jit
    def _src_tile(ptr, stride, emb_ptr, code_ptr, stride_e, rows, row_mask, cols, col_mask,
                  EMB: tl.constexpr, BR: tl.constexpr):
        """Rows of the stage's residual stream as fp32: x[rows, cols], or for the first layer with
        EMB, projected + embed[code of the row's call] rounded to bf16 (as the torch add does)."""
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0,
                    cache_modifier=".cg").to(tl.float32)
        if EMB:
            code = tl.load(code_ptr + rows // BR, mask=row_mask, other=0)
            e = tl.load(emb_ptr + code[:, None] * stride_e + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            x = _round_to_bf16(x + e)
        return x

    @triton.jit
    def _round_to_bf16(x):
        """fp32 → the nearest bf16 (ties to even), kept in fp32: what torch's bf16 add rounds to.
        By bits, because Triton's interpreter truncates a plain `.to(tl.bfloat16)` (the GPU
        rounds to nearest either way); the inputs are finite."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _src_rstd(ptr, stride, emb_ptr, code_ptr, stride_e, rows, row_mask, K: tl.constexpr, eps,
                  EMB: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
        cols = tl.arange(0, BK)
        total = tl.zeros([rows.shape[0]], dtype=tl.float32)
        for k0 in range(0, K, BK):
            x = _src_tile(ptr, stride, emb_ptr, code_ptr, stride_e, rows, row_mask, k0 + cols, (k0 + cols) < K,
                          EMB, BR)
            total += tl.sum(x * x, axis=1)
        return 1.0 / tl.sqrt(total / K + eps)

    @triton.jit
    def _src_normed(ptr, stride, emb_ptr, code_ptr, stride_e, norm_ptr, rows, row_mask, k0, K: tl.constexpr, rstd,
                    HAS_NORM: tl.constexpr, EMB: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
        cols = k0 + tl.arange(0, BK)
        col_mask = cols < K
        x = _src_tile(ptr, stride, emb_ptr, code_ptr, stride_e, rows, row_mask, cols, col_mask, EMB, BR)
        if HAS_NORM:
            w = tl.load(norm_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            x = x * rstd[:, None] * w[None, :]
        return x.to(tl.bfloat16)

    # -- the matrix phases --------------------------------------------------------------------

    @triton.jit
    def _first_tile(w_ptr, pid, N, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """The first weight tile this program multiplies in a phase (read before the barrier)."""
        cols_n = pid * BN + tl.arange(0, BN)
        return _weight_tile(w_ptr, K, cols_n, cols_n < N, 0, K, BK)

    @triton.jit
    def _linear_phase(w_next, pid, P: tl.constexpr, x_ptr, stride_x, x_emb_ptr, x_code_ptr, X_EMB: tl.constexpr,
                      r_ptr, stride_r, r_emb_ptr, r_code_ptr, R_EMB: tl.constexpr, stride_e,
                      w_ptr, norm_ptr, out_ptr, stride_o, M, N: tl.constexpr, eps, K: tl.constexpr,
                      HAS_NORM: tl.constexpr, HAS_RES: tl.constexpr, BR: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """out[:, tiles of this program] = norm(x) @ w.T (+ residual rows), `w_next` its first tile."""
        KC: tl.constexpr = (K + BK - 1) // BK
        rows = tl.arange(0, BM)
        row_mask = rows < M
        rstd = tl.zeros([BM], dtype=tl.float32)
        if HAS_NORM:
            rstd = _src_rstd(x_ptr, stride_x, x_emb_ptr, x_code_ptr, stride_e, rows, row_mask, K, eps, X_EMB, BR, BK)
        # every program runs the same count, known when compiled (the loop bound may not depend on
        # the program id); a program's tiles past the last are masked
        total: tl.constexpr = ((N + BN - 1) // BN + P - 1) // P * KC
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for i in range(0, total):
            t = pid + (i // KC) * P
            k0 = (i % KC) * BK
            w = w_next
            j = i + 1  # the next tile (or K chunk), read while this one is multiplied
            cols_j = (pid + (j // KC) * P) * BN + tl.arange(0, BN)
            w_next = _weight_tile(w_ptr, K, cols_j, (cols_j < N) & (j < total), (j % KC) * BK, K, BK)
            x = _src_normed(x_ptr, stride_x, x_emb_ptr, x_code_ptr, stride_e, norm_ptr, rows, row_mask, k0, K, rstd,
                            HAS_NORM, X_EMB, BR, BK)
            acc = _tile_product(x, w, acc, False, False)
            if i % KC == KC - 1:
                cols_n = t * BN + tl.arange(0, BN)
                n_mask = cols_n < N
                if HAS_RES:
                    acc += _src_tile(r_ptr, stride_r, r_emb_ptr, r_code_ptr, stride_e, rows, row_mask, cols_n, n_mask,
                                     R_EMB, BR)
                tl.store(out_ptr + rows[:, None] * stride_o + cols_n[None, :], acc.to(out_ptr.dtype.element_ty),
                         mask=row_mask[:, None] & n_mask[None, :])
                acc = tl.zeros([BM, BN], dtype=tl.float32)

    @triton.jit
    def _gated_phase(gate_next, up_next, pid, P: tl.constexpr, x_ptr, w_ptr, norm_ptr, out_ptr, M, eps, K: tl.constexpr,
                     HIDDEN: tl.constexpr, ACT0: tl.constexpr, ACT1: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """out[:, tiles] = act0(gate) * act1(up), [gate | up] = norm(x) @ w.T (x [M, K] rows contiguous)."""
        KC: tl.constexpr = (K + BK - 1) // BK
        rows = tl.arange(0, BM)
        row_mask = rows < M
        rstd = _src_rstd(x_ptr, K, x_ptr, x_ptr, 0, rows, row_mask, K, eps, False, 1, BK)
        total: tl.constexpr = ((HIDDEN + BN - 1) // BN + P - 1) // P * KC  # as in _linear_phase
        gate = tl.zeros([BM, BN], dtype=tl.float32)
        up = tl.zeros([BM, BN], dtype=tl.float32)
        for i in range(0, total):
            t = pid + (i // KC) * P
            k0 = (i % KC) * BK
            w_gate, w_up = gate_next, up_next
            j = i + 1
            cols_j = (pid + (j // KC) * P) * BN + tl.arange(0, BN)
            mask_j = (cols_j < HIDDEN) & (j < total)
            gate_next = _weight_tile(w_ptr, K, cols_j, mask_j, (j % KC) * BK, K, BK)
            up_next = _weight_tile(w_ptr, K, cols_j + HIDDEN, mask_j, (j % KC) * BK, K, BK)
            x = _src_normed(x_ptr, K, x_ptr, x_ptr, 0, norm_ptr, rows, row_mask, k0, K, rstd, True, False, 1, BK)
            gate = _tile_product(x, w_gate, gate, False, False)
            up = _tile_product(x, w_up, up, False, False)
            if i % KC == KC - 1:
                cols_n = t * BN + tl.arange(0, BN)
                # the eager path rounds gate and up to bf16 before the activation: so do we
                g = gate.to(tl.bfloat16).to(tl.float32)
                u = up.to(tl.bfloat16).to(tl.float32)
                h = _activate(g, ACT0) * _activate(u, ACT1)
                tl.store(out_ptr + rows[:, None] * HIDDEN + cols_n[None, :], h.to(out_ptr.dtype.element_ty),
                         mask=row_mask[:, None] & (cols_n < HIDDEN)[None, :])
                gate = tl.zeros([BM, BN], dtype=tl.float32)
                up = tl.zeros([BM, BN], dtype=tl.float32)

    # -- the attention phase ------------------------------------------------------------------

    @triton.jit
    def _attention_phase(pid, P: tl.constexpr, qkv_ptr, map_ptr, ck_ptr, cv_ptr, out_ptr, M, slot, stride_cr, stride_ch, eps,
                         H: tl.constexpr, DH: tl.constexpr, SP: tl.constexpr, BM: tl.constexpr):
        """Each (row, head) of the stage's attention, as `kernels._stage_attention_kernel` does one."""
        d = tl.arange(0, DH)
        j = tl.arange(0, SP)
        for task0 in range(0, BM * H, P):
            task = task0 + pid
            ok = task < M * H  # the loop bound may not depend on the program id: the last round is masked
            r = task // H
            h = task % H
            q_map = tl.load(map_ptr + d[:, None] * DH + d[None, :], mask=ok, other=0.0).to(tl.float32)
            k_map = tl.load(map_ptr + DH * DH + d[:, None] * DH + d[None, :], mask=ok, other=0.0).to(tl.float32)
            base = qkv_ptr + r * (3 * H * DH) + h * DH
            q = tl.load(base + d, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
            k = tl.load(base + H * DH + d, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
            v = tl.load(base + 2 * H * DH + d, mask=ok, other=0.0, cache_modifier=".cg")
            q = (q / tl.sqrt(tl.sum(q * q, axis=0) / DH + eps)).to(tl.bfloat16).to(tl.float32)
            k = (k / tl.sqrt(tl.sum(k * k, axis=0) / DH + eps)).to(tl.bfloat16).to(tl.float32)
            q = tl.sum(q[:, None] * q_map, axis=0).to(tl.bfloat16).to(tl.float32)
            k = tl.sum(k[:, None] * k_map, axis=0).to(tl.bfloat16)
            cache = r * stride_cr + h * stride_ch
            tl.store(ck_ptr + cache + slot * DH + d, k, mask=ok)
            tl.store(cv_ptr + cache + slot * DH + d, v, mask=ok)
            earlier = ((j < slot) & ok)[:, None]
            keys = tl.load(ck_ptr + cache + j[:, None] * DH + d[None, :], mask=earlier, other=0.0,
                           cache_modifier=".cg").to(tl.float32)
            values = tl.load(cv_ptr + cache + j[:, None] * DH + d[None, :], mask=earlier, other=0.0,
                             cache_modifier=".cg").to(tl.float32)
            this = (j == slot)[:, None]
            keys = tl.where(this, k.to(tl.float32)[None, :], keys)
            values = tl.where(this, v.to(tl.float32)[None, :], values)
            scores = tl.sum(keys * q[None, :], axis=1)
            scores = tl.where(j <= slot, scores, float("-inf"))
            p = tl.exp(scores - tl.max(scores, axis=0))
            p = p / tl.sum(p, axis=0)
            att = tl.sum(p[:, None] * values, axis=0)
            tl.store(out_ptr + r * (H * DH) + h * DH + d, att.to(out_ptr.dtype.element_ty), mask=ok)

    # -- one layer, then the stage ------------------------------------------------------------

    @triton.jit
    def _layer(w, pid, P: tl.constexpr, counter_ptr, first_barrier, x_ptr, stride_x, emb_ptr, code_ptr, stride_e, EMB: tl.constexpr,
               xbuf_ptr, qkv_ptr, att_ptr, h_ptr,
               pre_norm, in_proj, qk_map, out_proj, post_norm, wi, wo, ck, cv,
               M, slot, stride_cr, stride_ch, eps, D: tl.constexpr, H: tl.constexpr, DH: tl.constexpr,
               HIDDEN: tl.constexpr, ACT0: tl.constexpr, ACT1: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr,
               BK_D: tl.constexpr, BK_HD: tl.constexpr, BK_HID: tl.constexpr, SP: tl.constexpr,
               BN_IN: tl.constexpr, BN_OUT: tl.constexpr, BN_GATE: tl.constexpr, BN_MLP: tl.constexpr,
               WAIT_FIRST: tl.constexpr):
        """One depformer layer: x (the stage's input rows when EMB, else xbuf) → xbuf, five phases
        and four barriers inside (five with WAIT_FIRST: the one after the last layer's MLP). `w`:
        this program's first in_proj tile, read before the wait."""
        QKV: tl.constexpr = 3 * H * DH
        if WAIT_FIRST:
            _wait(counter_ptr, first_barrier * P)
        _linear_phase(w, pid, P, x_ptr, stride_x, emb_ptr, code_ptr, EMB, x_ptr, stride_x, emb_ptr, code_ptr, False,
                      stride_e, in_proj, pre_norm, qkv_ptr, QKV, M, QKV, eps, D, True, False, BR, BM, BN_IN, BK_D)
        _arrive(counter_ptr)
        _wait(counter_ptr, (first_barrier + 1) * P)
        _attention_phase(pid, P, qkv_ptr, qk_map, ck, cv, att_ptr, M, slot, stride_cr, stride_ch, eps, H, DH, SP, BM)
        _arrive(counter_ptr)
        w = _first_tile(out_proj, pid, D, H * DH, BN_OUT, BK_HD)
        _wait(counter_ptr, (first_barrier + 2) * P)
        _linear_phase(w, pid, P, att_ptr, H * DH, att_ptr, att_ptr, False, x_ptr, stride_x, emb_ptr, code_ptr, EMB,
                      stride_e, out_proj, out_proj, xbuf_ptr, D, M, D, eps, H * DH, False, True, BR, BM, BN_OUT, BK_HD)
        _arrive(counter_ptr)
        gate0 = _first_tile(wi, pid, HIDDEN, D, BN_GATE, BK_D)
        up0 = _first_tile(wi + HIDDEN * D, pid, HIDDEN, D, BN_GATE, BK_D)
        _wait(counter_ptr, (first_barrier + 3) * P)
        _gated_phase(gate0, up0, pid, P, xbuf_ptr, wi, post_norm, h_ptr, M, eps, D, HIDDEN, ACT0, ACT1, BM, BN_GATE,
                     BK_D)
        _arrive(counter_ptr)
        w = _first_tile(wo, pid, D, HIDDEN, BN_MLP, BK_HID)
        _wait(counter_ptr, (first_barrier + 4) * P)
        _linear_phase(w, pid, P, h_ptr, HIDDEN, h_ptr, h_ptr, False, xbuf_ptr, D, xbuf_ptr, xbuf_ptr, False,
                      stride_e, wo, wo, xbuf_ptr, D, M, D, eps, HIDDEN, False, True, BR, BM, BN_MLP, BK_HID)
        _arrive(counter_ptr)

    # one compiled kernel for every stage and row count: the slot (0 and 16 are multiples of 16)
    # and the rows are not specialised on
    @triton.jit(do_not_specialize=["M", "slot"])
    def _stage_kernel(x_ptr, stride_x, emb_ptr, code_ptr, stride_e, xbuf_ptr, qkv_ptr, att_ptr, h_ptr, out_ptr,
                      counter_ptr,
                      pn0, ip0, qm0, op0, po0, wi0, wo0, ck0, cv0,
                      pn1, ip1, qm1, op1, po1, wi1, wo1, ck1, cv1,
                      pn2, ip2, qm2, op2, po2, wi2, wo2, ck2, cv2,
                      pn3, ip3, qm3, op3, po3, wi3, wo3, ck3, cv3,
                      norm_ptr, logits_ptr, M, slot, stride_cr, stride_ch, eps, P: tl.constexpr,
                      D: tl.constexpr, H: tl.constexpr, DH: tl.constexpr, HIDDEN: tl.constexpr, V: tl.constexpr,
                      LAYERS: tl.constexpr, EMB: tl.constexpr, BR: tl.constexpr, ACT0: tl.constexpr,
                      ACT1: tl.constexpr, BM: tl.constexpr, BK_D: tl.constexpr, BK_HD: tl.constexpr,
                      BK_HID: tl.constexpr, SP: tl.constexpr, BN_IN: tl.constexpr, BN_OUT: tl.constexpr,
                      BN_GATE: tl.constexpr, BN_MLP: tl.constexpr, BN_LOGITS: tl.constexpr, PDL: tl.constexpr):
        """The stage: logits [M, V] of its input rows (x, or with EMB projected + embed[code]);
        writes each layer's keys and values at cache slot `slot`."""
        pid = tl.program_id(0)  # of P, the grid
        QKV: tl.constexpr = 3 * H * DH
        w = _first_tile(ip0, pid, QKV, D, BN_IN, BK_D)  # weights only: read while the kernel before ends
        if PDL:
            gdc_wait()  # the input rows (and the counters) are the kernel before's
            gdc_launch_dependents()
        _layer(w, pid, P, counter_ptr, 0, x_ptr, stride_x, emb_ptr, code_ptr, stride_e, EMB, xbuf_ptr, qkv_ptr, att_ptr,
               h_ptr, pn0, ip0, qm0, op0, po0, wi0, wo0, ck0, cv0, M, slot, stride_cr, stride_ch, eps, D, H, DH,
               HIDDEN, ACT0, ACT1, BR, BM, BK_D, BK_HD, BK_HID, SP, BN_IN, BN_OUT, BN_GATE, BN_MLP, False)
        if LAYERS > 1:
            w = _first_tile(ip1, pid, QKV, D, BN_IN, BK_D)
            _layer(w, pid, P, counter_ptr, 5, xbuf_ptr, D, emb_ptr, code_ptr, stride_e, False, xbuf_ptr, qkv_ptr,
                   att_ptr, h_ptr, pn1, ip1, qm1, op1, po1, wi1, wo1, ck1, cv1, M, slot, stride_cr, stride_ch, eps,
                   D, H, DH, HIDDEN, ACT0, ACT1, BR, BM, BK_D, BK_HD, BK_HID, SP, BN_IN, BN_OUT, BN_GATE, BN_MLP,
                   True)
        if LAYERS > 2:
            w = _first_tile(ip2, pid, QKV, D, BN_IN, BK_D)
            _layer(w, pid, P, counter_ptr, 10, xbuf_ptr, D, emb_ptr, code_ptr, stride_e, False, xbuf_ptr, qkv_ptr,
                   att_ptr, h_ptr, pn2, ip2, qm2, op2, po2, wi2, wo2, ck2, cv2, M, slot, stride_cr, stride_ch, eps,
                   D, H, DH, HIDDEN, ACT0, ACT1, BR, BM, BK_D, BK_HD, BK_HID, SP, BN_IN, BN_OUT, BN_GATE, BN_MLP,
                   True)
        if LAYERS > 3:
            w = _first_tile(ip3, pid, QKV, D, BN_IN, BK_D)
            _layer(w, pid, P, counter_ptr, 15, xbuf_ptr, D, emb_ptr, code_ptr, stride_e, False, xbuf_ptr, qkv_ptr,
                   att_ptr, h_ptr, pn3, ip3, qm3, op3, po3, wi3, wo3, ck3, cv3, M, slot, stride_cr, stride_ch, eps,
                   D, H, DH, HIDDEN, ACT0, ACT1, BR, BM, BK_D, BK_HD, BK_HID, SP, BN_IN, BN_OUT, BN_GATE, BN_MLP,
                   True)
        w = _first_tile(logits_ptr, pid, V, D, BN_LOGITS, BK_D)
        _wait(counter_ptr, (5 * LAYERS) * P)
        _linear_phase(w, pid, P, xbuf_ptr, D, xbuf_ptr, xbuf_ptr, False, xbuf_ptr, D, xbuf_ptr, xbuf_ptr, False,
                      stride_e, logits_ptr, norm_ptr, out_ptr, V, M, V, eps, D, True, False, BR, BM, BN_LOGITS, BK_D)
        _leave(counter_ptr, P)


class StageCounters:
    """The grid barriers' counters of a stepper's persistent stages: two int32 per stage (arrivals
    and departures), zero between launches; one set per frame, so stages that could overlap under
    programmatic dependent launch never share one."""

    def __init__(self, stages: int, device: torch.device):
        self.counts = torch.zeros(stages, 2, dtype=torch.int32, device=device)

    def of(self, stage: int) -> torch.Tensor:
        return self.counts[stage]


def supported(stage: StageWeights, rows: int) -> bool:
    """Whether a stage can run as one launch: bf16 weights, at most MAX_LAYERS layers, few rows."""
    return (rows <= kernels.FUSED_MAX_ROWS and len(stage.layers) <= MAX_LAYERS
            and not isinstance(stage.logits, kernels.QuantWeight)
            and not any(isinstance(l.in_proj, kernels.QuantWeight) for l in stage.layers))


def programs(device: torch.device) -> int:
    """The grid: one program under the interpreter (its barrier is then trivial), else one per SM
    up to MAX_PROGRAMS, so that every program is resident at once."""
    if kernels.INTERPRETED:
        return 1
    return min(MAX_PROGRAMS, torch.cuda.get_device_properties(device).multi_processor_count)


def stage_logits(x: torch.Tensor, stage: StageWeights, caches: Sequence, shape: StageShape, *, index: int,
                 counters: torch.Tensor, code: torch.Tensor | None = None, branches: int = 1,
                 grid: int | None = None) -> torch.Tensor:
    """`model.depformer_stage_logits_fused` in one launch: logits [R, real codes] bf16 of a
    stage's input rows, x [R, Dd] itself or, with `code` [R / branches], x + embed[code] on each
    of a call's branches (`model.depformer_stage_fused`'s input, without its three launches).
    Writes each layer's keys and values at cache slot `index`. `counters`: this stage's two
    zeroed int32 (`StageCounters.of`)."""
    m, d = x.shape
    layers = stage.layers
    assert len(layers) <= MAX_LAYERS and x.stride(1) == 1
    h, dh, hidden, v = shape.heads, shape.head_dim, shape.hidden, shape.real_codes
    dev, dt = x.device, x.dtype
    xbuf = torch.empty(m, d, device=dev, dtype=dt)
    qkv = torch.empty(m, 3 * h * dh, device=dev, dtype=dt)
    att = torch.empty(m, h * dh, device=dev, dtype=dt)
    hid = torch.empty(m, hidden, device=dev, dtype=dt)
    out = torch.empty(m, v, device=dev, dtype=dt)
    cache_k0 = caches[0][0]
    stride_cr, stride_ch = cache_k0.stride(0), cache_k0.stride(1)
    per_layer = []
    for i in range(MAX_LAYERS):
        l, (ck, cv) = (layers[i], caches[i]) if i < len(layers) else (layers[0], caches[0])  # unused when absent
        assert ck.stride(0) == stride_cr and ck.stride(1) == stride_ch and ck.stride(3) == 1 and cv.stride() == ck.stride()
        for w in (l.in_proj, l.out_proj, l.wi, l.wo):
            assert w.is_contiguous()
        per_layer += [l.pre_norm, l.in_proj, l.qk_map, l.out_proj, l.post_norm, l.wi, l.wo, ck, cv]
    emb = code is not None
    pdl = kernels.pdl_enabled()
    opts = {} if kernels.INTERPRETED else dict(num_warps=WARPS, num_stages=1, launch_pdl=pdl)
    tiles = {kind: kernels._config(kind, m) for kind in ("in_proj", "out_proj", "gated", "mlp_out", "logits")}
    # the five-launch path's K tile of the same product (one per phase: the phases share a weight tile loader)
    bk = lambda k, kind: min(tiles[kind].bk, triton.next_power_of_2(k))  # noqa: E731
    p = grid or programs(dev)
    _stage_kernel[(p,)](x, x.stride(0), stage.embed, code if emb else x, stage.embed.stride(0), xbuf, qkv, att, hid,
                        out, counters, *per_layer, stage.norm, stage.logits, m, index, stride_cr, stride_ch,
                        shape.eps, P=p, D=d, H=h, DH=dh, HIDDEN=hidden, V=v, LAYERS=len(layers), EMB=emb, BR=branches,
                        ACT0=kernels._ACTIVATIONS[shape.activations[0]],
                        ACT1=kernels._ACTIVATIONS[shape.activations[1]], BM=triton.next_power_of_2(m),
                        BK_D=bk(d, "in_proj"), BK_HD=bk(h * dh, "out_proj"), BK_HID=bk(hidden, "mlp_out"),
                        SP=triton.next_power_of_2(cache_k0.shape[2]), BN_IN=tiles["in_proj"].bn,
                        BN_OUT=tiles["out_proj"].bn, BN_GATE=tiles["gated"].bn, BN_MLP=tiles["mlp_out"].bn,
                        BN_LOGITS=tiles["logits"].bn,
                        PDL=pdl, **opts)
    return out
