"""The draw alone on the GPU: the sorted torch path (`runtime.pick`) against the fused kernel
(`fused_pick.pick`) at 4 and 8 warps and 1, 2 or 4 threshold bits a counting pass
(`SELECT_BITS`), each in a CUDA graph, for a frame's logits at 1-128 calls with CFG and 1 call
without. Prints µs per draw and whether the tokens agree.

    python3 scripts/pick_bench.py --json pick.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vendor_dia2 import fused_pick  # noqa: E402
from vendor_dia2.runtime import pick  # noqa: E402
from vendor_dia2.sampling import draw_noise, gumbel_noise  # noqa: E402


def time_graph(fn) -> float:
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(fn, rep=30)) * 1000  # median µs of replays


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    dev = torch.device("cuda")
    rows = []
    for calls, branches in ((1, 2), (1, 1), (64, 2), (128, 2)):
        g = torch.Generator(device=dev).manual_seed(calls)
        logits = (torch.randn(calls * branches, 2048, device=dev, generator=g) * 3).bfloat16().float()
        keys = torch.arange(calls, device=dev)
        temp = torch.full((calls, 1), 0.8, device=dev)
        top = torch.full((calls, 1), 50, device=dev, dtype=torch.long)
        noise, inv = draw_noise(gumbel_noise(keys, keys, 1, 256), temp, top)
        noise, inv, top = noise[:, 0], inv[:, 0], top[:, 0]
        scale = torch.full((calls,), 2.0 if branches == 2 else 1.0, device=dev)
        ref = lambda: pick(logits, inv, noise, scale, branches=branches, filter_k=50, max_top_k=256)  # noqa: E731
        row = {"calls": calls, "cfg": branches == 2, "sorted_us": round(time_graph(ref), 2)}
        want = ref()
        for warps in (4, 8):
            for bits in (1, 2, 4):
                fused_pick.PICK_WARPS = {True: warps, False: warps}
                fused_pick.SELECT_BITS = bits
                def fn():
                    return fused_pick.pick(logits, inv, noise, scale, top, branches=branches, filter_k=50)
                row[f"fused_{warps}w_{bits}b_us"] = round(time_graph(fn), 2)
                row[f"fused_{warps}w_{bits}b_equal"] = bool(torch.equal(fn(), want))
        rows.append(row)
        print(row, flush=True)
        if args.json:  # after every row: a run cut short keeps what it measured
            result = {"device": torch.cuda.get_device_name(), "draws": rows}
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
