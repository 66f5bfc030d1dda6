"""How long the GPU idles while the engine steps its calls (issue 18: "GPU idle inside a 64-call
frame step ≤ 10 %"), measured with the profiler on the engine the server builds.

    python -m dia2stream.tools.gpu_idle --checkpoint /tmp/dia2-bench/2b --mimi random --calls 1,64,128
    python -m dia2stream.tools.gpu_idle --calls 1,4 --steps 10          # the code path, CPU (busy 0)

For each call count N the engine (built as `server.py` builds it: CUDA graphs, default kernels)
holds N calls that all speak a long turn at once, with no pacing limit (`max_lead_ms` huge), so
every call steps in every step, back to back: the load at which host work in series with the GPU
costs the most. Once every turn has audio, `--steps` steps run with no profiler (the step as the
engine runs it), then the profiler records the GPU's kernels over as many more (CUDA activity
only: recording every host op as well would slow the host path it measures; even CUPTI's kernel
tracing slows the host's launch of a graph of thousands of kernels, so the idle share is quoted
against the unprofiled step). Printed per N: the step as the engine runs it (the window over the steps it completed in
it), the GPU busy time per step (the union of its kernels, overlaps counted once), the idle
share, and the engine's own host_ms (the step less its waits on the device).

`--trace FILE` also writes a Chrome trace of the last call count with the host ops of every
thread and the engine's step ranges (`engine.STEP_MARK`): to see where the idle is, not to time it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dia2stream.wire import protocol as p
from dia2stream.wire.frames import AudioFrame

TEXT = "[S1] " + " ".join(["so here is one more sentence about the weather and the long road home tonight"] * 12)


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by `intervals` (overlapping kernels on several streams count once)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def window_figures(window_s: float, steps: int, kernels: list[tuple[float, float]]) -> dict:
    """Steps completed in `window_s`, and the GPU's busy time (kernel intervals in µs) over it."""
    busy_s = union_us(kernels) / 1e6
    return {"steps": steps, "step_ms": round(1000 * window_s / max(steps, 1), 3),
            "gpu_busy_ms_per_step": round(1000 * busy_s / max(steps, 1), 3),
            "gpu_idle_share": round(1 - busy_s / window_s, 4) if window_s > 0 else None}


class Listener:
    """A call's client: acknowledges frames as the server's sender does, counts them."""

    def __init__(self):
        self.call = None
        self.frames = 0

    def __call__(self, item) -> None:
        if isinstance(item, AudioFrame):
            self.frames += 1
            self.call.frames_acked += 1


def profile_engine(engine, calls: int, steps: int, warm_frames: int = 24, timeout_s: float = 600.0,
                   trace: str | None = None) -> dict:
    import torch
    from torch._C._profiler import _ExperimentalConfig
    from torch.profiler import ProfilerActivity, profile

    listeners = []
    for _ in range(calls):
        listener = Listener()
        listener.call = engine.open_call(listener)
        if listener.call is None:
            raise SystemExit(f"the engine refused call {len(listeners) + 1} of {calls} (raise --max-calls)")
        listeners.append(listener)
    try:
        for i, listener in enumerate(listeners):
            engine.submit(listener.call, p.Start(text=TEXT, seed=i))
        deadline = time.monotonic() + timeout_s
        while min(listener.frames for listener in listeners) < warm_frames:
            if time.monotonic() > deadline:
                raise SystemExit("timed out waiting for every call's audio")
            time.sleep(0.05)
        print(f"{calls} calls: every call has audio; {steps} steps with no profiler, then {steps} profiled",
              flush=True)  # a sampling profiler of the host (py-spy) can start here
        seen, t0 = engine.steps, time.perf_counter()  # the same steps with no profiler attached
        while engine.steps < seen + steps:
            time.sleep(0.002)
        plain_ms = 1000 * (time.perf_counter() - t0) / (engine.steps - seen)
        cuda = torch.cuda.is_available()
        activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
        with profile(activities=activities) as prof:
            seen, t0 = engine.steps, time.perf_counter()
            while engine.steps < seen + steps:
                time.sleep(0.002)
            done, window_s = engine.steps - seen, time.perf_counter() - t0
            host_ms = engine.host_ms  # now: reading the profile below holds this interpreter for seconds
        kernels = [(e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA]
        out = window_figures(window_s, done, kernels)
        # CUPTI's activity tracing slows the host's graph launches (thousands of kernel nodes
        # each): the idle share against the unprofiled step is the one to quote
        out["step_ms_unprofiled"] = round(plain_ms, 3)
        out["gpu_idle_share_unprofiled"] = round(max(0.0, 1 - out["gpu_busy_ms_per_step"] / plain_ms), 4)
        out.update(calls=calls, kernels_per_step=round(len(kernels) / max(done, 1)), host_ms=round(host_ms, 3))
        if trace:
            # the steps run on the engine's generation thread, not this one
            with profile(activities=activities + ([ProfilerActivity.CPU] if cuda else []),
                         experimental_config=_ExperimentalConfig(profile_all_threads=True)) as traced:
                seen = engine.steps
                while engine.steps < seen + 10:
                    time.sleep(0.002)
            traced.export_chrome_trace(trace)
        return out
    finally:
        for listener in listeners:
            engine.close_call(listener.call)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dia2stream.tools.gpu_idle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", default="1,64,128", help="comma-separated call counts")
    parser.add_argument("--steps", type=int, default=60, help="profiled steps per call count")
    parser.add_argument("--checkpoint", default="tiny")
    parser.add_argument("--mimi", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--simulate-gpu", default=None, help="a GPU profile: the code path on CPU (no kernels: busy 0)")
    parser.add_argument("--pdl", default=None, choices=("auto", "on", "off"), help="as server.py's --pdl")
    parser.add_argument("--gpu-tilings", default=None, help="as server.py's --gpu-tilings")
    parser.add_argument("--step-in-flight", default=None, choices=("auto", "on", "off"),
                        help="as server.py's --step-in-flight")
    parser.add_argument("--decode-stream", default=None, choices=("on", "off"), help="as server.py's --decode-stream")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--trace", help="a Chrome trace of the last call count's steps, host ops included")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.calls.split(",")]
    from dia2stream.serve.build import build_engine
    from dia2stream.serve.config import ServerConfig

    settings = {"checkpoint": args.checkpoint, "mimi": args.mimi, "device": args.device,
                "simulate_gpu": args.simulate_gpu, "pdl": args.pdl, "gpu_tilings": args.gpu_tilings,
                "step_in_flight": args.step_in_flight, "decode_stream": args.decode_stream}
    config = ServerConfig(host="127.0.0.1", port=0, max_calls=max(counts), max_lead_ms=1e6, log_level="WARNING",
                          web=False, engine_process="off", overload_refusal_s=0.0,
                          **{k: v for k, v in settings.items() if v is not None})
    _, engine = build_engine(config)
    results = []
    try:
        for n in counts:
            figures = profile_engine(engine, n, args.steps, trace=args.trace if n == counts[-1] else None)
            results.append(figures)
            print(f"{n:4d} calls: step {figures['step_ms_unprofiled']:.2f} ms ({figures['step_ms']:.2f} profiled), GPU "
                  f"busy {figures['gpu_busy_ms_per_step']:.2f} ms a step, idle "
                  f"{100 * figures['gpu_idle_share_unprofiled']:.1f} % ({100 * figures['gpu_idle_share']:.1f} % profiled), "
                  f"{figures['kernels_per_step']} kernels a step, host_ms {figures['host_ms']}", flush=True)
    finally:
        engine.close()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
