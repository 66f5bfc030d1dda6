"""Triton kernels for the depformer stage on CUDA: fewer launches, each weight read once.

The eager depformer (`model.depformer_stage`) spends a frame in ~70 launches per stage, most of
them GEMVs at M = 2 rows that reach half the memory bandwidth, an SDPA over 31 slots and the
elementwise glue between them (docs/benchmarks.md, profile). Here a depformer layer is five
launches:

    rms + in_proj  →  q/k norm + RoPE map + cache write + attention over the stage's slots
    →  out_proj + residual  →  rms + gated MLP in (gate and up in one pass)  →  MLP out + residual

Each matrix kernel streams its weight tile once per row block, with the RMSNorm of its input
folded into the prologue and the residual add, or the gate activation, into the epilogue.
Accumulation is fp32; outputs are rounded once (the eager path rounds after every op), so the
two agree within bf16 tolerance, not bit for bit (tests/test_kernels.py).

On Hopper and later every kernel here (and the fused draw, `fused_pick.py`) launches with
programmatic dependent launch (`PDL`, `--pdl`): it may start while the kernel before it ends,
reads its first weight tile, then waits (`griddepcontrol.wait`) before it reads anything that
kernel wrote, and lets the next one start at once. A stage of the Triton path is then a chain of
Triton launches only, the draw writing the next stage's input.

Weights may be bf16, or FP8 e4m3 with one fp32 scale per output row (`QuantWeight`,
`--weights fp8`): the kernel widens each tile to bf16 as it loads it, halving the bytes.

The CPU path never comes here. Without a GPU the kernels still run under Triton's interpreter
(`TRITON_INTERPRET=1`), which is how the CPU machine checks them.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

try:  # Triton ships with CUDA builds of torch; the CPU wheel has none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

FP8_MAX = 448.0  # largest finite float8 e4m3fn
# Triton decides interpreter or compiler when it decorates the kernels, at import: so do we.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


# Programmatic dependent launch (Hopper and later): each kernel is launched so that it may start
# while the one before it finishes, reads its weights, then waits for that kernel's results
# (griddepcontrol.wait). None: on where the GPU and Triton support it (`pdl_enabled`).
PDL: bool | None = None


def pdl_enabled() -> bool:
    """Whether the kernels launch with programmatic dependent launch (never under the interpreter)."""
    if INTERPRETED or triton is None:
        return False
    if PDL is not None:
        return PDL
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def available(device: torch.device | str) -> bool:
    """Whether the fused kernels can run for tensors on `device`."""
    if triton is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return torch.device(device).type == "cuda"


class QuantWeight(NamedTuple):
    """A weight `[N, K]` in float8 e4m3 with one fp32 scale per output row: w ≈ q * scale[:, None]."""

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> "QuantWeight":
        w = weight.float()
        scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_min(1e-12)
        return cls((w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale.contiguous())

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return (self.q.float() * self.scale[:, None]).to(dtype)


def _split(weight) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(weight, QuantWeight):
        return weight.q, weight.scale
    return weight, None


if triton is not None:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def _row_rstd(x_ptr, stride_xm, rows, row_mask, K: tl.constexpr, eps, BM: tl.constexpr, BK: tl.constexpr):
        """1 / rms of each row of x [BM rows, K]."""
        cols = tl.arange(0, BK)
        total = tl.zeros([BM], dtype=tl.float32)
        for k0 in range(0, K, BK):
            mask = row_mask[:, None] & ((k0 + cols) < K)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
            total += tl.sum(x * x, axis=1)
        return 1.0 / tl.sqrt(total / K + eps)

    @triton.jit
    def _normed_tile(x_ptr, stride_xm, norm_ptr, rows, row_mask, k0, K: tl.constexpr, rstd, HAS_NORM: tl.constexpr,
                     BK: tl.constexpr):
        """x[rows, k0:k0+BK] as bf16, RMS-normalised (times the norm weight) when HAS_NORM."""
        cols = k0 + tl.arange(0, BK)
        col_mask = cols < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                    other=0.0).to(tl.float32)
        if HAS_NORM:
            w = tl.load(norm_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            x = x * rstd[:, None] * w[None, :]
        return x.to(tl.bfloat16)

    @triton.jit
    def _weight_tile(w_ptr, stride_wn, cols_n, n_mask, k0, K: tl.constexpr, BK: tl.constexpr):
        """w[cols_n, k0:k0+BK] transposed to [BK, BN], widened to bf16 (FP8 weights widen here)."""
        ks = k0 + tl.arange(0, BK)
        w = tl.load(w_ptr + cols_n[None, :] * stride_wn + ks[:, None], mask=n_mask[None, :] & (ks < K)[:, None],
                    other=0.0)
        return w.to(tl.bfloat16)

    @triton.jit
    def _tile_product(x, w, acc, USE_DOT: tl.constexpr, WIDE_DOT: tl.constexpr):
        """acc [BM, BN] += x [BM, BK] @ w [BK, BN]: tensor cores (`tl.dot`, 16 rows at least), or
        for a few rows a broadcast multiply and sum on the CUDA cores, which pads no rows."""
        if USE_DOT:
            if WIDE_DOT:
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(x, w, acc)
        else:
            acc += tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
        return acc

    @triton.jit
    def _linear_kernel(x_ptr, w_ptr, scale_ptr, norm_ptr, res_ptr, out_ptr, M, N, K: tl.constexpr,
                       stride_xm, stride_wn, stride_rm, stride_om, eps,
                       HAS_NORM: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_RES: tl.constexpr,
                       USE_DOT: tl.constexpr, WIDE_DOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       BK: tl.constexpr, PDL: tl.constexpr):
        """out[M, N] = norm(x) @ w.T (* scale) (+ res)."""
        rows = tl.program_id(1) * BM + tl.arange(0, BM)
        cols_n = tl.program_id(0) * BN + tl.arange(0, BN)
        row_mask, n_mask = rows < M, cols_n < N
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        if PDL:
            # the first weight tile does not depend on the kernel before: read it while that one ends
            w_next = _weight_tile(w_ptr, stride_wn, cols_n, n_mask, 0, K, BK)
            gdc_wait()
            gdc_launch_dependents()
            rstd = tl.zeros([BM], dtype=tl.float32)
            if HAS_NORM:
                rstd = _row_rstd(x_ptr, stride_xm, rows, row_mask, K, eps, BM, BK)
            for k0 in range(0, K, BK):
                w = w_next
                w_next = _weight_tile(w_ptr, stride_wn, cols_n, n_mask, k0 + BK, K, BK)
                x = _normed_tile(x_ptr, stride_xm, norm_ptr, rows, row_mask, k0, K, rstd, HAS_NORM, BK)
                acc = _tile_product(x, w, acc, USE_DOT, WIDE_DOT)
        else:
            rstd = tl.zeros([BM], dtype=tl.float32)
            if HAS_NORM:
                rstd = _row_rstd(x_ptr, stride_xm, rows, row_mask, K, eps, BM, BK)
            for k0 in range(0, K, BK):
                x = _normed_tile(x_ptr, stride_xm, norm_ptr, rows, row_mask, k0, K, rstd, HAS_NORM, BK)
                w = _weight_tile(w_ptr, stride_wn, cols_n, n_mask, k0, K, BK)
                acc = _tile_product(x, w, acc, USE_DOT, WIDE_DOT)
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + cols_n, mask=n_mask, other=0.0)[None, :]
        out_mask = row_mask[:, None] & n_mask[None, :]
        if HAS_RES:
            acc += tl.load(res_ptr + rows[:, None] * stride_rm + cols_n[None, :], mask=out_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows[:, None] * stride_om + cols_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _activate(x, KIND: tl.constexpr):
        if KIND == 1:  # silu
            x = x * tl.sigmoid(x)
        elif KIND == 2:  # gelu (erf form, as F.gelu)
            x = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
        elif KIND == 3:  # relu
            x = tl.maximum(x, 0.0)
        return x

    @triton.jit
    def _gated_kernel(x_ptr, w_ptr, scale_ptr, norm_ptr, out_ptr, M, HIDDEN, K: tl.constexpr, stride_xm, stride_wn, stride_om, eps,
                      ACT0: tl.constexpr, ACT1: tl.constexpr, HAS_SCALE: tl.constexpr, USE_DOT: tl.constexpr,
                      WIDE_DOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      PDL: tl.constexpr):
        """out[M, HIDDEN] = act0(gate) * act1(up), [gate | up] = norm(x) @ w.T, w [2 HIDDEN, K]."""
        rows = tl.program_id(1) * BM + tl.arange(0, BM)
        cols_n = tl.program_id(0) * BN + tl.arange(0, BN)
        row_mask, n_mask = rows < M, cols_n < HIDDEN
        gate = tl.zeros([BM, BN], dtype=tl.float32)
        up = tl.zeros([BM, BN], dtype=tl.float32)
        if PDL:
            gate_next = _weight_tile(w_ptr, stride_wn, cols_n, n_mask, 0, K, BK)
            up_next = _weight_tile(w_ptr, stride_wn, cols_n + HIDDEN, n_mask, 0, K, BK)
            gdc_wait()
            gdc_launch_dependents()
            rstd = _row_rstd(x_ptr, stride_xm, rows, row_mask, K, eps, BM, BK)
            for k0 in range(0, K, BK):
                w_gate, w_up = gate_next, up_next
                gate_next = _weight_tile(w_ptr, stride_wn, cols_n, n_mask, k0 + BK, K, BK)
                up_next = _weight_tile(w_ptr, stride_wn, cols_n + HIDDEN, n_mask, k0 + BK, K, BK)
                x = _normed_tile(x_ptr, stride_xm, norm_ptr, rows, row_mask, k0, K, rstd, True, BK)
                gate = _tile_product(x, w_gate, gate, USE_DOT, WIDE_DOT)
                up = _tile_product(x, w_up, up, USE_DOT, WIDE_DOT)
        else:
            rstd = _row_rstd(x_ptr, stride_xm, rows, row_mask, K, eps, BM, BK)
            for k0 in range(0, K, BK):
                x = _normed_tile(x_ptr, stride_xm, norm_ptr, rows, row_mask, k0, K, rstd, True, BK)
                w_gate = _weight_tile(w_ptr, stride_wn, cols_n, n_mask, k0, K, BK)
                w_up = _weight_tile(w_ptr, stride_wn, cols_n + HIDDEN, n_mask, k0, K, BK)
                gate = _tile_product(x, w_gate, gate, USE_DOT, WIDE_DOT)
                up = _tile_product(x, w_up, up, USE_DOT, WIDE_DOT)
        if HAS_SCALE:
            gate = gate * tl.load(scale_ptr + cols_n, mask=n_mask, other=0.0)[None, :]
            up = up * tl.load(scale_ptr + HIDDEN + cols_n, mask=n_mask, other=0.0)[None, :]
        # the eager path rounds gate and up to bf16 before the activation: so do we
        gate = gate.to(tl.bfloat16).to(tl.float32)
        up = up.to(tl.bfloat16).to(tl.float32)
        h = _activate(gate, ACT0) * _activate(up, ACT1)
        tl.store(out_ptr + rows[:, None] * stride_om + cols_n[None, :], h.to(out_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _stage_attention_kernel(qkv_ptr, map_ptr, ck_ptr, cv_ptr, out_ptr, slot, H, stride_qkv, stride_cr, stride_ch,
                                stride_out, eps, DH: tl.constexpr, SP: tl.constexpr, PDL: tl.constexpr):
        """One (row, head) of a depformer stage's attention: q, k RMS-normalised and mapped by the
        stage's [Dh, Dh] norm-times-RoPE matrices, k and v written to cache slot `slot`, then
        attention of q over slots 0..slot (scale 1: the norms stand in for 1/sqrt(Dh))."""
        r = tl.program_id(0)
        h = tl.program_id(1)
        q_map, k_map = _stage_maps(map_ptr, DH)
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        _stage_attention_row(qkv_ptr, ck_ptr, cv_ptr, out_ptr, r, h, q_map, k_map, slot, H, stride_qkv, stride_cr,
                             stride_ch, stride_out, eps, DH, SP)

    @triton.jit
    def _stage_attention_rows_kernel(qkv_ptr, map_ptr, ck_ptr, cv_ptr, out_ptr, slot, H, R, stride_qkv, stride_cr,
                                     stride_ch, stride_out, eps, DH: tl.constexpr, SP: tl.constexpr,
                                     ROWS: tl.constexpr, PDL: tl.constexpr):
        """`_stage_attention_kernel` for ROWS rows of one head: the stage's maps are read once for
        all of them (at 512 rows one program a row reads them 8,192 times a launch)."""
        first = tl.program_id(0) * ROWS
        h = tl.program_id(1)
        q_map, k_map = _stage_maps(map_ptr, DH)
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        for i in tl.static_range(ROWS):
            if first + i < R:
                _stage_attention_row(qkv_ptr, ck_ptr, cv_ptr, out_ptr, first + i, h, q_map, k_map, slot, H,
                                     stride_qkv, stride_cr, stride_ch, stride_out, eps, DH, SP)

    @triton.jit
    def _stage_maps(map_ptr, DH: tl.constexpr):
        """The stage's q and k maps, fp32 [DH, DH]: row i of a map holds input dim i, so
        out[j] = sum_i x[i] * map[i, j]."""
        d = tl.arange(0, DH)
        q_map = tl.load(map_ptr + d[:, None] * DH + d[None, :]).to(tl.float32)
        k_map = tl.load(map_ptr + DH * DH + d[:, None] * DH + d[None, :]).to(tl.float32)
        return q_map, k_map

    @triton.jit
    def _stage_attention_row(qkv_ptr, ck_ptr, cv_ptr, out_ptr, r, h, q_map, k_map, slot, H, stride_qkv, stride_cr,
                             stride_ch, stride_out, eps, DH: tl.constexpr, SP: tl.constexpr):
        """Row r, head h of the stage's attention, with the maps already loaded (fp32 [DH, DH])."""
        d = tl.arange(0, DH)
        base = qkv_ptr + r * stride_qkv + h * DH
        q = tl.load(base + d).to(tl.float32)
        k = tl.load(base + H * DH + d).to(tl.float32)
        v = tl.load(base + 2 * H * DH + d)
        q = (q / tl.sqrt(tl.sum(q * q, axis=0) / DH + eps)).to(tl.bfloat16).to(tl.float32)
        k = (k / tl.sqrt(tl.sum(k * k, axis=0) / DH + eps)).to(tl.bfloat16).to(tl.float32)
        q = tl.sum(q[:, None] * q_map, axis=0).to(tl.bfloat16).to(tl.float32)
        k = tl.sum(k[:, None] * k_map, axis=0).to(tl.bfloat16)
        cache = r * stride_cr + h * stride_ch
        tl.store(ck_ptr + cache + slot * DH + d, k)
        tl.store(cv_ptr + cache + slot * DH + d, v)
        j = tl.arange(0, SP)
        earlier = (j < slot)[:, None]
        keys = tl.load(ck_ptr + cache + j[:, None] * DH + d[None, :], mask=earlier, other=0.0).to(tl.float32)
        values = tl.load(cv_ptr + cache + j[:, None] * DH + d[None, :], mask=earlier, other=0.0).to(tl.float32)
        this = (j == slot)[:, None]
        keys = tl.where(this, k.to(tl.float32)[None, :], keys)
        values = tl.where(this, v.to(tl.float32)[None, :], values)
        scores = tl.sum(keys * q[None, :], axis=1)
        scores = tl.where(j <= slot, scores, float("-inf"))
        p = tl.exp(scores - tl.max(scores, axis=0))
        p = p / tl.sum(p, axis=0)
        att = tl.sum(p[:, None] * values, axis=0)
        tl.store(out_ptr + r * stride_out + h * DH + d, att.to(out_ptr.dtype.element_ty))


_ACTIVATIONS = {"linear": 0, "silu": 1, "gelu": 2, "relu": 3}


class TileConfig(NamedTuple):
    """How a matrix kernel tiles its work: BN outputs and BK inputs per step, tensor cores or not."""

    bn: int = 16
    bk: int = 256
    warps: int = 4
    stages: int = 4
    dot: bool = True


# Chosen per GPU model and (kernel, rows class) by scripts/kernel_sweep.py (docs/bench/sweep-*.json,
# docs/benchmarks.md). The stepper loads the table of the GPU it runs on when it builds the Triton
# stages (`load_tilings`, from the device name, or the model `TILINGS_MODEL` names, `--gpu-tilings`);
# `configure` replaces single entries (the sweep itself uses it). H100: at 2 rows
# the CUDA-core product with thin, long tiles won every site; at 16 and 64 rows cuBLAS beat every
# tiling tried, so the runtime takes these kernels there only for FP8 weights (FUSED_MAX_ROWS).
_FEW_WIDE = TileConfig(bn=8, bk=1024, warps=8, stages=4, dot=False)
_FEW_THIN = TileConfig(bn=4, bk=1024, warps=4, stages=4, dot=False)
_H100: dict[tuple[str, str], TileConfig] = {
    ("in_proj", "few"): _FEW_WIDE, ("logits", "few"): _FEW_WIDE,
    ("out_proj", "few"): _FEW_THIN, ("gated", "few"): _FEW_THIN, ("mlp_out", "few"): _FEW_THIN,
    ("in_proj", "some"): TileConfig(32, 256, 4, 3, True), ("gated", "some"): TileConfig(32, 256, 4, 3, True),
    ("in_proj", "many"): TileConfig(32, 256, 4, 3, True), ("gated", "many"): TileConfig(32, 128, 4, 3, True),
    ("in_proj", "most"): TileConfig(32, 256, 4, 3, True), ("gated", "most"): TileConfig(32, 128, 4, 3, True),
}
# H200 (docs/bench/run13-h200/sweep.log, PDL on): at 2 rows the thin CUDA-core tiles win again, a
# little differently (out_proj 1.6 us, logits 2.4, in_proj 3.3, mlp_out 4.9, gated 6.0); at 16 and
# 256 rows cuBLAS beats every tiling tried at 4 of 5 sites, so FUSED_MAX_ROWS stays 4
_H200: dict[tuple[str, str], TileConfig] = dict(_H100) | {
    ("in_proj", "few"): TileConfig(8, 1024, 4, 4, False), ("out_proj", "few"): TileConfig(8, 1024, 4, 2, False),
    ("gated", "few"): TileConfig(4, 1024, 4, 4, False), ("mlp_out", "few"): TileConfig(8, 1024, 4, 4, False),
    ("logits", "few"): TileConfig(8, 1024, 4, 2, False),
    ("in_proj", "some"): TileConfig(32, 256, 4, 5, True), ("out_proj", "some"): TileConfig(16, 256, 4, 3, True),
    ("gated", "some"): TileConfig(32, 256, 4, 3, True), ("mlp_out", "some"): TileConfig(16, 256, 4, 3, True),
    ("logits", "some"): TileConfig(16, 256, 4, 3, True),
    ("in_proj", "most"): TileConfig(64, 128, 4, 3, True), ("out_proj", "most"): TileConfig(32, 128, 4, 3, True),
    ("gated", "most"): TileConfig(64, 128, 4, 3, True), ("mlp_out", "most"): TileConfig(32, 256, 4, 5, True),
    ("logits", "most"): TileConfig(64, 256, 4, 3, True),
}
GPU_TILINGS: dict[str, dict[tuple[str, str], TileConfig]] = {"H100": _H100, "H200": _H200}
# bf16 weights: above this many rows the compiled torch stage is faster (per GPU model)
GPU_FUSED_MAX_ROWS: dict[str, int] = {"H100": 4, "H200": 4}
DEFAULT_GPU = "H100"
CONFIGS: dict[tuple[str, str], TileConfig] = dict(_H100)
DEFAULT_CONFIG = TileConfig(bn=16, bk=256, warps=4, stages=3, dot=True)
FUSED_MAX_ROWS = GPU_FUSED_MAX_ROWS[DEFAULT_GPU]
ATTENTION_WARPS = 1  # one (row, head) per program, 64 dims over at most 32 slots: 3.2 us vs 4.2 with 4 warps
# Rows of a head per program in the batched torch stages' attention (`model.depformer_stage_kernel_attention`):
# 1 runs the one-row kernel; more share the stage's maps between rows. Not yet timed on a GPU, so 1.
BATCHED_ATTENTION_ROWS = 1


def gpu_model(device_name: str) -> str:
    """The tiling table for a device name as torch reports it ("NVIDIA H200" → "H200"); the
    H100's for a GPU that has no table of its own."""
    return next((model for model in GPU_TILINGS if model in device_name), DEFAULT_GPU)


TILINGS_MODEL: str | None = None  # None: the table of the GPU the stepper runs on; else a key of GPU_TILINGS
TILINGS_LOADED = DEFAULT_GPU  # the model whose table CONFIGS holds (what a benchmark reports)


def load_tilings(device: torch.device) -> str:
    """Load the tiling table for `device` (or `TILINGS_MODEL`'s) before the stages are built and
    captured (a graph keeps the tilings it was captured with); returns the model chosen."""
    if TILINGS_MODEL is not None:
        if TILINGS_MODEL not in GPU_TILINGS:
            raise ValueError(f"no tiling table for {TILINGS_MODEL!r}; there are {', '.join(GPU_TILINGS)}")
        return use_gpu_tilings(TILINGS_MODEL)
    return use_gpu_tilings(torch.cuda.get_device_name(device) if device.type == "cuda" else "")


def use_gpu_tilings(device_name: str) -> str:
    """Load the tilings (and FUSED_MAX_ROWS) swept on this GPU model; returns the model chosen."""
    global FUSED_MAX_ROWS, TILINGS_LOADED
    model = TILINGS_LOADED = gpu_model(device_name)
    CONFIGS.clear()
    CONFIGS.update(GPU_TILINGS[model])
    FUSED_MAX_ROWS = GPU_FUSED_MAX_ROWS[model]
    return model


def rows_class(m: int) -> str:
    return "few" if m <= 4 else ("some" if m <= 32 else ("many" if m <= 128 else "most"))


def configure(kind: str, rows: str, config: TileConfig | None) -> None:
    """Set (or with None, drop) the tiling of one kernel kind for one rows class."""
    if config is None:
        CONFIGS.pop((kind, rows), None)
    else:
        CONFIGS[(kind, rows)] = config


def _config(kind: str, m: int) -> TileConfig:
    return CONFIGS.get((kind, rows_class(m)), DEFAULT_CONFIG)


def _launch_opts(config: TileConfig, m: int, k: int) -> dict:
    # BM: every row in one block when the kernel does not use tensor cores (each weight tile is
    # then read once); with tensor cores 16 rows at least, at most 64
    bm = triton.next_power_of_2(m) if not config.dot else max(16, min(64, triton.next_power_of_2(m)))
    opts = dict(BM=bm, BN=config.bn, BK=min(config.bk, triton.next_power_of_2(k)), USE_DOT=config.dot)
    if INTERPRETED:
        # the interpreter multiplies bf16 tiles as their raw bits: widen them to fp32 first
        return dict(opts, WIDE_DOT=True, PDL=False)
    pdl = pdl_enabled()
    return dict(opts, WIDE_DOT=False, num_warps=config.warps, num_stages=config.stages, PDL=pdl, launch_pdl=pdl)


def linear(x: torch.Tensor, weight, *, norm: torch.Tensor | None = None, eps: float = 1e-5,
           residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None, n: int | None = None, kind: str = "linear") -> torch.Tensor:
    """`(rms_norm(x) * norm) @ weight[:n].T (+ residual)` for x [M, K] (rows contiguous):
    one launch. `n` takes only the first rows of the weight (the logits' real codes); `kind`
    names the call site for its tiling (`CONFIGS`)."""
    w, scale = _split(weight)
    m, k = x.shape
    n = n or w.shape[0]
    if out is None:
        out = torch.empty(m, n, device=x.device, dtype=out_dtype or x.dtype)
    config = _config(kind, m)
    opts = _launch_opts(config, m, k)
    grid = (triton.cdiv(n, config.bn), triton.cdiv(m, opts["BM"]))
    dummy = x
    _linear_kernel[grid](x, w, scale if scale is not None else dummy, norm if norm is not None else dummy,
                         residual if residual is not None else dummy, out, m, n, k,
                         x.stride(0), w.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
                         eps, HAS_NORM=norm is not None, HAS_SCALE=scale is not None, HAS_RES=residual is not None,
                         **opts)
    return out


def gated_mlp_in(x: torch.Tensor, weight, norm: torch.Tensor, eps: float, hidden: int,
                 activations: tuple[str, str], out: torch.Tensor | None = None) -> torch.Tensor:
    """`act0(gate) * act1(up)` with `[gate | up] = (rms_norm(x) * norm) @ weight.T`: one launch."""
    w, scale = _split(weight)
    m, k = x.shape
    if out is None:
        out = torch.empty(m, hidden, device=x.device, dtype=x.dtype)
    config = _config("gated", m)
    opts = _launch_opts(config, m, k)
    grid = (triton.cdiv(hidden, config.bn), triton.cdiv(m, opts["BM"]))
    _gated_kernel[grid](x, w, scale if scale is not None else x, norm, out, m, hidden, k, x.stride(0), w.stride(0),
                        out.stride(0), eps, ACT0=_ACTIVATIONS[activations[0]], ACT1=_ACTIVATIONS[activations[1]],
                        HAS_SCALE=scale is not None, **opts)
    return out


def stage_attention(qkv: torch.Tensor, qk_map: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, slot: int,
                    heads: int, eps: float, rows_per_program: int = 1) -> torch.Tensor:
    """qkv [R, 3 H Dh] → attention output [R, H Dh]; writes k, v at cache slot `slot` of the
    `[R, H, S, Dh]` caches (rows contiguous in their last two dims). `rows_per_program` > 1: each
    program runs that many rows of a head, reading the stage's maps once for them."""
    r = qkv.shape[0]
    dh = qk_map.shape[-1]
    out = torch.empty(r, heads * dh, device=qkv.device, dtype=qkv.dtype)
    sp = triton.next_power_of_2(cache_k.shape[2])
    launch = {} if INTERPRETED else dict(num_warps=ATTENTION_WARPS, launch_pdl=pdl_enabled())
    strides = (qkv.stride(0), cache_k.stride(0), cache_k.stride(1), out.stride(0))
    if rows_per_program <= 1:
        _stage_attention_kernel[(r, heads)](qkv, qk_map, cache_k, cache_v, out, slot, heads, *strides, eps, DH=dh,
                                            SP=sp, PDL=pdl_enabled(), **launch)
    else:
        _stage_attention_rows_kernel[(triton.cdiv(r, rows_per_program), heads)](
            qkv, qk_map, cache_k, cache_v, out, slot, heads, r, *strides, eps, DH=dh, SP=sp, ROWS=rows_per_program,
            PDL=pdl_enabled(), **launch)
    return out
