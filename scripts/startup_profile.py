"""Where a server's start-up goes: the engine built as the server builds it (same flags, same
code), under cProfile, then the time split into the parts a cold start pays for.

    python scripts/startup_profile.py [--out DIR] -- [server flags...]

The profiler slows Python-heavy parts (dynamo's tracing) more than compiler subprocesses and GPU
work, so read the split as proportions of a slower run; the wall time without it is the server's
own log line. Writes DIR/startup.prof (pstats) and DIR/startup.txt."""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

# The parts, as functions whose cumulative time is that part. Nested parts (inductor inside
# dynamo) are listed inside-out, so each line reads as "of which".
PARTS = (
    ("model and Mimi load", ("vendor_dia2/api.py", "from_pretrained")),
    ("frame graphs: compile and capture, every batch size", ("vendor_dia2/graphs.py", "capture_all")),
    ("dynamo: trace and compile a frame (all of torch.compile)", ("convert_frame.py", "_compile")),
    ("  inductor: lower and generate code", ("compile_fx.py", "fx_codegen_and_compile")),
    ("  inductor: wait for its parallel kernel compiles", ("async_compile.py", "wait")),
    ("  inductor: autotune", ("select_algorithm.py", "__call__")),
    ("Triton: compile a kernel in this process (ours and inductor's)", ("compiler/compiler.py", "compile")),
    ("CUDA graph capture", ("torch/cuda/graphs.py", "capture_end")),
    ("the Mimi stream opens", ("codec.py", "open_stream")),
)


def part_seconds(stats: pstats.Stats, where: str, name: str) -> tuple[float, int]:
    """Cumulative seconds and calls of every profiled function named `name` in a file whose path
    ends with `where`; a recursive function counts once (pstats' cumulative already does)."""
    seconds, calls = 0.0, 0
    for (path, _, function), (_, primitive, _, cumulative, _) in stats.stats.items():
        if function == name and path.replace(os.sep, "/").endswith(where):
            seconds += cumulative
            calls += primitive
    return seconds, calls


def report(profiler: cProfile.Profile, wall: float) -> str:
    top = io.StringIO()
    stats = pstats.Stats(profiler, stream=top)
    lines = [f"engine built in {wall:.1f} s under the profiler", ""]
    for label, (where, name) in PARTS:
        seconds, calls = part_seconds(stats, where, name)
        lines.append(f"{label:<66} {seconds:7.1f} s  {calls:6d} calls")
    stats.sort_stats("cumulative").print_stats(60)
    lines += ["", "the 60 functions of most cumulative time:", top.getvalue()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".", help="folder for startup.prof and startup.txt")
    parser.add_argument("--no-profile", action="store_true", help="time the build alone (the profiler slows it)")
    parser.add_argument("server_flags", nargs=argparse.REMAINDER, help="after --: the server's flags")
    args = parser.parse_args(argv)
    flags = args.server_flags[1:] if args.server_flags[:1] == ["--"] else args.server_flags

    import logging

    from dia2stream.serve.build import build_engine
    from dia2stream.serve.config import parse_args

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = parse_args(flags)
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    if not args.no_profile:
        profiler.enable()
    _, engine = build_engine(config)
    profiler.disable()
    wall = time.perf_counter() - t0
    engine.close()
    if args.no_profile:
        print(f"engine built in {wall:.1f} s (no profiler)")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    profiler.dump_stats(out / "startup.prof")
    text = report(profiler, wall)
    (out / "startup.txt").write_text(text)
    print(text[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
