"""A burst of new turns on the highest slots while the other calls play, on the simulated GPU, with
and without moving the new turns to the lowest slots (issue 18). Every figure is SIMULATED.

    .venv/bin/python scripts/sim_burst.py --profile profiles/h200-2b.json [--calls 64 --burst 8 --rounds 4]

Prints, for moves off and on: the new turns' first audio (from their `start` to their first frame
out: 18 start-up steps plus the lead-in), the playing calls' underruns, the slot moves made.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dia2stream.call.call import AudioFrame  # noqa: E402
from dia2stream.engine.engine import Engine  # noqa: E402
from dia2stream.engine.simulated import GpuProfile, SimulatedDia2  # noqa: E402
from dia2stream.serve.config import ServerConfig  # noqa: E402
from dia2stream.tools import playback  # noqa: E402
from dia2stream.wire import protocol as p  # noqa: E402


class Listener:
    def __init__(self):
        self.frames: list[float] = []
        self.call = None

    def __call__(self, item) -> None:
        if isinstance(item, AudioFrame):
            self.frames.append(time.monotonic())
            self.call.frames_acked += 1


def run(profile: GpuProfile, calls: int, burst: int, rounds: int, move_slots: bool) -> str:
    tts = SimulatedDia2(profile)
    config = ServerConfig(overload_refusal_s=0.0).engine_config(tts.device, max_calls=calls, max_lead_ms=1000,
                                                                 move_slots=move_slots)
    engine = Engine(tts, config)
    listeners = []
    for _ in range(calls):
        listener = Listener()
        listener.call = engine.open_call(listener)
        listeners.append(listener)
    playing, new = listeners[:calls - burst], listeners[calls - burst:]
    for i, listener in enumerate(playing):
        engine.submit(listener.call, p.Start(text="[S1] " + " ".join(["word"] * 200), seed=i))
    while not all(len(listener.frames) >= 30 for listener in playing):
        time.sleep(0.01)
    first_audio = []
    for _ in range(rounds):
        for listener in new:
            listener.frames.clear()
        sent = time.monotonic()
        for i, listener in enumerate(new):
            engine.submit(listener.call, p.Start(text="[S1] " + " ".join(["hello"] * 6), seed=100 + i))
        while not all(listener.frames for listener in new):
            time.sleep(0.002)
        first_audio += [listener.frames[0] - sent for listener in new]
        time.sleep(2.5)  # the short turns end; the others play on
    underruns = sum(sum(1 for late in playback.simulate(l.frames, l.frames[0]).late_s if late > 0) for l in playing)
    engine.close()
    p95 = statistics.quantiles(first_audio, n=20)[18]
    return (f"SIMULATED {profile.gpu}, {calls} slots, {burst} new turns x {rounds} on the top slots, moves "
            f"{'on ' if move_slots else 'off'}: first audio p50 {statistics.median(first_audio) * 1000:.0f} ms, "
            f"p95 {p95 * 1000:.0f} ms; playing calls' underruns {underruns}; slot moves {engine.slot_moves}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="profiles/h200-2b.json")
    parser.add_argument("--calls", type=int, default=64)
    parser.add_argument("--burst", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    profile = GpuProfile.load(args.profile)
    for move_slots in (False, True):
        print(run(profile, args.calls, args.burst, args.rounds, move_slots), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
