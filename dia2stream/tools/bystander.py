"""What one hostile connection does to another call on the same server (issue 19's measurement).

    python -m dia2stream.tools.bystander                       # tiny checkpoint, CPU, --max-calls 2
    python -m dia2stream.tools.bystander --attack churn         # 5 clients connecting and closing
    python -m dia2stream.tools.bystander --attack large         # maximum-size messages back to back
    python -m dia2stream.tools.bystander --flood-close-s 0 --engine-process off   # one process, no policy

A server runs (`python server.py`, the server's defaults but `--max-calls 2`). A bystander call
speaks long utterances back to back, played by a client without a jitter buffer
(`tools.playback.simulate`). After `--before-s`, the attacker runs for up to `--flood-s`:
`ping` as fast as it can while reading its replies (`--attack ping`, until the server closes
it), connect/close cycles from five clients at once (`churn`), or valid messages of exactly
the server's command limit back to back (`large`); then `--after-s` of quiet, and a new
connection tries to get a call. Printed per phase: the bystander's frames (against the 12.5 a
second it should get), its underruns and the total gap it heard; the attacker's messages or
cycles and close code; whether the newcomer got `ready` or `busy`.

The server runs as `server.py` in its own process(es) and the attacker in a process of its own,
niced by `--flooder-nice` (a remote client's CPU is not the server's); `--server-here` and
`--flooder-here` put them back in this one: in one interpreter with the bystander's client they
would take it from the client, and the figures would show the harness's contention, not the
server's. `--flood-close-s 0` turns the abuse policy off so a flood lasts `--flood-s` (the worst
case the server must survive); `--engine-process` picks where the engine runs (default: the
server's default). `tests/test_bystander.py` runs the three attacks and asserts the bystander
hears no underrun.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import multiprocessing
import os
import signal
import subprocess
import json
import sys
import threading
import time
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from dia2stream.clock import FRAME_RATE
from dia2stream.tools.playback import simulate

ATTACKS = ("ping", "churn", "large")
CHURN_CLIENTS = 5

TEXT = "[S1] " + " ".join(["one two three four five six seven eight nine ten"] * 4)


def start_server_here(config):
    """The server on a thread of this process (`--server-here`), as the script first did."""
    from dia2stream.serve.server import run  # here: the flooder's process need not import torch

    port: concurrent.futures.Future = concurrent.futures.Future()
    holder: dict = {}

    async def serve() -> None:
        holder["loop"], holder["stop"] = asyncio.get_running_loop(), asyncio.Event()
        await run(config, port, stop=holder["stop"])

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    return port.result(timeout=300), lambda: (holder["loop"].call_soon_threadsafe(holder["stop"].set),
                                              thread.join(30))


def start_server_process(flags: list[str], cpus: set[int] | None = None):
    """`python server.py FLAGS` in its own process, as it is deployed: the bystander's client (this
    process) and the flooder (another) do not share its interpreter."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "server.py", *flags], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    for line in proc.stdout:
        if line.startswith("dia2stream ready on "):
            port = int(line.strip().rstrip("/").rsplit(":", 1)[1])
            break
    else:
        raise SystemExit(f"server.py exited with {proc.wait()} before it was ready")
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its pipe from filling

    def stop() -> None:
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)  # the second one stops at once (no drain)
        proc.wait(60)

    return port, stop


class NoCall(Exception):
    """The bystander got no call, or lost it before its first frame: nothing to measure."""


CALL_WAIT_S = 30.0  # a hung-up call's slot is freed by the engine a little after its socket closes


async def call_when_free(url: str, wait_s: float):
    """A connection that got `ready`: refused as busy, try again until `wait_s` have passed."""
    deadline = time.monotonic() + wait_s
    while True:
        ws = await connect(url, open_timeout=60, max_size=None)
        first = json.loads(await ws.recv())
        if first["event"] == "ready":
            return ws
        await ws.close()
        if time.monotonic() > deadline:
            raise NoCall(f"the bystander got no call within {wait_s:.0f} s: {first}")
        await asyncio.sleep(0.5)


async def bystander(url: str, stop: asyncio.Event, utterances: list[list[float]],
                    call_wait_s: float = CALL_WAIT_S) -> None:
    async with await call_when_free(url, call_wait_s) as ws:
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


async def flooder(url: str, seconds: float, message: str = '{"cmd": "ping"}') -> dict:
    ws = await connect(url, open_timeout=60, max_size=None)
    first = json.loads(await ws.recv())  # `ready`, or the error a refusal carries
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
            await ws.send(message)
            sent += 1
            if sent % 64 == 0:
                await asyncio.sleep(0)  # let the reader run
    except ConnectionClosed:
        pass
    closed_after = time.monotonic() - t0 if reader.done() else None
    await ws.close()
    await reader
    return {"sent": sent, "replies": replies, "close_code": ws.close_code, "closed_after_s": closed_after,
            "first": first.get("message", first["event"])}


async def churner(url: str, seconds: float) -> dict:
    """Connect, read the first message (`ready` or `busy`) and close, from five clients at once."""
    outcomes: dict[str, int] = {}
    t0 = time.monotonic()

    async def cycle() -> None:
        while time.monotonic() - t0 < seconds:
            async with connect(url, open_timeout=60, close_timeout=2) as ws:
                first = json.loads(await ws.recv())
                key = first["event"] if first["event"] != "error" else first["code"]
                outcomes[key] = outcomes.get(key, 0) + 1

    await asyncio.gather(*[cycle() for _ in range(CHURN_CLIENTS)])
    return {"sent": sum(outcomes.values()), "replies": sum(outcomes.values()), "close_code": None,
            "closed_after_s": None, "outcomes": outcomes}


def largest_ping(max_command_bytes: int) -> str:
    """A valid `ping` of exactly `max_command_bytes` (padded with spaces inside the object)."""
    head, tail = '{"cmd": "ping", "id": 1', "}"
    return head + " " * (max_command_bytes - len(head) - len(tail)) + tail


def attack_in_this_process(url: str, seconds: float, nice: int = 0, attack: str = "ping",
                           max_command_bytes: int = 64 * 1024) -> dict:
    if nice:
        os.nice(nice)  # (its CPU affinity is this process's: see --pin)
    if attack == "churn":
        return asyncio.run(churner(url, seconds))
    message = largest_ping(max_command_bytes) if attack == "large" else '{"cmd": "ping"}'
    return asyncio.run(flooder(url, seconds, message))


def step_figures(url: str) -> dict:
    """The engine's frame-step histogram from /metrics (count, sum, steps over 80 ms)."""
    import urllib.request

    http = url.replace("ws://", "http://").rstrip("/") + "/metrics"
    out = {"count": 0.0, "sum": 0.0, "under_80ms": 0.0}
    with urllib.request.urlopen(http, timeout=30) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("dia2_frame_step_seconds_count "):
                out["count"] = float(line.split()[-1])
            elif line.startswith("dia2_frame_step_seconds_sum "):
                out["sum"] = float(line.split()[-1])
            elif line.startswith('dia2_frame_step_seconds_bucket{le="0.08"}'):
                out["under_80ms"] = float(line.split()[-1])
    return out


def step_delta(before: dict, after: dict) -> dict:
    steps = after["count"] - before["count"]
    return {"steps": int(steps), "mean_ms": round(1000 * (after["sum"] - before["sum"]) / max(steps, 1), 1),
            "over_80ms": int(steps - (after["under_80ms"] - before["under_80ms"]))}


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


async def measure(url: str, before_s: float, flood_s: float, after_s: float, flooder_here: bool = False,
                  flooder_nice: int = 0, attack: str = "ping", max_command_bytes: int = 64 * 1024,
                  call_wait_s: float = CALL_WAIT_S) -> dict:
    stop, utterances = asyncio.Event(), []
    speaker = asyncio.create_task(bystander(url, stop, utterances, call_wait_s))
    while not any(utterances):
        if speaker.done():  # it ended before its first frame: its error, not a wait without end
            speaker.result()
            raise NoCall(f"the bystander hung up before its first frame: {utterances}")
        await asyncio.sleep(0.05)
    t0 = time.monotonic()
    await asyncio.sleep(before_s)
    steps = [await asyncio.to_thread(step_figures, url)]
    if flooder_here:
        t1 = time.monotonic()
        flood = await (churner(url, flood_s) if attack == "churn" else
                       flooder(url, flood_s, largest_ping(max_command_bytes) if attack == "large" else '{"cmd": "ping"}'))
    else:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            await asyncio.get_running_loop().run_in_executor(pool, time.sleep, 0)  # the process is up
            steps = [await asyncio.to_thread(step_figures, url)]
            t1 = time.monotonic()
            flood = await asyncio.get_running_loop().run_in_executor(pool, attack_in_this_process, url, flood_s,
                                                                     flooder_nice, attack, max_command_bytes)
    t2 = time.monotonic()
    steps.append(await asyncio.to_thread(step_figures, url))
    await asyncio.sleep(after_s)
    t3 = time.monotonic()
    try:
        async with connect(url, open_timeout=60) as ws:
            newcomer = json.loads(await ws.recv())
            newcomer = newcomer["event"] if newcomer["event"] != "error" else newcomer["code"]
    except Exception as exc:  # noqa: BLE001 - reported
        newcomer = f"{type(exc).__name__}: {exc}"
    stop.set()
    speaker.cancel()  # the figures are in: hang up mid-utterance rather than wait for its end
    with contextlib.suppress(asyncio.CancelledError):
        await speaker
    return {"before": phase_figures(utterances, t0, t1), "flood": phase_figures(utterances, t1, t2),
            "after": phase_figures(utterances, t2, t3), "flooder": flood, "newcomer": newcomer,
            "steps_during_flood": step_delta(*steps)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attack", choices=ATTACKS, default="ping", help="what the hostile client does")
    parser.add_argument("--max-calls", type=int, default=2)
    parser.add_argument("--before-s", type=float, default=3.0)
    parser.add_argument("--flood-s", type=float, default=6.0)
    parser.add_argument("--after-s", type=float, default=5.0)
    parser.add_argument("--checkpoint", default="tiny")
    parser.add_argument("--mimi", default=None)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--flood-close-s", type=float, default=None, help="the server's abuse policy (0 = off)")
    parser.add_argument("--engine-process", choices=("on", "off"), default=None,
                        help="where the server runs its engine (default: the server's default)")
    parser.add_argument("--overload-refusal-s", type=float, default=None,
                        help="the server's refusal after calls fell behind (0 = never; on a busy machine the "
                             "flooder may otherwise be refused as busy)")
    parser.add_argument("--flooder-here", action="store_true", help="flood from this process's event loop")
    parser.add_argument("--server-here", action="store_true", help="run the server on a thread of this process")
    parser.add_argument("--pin", action="store_true",
                        help="server (and its engine process) on CPU 0, the clients (this process, the flooder) on "
                             "CPU 1: one core for the server whatever its processes, the clients' CPU not its own")
    parser.add_argument("--flooder-nice", type=int, default=0,
                        help="raise the flooder process's niceness (a remote client's CPU is not the server's)")
    args = parser.parse_args(argv)
    settings = {"checkpoint": args.checkpoint, "mimi": args.mimi, "device": "cpu", "max_calls": args.max_calls,
                "log_level": "ERROR", "flood_close_s": args.flood_close_s, "engine_process": args.engine_process,
                "overload_refusal_s": args.overload_refusal_s}
    settings = {name: value for name, value in settings.items() if value is not None}
    if args.server_here:
        from dia2stream.serve.config import ServerConfig

        port, stop = start_server_here(ServerConfig(host="127.0.0.1", port=0, **settings))
    else:
        flags = ["--host", "127.0.0.1", "--port", "0"]
        for name, value in settings.items():
            flags += ["--" + name.replace("_", "-"), str(value)]
        port, stop = start_server_process(flags, {0} if args.pin else None)
    if args.pin:
        os.sched_setaffinity(0, {1})  # the flooder's process, started later, inherits it
    try:
        result = asyncio.run(measure(f"ws://127.0.0.1:{port}/", args.before_s, args.flood_s, args.after_s,
                                     args.flooder_here, args.flooder_nice, args.attack))
    finally:
        stop()
    for name in ("before", "flood", "after"):
        r = result[name]
        print(f"{name:>6}: {r['seconds']:5.1f} s, bystander {r['frames']} frames ({r['expected']} expected), "
              f"{r['underruns']} underruns, stalled {r['stalled_ms']} ms")
    st = result["steps_during_flood"]
    print(f"engine during the flood: {st['steps']} frame steps, mean {st['mean_ms']} ms, {st['over_80ms']} over 80 ms")
    f = result["flooder"]
    if args.attack == "churn":
        print(f"churn: {f['sent']} connect/close cycles ({f['outcomes']}); a new connection right after: "
              f"{result['newcomer']}")
    else:
        print(f"{args.attack} flooder: {f['sent']} sent, {f['replies']} replies, close code {f['close_code']}"
              + (f" after {f['closed_after_s']:.2f} s" if f["closed_after_s"] is not None else " (never closed)")
              + f"; a new connection right after: {result['newcomer']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
