"""What one flooding connection does to another call on the same server (issue 19's measurement).

    .venv/bin/python scripts/bystander_flood.py                   # tiny checkpoint, CPU, --max-calls 2
    .venv/bin/python scripts/bystander_flood.py --flood-s 6 --json out.json
    .venv/bin/python scripts/bystander_flood.py --flood-close-s 0 --engine-process off   # one process, no policy

A server runs in this process (`serve.server.run`, the server's defaults but `--max-calls 2`). A
bystander call speaks long utterances back to back, played by a client without a jitter buffer
(`tools.playback.simulate`). After `--before-s`, a second connection sends `ping` as fast as it
can for `--flood-s` while reading its replies (until the server closes it); then `--after-s` of
quiet, and a new connection tries to get a call. Printed per phase: the bystander's frames
(against the 12.5 a second it should get), its underruns and the total gap it heard; the
flooder's messages, replies and close code; whether the newcomer got `ready` or `busy`.
Only public pieces are used, so the script runs unchanged on older trees (a before/after).

The flooder runs in a process of its own (`--flooder-here` keeps it on this process's event loop,
as before): here it would take this interpreter from the bystander's client, and the figures
would show the clients' contention, not the server's. `--flood-close-s 0` turns the abuse policy
off so the flood lasts `--flood-s` (the worst case the server must survive); `--engine-process`
picks where the engine runs (default: the server's default).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import multiprocessing
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from dia2stream.clock import FRAME_RATE  # noqa: E402
from dia2stream.serve.config import ServerConfig  # noqa: E402
from dia2stream.serve.server import run  # noqa: E402
from dia2stream.tools.playback import simulate  # noqa: E402

TEXT = "[S1] " + " ".join(["one two three four five six seven eight nine ten"] * 4)


def start_server(config: ServerConfig):
    port: concurrent.futures.Future = concurrent.futures.Future()
    holder: dict = {}

    async def serve() -> None:
        holder["loop"], holder["stop"] = asyncio.get_running_loop(), asyncio.Event()
        await run(config, port, stop=holder["stop"])

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    return port.result(timeout=300), lambda: (holder["loop"].call_soon_threadsafe(holder["stop"].set),
                                              thread.join(30))


async def bystander(url: str, stop: asyncio.Event, utterances: list[list[float]]) -> None:
    async with connect(url, open_timeout=60, max_size=None) as ws:
        json.loads(await ws.recv())
        n = 0
        while not stop.is_set():
            n += 1
            await ws.send(json.dumps({"cmd": "start", "text": TEXT, "id": n}))
            arrivals: list[float] = []
            utterances.append(arrivals)
            async for message in ws:
                if isinstance(message, bytes):
                    arrivals.append(time.monotonic())
                elif json.loads(message)["event"] in ("done", "error"):
                    break


async def flooder(url: str, seconds: float) -> dict:
    ws = await connect(url, open_timeout=60, max_size=None)
    json.loads(await ws.recv())
    replies = 0

    async def read() -> None:
        nonlocal replies
        try:
            async for _ in ws:
                replies += 1
        except ConnectionClosed:
            pass

    reader = asyncio.create_task(read())
    sent, t0 = 0, time.monotonic()
    try:
        while time.monotonic() - t0 < seconds and not reader.done():
            await ws.send('{"cmd": "ping"}')
            sent += 1
            if sent % 64 == 0:
                await asyncio.sleep(0)  # let the reader run
    except ConnectionClosed:
        pass
    closed_after = time.monotonic() - t0 if reader.done() else None
    await ws.close()
    await reader
    return {"sent": sent, "replies": replies, "close_code": ws.close_code, "closed_after_s": closed_after}


def flood_in_this_process(url: str, seconds: float) -> dict:
    return asyncio.run(flooder(url, seconds))


def phase_figures(utterances: list[list[float]], start: float, end: float) -> dict:
    frames = underruns = 0
    gap = 0.0
    for arrivals in utterances:
        if not arrivals:
            continue
        play = simulate(arrivals, arrivals[0], tolerance_s=0.002)
        for at, late in zip(play.arrivals, play.late_s):
            if start <= at < end:
                frames += 1
                underruns += late > 0
                gap += late
    return {"seconds": round(end - start, 2), "frames": frames, "expected": round((end - start) * FRAME_RATE),
            "underruns": underruns, "stalled_ms": round(gap * 1000)}


async def measure(url: str, before_s: float, flood_s: float, after_s: float, flooder_here: bool = False) -> dict:
    stop, utterances = asyncio.Event(), []
    speaker = asyncio.create_task(bystander(url, stop, utterances))
    while not any(utterances):
        await asyncio.sleep(0.05)
    t0 = time.monotonic()
    await asyncio.sleep(before_s)
    if flooder_here:
        t1 = time.monotonic()
        flood = await flooder(url, flood_s)
    else:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            await asyncio.get_running_loop().run_in_executor(pool, time.sleep, 0)  # the process is up
            t1 = time.monotonic()
            flood = await asyncio.get_running_loop().run_in_executor(pool, flood_in_this_process, url, flood_s)
    t2 = time.monotonic()
    await asyncio.sleep(after_s)
    t3 = time.monotonic()
    try:
        async with connect(url, open_timeout=60) as ws:
            newcomer = json.loads(await ws.recv())
            newcomer = newcomer["event"] if newcomer["event"] != "error" else newcomer["code"]
    except Exception as exc:  # noqa: BLE001 - reported
        newcomer = f"{type(exc).__name__}: {exc}"
    stop.set()
    await asyncio.wait_for(speaker, 120)
    return {"before": phase_figures(utterances, t0, t1), "flood": phase_figures(utterances, t1, t2),
            "after": phase_figures(utterances, t2, t3), "flooder": flood, "newcomer": newcomer}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before-s", type=float, default=3.0)
    parser.add_argument("--flood-s", type=float, default=6.0)
    parser.add_argument("--after-s", type=float, default=5.0)
    parser.add_argument("--checkpoint", default="tiny")
    parser.add_argument("--mimi", default=None)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--flood-close-s", type=float, default=None, help="the server's abuse policy (0 = off)")
    parser.add_argument("--engine-process", choices=("on", "off"), default=None,
                        help="where the server runs its engine (default: the server's default)")
    parser.add_argument("--flooder-here", action="store_true", help="flood from this process's event loop")
    args = parser.parse_args(argv)
    extra = {name: value for name, value in (("flood_close_s", args.flood_close_s),
                                               ("engine_process", args.engine_process)) if value is not None}
    config = ServerConfig(host="127.0.0.1", port=0, checkpoint=args.checkpoint, mimi=args.mimi, device="cpu",
                          max_calls=2, log_level="ERROR", **extra)
    port, stop = start_server(config)
    try:
        result = asyncio.run(measure(f"ws://127.0.0.1:{port}/", args.before_s, args.flood_s, args.after_s,
                                     args.flooder_here))
    finally:
        stop()
    for name in ("before", "flood", "after"):
        r = result[name]
        print(f"{name:>6}: {r['seconds']:5.1f} s, bystander {r['frames']} frames ({r['expected']} expected), "
              f"{r['underruns']} underruns, stalled {r['stalled_ms']} ms")
    f = result["flooder"]
    print(f"flooder: {f['sent']} sent, {f['replies']} replies, close code {f['close_code']}"
          + (f" after {f['closed_after_s']:.2f} s" if f["closed_after_s"] is not None else " (never closed)")
          + f"; a new connection right after: {result['newcomer']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
