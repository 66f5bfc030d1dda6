"""Every call starting a turn at once, on the simulated GPU, with and without a step in flight
(issue 18). Every figure is SIMULATED: the frame step and the Mimi decode take the profile's time
and compute nothing; the host work (calls, scheduler, text state machines) is real.

    .venv/bin/python scripts/sim_flight.py --profile profiles/h200-2b.json [--calls 64 --runs 3]

Each run opens `--calls` calls, starts a turn on every one at once (a fresh start: the cheap
decoder-only steps first), waits for every done, then starts the next turn on every one at once
(an inject after done: full steps from the first). Prints, per mode and turn: the first audio
(from the commands to the call's first frame, p50 and max over the calls), the steps it took and
how many calls were launched with their step before still in flight, and the simulated GPU's busy
time over that window against the wall time. The busy time counts work when it is queued, so with
a step in flight it includes the step queued beyond the last first frame (busy can exceed wall).
"""

from __future__ import annotations

import argparse
import queue
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dia2stream.call.call import AudioFrame  # noqa: E402
from dia2stream.engine.engine import Engine  # noqa: E402
from dia2stream.engine.simulated import GpuProfile, SimulatedDia2  # noqa: E402
from dia2stream.serve.config import ServerConfig  # noqa: E402
from dia2stream.wire import protocol as p  # noqa: E402

TURNS = ("[S1] Thanks for calling. Let me check that for you.", " Okay, I found it. Anything else?")


class Listener:
    """A client that reads every frame at once and notes when the first of a turn came."""

    def __init__(self):
        self.call = None
        self.first: float | None = None
        self.events: queue.Queue = queue.Queue()

    def __call__(self, item) -> None:
        if isinstance(item, AudioFrame):
            self.call.frames_acked += 1
            if self.first is None:
                self.first = time.monotonic()
        else:
            self.events.put(item)

    def wait_done(self) -> None:
        while not isinstance(self.events.get(timeout=120), p.Done):
            pass


def run(profile: GpuProfile, calls: int, step_in_flight: str) -> list[str]:
    tts = SimulatedDia2(profile)
    config = ServerConfig(overload_refusal_s=0.0, step_in_flight=step_in_flight)
    engine = Engine(tts, config.engine_config(tts.device, max_calls=calls, max_unsent_frames=10**9))
    lines = []
    try:
        listeners = [Listener() for _ in range(calls)]
        for listener in listeners:
            listener.call = engine.open_call(listener)
        time.sleep(0.5)  # every attach done
        for turn, text in enumerate(TURNS):
            for listener in listeners:
                listener.first = None
            t0, steps, ahead, busy = time.monotonic(), engine.steps, engine.steps_ahead, tts.device_busy_seconds()
            for i, listener in enumerate(listeners):
                engine.submit(listener.call, p.Start(text=text, seed=i) if turn == 0 else p.Inject(text=text))
            while any(listener.first is None for listener in listeners):
                time.sleep(0.001)
            wall = time.monotonic() - t0
            firsts = sorted((listener.first - t0) * 1000 for listener in listeners)
            lines.append(f"{step_in_flight:>3} {'start' if turn == 0 else 'inject':>6}: first audio p50 "
                         f"{statistics.median(firsts):.0f} ms, max {firsts[-1]:.0f} ms; {engine.steps - steps} steps, "
                         f"{engine.steps_ahead - ahead} calls launched ahead; GPU busy "
                         f"{(tts.device_busy_seconds() - busy) * 1000:.0f} ms of {wall * 1000:.0f} ms")
            for listener in listeners:
                listener.wait_done()
    finally:
        engine.close()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="profiles/h200-2b.json")
    parser.add_argument("--calls", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    profile = GpuProfile.load(args.profile)
    print(f"SIMULATED {profile.gpu} {profile.preset}, {args.calls} calls")
    for _ in range(args.runs):
        for mode in ("off", "on"):
            print("\n".join(run(profile, args.calls, mode)), flush=True)


if __name__ == "__main__":
    main()
