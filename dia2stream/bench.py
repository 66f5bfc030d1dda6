"""Benchmark: `python -m dia2stream.bench --presets 2b` (GPU) or `--presets tiny` (CPU smoke run).

Writes random checkpoints of the requested presets locally (nothing is downloaded), then measures
and prints a table plus JSON:
- ms per frame step (p50/p95), CUDA-graph and eager side by side, cfg 1 and cfg 2;
- compute time of the first decodable frame (max_delay + 1 steps, plus one Mimi decode);
- Mimi streaming decode ms per frame;
- cold TTFA through the real server over loopback (`start` → first PCM byte at the client);
- inject → first frame whose audio depends on the injected text (inject after `done`: time to
  the first binary frame that follows the injected first word's `word` event);
- real-time factor (frame step + decode, over 80 ms) and peak GPU memory.
Random weights: speed only, never quality.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from vendor_dia2 import Dia2
from vendor_dia2.checkpoint import write_random_checkpoint
from vendor_dia2.config import preset
from vendor_dia2.runtime import FrameStepper, SamplingParams
from vendor_dia2.script import parse_script

SCRIPT = ("[S1] Thanks for calling, this is the front desk. How can I help you today? "
          "We are open every day from nine to five, and we would be glad to help.")


def stats(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    if not values:
        return {}
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {"p50": round(statistics.median(values), 3), "p95": round(pick(0.95), 3),
            "min": round(values[0], 3), "n": len(values)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_steps(tts: Dia2, *, cfg: bool, graph: bool, frames: int, compile: bool = False,
                profile: bool = False) -> dict:
    """Time `frames` steps (after a warm-up) of a fresh stepper, host state machine included."""
    tts._stepper = None
    if tts.device.type == "cuda":
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    stepper = FrameStepper(tts.model, cfg=cfg, use_cuda_graph=graph, compile=compile)
    build_s = time.perf_counter() - t0
    stepper.set_sampling(0, SamplingParams(cfg_scale=2.0 if cfg else 1.0))
    machine = tts.new_state_machine()
    machine.push(parse_script(SCRIPT * 3, tts.tokenizer))
    times, first_decodable = [], None
    start = time.perf_counter()
    for t in range(frames + 5):
        t0 = time.perf_counter()
        action = stepper.step([machine.preview(t)])[0]
        machine.process(t, action)
        times.append((time.perf_counter() - t0) * 1000)
        if t == stepper.max_delay - 1:
            _sync(tts.device)
            first_decodable = (time.perf_counter() - start) * 1000
    out = stats(times[5:])
    out["build_s"] = round(build_s, 2)
    if profile:
        try:
            out["profile"] = profile_steps(stepper, machine, frames + 5)
        except Exception as exc:  # the timings above stand without it
            out["profile"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    out["first_decodable_frame_ms"] = round(first_decodable, 2)
    del stepper
    return out


def profile_steps(stepper: FrameStepper, machine, t0: int, steps: int = 5) -> dict:
    """Kernels per frame and the kernels that take the GPU time (what a missed target is about)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for t in range(t0, t0 + steps):
            machine.process(t, stepper.step([machine.preview(t)])[0])
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.device_time for e in kernels) if kernels else 0.0
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:60], []).append(e.device_time)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:12]
    return {"kernels_per_frame": round(len(kernels) / steps), "gpu_busy_ms_per_frame": round(gpu_us / steps / 1000, 3),
            "top_kernels": [{"name": k, "count_per_frame": round(len(v) / steps), "ms_per_frame": round(sum(v) / steps / 1000, 3)}
                            for k, v in top]}


def bench_mimi(tts: Dia2, frames: int) -> dict:
    codec = tts.codec
    codec.open_stream(1)
    codes = torch.randint(0, 2048, (1, 32), device=codec.device)
    times = []
    for i in range(frames + 5):
        _sync(tts.device)
        t0 = time.perf_counter()
        codec.decode_frame(codes)
        _sync(tts.device)
        times.append((time.perf_counter() - t0) * 1000)
    codec.close_stream()
    return stats(times[5:])


def bench_prefill(tts: Dia2, seconds: float = 10.0, runs: int = 5) -> dict:
    """Voice prefix warm-up at this shape: parallel (chunked) prefill vs frame by frame, and the
    restore-by-copy of a prepared state (decoder cache + buffer, Mimi stream)."""
    d = tts.config.data
    frames = int(seconds * 12.5)
    tts._stepper = None
    stepper = FrameStepper(tts.model, cfg=True, use_cuda_graph=False)
    gen = torch.Generator().manual_seed(0)
    delayed = torch.randint(0, 2048, (d.num_codebooks, frames + d.max_delay), generator=gen)
    for k, delay in enumerate(d.delay_pattern):
        delayed[k, :delay] = d.audio_bos
    text = torch.full((frames + 1, 2), d.text_pad_token_id)
    parallel = []
    for i in range(runs + 1):
        stepper.reset_call(0)
        _sync(tts.device)
        t0 = time.perf_counter()
        stepper.prefill(0, delayed, text, frames)
        _sync(tts.device)
        if i:
            parallel.append((time.perf_counter() - t0) * 1000)
    tokens = torch.empty(2, frames, d.channels, dtype=torch.long, device=tts.device)
    tokens[:, :, 2:] = delayed[:, :frames].T.to(tts.device)
    tokens[:, :, :2] = d.text_pad_token_id
    stepper.reset_call(0)
    _sync(tts.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for t in range(frames):  # what upstream does on every request
            tts.model.transformer(tokens[:, t:t + 1], torch.full((2, 1), t, device=tts.device))
    _sync(tts.device)
    sequential = (time.perf_counter() - t0) * 1000
    snap = stepper.snapshot()
    restore = []
    codec = tts.codec
    codec.open_stream(1)
    codec.warm_stream(torch.randint(0, 2048, (1, 32, frames), device=codec.device))
    codec_snap = codec.snapshot_stream()
    for _ in range(20):
        _sync(tts.device)
        t0 = time.perf_counter()
        stepper.restore(snap)
        codec.restore_stream(codec_snap)
        _sync(tts.device)
        restore.append((time.perf_counter() - t0) * 1000)
    codec.close_stream()
    del stepper
    return {"prefix_frames": frames, "parallel_prefill_ms": stats(parallel),
            "frame_by_frame_ms": round(sequential, 1), "restore_ms": stats(restore)}


def _voice_wav_b64(seconds: float = 10.0) -> str:
    """A synthetic 24 kHz voice prefix (a wobbling tone with noise): random weights, any audio will do."""
    import base64
    import io

    import numpy as np
    import soundfile as sf

    t = np.arange(int(seconds * 24000)) / 24000
    wav = 0.3 * np.sin(2 * np.pi * (180 + 40 * np.sin(2 * np.pi * 3 * t)) * t)
    wav += 0.02 * np.random.default_rng(0).standard_normal(t.shape)
    buf = io.BytesIO()
    sf.write(buf, wav.astype(np.float32), 24000, format="WAV", subtype="PCM_16")
    return base64.b64encode(buf.getvalue()).decode()


VOICE_TRANSCRIPT = ("[S1] Hello, this is the bench voice speaking for about ten seconds so that the prefix "
                    "has enough words to align with the audio we made up for it, thank you.")


# -- through the real server --------------------------------------------------------------------

def start_server(tts: Dia2, cfg_scale: float):
    """The real server on a free loopback port, in a thread with its own loop."""
    from websockets.asyncio.server import serve

    from dia2stream import protocol as p
    from dia2stream.server import Dia2Server
    from dia2stream.session import SessionConfig, StreamingSession

    tts._stepper = None
    sys.setswitchinterval(0.0005)  # as server.build_session does
    session = StreamingSession(tts, SessionConfig(max_lead_ms=60_000, cfg_scale=cfg_scale))
    server = Dia2Server(session, tts.name, str(tts.device), 60_000)
    ready: "asyncio.Future[int]"
    holder: dict = {}
    started = threading.Event()

    async def main():
        stop = asyncio.Event()
        holder["stop"], holder["loop"] = stop, asyncio.get_running_loop()
        async with serve(server.handle, "127.0.0.1", 0, process_request=server.process_request,
                         max_size=p.MAX_MESSAGE_BYTES) as ws_server:
            holder["port"] = ws_server.sockets[0].getsockname()[1]
            started.set()
            await stop.wait()

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    started.wait(60)

    def stop():
        holder["loop"].call_soon_threadsafe(holder["stop"].set)
        thread.join(10)
        session.close()

    return holder["port"], stop


async def _recv_until(ws, predicate, timeout=30.0):
    """Receive messages until predicate(msg) is true; return (msg, time)."""
    while True:
        msg = await asyncio.wait_for(ws.recv(), timeout)
        if predicate(msg):
            return msg, time.perf_counter()


def _is_event(name):
    return lambda m: isinstance(m, str) and json.loads(m).get("event") == name


def _is_audio(m):
    return isinstance(m, bytes)


async def bench_server(port: int, runs: int) -> dict:
    from websockets.asyncio.client import connect

    ttfa, inject, voice_ttfa = [], [], []
    voice_info = {}
    async with connect(f"ws://127.0.0.1:{port}/", max_size=None) as ws:
        await _recv_until(ws, _is_event("ready"))
        await ws.send(json.dumps({"cmd": "set_voice", "name": "bench", "audio": _voice_wav_b64(),
                                  "transcript": VOICE_TRANSCRIPT}))
        msg, _ = await _recv_until(ws, lambda m: isinstance(m, str) and json.loads(m).get("event") in ("voice_ready", "error"),
                                   timeout=300)
        voice_info = json.loads(msg)
        if voice_info.get("event") == "voice_ready":
            for i in range(runs + 2):  # TTFA from a prepared voice (restored by copy at start)
                t0 = time.perf_counter()
                await ws.send(json.dumps({"cmd": "start", "text": "[S1] Hello, how can I help you today?",
                                          "voice": "bench"}))
                _, t1 = await _recv_until(ws, _is_audio)
                if i >= 2:
                    voice_ttfa.append((t1 - t0) * 1000)
                await ws.send(json.dumps({"cmd": "reset", "voice": "bench"}))
                await _recv_until(ws, _is_event("reset"))
        await ws.send(json.dumps({"cmd": "reset"}))
        await _recv_until(ws, _is_event("reset"))
        for i in range(runs + 2):  # cold TTFA: each start from the clean state
            t0 = time.perf_counter()
            await ws.send(json.dumps({"cmd": "start", "text": "[S1] Hello, how can I help you today?"}))
            _, t1 = await _recv_until(ws, _is_audio)
            if i >= 2:
                ttfa.append((t1 - t0) * 1000)
            await ws.send(json.dumps({"cmd": "reset"}))
            await _recv_until(ws, _is_event("reset"))
        await ws.send(json.dumps({"cmd": "start", "text": "[S1] Hello there."}))
        await _recv_until(ws, _is_event("done"), timeout=120)
        for i in range(runs + 2):  # inject after done: the next turn from the warm state
            t0 = time.perf_counter()
            await ws.send(json.dumps({"cmd": "inject", "text": " Sure, one moment."}))
            await _recv_until(ws, lambda m: isinstance(m, str) and json.loads(m).get("word") == "Sure,")
            _, t1 = await _recv_until(ws, _is_audio)
            if i >= 2:
                inject.append((t1 - t0) * 1000)
            await _recv_until(ws, _is_event("done"), timeout=120)
    return {"ttfa_ms": stats(ttfa), "inject_to_new_text_audio_ms": stats(inject),
            "voice": voice_info, "voice_ttfa_ms": stats(voice_ttfa)}


# -- driver ----------------------------------------------------------------------------------------

def run_preset(name: str, args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    root = Path(args.checkpoint_dir) / name
    if not (root / "model.safetensors").is_file():
        t0 = time.perf_counter()
        write_random_checkpoint(preset(name), root, progress=True, device=device)
        print(f"[{name}] wrote random checkpoint in {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    tts = Dia2.from_pretrained(str(root), device=device, mimi=args.mimi)
    result: dict = {"preset": name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "dtype": str(tts.dtype), "load_s": round(time.perf_counter() - t0, 1)}
    print(f"[{name}] loaded in {result['load_s']} s on {result['device']}", flush=True)
    graphs = [True, False] if device.type == "cuda" else [False]
    steps = {}
    for cfg in (False, True):
        for graph in graphs:
            key = f"{'graph' if graph else 'eager'}_cfg{2 if cfg else 1}"
            frames = args.frames if graph else max(20, args.frames // 4)
            steps[key] = bench_steps(tts, cfg=cfg, graph=graph, frames=frames)
            print(f"[{name}] step {key}: {steps[key]}", flush=True)
    if args.compile and device.type == "cuda":
        for cfg in (False, True):
            key = f"graph_compiled_cfg{2 if cfg else 1}"
            try:
                steps[key] = bench_steps(tts, cfg=cfg, graph=True, frames=args.frames, compile=True,
                                         profile=args.profile and cfg)
            except Exception as exc:  # compile failures are reported, not fatal to the run
                steps[key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(f"[{name}] step {key}: {steps[key]}", flush=True)
    result["step_ms"] = steps
    result["mimi_decode_ms"] = bench_mimi(tts, args.frames)
    result["voice_prefill"] = bench_prefill(tts)
    print(f"[{name}] voice prefill: {result['voice_prefill']}", flush=True)
    print(f"[{name}] mimi decode: {result['mimi_decode_ms']}", flush=True)
    if not args.skip_server:
        tts.compile_steps = args.compile and device.type == "cuda"
        port, stop = start_server(tts, cfg_scale=args.cfg_scale)
        try:
            result["server"] = asyncio.run(bench_server(port, args.runs))
        finally:
            stop()
        result["server"]["cfg_scale"] = args.cfg_scale
        result["server"]["compiled"] = tts.compile_steps
        print(f"[{name}] server: {result['server']}", flush=True)
    cfg_key = 2 if args.cfg_scale != 1 else 1
    best = steps.get(f"graph_compiled_cfg{cfg_key}") if args.compile else None
    best = (best if best and "p50" in best else None) or steps.get(f"graph_cfg{cfg_key}") or steps[f"eager_cfg{2 if args.cfg_scale != 1 else 1}"]
    result["rtf"] = round((best["p50"] + result["mimi_decode_ms"]["p50"]) / 80.0, 4)
    if device.type == "cuda":
        result["gpu_peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del tts
    return result


def print_table(results: list[dict]) -> None:
    print("\n| preset | variant | p50 ms/frame | p95 | first decodable frame ms |")
    print("|---|---|---|---|---|")
    for r in results:
        for key, s in r["step_ms"].items():
            if "p50" not in s:
                print(f"| {r['preset']} | {key} | {s} | | |")
                continue
            print(f"| {r['preset']} | {key} | {s['p50']} | {s['p95']} | {s['first_decodable_frame_ms']} |")
    for r in results:
        srv = r.get("server", {})
        print(f"\n{r['preset']} on {r['device']}: mimi decode p50 {r['mimi_decode_ms'].get('p50')} ms, "
              f"RTF {r['rtf']}, TTFA {srv.get('ttfa_ms')}, inject->new text {srv.get('inject_to_new_text_audio_ms')}, "
              f"GPU peak {r.get('gpu_peak_memory_gb')} GB")
        eager = r["step_ms"].get("eager_cfg2")
        for key in ("graph_cfg2", "graph_compiled_cfg2"):
            fast = r["step_ms"].get(key)
            if eager and fast and "p50" in fast:
                print(f"  {key} speed-up over eager at cfg 2: {eager['p50'] / fast['p50']:.1f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dia2stream.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="2b", help="comma-separated presets: tiny, 1b, 2b")
    parser.add_argument("--checkpoint-dir", default=os.environ.get("DIA2_BENCH_DIR", "/tmp/dia2-bench"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--mimi", default="random", help="codec source (default random: full-size Mimi)")
    parser.add_argument("--frames", type=int, default=200, help="timed frame steps per variant")
    parser.add_argument("--runs", type=int, default=20, help="server TTFA / inject runs")
    parser.add_argument("--cfg-scale", type=float, default=2.0, help="server's CFG scale")
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile inside the graph")
    parser.add_argument("--profile", action="store_true", help="kernel profile of the compiled cfg 2 step")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    results = [run_preset(name.strip(), args) for name in args.presets.split(",") if name.strip()]
    print_table(results)
    payload = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
               "command": "python -m dia2stream.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
               "results": results}
    print(json.dumps(payload, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
