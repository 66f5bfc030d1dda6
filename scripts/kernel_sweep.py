"""Tile sweep for the fused depformer kernels on the GPU (vendor_dia2/kernels.py).

For each call site of a 2b depformer layer (in_proj, out_proj, gated MLP in, MLP out, logits) and
each rows class (2 rows: one call with CFG; 16: 8 calls; 64: 32 calls; 256: 128 calls) it times
every candidate tiling inside a CUDA graph (as the frame runs them) next to cuBLAS doing the bare
matrix product, and prints the best, then the winners as a `kernels.GPU_TILINGS` table for this
GPU model. Weights are random: speed does not depend on their values. Launches use programmatic
dependent launch where the frame does (`kernels.pdl_enabled`).

    python3 scripts/kernel_sweep.py --json sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vendor_dia2 import kernels  # noqa: E402

D, HIDDEN, HEADS, DH, CODES = 1024, 4096, 16, 64, 2048
SITES = {  # kind: (N, K, norm, residual)
    "in_proj": (3 * HEADS * DH, D, True, False),
    "out_proj": (D, HEADS * DH, False, True),
    "gated": (HIDDEN, D, True, False),
    "mlp_out": (D, HIDDEN, False, True),
    "logits": (CODES, D, True, False),
}


def candidates(m: int, wide: bool) -> list[kernels.TileConfig]:
    if wide and m <= 4:  # past the edges of the first sweep's winners (bn 8, bk 512)
        return [kernels.TileConfig(bn, bk, w, st, False)
                for bn, bk, w, st in itertools.product((4, 8), (512, 1024), (4, 8), (2, 4))]
    dot = [kernels.TileConfig(bn, bk, 4, st, True) for bn, bk, st in itertools.product((16, 32, 64), (128, 256), (3,))]
    dot += [kernels.TileConfig(16, 128, 4, 5, True), kernels.TileConfig(32, 256, 4, 5, True)]
    if m > 4:
        return dot
    few = [kernels.TileConfig(bn, bk, w, st, False)
           for bn, bk, w, st in itertools.product((8, 16, 32), (256, 512), (4,), (2, 4))]
    return few + dot


def time_graph(fn) -> float:
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(fn, rep=30))  # median ms of replays


def sweep_site(kind: str, m: int, wide: bool, weights: str) -> dict:
    n, k, has_norm, has_res = SITES[kind]
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(m)
    rows_n = 2 * n if kind == "gated" else n
    w = torch.randn(rows_n, k, device=dev, generator=g, dtype=torch.bfloat16) * k ** -0.5
    weight = kernels.QuantWeight.quantize(w) if weights == "fp8" else w
    x = torch.randn(m, k, device=dev, generator=g, dtype=torch.bfloat16)
    norm = torch.randn(k, device=dev, generator=g, dtype=torch.bfloat16) if has_norm else None
    res = torch.randn(m, n, device=dev, generator=g, dtype=torch.bfloat16) if has_res else None
    out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
    cublas_out = torch.empty(m, rows_n, device=dev, dtype=torch.bfloat16)
    cublas = time_graph(lambda: torch.matmul(x, w.T, out=cublas_out))
    rows = kernels.rows_class(m)
    results = []
    for config in candidates(m, wide):
        kernels.configure("gated" if kind == "gated" else kind, rows, config)
        if kind == "gated":
            fn = lambda: kernels.gated_mlp_in(x, weight, norm, 1e-5, n, ("silu", "linear"), out=out)  # noqa: E731
        else:
            fn = lambda: kernels.linear(x, weight, norm=norm, residual=res, out=out, kind=kind)  # noqa: E731
        try:
            fn()
            torch.cuda.synchronize()
            results.append((time_graph(fn), config))
        except Exception as exc:  # a tiling that does not compile (registers, shared memory) is skipped
            print(f"  {kind} m={m} {config}: {type(exc).__name__}", flush=True)
    kernels.configure(kind, rows, None)
    results.sort(key=lambda r: r[0])
    best_ms, best = results[0]
    mb = w.numel() * (1 if weights == "fp8" else 2) / 1e6
    row = {"kind": kind, "rows": m, "weights": weights, "cublas_matmul_us": round(cublas * 1000, 2),
           "best_us": round(best_ms * 1000, 2), "best": best._asdict(), "weight_mb": round(mb, 1),
           "best_tb_s": round(mb / 1e6 / (best_ms / 1000), 2),
           "top3": [(round(t * 1000, 2), c._asdict()) for t, c in results[:3]]}
    print(f"{kind:9s} rows {m:3d} {weights}: cuBLAS {row['cublas_matmul_us']:7.2f} us | best {row['best_us']:7.2f} us "
          f"({row['best_tb_s']} TB/s) {tuple(best)}", flush=True)
    return row


def sweep_attention() -> dict:
    dev = torch.device("cuda")
    out = {}
    for rows in (2, 64):
        qkv = torch.randn(rows, 3 * HEADS * DH, device=dev, dtype=torch.bfloat16)
        qk_map = torch.randn(2, DH, DH, device=dev, dtype=torch.bfloat16)
        ck = torch.randn(rows, HEADS, 31, DH, device=dev, dtype=torch.bfloat16)
        cv = torch.randn_like(ck)
        for warps in (1, 2, 4):
            kernels.ATTENTION_WARPS = warps
            us = time_graph(lambda: kernels.stage_attention(qkv, qk_map, ck, cv, 17, HEADS, 1e-5)) * 1000
            out[f"{rows} rows, {warps} warps"] = round(us, 2)
            print(f"attention rows {rows:3d}, {warps} warps: {us:.2f} us", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="2,16,64,256")
    parser.add_argument("--weights", default="bf16", help="comma list: bf16, fp8")
    parser.add_argument("--wide", action="store_true", help="few rows: thinner and longer tiles than the first sweep")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    t0 = time.perf_counter()
    rows = []
    for weights in args.weights.split(","):
        for m in (int(r) for r in args.rows.split(",")):
            for kind in SITES:
                rows.append(sweep_site(kind, m, args.wide, weights))
    result = {"device": torch.cuda.get_device_name(), "pdl": kernels.pdl_enabled(), "sites": rows,
              "attention_us": sweep_attention(), "seconds": round(time.perf_counter() - t0, 1)}
    print(f"# {result['device']}: winners as a kernels.GPU_TILINGS table (bf16), and where Triton beat cuBLAS")
    for row in rows:
        if row["weights"] == "bf16":
            wins = "beats" if row["best_us"] < row["cublas_matmul_us"] else "loses to"
            print(f'    ("{row["kind"]}", "{kernels.rows_class(row["rows"])}"): TileConfig(**{row["best"]}),'
                  f'  # {row["best_us"]} us, {wins} cuBLAS {row["cublas_matmul_us"]} us')
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"sweep took {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
