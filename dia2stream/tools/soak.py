"""Soak: long simulated calls on one engine, as fast as the CPU allows, watching for growth.

    python -m dia2stream.tools.soak --frames 20000 --calls 2            # tiny checkpoint, CPU
    python -m dia2stream.tools.soak --frames 2000 --json soak.json        # machine-readable summary

Each call runs the same conversation over and over until the engine has produced `--frames`
audio frames in all: `start` (a streamed turn, `final: false`), an `inject` while speaking,
`flush`, `pause` then `resume` mid-utterance, `done`, an `inject` after `done` (the next turn,
warm), `done`, `reset`. No pacing (`max_lead_ms` is huge) and no websocket: this measures the
engine, the calls and the codec, not the network. Every `--report-every` frames it prints the
rate, the process's RSS and the number of live Python objects (`gc.get_objects()`), each
against a baseline taken after the first `--warmup` frames, when every allocation a cycle needs
has been made once. A leak shows as growth that keeps rising with the frame count.
"""

from __future__ import annotations

import argparse
import gc
import json
import queue
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

from dia2stream.wire import protocol as p
from dia2stream.wire.frames import AudioFrame

WORDS = "so here is one more sentence about the weather and the long road home tonight".split()


@dataclass
class Sample:
    frames: int
    seconds: float
    rss_mb: float
    objects: int


@dataclass
class SoakReport:
    frames: int
    calls: int
    cycles: int
    seconds: float
    frames_per_s: float
    errors: dict[str, int]
    baseline: Sample | None
    final: Sample | None
    samples: list[Sample] = field(default_factory=list)

    @property
    def rss_growth_mb(self) -> float:
        return self.final.rss_mb - self.baseline.rss_mb

    @property
    def object_growth(self) -> int:
        return self.final.objects - self.baseline.objects

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "rss_growth_mb": round(self.rss_growth_mb, 1),
                           "object_growth": self.object_growth}, indent=1)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Counter:
    """Frames produced by all calls together; tells the callers when to stop and when to sample."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.frames = 0
        self.cycles = 0
        self.errors: dict[str, int] = {}
        self._lock = threading.Lock()

    def frame(self) -> None:
        with self._lock:
            self.frames += 1

    def error(self, code: str) -> None:
        with self._lock:
            self.errors[code] = self.errors.get(code, 0) + 1

    @property
    def done(self) -> bool:
        return self.frames >= self.target


class SoakCall:
    """One call's driver: submits the conversation's commands and waits for their answers,
    acknowledging frames as a server's send loop would (else pacing would stop the call)."""

    def __init__(self, engine, counter: Counter, index: int, timeout: float = 60.0) -> None:
        self.engine, self.counter, self.index, self.timeout = engine, counter, index, timeout
        self.events: queue.Queue = queue.Queue()
        self.call = engine.open_call(self.events.put)
        assert self.call is not None, "no free call slot"

    def run(self) -> None:
        n = 0
        while not self.counter.done:
            n += 1
            self.cycle(n)
            self.counter.cycles += 1

    def cycle(self, n: int) -> None:
        text = " ".join(WORDS[(n + i) % len(WORDS)] for i in range(10))
        self.send(p.Start(text=f"[S1] {text}", final=False, seed=n, id=f"s{n}"), p.Started)
        self.frames(3)
        self.send(p.Inject(text=" and then a little more", final=False, id=f"i{n}"))
        self.send(p.Flush())
        self.frames(3)
        self.send(p.Pause(id=f"p{n}"), p.Paused)
        self.send(p.Resume(id=f"r{n}"), p.Resumed, p.ErrorEvent)  # not_paused if it had just ended
        self.until(p.Done)
        self.send(p.Inject(text=" Okay, goodbye for now.", id=f"n{n}"), p.Started)
        self.until(p.Done)
        self.send(p.Reset(id=f"x{n}"), p.ResetDone)

    def send(self, command, *answers: type) -> None:
        self.engine.submit(self.call, command)
        if answers:
            self.until(*answers)

    def frames(self, count: int) -> None:
        target = self.call.frames_acked + count
        while self.call.frames_acked < target:
            if isinstance(self.next(), p.Done):
                return

    def until(self, *kinds: type) -> object:
        while True:
            item = self.next()
            if isinstance(item, kinds):
                return item

    def next(self) -> object:
        item = self.events.get(timeout=self.timeout)
        if isinstance(item, AudioFrame):
            self.call.frames_acked += 1
            self.counter.frame()
        elif isinstance(item, p.ErrorEvent):
            self.counter.error(item.code)
        return item


def sample(counter: Counter, t0: float) -> Sample:
    gc.collect()
    return Sample(counter.frames, round(time.perf_counter() - t0, 2), round(rss_mb(), 1), len(gc.get_objects()))


def soak(frames: int, calls: int = 2, checkpoint: str = "tiny", mimi: str | None = "random-small",
         warmup: int | None = None, report_every: int = 2000, out=sys.stdout, tts=None) -> SoakReport:
    """Run the soak; prints progress to `out` (None: silent). `tts`: a loaded model to reuse."""
    import torch

    from vendor_dia2 import Dia2

    from dia2stream.engine.engine import Engine
    from dia2stream.serve.config import ServerConfig

    torch.set_grad_enabled(False)
    tts = tts or Dia2.from_pretrained(checkpoint, device="cpu", mimi=mimi)
    engine = Engine(tts, ServerConfig(max_calls=calls, max_lead_ms=1e9).engine_config(tts.device))
    counter = Counter(frames)
    warmup = frames // 10 if warmup is None else warmup
    drivers = [SoakCall(engine, counter, i) for i in range(calls)]
    threads = [threading.Thread(target=d.run, name=f"soak-call-{i}", daemon=True) for i, d in enumerate(drivers)]
    t0 = time.perf_counter()
    baseline = None
    samples: list[Sample] = []
    try:
        for t in threads:
            t.start()
        next_report = warmup
        while any(t.is_alive() for t in threads):
            time.sleep(0.05)
            if counter.frames < next_report:
                continue
            s = sample(counter, t0)
            if baseline is None:
                baseline = s
            samples.append(s)
            next_report = max(next_report + report_every, counter.frames)
            if out is not None:
                print(f"frames {s.frames:>7}/{frames}  {s.seconds:7.1f} s  {s.frames / max(s.seconds, 1e-9):6.0f} "
                      f"frames/s  RSS {s.rss_mb:7.1f} MiB ({s.rss_mb - baseline.rss_mb:+.1f})  objects "
                      f"{s.objects} ({s.objects - baseline.objects:+d})", file=out, flush=True)
        for t in threads:
            t.join()
    finally:
        engine.close()
    final = sample(counter, t0)
    samples.append(final)
    seconds = time.perf_counter() - t0
    return SoakReport(frames=counter.frames, calls=calls, cycles=counter.cycles, seconds=round(seconds, 1),
                      frames_per_s=round(counter.frames / seconds, 1), errors=dict(counter.errors),
                      baseline=baseline or final, final=final, samples=samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dia2stream.tools.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=20_000, help="audio frames to produce, all calls together")
    parser.add_argument("--calls", type=int, default=2, help="concurrent calls on the engine")
    parser.add_argument("--checkpoint", default="tiny")
    parser.add_argument("--mimi", default="random-small")
    parser.add_argument("--warmup", type=int, default=None, help="frames before the baseline (default: 10%%)")
    parser.add_argument("--report-every", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args(argv)
    if args.frames < 1 or args.calls < 1:
        parser.error("--frames and --calls must be positive")
    import torch

    torch.set_num_threads(args.threads)
    report = soak(args.frames, args.calls, args.checkpoint, args.mimi, args.warmup, args.report_every)
    print(f"soak: {report.frames} frames, {report.cycles} conversation cycles on {report.calls} calls in "
          f"{report.seconds} s ({report.frames_per_s} frames/s); RSS {report.baseline.rss_mb} -> "
          f"{report.final.rss_mb} MiB ({report.rss_growth_mb:+.1f}), objects {report.baseline.objects} -> "
          f"{report.final.objects} ({report.object_growth:+d}); errors {report.errors or 'none'}")
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
