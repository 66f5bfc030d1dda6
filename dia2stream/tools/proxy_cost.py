"""What HAProxy costs per proxied call: CPU and memory of a real HAProxy running deploy/haproxy.cfg
on 127.0.0.1, while N calls stream through it at the wire's pace (12.5 frames a second).

    python -m dia2stream.tools.proxy_cost --calls 50 --seconds 20 [--format pcm_24000] [--json out.json]

HAProxy only sees bytes, so the server behind it is a stand-in that needs no model: a websockets
server on 127.0.0.1 that answers /ready, an agent (`AgentResponder`) and, on each call, `ready`
then one binary frame of the format's size every 80 ms. N clients read every frame. HAProxy's
own CPU time (utime + stime from /proc) and memory (VmRSS) are read over a window with no call
(its health and agent checks alone), then over the same window with N calls; the difference,
per call, is what one call costs it. The configuration is deploy/haproxy.cfg made local by
`haproxy_config.fleet_config`, as tests/test_fleet.py runs it. Bounded: it stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from http import HTTPStatus
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from vendor_dia2.config import FRAME_RATE

from dia2stream.serve.agent import AgentResponder
from dia2stream.tools.haproxy_config import CONFIG, fleet_config, free_port
from dia2stream.wire.formats import FORMAT_NAMES, FORMATS

MAX_CALLS = 2000


@dataclass(frozen=True)
class ProcessUsage:
    cpu_s: float  # user + system
    rss_kib: int


def usage(pid: int) -> ProcessUsage:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu_s = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15 of stat)
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return ProcessUsage(cpu_s, rss)


# --- the stand-in server ------------------------------------------------------------------------------


class FrameSource:
    """Answers /ready with 200 and streams frames of `frame_bytes` at the wire's pace to each call."""

    def __init__(self, frame_bytes: int):
        self.frame = b"\0" * frame_bytes
        self.calls = 0

    def process_request(self, connection, request):
        if request.path.startswith("/ready") or request.path.startswith("/health"):
            return connection.respond(HTTPStatus.OK, "{}\n")
        return None

    async def handle(self, ws) -> None:
        self.calls += 1
        try:
            await ws.send(json.dumps({"event": "ready"}))
            start = time.monotonic()
            sent = 0
            while True:
                await ws.send(self.frame)
                sent += 1
                await asyncio.sleep(max(0.0, start + sent / FRAME_RATE - time.monotonic()))
        except ConnectionClosed:
            pass  # the caller hung up: the end of the run
        finally:
            self.calls -= 1

    def health(self) -> dict:
        return {"status": "ok", "calls": self.calls, "max_calls": MAX_CALLS, "busy": False}


# --- the run ------------------------------------------------------------------------------------------


@dataclass
class Result:
    calls: int
    format: str
    frame_bytes: int
    seconds: float
    frames_per_s_per_call: float  # what the callers received in the window (12.5 is the wire's pace)
    idle_cpu_percent: float  # of one core, checks only
    loaded_cpu_percent: float
    cpu_ms_per_call_second: float  # (loaded - idle) CPU per call per second of call
    cpu_us_per_frame: float
    calls_per_core: int | None  # at this cost, the calls one core of HAProxy carries
    rss_kib_idle: int
    rss_kib_loaded: int
    rss_kib_per_call: float
    haproxy: str


async def measure(args: argparse.Namespace) -> Result:
    frame_bytes = FORMATS[args.format].frame_bytes
    source = FrameSource(frame_bytes)
    async with serve(source.handle, "127.0.0.1", 0, process_request=source.process_request,
                     compression=None, max_queue=None) as server, \
            AgentResponder(source.health, "127.0.0.1", 0) as agent:
        port = server.sockets[0].getsockname()[1]
        calls_port, stats_port = free_port(), free_port()
        with tempfile.TemporaryDirectory(prefix="proxy-cost-") as tmp:
            config = Path(tmp) / "haproxy.cfg"
            config.write_text(fleet_config(CONFIG.read_text(), [(port, agent.port)], calls_port, stats_port,
                                           max_calls=MAX_CALLS))
            log = open(Path(tmp) / "haproxy.log", "w")
            proxy = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
            try:
                return await _measure_through(proxy, calls_port, source, args, frame_bytes)
            finally:
                proxy.terminate()
                proxy.wait(30)
                log.close()


async def _measure_through(proxy: subprocess.Popen, calls_port: int, source: FrameSource,
                           args: argparse.Namespace, frame_bytes: int) -> Result:
    url = f"ws://127.0.0.1:{calls_port}/"
    await _wait_up(url, args.seconds * 3)
    idle0 = usage(proxy.pid)
    await asyncio.sleep(args.seconds)
    idle1 = usage(proxy.pid)

    received = [0]
    counting = asyncio.Event()

    async def caller() -> None:
        async with connect(url, open_timeout=30, compression=None, max_queue=None) as ws:
            await ws.recv()  # ready
            async for message in ws:
                if counting.is_set():
                    received[0] += 1
                if stop.is_set():
                    return

    stop = asyncio.Event()
    callers = [asyncio.create_task(caller()) for _ in range(args.calls)]
    try:
        await asyncio.sleep(max(2.0, args.calls / 50))  # every call connected and streaming
        if source.calls != args.calls:
            raise RuntimeError(f"only {source.calls} of {args.calls} calls reached the stand-in server")
        counting.set()
        loaded0, t0 = usage(proxy.pid), time.monotonic()
        await asyncio.sleep(args.seconds)
        loaded1, window = usage(proxy.pid), time.monotonic() - t0
        counting.clear()
    finally:
        stop.set()
        for task in callers:
            task.cancel()
        await asyncio.gather(*callers, return_exceptions=True)

    idle_cpu = (idle1.cpu_s - idle0.cpu_s) / args.seconds
    loaded_cpu = (loaded1.cpu_s - loaded0.cpu_s) / window
    per_call = max(0.0, loaded_cpu - idle_cpu) / args.calls  # CPU seconds per call-second
    frames = received[0] / window
    version = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.splitlines()[0]
    return Result(
        calls=args.calls, format=args.format, frame_bytes=frame_bytes, seconds=round(window, 2),
        frames_per_s_per_call=round(frames / args.calls, 2),
        idle_cpu_percent=round(100 * idle_cpu, 3), loaded_cpu_percent=round(100 * loaded_cpu, 2),
        cpu_ms_per_call_second=round(1000 * per_call, 4),
        cpu_us_per_frame=round(1e6 * per_call / FRAME_RATE, 2),
        calls_per_core=round(1 / per_call) if per_call else None,  # None: too little CPU to read in the window
        rss_kib_idle=idle1.rss_kib, rss_kib_loaded=loaded1.rss_kib,
        rss_kib_per_call=round((loaded1.rss_kib - idle1.rss_kib) / args.calls, 1), haproxy=version)


async def _wait_up(url: str, timeout: float) -> None:
    """Until HAProxy has marked the stand-in UP (a call gets through)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with connect(url, open_timeout=5) as ws:
                await ws.recv()
                return
        except Exception:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no call got through HAProxy at {url} within {timeout:g} s") from None
            await asyncio.sleep(0.2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=50, help=f"calls streaming at once, 1..{MAX_CALLS} (default 50)")
    ap.add_argument("--seconds", type=float, default=20.0, help="each measuring window, seconds (default 20)")
    ap.add_argument("--format", choices=FORMAT_NAMES, default="pcm_24000", help="frame size of this format")
    ap.add_argument("--json", metavar="PATH", help="write the result as JSON")
    args = ap.parse_args(argv)
    if not 1 <= args.calls <= MAX_CALLS or not 1 <= args.seconds <= 600:
        ap.error(f"--calls must be in 1..{MAX_CALLS} and --seconds in 1..600")
    if shutil.which("haproxy") is None:
        ap.error("haproxy is not installed (apt-get install haproxy)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(measure(args))
    for key, value in asdict(result).items():
        print(f"{key:24s} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(result), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
