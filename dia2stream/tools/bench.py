"""Benchmark: `python -m dia2stream.tools.bench --presets 2b` (GPU) or `--presets tiny` (CPU smoke run).

Writes random checkpoints of the requested presets locally (nothing is downloaded), then measures
and prints a table plus JSON:
- ms per frame step (p50/p95), CUDA-graph and eager side by side, cfg 1 and cfg 2, for the full
  frame and for the decoder-only lane (steps whose depformer codes no output reads);
- ms per batched step with 1, 8, 16, 32, 64 active calls, and the batched Mimi decode; once more
  for each `--batched-stage-attention` mode a step variant names (`batched_runs`): e.g.
  `--kernels triton --compile --batched 1,64,128 --steps graph_compiled_triton_cfg2,graph_compiled_triton_stagesdpa_cfg2`
  times the batched stages' one-launch attention (auto) against SDPA in one process;
- compute time of the first decodable frame (max_delay steps, the first ones decoder-only);
- Mimi streaming decode ms per frame;
- through the real server over loopback: time to first byte and **speech onset** (the moment a
  client that plays frames back to back from the first one reaches the first word's frame) for a
  cold `start`, for an `inject` after `done` (the warm next turn), and for a start from a voice;
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
from vendor_dia2 import fused_pick
from vendor_dia2 import kernels as fused_kernels
from vendor_dia2 import decode_attention, graphs, persistent_stage, row_swap
from vendor_dia2 import model as dia2_model
from vendor_dia2.checkpoint import write_random_checkpoint
from vendor_dia2.config import Sampler, preset
from vendor_dia2.runtime import FrameStepper, SamplingParams
from vendor_dia2.script import parse_script

from dia2stream.clock import FRAME_RATE, SAMPLE_RATE
from dia2stream.serve.config import CompileMode

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
                profile: bool = False, kernels: str = "torch", weights: str = "bf16", sampler: str = "auto") -> dict:
    """Time `frames` steps (after a warm-up) of a fresh one-call stepper, host state machine
    included; the decoder-only lane is timed over the first steps of fresh calls."""
    if tts.device.type == "cuda":
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    stepper = tts.new_stepper(cfg=cfg, use_cuda_graph=graph, compile=compile, kernels=kernels, weights=weights,
                              sampler=sampler)
    build_s = time.perf_counter() - t0
    stepper.set_sampling(0, SamplingParams(cfg_scale=2.0 if cfg else 1.0))
    machine = tts.new_state_machine()
    machine.push(parse_script(SCRIPT * 3, tts.tokenizer))
    times, lite, first_decodable = [], [], None
    start = time.perf_counter()
    for t in range(frames + 5):
        t0 = time.perf_counter()
        action = stepper.step([machine.preview(t)])[0]
        machine.process(t, action)
        (times if stepper.last_full else lite).append((time.perf_counter() - t0) * 1000)
        if t == stepper.max_delay - 1:
            _sync(tts.device)
            first_decodable = (time.perf_counter() - start) * 1000
    for _ in range(3):  # more decoder-only steps: fresh calls
        stepper.reset_call(0)
        machine = tts.new_state_machine()
        machine.push(parse_script(SCRIPT, tts.tokenizer))
        for t in range(stepper.first_stage_delay - 1):
            t0 = time.perf_counter()
            machine.process(t, stepper.step([machine.preview(t)])[0])
            lite.append((time.perf_counter() - t0) * 1000)
    out = stats(times[5:])
    out["decoder_only"] = stats(lite[2:])
    out["build_s"] = round(build_s, 2)
    if profile:
        try:
            out["profile"] = profile_steps(stepper, machine, stepper.first_stage_delay + 5)
        except Exception as exc:  # the timings above stand without it
            out["profile"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    out["first_decodable_frame_ms"] = round(first_decodable, 2)
    del stepper
    return out


def _timed_swaps(stepper, codec, device, n_max: int, pairs: int = 1) -> list[float]:
    """ms of 10 swaps (after 2 untimed), each synchronised: the calls on the top `pairs` slots
    move to the lowest ones and back, as the engine moves new turns (one swap for all of them)."""
    moves = [(low, n_max - 1 - low) for low in range(pairs)]
    swaps = []
    for _ in range(12):
        _sync(device)
        t0 = time.perf_counter()
        stepper.swap_rows_many(moves)
        codec.swap_rows_many(moves)
        _sync(device)
        swaps.append((time.perf_counter() - t0) * 1000)
    return swaps[2:]


def _timed_swap_groups(stepper, codec, device, n_max: int) -> dict[str, dict]:
    """`_timed_swaps` for each group size of one swap (`row_swap.PAIR_GROUPS`) the slots allow."""
    return {str(k): stats(_timed_swaps(stepper, codec, device, n_max, pairs=k))
            for k in row_swap.PAIR_GROUPS if 2 * k <= n_max}


def bench_batched(tts: Dia2, *, sizes: list[int], frames: int, compile: bool, kernels: str = "torch",
                  profile: bool = False, compile_max_calls: int | None = None, sampler: str = "auto") -> dict:
    """One stepper with max(sizes) slots (as the server builds it); ms per step with the first N
    slots active (the full frame, then the decoder-only lane over fresh calls), the batched Mimi
    decode of N rows (the stream runs over its first rows only, padded as a step is), and one
    slot swap (a call moved to another slot: stepper and Mimi rows)."""
    n_max = max(sizes)
    if tts.device.type == "cuda":
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    stepper = tts.new_stepper(n_calls=n_max, cfg=True, compile=compile, kernels=kernels,
                              compile_max_calls=compile_max_calls, sampler=sampler)
    out: dict = {"build_s": round(time.perf_counter() - t0, 2), "batch_sizes": list(stepper.batch_sizes),
                 "kernels": kernels, "sampler": stepper.sampler, "pdl": fused_kernels.pdl_enabled(),
                 "tilings": fused_kernels.TILINGS_LOADED if kernels == "triton" else None,
                 "persistent_stage": stepper.frame.stage_counters is not None,
                 "decode_attention": stepper.decode_attention,
                 "batched_stage_attention": stepper.frame.kernel_attention,
                 "batched_attention_rows": fused_kernels.BATCHED_ATTENTION_ROWS,
                 "compile_dynamic": graphs.DYNAMIC_SHAPES,
                 "compiled_up_to_calls": stepper.compile_max_calls}
    codec = tts.codec
    codec.open_stream(n_max, decode_sizes=stepper.batch_sizes)
    machines = [_machine(tts, stepper, call) for call in range(n_max)]

    def step(active) -> None:
        choices = [machines[c].preview(stepper.position(c)) if active[c] else None for c in range(n_max)]
        actions = stepper.step(choices, active)
        for c in range(n_max):
            if active[c]:
                machines[c].process(stepper.position(c) - 1, actions[c])

    for n in sizes:
        active = [call < n for call in range(n_max)]
        while not all(stepper.needs_depformer(c) for c in range(n)):  # past the decoder-only stretch
            step(active)
        times, decode = [], []
        rows = torch.tensor(active)
        for i in range(frames + 3):
            t0 = time.perf_counter()
            step(active)
            t1 = time.perf_counter()
            codec.decode_frame(stepper.ready_codes, rows).cpu()
            t2 = time.perf_counter()
            if i >= 3:
                times.append((t1 - t0) * 1000)
                decode.append((t2 - t1) * 1000)
        lite = []
        for _ in range(2):  # the decoder-only lane: the first steps of fresh calls
            for c in range(n):
                stepper.reset_call(c)
                machines[c] = _machine(tts, stepper, c)
            while not any(stepper.needs_depformer(c) for c in range(n)):
                t0 = time.perf_counter()
                step(active)
                if not stepper.last_full:
                    lite.append((time.perf_counter() - t0) * 1000)
        out[str(n)] = {"step_ms": stats(times), "lite_step_ms": stats(lite[2:]), "mimi_decode_ms": stats(decode),
                       "padded_to": stepper.batch_size_for(n), "decode_rows": codec.decode_size_for(n)}
        if profile and n == max(sizes):
            out[str(n)]["profile"] = _profile(lambda: stepper.step(
                [machines[c].preview(stepper.position(c)) if active[c] else None for c in range(n_max)], active))
        print(f"  batched {n} calls: step {out[str(n)]['step_ms']}, decoder-only {out[str(n)]['lite_step_ms']}, "
              f"decode {out[str(n)]['mimi_decode_ms']}", flush=True)
    out["swap_ms"] = stats(_timed_swaps(stepper, codec, tts.device, n_max))
    if tts.device.type == "cuda":  # the same moves as one graph replay each (`row_swap.GRAPHED`)
        stepper.slots.capture_swap(graph=True)
        codec.capture_swap(graph=True)
        out["swap_graphed_ms"] = stats(_timed_swaps(stepper, codec, tts.device, n_max))
        out["swap_pairs_ms"] = _timed_swap_groups(stepper, codec, tts.device, n_max)
        stepper.slots.capture_swap(graph=row_swap.GRAPHED)
        codec.capture_swap(graph=row_swap.GRAPHED)
    print(f"  slot move (stepper and Mimi rows): {out['swap_ms']}, as graphs {out.get('swap_graphed_ms')}, "
          f"several pairs in one graphed swap {out.get('swap_pairs_ms')}", flush=True)
    codec.close_stream()
    del stepper
    return out


def _machine(tts: Dia2, stepper: FrameStepper, call: int):
    stepper.set_sampling(call, SamplingParams(seed=call))
    machine = tts.new_state_machine()
    machine.push(parse_script(SCRIPT * 3, tts.tokenizer))
    return machine


def gpu_profile(result: dict, source: str) -> dict:
    """A GPU profile for the simulated GPU (profiles/README.md) from one preset's results (this
    bench's JSON, `results[i]`). Figures a run did not measure are estimated as the README says,
    and `source` says which."""
    batched = result.get("batched") or {}
    sizes = sorted(int(k) for k in batched if k.isdigit())
    if not sizes:
        raise ValueError("a profile needs the batched steps (--batched 1,8,...)")
    notes = [source]
    full = {n: batched[str(n)]["step_ms"]["p50"] for n in sizes}
    lite = {n: batched[str(n)]["lite_step_ms"]["p50"] for n in sizes if "lite_step_ms" in batched[str(n)]}
    if not lite:
        one = min((v for k, v in result["step_ms"].items() if k.endswith("cfg2") and "p50" in v and "fp8" not in k),
                  key=lambda v: v["p50"])
        ratio = one["decoder_only"]["p50"] / one["p50"]
        lite = {n: round(ms * ratio, 3) for n, ms in full.items()}
        notes.append(f"decoder-only lane ESTIMATED as the full step times the one-call ratio ({ratio:.3f}), "
                     "not measured batched")
    if all("decode_rows" in batched[str(n)] for n in sizes):
        decode = {batched[str(n)]["decode_rows"]: batched[str(n)]["mimi_decode_ms"]["p50"] for n in sizes}
    else:  # older runs decoded the whole stream (max(sizes) rows) at every size
        decode = {1: result["mimi_decode_ms"]["p50"], max(sizes): batched[str(max(sizes))]["mimi_decode_ms"]["p50"]}
        notes.append(f"Mimi decode: 1 row from a one-row stream, {max(sizes)} rows from the batched run (which "
                     "decoded the whole stream at every size); sizes between are interpolated")
    profile = {"gpu": result["device"], "preset": result["preset"], "cfg": 2, "full_step_ms": full,
               "lite_step_ms": lite, "decode_ms": decode}
    prefill = result.get("voice_prefill")
    if prefill:
        profile["prefill_ms_per_frame"] = round(prefill["parallel_prefill_ms"]["p50"] / prefill["prefix_frames"], 4)
    if "swap_ms" in batched:
        profile["swap_ms"] = batched["swap_ms"]["p50"]
    else:
        notes.append("slot swap not measured: the simulator's estimate (engine.simulated.SWAP_MS)")
    groups = {int(k): v["p50"] for k, v in batched.get("swap_pairs_ms", {}).items()}
    if len(groups) > 1:
        largest = max(groups)
        profile["swap_pair_ms"] = round((groups[largest] - groups[1]) / (largest - 1), 4)
    else:
        notes.append("swaps of several pairs not measured: the simulator's estimate (engine.simulated.SWAP_PAIR_MS)")
    profile["source"] = "; ".join(notes)
    return {k: ({str(n): ms for n, ms in v.items()} if isinstance(v, dict) else v) for k, v in profile.items()}


def profile_steps(stepper: FrameStepper, machine, t0: int, steps: int = 5) -> dict:
    """Kernels per frame and the kernels that take the GPU time (what a missed target is about)."""
    t = iter(range(t0, t0 + steps))

    def one_step():
        now = next(t)
        machine.process(now, stepper.step([machine.preview(now)])[0])

    return _profile(one_step, steps)


def _profile(one_step, steps: int = 5) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            one_step()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.device_time for e in kernels) if kernels else 0.0
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:60], []).append(e.device_time)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:16]
    return {"kernels_per_frame": round(len(kernels) / steps), "gpu_busy_ms_per_frame": round(gpu_us / steps / 1000, 3),
            "top_kernels": [{"name": k, "count_per_frame": round(len(v) / steps), "ms_per_frame": round(sum(v) / steps / 1000, 3)}
                            for k, v in top]}


def bench_fp8_agreement(tts: Dia2, frames: int = 200, cfg: bool = True) -> dict:
    """How often FP8 depformer weights change a greedy token against bf16 on this checkpoint.

    Two triton steppers (bf16 and fp8) step the same script greedily; before every step the fp8
    one is given the bf16 one's slot (inputs, delayed buffer, caches), so each frame is compared on the same
    history (the decoder is bf16 in both: its caches follow from the inputs). Codebook 0 comes
    from the decoder and is excluded; a changed stage also changes the inputs of the stages after
    it in that frame, so `stage1_changed` (no such cascade) is reported beside the total."""
    greedy = SamplingParams(text_temperature=0.0, audio_temperature=0.0, cfg_scale=2.0 if cfg else 1.0)
    ref = tts.new_stepper(cfg=cfg, kernels="triton")
    fp8 = tts.new_stepper(cfg=cfg, kernels="triton", weights="fp8")
    for stepper in (ref, fp8):
        stepper.set_sampling(0, greedy)
    machine = tts.new_state_machine()
    machine.push(parse_script(SCRIPT * 4, tts.tokenizer))
    changed = stage1 = total = frames_changed = actions_changed = 0
    for t in range(frames + ref.max_delay):
        choice = [machine.preview(t)]
        action = ref.step(choice)[0]
        other = fp8.step(choice)[0]
        if t >= ref.max_delay:  # every stage's codes are read from here on
            diff = ref.codes[0, 1:] != fp8.codes[0, 1:]
            changed += int(diff.sum())
            stage1 += int(diff[0])
            total += diff.numel()
            frames_changed += int(diff.any())
            actions_changed += int(action != other)
        machine.process(t, action)
        fp8.restore(ref.snapshot(0), 0)  # inputs, delayed buffer (and the caches, equal already)
    return {"frames": frames, "token_change_rate": round(changed / total, 4),
            "stage1_change_rate": round(stage1 / frames, 4), "frames_with_a_change": round(frames_changed / frames, 4),
            "action_change_rate": round(actions_changed / frames, 4)}


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
    frames = int(seconds * FRAME_RATE)
    stepper = tts.new_stepper(cfg=True, use_cuda_graph=False)
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
    stepper.reset_call(0)
    _sync(tts.device)
    t0 = time.perf_counter()
    stepper.prefill(0, delayed, text, frames, chunk=1)  # frame by frame: what upstream does on every request
    _sync(tts.device)
    sequential = (time.perf_counter() - t0) * 1000
    snap = stepper.snapshot()
    restore = []
    codec = tts.codec
    codec.open_stream(1)
    codec_snap = codec.warmed_row(torch.randint(0, 2048, (1, 32, frames), device=codec.device))
    for _ in range(20):
        _sync(tts.device)
        t0 = time.perf_counter()
        stepper.restore(snap)
        codec.restore_row(0, codec_snap)
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

    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    wav = 0.3 * np.sin(2 * np.pi * (180 + 40 * np.sin(2 * np.pi * 3 * t)) * t)
    wav += 0.02 * np.random.default_rng(0).standard_normal(t.shape)
    buf = io.BytesIO()
    sf.write(buf, wav.astype(np.float32), SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return base64.b64encode(buf.getvalue()).decode()


VOICE_TRANSCRIPT = ("[S1] Hello, this is the bench voice speaking for about ten seconds so that the prefix "
                    "has enough words to align with the audio we made up for it, thank you.")


# -- through the real server --------------------------------------------------------------------

def start_server(tts: Dia2, cfg_scale: float, compile: bool = False, kernels: str = "torch",
                 step_in_flight: str | None = None, decode_stream: str | None = None):
    """The real server on a free loopback port, in a thread with its own loop."""
    from websockets.asyncio.server import serve

    from dia2stream.wire import protocol as p
    from dia2stream.engine.engine import Engine
    from dia2stream.serve.config import CompileMode, KernelChoice, ServerConfig, Switch
    from dia2stream.serve.server import Dia2Server

    sys.setswitchinterval(0.0005)  # as serve/build.py build_engine does
    # the server's own defaults for the switches not given
    switches = {name: kind(value) for name, kind, value in (("step_in_flight", CompileMode, step_in_flight),
                                                            ("decode_stream", Switch, decode_stream)) if value}
    config = ServerConfig(max_calls=1, max_lead_ms=60_000, cfg_scale=cfg_scale, kernels=KernelChoice(kernels),
                          compile=CompileMode.ON if compile else CompileMode.OFF, **switches)
    engine = Engine(tts, config.engine_config(tts.device))
    server = Dia2Server(engine, tts.name, str(tts.device), 60_000)
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
        engine.close()

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


async def _first_audio_and_onset(ws, t0: float) -> tuple[float, float]:
    """(time to first byte, speech onset) in ms for the utterance just commanded at t0: onset is
    when a client that plays frames back to back from the first one reaches the first word's
    frame (the `word` event's `frame`)."""
    first_audio = word_frame = None
    while first_audio is None or word_frame is None:
        msg = await asyncio.wait_for(ws.recv(), 60)
        if isinstance(msg, bytes):
            first_audio = first_audio or time.perf_counter()
            continue
        event = json.loads(msg)
        if event.get("event") == "word" and word_frame is None:
            word_frame = event["frame"]
        elif event.get("event") == "error":
            raise RuntimeError(event)
    ttfb = (first_audio - t0) * 1000
    return ttfb, ttfb + word_frame * 80.0


async def bench_server(port: int, runs: int) -> dict:
    from websockets.asyncio.client import connect

    cold, inject, voiced = [], [], []
    voice_info = {}
    async with connect(f"ws://127.0.0.1:{port}/", max_size=None) as ws:
        await _recv_until(ws, _is_event("ready"))
        for i in range(runs + 2):  # cold: each start from the clean state (no voice yet on this connection)
            t0 = time.perf_counter()
            await ws.send(json.dumps({"cmd": "start", "text": "[S1] Hello, how can I help you today?"}))
            got = await _first_audio_and_onset(ws, t0)
            if i >= 2:
                cold.append(got)
            await ws.send(json.dumps({"cmd": "reset"}))
            await _recv_until(ws, _is_event("reset"))
        await ws.send(json.dumps({"cmd": "start", "text": "[S1] Hello there."}))
        await _recv_until(ws, _is_event("done"), timeout=120)
        for i in range(runs + 2):  # inject after done: the next turn from the warm state
            t0 = time.perf_counter()
            await ws.send(json.dumps({"cmd": "inject", "text": " Sure, one moment."}))
            got = await _first_audio_and_onset(ws, t0)
            if i >= 2:
                inject.append(got)
            await _recv_until(ws, _is_event("done"), timeout=120)
        rollback = []
        for i in range(runs + 2):  # barge-in: pause with played_ms mid-utterance -> paused
            await ws.send(json.dumps({"cmd": "start", "text": SCRIPT}))
            frames = 0
            while frames < 12:
                frames += isinstance(await asyncio.wait_for(ws.recv(), 60), bytes)
            t0 = time.perf_counter()
            await ws.send(json.dumps({"cmd": "pause", "played_ms": 400}))
            _, t1 = await _recv_until(ws, _is_event("paused"))
            if i >= 2:
                rollback.append((t1 - t0) * 1000)
            await ws.send(json.dumps({"cmd": "reset"}))
            await _recv_until(ws, _is_event("reset"))
        await ws.send(json.dumps({"cmd": "set_voice", "name": "bench", "audio": _voice_wav_b64(),
                                  "transcript": VOICE_TRANSCRIPT}))
        msg, _ = await _recv_until(ws, lambda m: isinstance(m, str) and json.loads(m).get("event") in ("voice_ready", "error"),
                                   timeout=300)
        voice_info = json.loads(msg)
        if voice_info.get("event") == "voice_ready":
            for i in range(runs + 2):  # from a prepared voice (restored by copy at start)
                t0 = time.perf_counter()
                await ws.send(json.dumps({"cmd": "start", "text": "[S1] Hello, how can I help you today?",
                                          "voice": "bench"}))
                got = await _first_audio_and_onset(ws, t0)
                if i >= 2:
                    voiced.append(got)
                await ws.send(json.dumps({"cmd": "reset", "voice": "bench"}))
                await _recv_until(ws, _is_event("reset"))
    pair = lambda rows: {"ttfb_ms": stats([r[0] for r in rows]), "onset_ms": stats([r[1] for r in rows])}  # noqa: E731
    return {"start": pair(cold), "inject_after_done": pair(inject), "start_with_voice": pair(voiced),
            "pause_with_played_ms_to_paused_ms": stats(rollback), "voice": voice_info}


# -- driver ----------------------------------------------------------------------------------------

def step_variants(args, device: torch.device) -> list[str]:
    """The frame-step variants to time: `--steps`, or eager and graph at cfg 1 and 2 (plus
    compiled with --compile), as before."""
    if args.steps:
        return [v.strip() for v in args.steps.split(",") if v.strip()]
    graphs = ["graph", "eager"] if device.type == "cuda" else ["eager"]
    keys = [f"{g}_cfg{c}" for c in (1, 2) for g in graphs]
    if args.compile and device.type == "cuda":
        keys += ["graph_compiled_cfg1", "graph_compiled_cfg2"]
    return keys


VARIANT_OPTIONS = {  # variant name parts that change a default, to time one change against it
    "sortdraw": ("sampler", "torch"),  # the sorted torch draw under the triton kernels
    "fuseddraw": ("sampler", "triton"),  # the fused draw under the torch kernels
    "nopdl": ("pdl", False),  # triton kernels without programmatic dependent launch
    "bits1": ("select_bits", 1),  # the fused draw's threshold select, 1, 2 or 4 bits a pass
    "bits2": ("select_bits", 2),
    "bits4": ("select_bits", 4),
    "persist": ("persistent", True),  # each Triton stage as one persistent launch (`--persistent-stage on`)
    "sdpa": ("decode_attention", False),  # the decoder's attention by SDPA (`--decode-attention off`)
    "decattn": ("decode_attention", True),  # the decoder's attention by `decode_attention` over filled slots
    "h100tiles": ("tilings", "H100"),  # the Triton kernels with the H100's tile table (default: this GPU's)
    "h200tiles": ("tilings", "H200"),
    # the torch stages' attention as one Triton launch a layer (`--batched-stage-attention on`), or
    # SDPA (`off`); it acts on the torch path: the batched rows of the Triton depformer, or every
    # row with the torch kernels. With --batched, the batched steps also run once in each mode a
    # variant names (`batched_runs`)
    "stageattn": ("stage_attention", True),
    "stagesdpa": ("stage_attention", False),
}


def variant_options(key: str) -> dict:
    return dict(VARIANT_OPTIONS[p] for p in key.split("_") if p in VARIANT_OPTIONS)


SWITCH = {mode.value: mode.forced for mode in CompileMode}  # an auto|on|off flag as the switch it sets


def batched_runs(args) -> list[tuple[str, bool | None]]:
    """(result key, stage attention mode) of each batched run: "batched" with
    --batched-stage-attention, then "batched_<part>" for each other mode a step variant names
    (`_stageattn`, `_stagesdpa`), so that `--steps ..._cfg2,..._stageattn_cfg2` compares the switch
    where it acts, at the batched rows, in one process (the kernels, compile and draw as the flags)."""
    runs = [("batched", SWITCH[args.batched_stage_attention])]
    parts = {part for key in args.steps.split(",") for part in key.strip().split("_")}
    for part in sorted(parts & VARIANT_OPTIONS.keys()):
        option, mode = VARIANT_OPTIONS[part]
        if option == "stage_attention" and mode not in {m for _, m in runs}:
            runs.append((f"batched_{part}", mode))
    return runs


def parse_variant(key: str) -> tuple[bool, bool, str, str, bool]:
    """`graph_compiled_triton_fp8_cfg2` → (graph, compile, kernels, weights, cfg); the parts of
    VARIANT_OPTIONS may follow (`variant_options`)."""
    parts = key.split("_")
    if parts[0] not in ("graph", "eager") or parts[-1] not in ("cfg1", "cfg2") or \
            not set(parts[1:-1]) <= {"compiled", "triton", "fp8", *VARIANT_OPTIONS}:
        raise SystemExit(f"unknown step variant {key!r}: (graph|eager)[_compiled][_triton][_fp8]"
                         f"[_{'|'.join(VARIANT_OPTIONS)}]_(cfg1|cfg2)")
    return (parts[0] == "graph", "compiled" in parts, "triton" if "triton" in parts else "torch",
            "fp8" if "fp8" in parts else "bf16", parts[-1] == "cfg2")


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
    steps = {}
    for key in step_variants(args, device):
        graph, compile, kernels, weights, cfg = parse_variant(key)
        options = variant_options(key)
        frames = args.frames if graph else max(20, args.frames // 4)
        select_bits = fused_pick.SELECT_BITS
        persistent = persistent_stage.ENABLED
        decoder_attention = decode_attention.ENABLED
        stage_attention = dia2_model.BATCHED_STAGE_ATTENTION
        try:
            fused_kernels.PDL = options.get("pdl")  # None: the default (on where the GPU has it)
            fused_kernels.TILINGS_MODEL = options.get("tilings")  # None: this GPU's table
            persistent_stage.ENABLED = options.get("persistent", persistent)  # read as the stepper is built
            decode_attention.ENABLED = options.get("decode_attention", decoder_attention)  # likewise
            dia2_model.BATCHED_STAGE_ATTENTION = options.get("stage_attention", stage_attention)  # likewise
            fused_pick.SELECT_BITS = options.get("select_bits", select_bits)  # read when the graphs are captured
            steps[key] = bench_steps(tts, cfg=cfg, graph=graph, frames=frames, compile=compile, kernels=kernels,
                                     weights=weights, sampler=options.get("sampler", args.sampler),
                                     profile=args.profile and graph and cfg and key != "graph_cfg2")
        except Exception as exc:  # a variant that fails (compile, triton) is reported, not fatal to the run
            steps[key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        finally:
            fused_kernels.PDL = None
            fused_kernels.TILINGS_MODEL = None
            fused_pick.SELECT_BITS = select_bits
            persistent_stage.ENABLED = persistent
            decode_attention.ENABLED = decoder_attention
            dia2_model.BATCHED_STAGE_ATTENTION = stage_attention
        print(f"[{name}] step {key}: {steps[key]}", flush=True)
    if args.fp8_agreement and device.type == "cuda":
        result["fp8_agreement"] = bench_fp8_agreement(tts, frames=args.fp8_agreement)
        print(f"[{name}] fp8 vs bf16 greedy tokens: {result['fp8_agreement']}", flush=True)
    result["step_ms"] = steps
    if args.batched:
        sizes = [int(s) for s in args.batched.split(",")]
        for run_key, mode in batched_runs(args):
            dia2_model.BATCHED_STAGE_ATTENTION = mode  # read as the stepper is built
            try:
                result[run_key] = bench_batched(tts, sizes=sizes, frames=max(20, args.frames // 4),
                                                compile=args.compile and device.type == "cuda", kernels=args.kernels,
                                                profile=args.profile and device.type == "cuda",
                                                compile_max_calls=args.compile_max_calls, sampler=args.sampler)
            finally:
                dia2_model.BATCHED_STAGE_ATTENTION = SWITCH[args.batched_stage_attention]
    result["mimi_decode_ms"] = bench_mimi(tts, args.frames)
    result["voice_prefill"] = bench_prefill(tts)
    print(f"[{name}] voice prefill: {result['voice_prefill']}", flush=True)
    print(f"[{name}] mimi decode: {result['mimi_decode_ms']}", flush=True)
    if not args.skip_server:
        compiled = args.compile and device.type == "cuda"
        port, stop = start_server(tts, cfg_scale=args.cfg_scale, compile=compiled, kernels=args.kernels,
                                  step_in_flight=args.step_in_flight, decode_stream=args.decode_stream)
        try:
            result["server"] = asyncio.run(bench_server(port, args.runs))
        finally:
            stop()
        result["server"]["cfg_scale"] = args.cfg_scale
        result["server"]["compiled"] = compiled
        result["server"]["kernels"] = args.kernels
        result["server"]["step_in_flight"] = args.step_in_flight or "server default"
        result["server"]["decode_stream"] = args.decode_stream or "server default"
        print(f"[{name}] server: {result['server']}", flush=True)
    cfg_key = 2 if args.cfg_scale != 1 else 1
    timed = [v for k, v in steps.items() if k.endswith(f"cfg{cfg_key}") and "fp8" not in k and "p50" in v]
    best = min(timed, key=lambda v: v["p50"], default=None)
    result["rtf"] = round((best["p50"] + result["mimi_decode_ms"]["p50"]) / 80.0, 4) if best else None
    if device.type == "cuda":
        result["gpu_peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del tts
    return result


def print_table(results: list[dict]) -> None:
    print("\n| preset | variant | p50 ms/frame | p95 | decoder-only p50 | first decodable frame ms |")
    print("|---|---|---|---|---|---|")
    for r in results:
        for key, s in r["step_ms"].items():
            if "p50" not in s:
                print(f"| {r['preset']} | {key} | {s} | | | |")
                continue
            print(f"| {r['preset']} | {key} | {s['p50']} | {s['p95']} | {s['decoder_only'].get('p50')} | "
                  f"{s['first_decodable_frame_ms']} |")
    for r in results:
        srv = r.get("server", {})
        print(f"\n{r['preset']} on {r['device']}: mimi decode p50 {r['mimi_decode_ms'].get('p50')} ms, "
              f"RTF {r['rtf']}, GPU peak {r.get('gpu_peak_memory_gb')} GB")
        for kind in ("start", "inject_after_done", "start_with_voice"):
            if kind in srv:
                print(f"  {kind}: first byte {srv[kind]['ttfb_ms']}, speech onset {srv[kind]['onset_ms']}")
        eager = r["step_ms"].get("eager_cfg2")
        for key in ("graph_cfg2", "graph_compiled_cfg2"):
            fast = r["step_ms"].get(key)
            if eager and fast and "p50" in fast:
                print(f"  {key} speed-up over eager at cfg 2: {eager['p50'] / fast['p50']:.1f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dia2stream.tools.bench", description=__doc__,
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
    parser.add_argument("--profile", action="store_true", help="kernel profile of each graph cfg 2 variant")
    parser.add_argument("--steps", default="", help="step variants to time, e.g. graph_compiled_cfg2,"
                        "graph_compiled_triton_cfg2 (default: eager/graph at cfg 1 and 2, compiled with --compile)")
    parser.add_argument("--kernels", default="torch", choices=["torch", "triton"],
                        help="depformer kernels of the batched steps and the server runs")
    parser.add_argument("--sampler", default=Sampler.AUTO.value, choices=[m.value for m in Sampler],
                        help="the draw of the steps timed where a variant name does not set it "
                             "(auto: the fused one with the triton kernels)")
    parser.add_argument("--persistent-stage", default="off", choices=["on", "off"],
                        help="each Triton depformer stage as one persistent launch, for the batched steps and the "
                             "server runs (as the server's flag; the step variants take `_persist`)")
    parser.add_argument("--decode-attention", default="off", choices=["auto", "on", "off"],
                        help="the decoder's attention over each row's filled slots (Triton) instead of SDPA, for "
                             "the batched steps and the server runs (as the server's flag; step variants take "
                             "`_sdpa` / `_decattn`)")
    parser.add_argument("--batched-stage-attention", default="auto", choices=list(SWITCH),
                        help="the torch stages' attention (the batched rows) as one Triton launch a layer instead "
                             "of ~6 kernels with SDPA, for the batched steps and the server runs (as the server's "
                             "flag; the step variants take `_stageattn` / `_stagesdpa`, and with --batched each mode "
                             "they name gets batched steps of its own)")
    parser.add_argument("--batched-attention-rows", type=int, default=fused_kernels.BATCHED_ATTENTION_ROWS,
                        help="rows of a head per program in the batched stages' one-launch attention "
                             "(kernels.BATCHED_ATTENTION_ROWS; more share the stage's maps between rows)")
    parser.add_argument("--compile-dynamic", default="off", choices=["on", "off"],
                        help="every shape dynamic from torch.compile's first compile (as the server's flag)")
    parser.add_argument("--compile-max-calls", type=int, default=None,
                        help="batched steps: largest padded batch that runs compiled (as the server's flag)")
    parser.add_argument("--fp8-agreement", type=int, default=0, metavar="FRAMES",
                        help="also measure how often fp8 depformer weights change a greedy token (CUDA)")
    parser.add_argument("--batched", default="", help="comma-separated call counts for batched steps, e.g. 1,8,16,32,64")
    parser.add_argument("--step-in-flight", default=None, choices=["auto", "on", "off"],
                        help="the server's, as server.py's (default: its default)")
    parser.add_argument("--decode-stream", default=None, choices=["on", "off"],
                        help="the server's, as server.py's (default: its default)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--profile-out", default=None, metavar="FILE",
                        help="write a GPU profile for --simulate-gpu from the measured figures (profiles/README.md)")
    parser.add_argument("--profile-from", default=None, metavar="BENCH_JSON",
                        help="with --profile-out: build the profile from this earlier run's --json, measure nothing")
    args = parser.parse_args(argv)
    persistent_stage.ENABLED = args.persistent_stage == "on"
    decode_attention.ENABLED = SWITCH[args.decode_attention]
    if args.batched_attention_rows < 1:
        parser.error("--batched-attention-rows must be 1 or more")
    fused_kernels.BATCHED_ATTENTION_ROWS = args.batched_attention_rows
    graphs.DYNAMIC_SHAPES = args.compile_dynamic == "on"
    dia2_model.BATCHED_STAGE_ATTENTION = SWITCH[args.batched_stage_attention]
    command = "python -m dia2stream.tools.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.profile_from:
        if not args.profile_out:
            parser.error("--profile-from needs --profile-out")
        earlier = json.loads(Path(args.profile_from).read_text())
        write_profile(earlier["results"][0], args.profile_out, f"{args.profile_from} ({earlier.get('date', '?')}: "
                      f"{earlier.get('command', '?')})")
        return 0
    results = [run_preset(name.strip(), args) for name in args.presets.split(",") if name.strip()]
    print_table(results)
    payload = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
               "command": command, "results": results}
    print(json.dumps(payload, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    if args.profile_out:
        write_profile(results[0], args.profile_out, f"{payload['date']}: {command}")
    return 0


def write_profile(result: dict, path: str, source: str) -> None:
    profile = gpu_profile(result, source)
    Path(path).write_text(json.dumps(profile, indent=2) + "\n")
    print(f"GPU profile written to {path}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
