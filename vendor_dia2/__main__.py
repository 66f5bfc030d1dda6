"""Command line: `python -m vendor_dia2 generate ...` and `python -m vendor_dia2 make-checkpoint ...`."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vendor_dia2", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="speak a script to a WAV file")
    gen.add_argument("script", help='text to speak, e.g. "[S1] Hello there."')
    gen.add_argument("-o", "--output", default="out.wav", help="WAV file to write (default out.wav)")
    gen.add_argument("--checkpoint", default="tiny", help="preset (tiny, 1b, 2b), directory or HF repo id")
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    gen.add_argument("--dtype", default=None, help="bf16 or fp32 (default: bf16 on cuda, fp32 on cpu)")
    gen.add_argument("--mimi", default=None, help="codec source: random, random-small, a path or repo id")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--cfg-scale", type=float, default=2.0)
    gen.add_argument("--temperature", type=float, default=None, help="text and audio temperature")
    gen.add_argument("--top-k", type=int, default=None, help="text and audio top-k")
    gen.add_argument("--max-frames", type=int, default=None)

    mk = sub.add_parser("make-checkpoint", help="write a deterministic random checkpoint in the published format")
    mk.add_argument("--preset", default="tiny", help="tiny, 1b or 2b")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--dtype", default=None, help="weights dtype (default fp32 for tiny, bf16 for full size)")
    mk.add_argument("directory")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            return _generate(args)
        return _make_checkpoint(args)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _generate(args) -> int:
    import soundfile as sf

    from . import Dia2

    t0 = time.perf_counter()
    tts = Dia2.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype, mimi=args.mimi)
    print(f"loaded {tts.name} on {tts.device} ({tts.dtype}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    result = tts.generate(args.script, seed=args.seed, cfg_scale=args.cfg_scale, temperature=args.temperature,
                          top_k=args.top_k, max_frames=args.max_frames, progress=True)
    sf.write(args.output, result.waveform, result.sample_rate, subtype="PCM_16")
    audio_s = len(result.waveform) / result.sample_rate
    ms = sorted(result.step_ms)
    print(f"wrote {args.output}: {audio_s:.2f} s of audio, {result.frames} frames in {result.wall_seconds:.2f} s "
          f"(median {ms[len(ms) // 2]:.1f} ms/frame)")
    for word, seconds in result.timestamps:
        print(f"  {seconds:6.2f} s  {word}")
    return 0


def _make_checkpoint(args) -> int:
    from .api import _parse_dtype
    from .checkpoint import write_random_checkpoint
    from .config import preset

    dtype = _parse_dtype(args.dtype) if args.dtype else None
    out = write_random_checkpoint(preset(args.preset), Path(args.directory), seed=args.seed, dtype=dtype,
                                  progress=True)
    print(f"wrote {args.preset} checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
