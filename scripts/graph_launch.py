"""How long the host spends launching one frame's CUDA graph, and how long the frame then takes.

Run 18's trace showed `cudaGraphLaunch` holding the host 3.8 ms for the 64-call frame graph
(~3,000 kernel nodes) and ~2.5 ms for the one-call graph, with the GPU idle until it returned,
but under the profiler, which itself slows a launch. This times it without one: for each batch
size, the host time of `replay()` (the launch) and the time until the GPU is done (the frame),
with programmatic dependent launch on and off (the PDL edges between the Triton kernels may keep
the driver off its fast path for straight-line graphs).

    python3 scripts/graph_launch.py --checkpoint /tmp/ck2b --batches 1,64 --pdl on,off
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vendor_dia2 import Dia2, kernels  # noqa: E402


def time_graph(stepper, b: int, runs: int) -> dict:
    graphs = stepper.graphs
    length = graphs.length_buckets[0]
    launch, frame = [], []
    for _ in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graphs.run(stepper.frame, b, True, length)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        launch.append((t1 - t0) * 1000)
        frame.append((t2 - t0) * 1000)
    return {"batch": b, "launch_ms": round(statistics.median(launch), 3),
            "launch_ms_max": round(max(launch), 3), "frame_ms": round(statistics.median(frame), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--pdl", default="on,off")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="torch.compile inside the graphs, as the server")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    batches = tuple(int(b) for b in args.batches.split(","))
    tts = Dia2.from_pretrained(args.checkpoint, device="cuda", mimi="random")
    results = []
    for pdl in args.pdl.split(","):
        kernels.PDL = pdl == "on"
        t0 = time.perf_counter()
        stepper = tts.new_stepper(n_calls=max(batches), cfg=True, compile=args.compile, kernels="triton",
                                  batch_sizes=batches, cache_buckets=(256,))
        build_s = time.perf_counter() - t0
        for b in batches:
            row = {"pdl": pdl, "compile": args.compile, "build_s": round(build_s, 1), **time_graph(stepper, b, args.runs)}
            results.append(row)
            print(json.dumps(row), flush=True)
        del stepper
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
