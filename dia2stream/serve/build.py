"""Building the engine from the server's settings: the model (or the simulated GPU), the device,
the engine and the voices preloaded. One home for both places that build it: the server's own
process (`--engine-process off`, the tools) and the engine process (`serve/engine_process.py`)."""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from pathlib import Path

from dia2stream.engine.engine import Engine
from dia2stream.serve.config import (CompileMode, GpuTilings, KernelChoice, ServerConfig, Switch, checkpoint_for,
                                     default_max_calls, split_voice_spec)
from dia2stream.serve.metrics import Metrics
from dia2stream.voices.voice import VoiceRequest

log = logging.getLogger("dia2stream")


def use_compile_cache(directory: str | None) -> None:
    """Keep torch.compile's and Triton's compiled kernels under `directory` (default
    $DIA2_CACHE/compile): one folder to keep across restarts. A cold start compiles for 74-103 s,
    one with the caches kept 35-41 s (H200, run 38). Their own variables, when set, win. Both are
    read when the first kernel compiles, so setting them here, before the model loads, is in time."""
    from vendor_dia2.checkpoint import cache_dir

    root = Path(directory) if directory else cache_dir() / "compile"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))


def build_engine(config: ServerConfig, metrics: Metrics | None = None, flush=None):
    """Load the model and make the engine (CUDA graphs, if any, are captured here, not on the first
    request). `metrics`, `flush`: the engine's (`Engine`); the engine process passes its own."""
    import torch

    from vendor_dia2 import Dia2
    from vendor_dia2.checkpoint import PUBLISHED_CHECKPOINT, is_random_preset

    threads = config.threads
    if threads is None and (os.cpu_count() or 1) <= 2 and not (config.device or "").startswith("cuda") \
            and not torch.cuda.is_available():
        threads = 1  # two spinning OpenMP threads fight the event loop on a 2-core box (up to 10x slower)
    if threads:
        torch.set_num_threads(threads)
    # The generation thread waits on the GPU once a frame; with the default 5 ms GIL switch
    # interval the event loop can hold it that long when the frame is done.
    sys.setswitchinterval(0.0005)
    use_device(config.device)  # this thread captures the CUDA graphs
    use_compile_cache(config.compile_cache)
    t0 = time.perf_counter()
    if config.simulate_gpu:
        from dia2stream.engine.simulated import GpuProfile, SimulatedDia2

        tts = SimulatedDia2(GpuProfile.load(config.simulate_gpu))
        log.warning("simulated GPU (%s, %s shape, profile %s): every timing figure is simulated and the audio is "
                    "noise", tts.profile.gpu, tts.profile.preset, config.simulate_gpu)
        engine_config = config.engine_config("cuda", max_calls=config.max_calls or default_max_calls("cuda"),
                                             compile=CompileMode.OFF, kernels=KernelChoice.TORCH,
                                             voice=config.voice_settings())
    else:
        checkpoint = checkpoint_for(config)
        tts = Dia2.from_pretrained(checkpoint, device=config.device, dtype=config.dtype, mimi=config.mimi)
        log.info("weights and Mimi loaded in %.1f s", time.perf_counter() - t0)
        if is_random_preset(checkpoint):
            log.warning("checkpoint %s has random weights: its audio is noise, not speech (the published model: "
                        "--checkpoint %s, on a GPU)", checkpoint, PUBLISHED_CHECKPOINT)
        engine_config = config.engine_config(tts.device)
        from vendor_dia2 import kernels as fused_kernels

        fused_kernels.PDL = config.pdl.forced  # read as the graphs are captured
        fused_kernels.TILINGS_MODEL = None if config.gpu_tilings == GpuTilings.AUTO else str(config.gpu_tilings)  # read as the stepper is built
        from vendor_dia2 import persistent_stage

        persistent_stage.ENABLED = config.persistent_stage == Switch.ON  # read as the engine's stepper is built
        from vendor_dia2 import decode_attention

        decode_attention.ENABLED = config.decode_attention.forced  # likewise
        from vendor_dia2 import row_swap

        row_swap.GRAPHED = config.graphed_swaps == Switch.ON  # read as the stepper and the Mimi stream open
        from vendor_dia2 import graphs

        graphs.DYNAMIC_SHAPES = config.compile_dynamic == Switch.ON  # read as the stepper compiles
        from vendor_dia2 import model

        # likewise: auto follows the depformer kernels
        model.BATCHED_STAGE_ATTENTION = config.batched_stage_attention.forced
    engine = Engine(tts, engine_config, metrics=metrics, flush=flush)
    log.info("loaded %s on %s (%s) in %.1f s: %d call slots, step batch sizes %s, %s kernels, %s depformer weights",
             tts.name, tts.device, tts.dtype, time.perf_counter() - t0, engine_config.max_calls,
             engine.stepper.batch_sizes, engine_config.kernels, engine_config.weights)
    try:
        for spec in config.voices:
            state = engine.preload_voice(parse_voice_spec(spec))
            log.info("voice %s ready (%.2f s prefix, %.0f ms)", state.name, state.prefix_s, state.prepare_ms)
    except BaseException:
        engine.close()
        raise
    freeze_startup_objects()
    return tts, engine


def freeze_startup_objects() -> None:
    """Keep what start-up made (the model, torch's and the libraries' objects, ~300,000 of them)
    out of the cyclic garbage collector's full passes: they live as long as the process, and a
    full pass over them on the generation thread took 225-250 ms every ~40 s at 64 simulated
    calls (CPU), a stall every call heard as underruns. Frozen, a full pass took 13-20 ms."""
    gc.collect()
    gc.freeze()


def use_device(device: str | None) -> None:
    """Make `--device cuda:N` this thread's current CUDA device. Work that names no device (CUDA
    graph capture, side streams, Triton launches, synchronize, the allocator's figures) uses the
    current one, which is per thread and cuda:0 by default: every thread that touches the GPU
    calls this (the engine's thread does the same for itself)."""
    if device and device.startswith("cuda:"):  # plain "cuda" is cuda:0, already current
        import torch

        index = torch.device(device).index
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA device(s)"
                             + (f" (cuda:0 to cuda:{count - 1})" if count else ""))
        torch.cuda.set_device(index)


def parse_voice_spec(spec: str) -> VoiceRequest:
    """`NAME=PATH[,TRANSCRIPT]` (the transcript is everything after the first comma; a transcript
    starting with @ names a text file)."""
    try:
        name, path, transcript = split_voice_spec(spec)
    except ValueError as exc:
        raise ValueError(f"--voice {exc}") from None
    transcript = transcript.strip() or None
    if transcript and transcript.startswith("@"):
        with open(transcript[1:], encoding="utf-8") as f:
            transcript = f.read().strip()
    return VoiceRequest(name=name, path=path, transcript=transcript, trusted=True)


