"""Where a server's start-up goes: the engine built as the server builds it (same flags, same
code), under cProfile, then the time split into the parts a cold start pays for.

    python scripts/startup_profile.py [--out DIR] -- [server flags...]

The profiler slows Python-heavy parts (dynamo's tracing) more than compiler subprocesses and GPU
work, so read the split as proportions of a slower run (`--no-profile` times the build alone).
Writes DIR/startup.prof (pstats) and DIR/startup.txt."""

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

# Where the time is spent, by the code that spends it (its own time, not its callees'): dynamo
# replaces Python frames while it compiles, and the profiler's cumulative times come out wrong
# under it, so the split is by area, each function's own time added to the first area whose
# path fragment (or built-in name) it matches.
AREAS = (
    ("waiting for inductor's compile workers (Triton kernels compiled in subprocesses)",
     ("concurrent/futures/_base.py", "compile_worker/", "method 'read' of '_io.BufferedReader'",
      "method 'acquire' of '_thread.lock'")),
    ("a subprocess's end (Triton's ptxas for our kernels)", ("posix.waitpid",)),
    ("Triton's compiler, in this process", ("triton/", "libtriton")),
    ("inductor: lowering, code generation, autotuning", ("torch/_inductor/",)),
    ("dynamo: tracing and guards", ("torch/_dynamo/", "torch._C._dynamo")),
    ("symbolic shapes (sympy, torch.fx)", ("sympy/", "torch/fx/", "torch/_subclasses/")),
    ("generated code loaded (Python's compile)", ("builtins.compile",)),
    ("torch ops run (warm-up steps, the Mimi stream, the weights)", ("torch._ops", "torch._C", "torch.conv",
                                                                     "torch.mm", "torch.addmm", "<_launch_kernel>")),
    ("our code", ("vendor_dia2/", "dia2stream/")),
)


def area_seconds(stats: pstats.Stats) -> list[tuple[str, float]]:
    """Seconds of own time per area (AREAS), then the rest."""
    totals = dict.fromkeys([label for label, _ in AREAS] + ["the rest"], 0.0)
    for (path, _, function), (_, _, own, _, _) in stats.stats.items():
        where = f"{path.replace(os.sep, '/')} {function}"
        label = next((label for label, parts in AREAS if any(part in where for part in parts)), "the rest")
        totals[label] += own
    return list(totals.items())


def report(profiler: cProfile.Profile, wall: float) -> str:
    top = io.StringIO()
    stats = pstats.Stats(profiler, stream=top)
    lines = [f"engine built in {wall:.1f} s under the profiler; its own time by area:", ""]
    lines += [f"  {seconds:7.1f} s  {label}" for label, seconds in area_seconds(stats)]
    stats.sort_stats("tottime").print_stats(40)
    lines += ["", "the 40 functions of most own time:", top.getvalue()]
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
