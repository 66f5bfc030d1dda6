"""Long calls at scale: N concurrent calls on the simulated GPU, in real time, for minutes of audio each.

    python -m dia2stream.tools.longcalls --calls 64 --audio-s 1800 --json longcalls.json   # 30 min each
    python -m dia2stream.tools.longcalls --calls 16 --audio-s 60 --server                  # the suite's run

The engine runs as `server.py --simulate-gpu profiles/h100-2b.json` runs it (every timing is
simulated; host work is real), with a small context (`--context-frames`) so calls roll their
context over every few turns, and two preloaded voices. The callers talk to the engine directly
(default), or with `--server` over websockets through the real server in this process (then the
server loop's asyncio tasks are counted too). Each call is one caller in a loop of turns, all
driven from one thread (every call's events and frames feed one queue), playing its audio in
real time as it arrives:

- a turn is an `inject` after `done` (warm, the same conversation), every `--switch-every`th a
  `start` naming the other voice (a voice switch);
- every `--barge-every`th turn the caller interrupts after `--barge-after` frames: `pause` with
  `played_ms` (what its real-time player has played), then alternately `inject` new words (the
  unheard ones are dropped: reported `unspoken`) or `resume` (they are spoken again).

Checked per call: every word sent is either spoken (a `word` event that no rollback took back)
or reported in a `paused` event's `unspoken` and dropped; `done` closes each utterance. Reported:
underruns (`delivery.DeliveryMeter`, the server's own measure, at the moment a frame reaches the
caller), rollovers (context position falling), errors by code, and the process's RSS, live threads
and open file descriptors: a baseline after `--warmup-s` of audio, the last sample, and after
every call has closed and the engine has stopped (against before it was built).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import gc
import json
import os
import queue
import re
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dia2stream.call.call import AudioFrame
from dia2stream.clock import FRAME_SECONDS, SAMPLE_RATE
from dia2stream.serve.delivery import DeliveryMeter
from dia2stream.serve.metrics import Metrics
from dia2stream.wire import protocol as p

DEFAULT_PROFILE = str(Path(__file__).resolve().parents[2] / "profiles" / "h100-2b.json")
WORDS = ("so here is one more sentence about the weather the long road home tonight and what we "
         "might cook for dinner after the game").split()
VOICES = ("anna", "bert")


@dataclass
class Sample:
    audio_s: float  # audio received per call, on average
    wall_s: float
    rss_mb: float
    threads: int
    fds: int


@dataclass
class CallTally:
    """One caller's account of its call."""

    frames: int = 0
    turns: int = 0
    utterances_done: int = 0
    barge_ins: int = 0
    voice_switches: int = 0
    rollovers: int = 0
    words_sent: int = 0
    words_spoken: int = 0
    words_unspoken: int = 0  # reported in `paused.unspoken` and dropped by the next inject
    word_mismatches: int = 0  # utterances whose spoken words were not what was sent (less the dropped)
    underruns: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    mismatch_examples: list[str] = field(default_factory=list)


@dataclass
class LongCallsReport:
    calls: int
    audio_s_per_call: float
    wall_s: float
    context_frames: int
    rollover_frames: int
    before: Sample  # before the engine was built
    baseline: Sample  # after the warm-up
    final: Sample  # the last sample with every call open
    after: Sample  # every call closed, engine stopped
    totals: CallTally
    samples: list[Sample] = field(default_factory=list)
    through_server: bool = False  # over websockets through the real server (else on the engine)
    leaked_tasks: int | None = None  # the server loop's tasks after every call closed, less before (server only)

    @property
    def rss_growth_pct(self) -> float:
        return 100.0 * (self.final.rss_mb - self.baseline.rss_mb) / self.baseline.rss_mb

    @property
    def leaked_threads(self) -> int:
        return self.after.threads - self.before.threads

    @property
    def leaked_fds(self) -> int:
        return self.after.fds - self.before.fds

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "rss_growth_pct": round(self.rss_growth_pct, 2),
                           "leaked_threads": self.leaked_threads, "leaked_fds": self.leaked_fds}, indent=1)

    def summary(self) -> str:
        t = self.totals
        where = "through the server" if self.through_server else "on the engine"
        tasks = f", server tasks {self.leaked_tasks:+d}" if self.leaked_tasks is not None else ""
        return (f"longcalls (simulated GPU, {where}): {self.calls} calls x {self.audio_s_per_call:.0f} s of audio in "
                f"{self.wall_s:.0f} s; {t.turns} turns, {t.utterances_done} done, {t.barge_ins} barge-ins, "
                f"{t.voice_switches} voice switches, {t.rollovers} rollovers; underruns {t.underruns}; words "
                f"{t.words_sent} sent = {t.words_spoken} spoken + {t.words_unspoken} unspoken, "
                f"{t.word_mismatches} mismatched utterances; errors {t.errors or 'none'}; RSS "
                f"{self.baseline.rss_mb} -> {self.final.rss_mb} MiB after warm-up ({self.rss_growth_pct:+.2f} %); "
                f"threads {self.before.threads} -> {self.after.threads}, fds {self.before.fds} -> {self.after.fds} "
                f"(before the engine -> after it stopped){tasks}")


# -- how a caller reaches its call ------------------------------------------------------------------


class EngineLine:
    """A call on the engine itself, no server: commands are submitted, events and frames arrive
    in `inbox` as (index, item), and frames are acknowledged as the server's send loop does."""

    def __init__(self, engine, index: int, inbox: queue.Queue) -> None:
        self.engine = engine
        self.call = engine.open_call(lambda item: inbox.put((index, item)))
        if self.call is None:
            raise RuntimeError(f"call {index}: refused (busy)")

    def send(self, command) -> None:
        self.engine.submit(self.call, command)

    def plays(self, frame: AudioFrame) -> bool:
        """Acknowledge a frame; False if a pause or reset silenced it (never played)."""
        self.call.frames_acked += 1
        return frame.epoch >= self.call.epoch

    def close(self) -> None:
        self.engine.close_call(self.call)


class SocketLine:
    """A call through the real server: one websocket, read by a task on `loop` that puts
    (index, frame bytes or typed event) in `inbox`; commands go out in order through a writer task."""

    def __init__(self, loop: asyncio.AbstractEventLoop, url: str, index: int, inbox: queue.Queue) -> None:
        self.loop, self.index, self.inbox = loop, index, inbox
        self._out: asyncio.Queue | None = None
        self._ws = None
        asyncio.run_coroutine_threadsafe(self._open(url), loop).result(timeout=60)

    async def _open(self, url: str) -> None:
        from websockets.asyncio.client import connect

        self._ws = await connect(url, open_timeout=60, max_size=None)
        ready = p.parse_event(await self._ws.recv())
        if not isinstance(ready, p.Ready):
            raise RuntimeError(f"call {self.index}: refused ({ready})")
        self._out = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._write())]

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for message in self._ws:
                self.inbox.put((self.index, message if isinstance(message, bytes) else p.parse_event(message)))
        except ConnectionClosed:
            pass

    async def _write(self) -> None:
        while True:
            await self._ws.send(await self._out.get())

    def send(self, command) -> None:
        self.loop.call_soon_threadsafe(self._out.put_nowait, p.command_to_json(command))

    def plays(self, frame: bytes) -> bool:
        return True  # the server drops silenced frames itself

    def close(self) -> None:
        async def close() -> None:
            for task in self._tasks:
                task.cancel()
            await self._ws.close()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=30)


# -- one caller -------------------------------------------------------------------------------------


class Caller:
    """A caller's side of one call: sends the next command when the last one's answer arrives,
    counts frames as a real-time player hears them and keeps the word account."""

    def __init__(self, line, index: int, target_frames: int, options: "Options", metrics: Metrics) -> None:
        self.line, self.index, self.options = line, index, options
        self.target_frames = target_frames
        self.tally = CallTally()
        self.meter = DeliveryMeter(metrics)
        self.voice = VOICES[index % len(VOICES)]
        self.finished = False
        self._expected: list[str] = []  # the words this utterance should speak
        self._heard: list[str] = []  # word events, less what a rollback took back
        self._utterance_frames = 0
        self._segment_start: float | None = None  # when the player started this segment's first frame
        self._segment_frames = 0
        self._barge_pending = False  # this turn interrupts after `barge_after` frames
        self._waiting_paused = False
        self._position = 0

    # -- commands

    def next_turn(self) -> None:
        if self.tally.frames >= self.target_frames:
            self.finished = True
            return
        n = self.tally.turns = self.tally.turns + 1
        words = self._words(n)
        self._expected, self._heard = list(words), []
        self._barge_pending = n % self.options.barge_every == 0
        text = "[S1] " + " ".join(words)
        if n == 1 or n % self.options.switch_every == 0:
            if n > 1:
                self.voice = VOICES[(VOICES.index(self.voice) + 1) % len(VOICES)]
                self.tally.voice_switches += 1
            self._submit(p.Start(text=text, voice=self.voice, seed=self.index * 1000 + n, id=n))
        else:
            self._submit(p.Inject(text=text, id=n))
        self.tally.words_sent += len(words)

    def _barge_in(self) -> None:
        played = int((time.monotonic() - self._segment_start) / FRAME_SECONDS) if self._segment_start else 0
        played = max(0, min(played, self._segment_frames))
        self._barge_pending, self._waiting_paused = False, True
        self.tally.barge_ins += 1
        self._submit(p.Pause(played_ms=played * FRAME_SECONDS * 1000, id=f"b{self.tally.turns}"))

    def _after_pause(self, paused: p.Paused) -> None:
        self._waiting_paused = False
        if paused.spoken is None:  # nothing to roll back (the utterance had just ended)
            self.next_turn()
            return
        self._heard = [_norm(w["word"]) for w in paused.spoken]
        unspoken = [_norm(w) for w in paused.unspoken or []]
        if self.tally.barge_ins % 2:  # the caller said something: the unheard words are dropped
            self.tally.words_unspoken += len(unspoken)
            more = self._words(self.tally.turns + 7)[:4]
            self._expected = self._heard + more
            self.tally.words_sent += len(more)
            self._submit(p.Inject(text=" " + " ".join(more), id=f"r{self.tally.turns}"))
        else:  # "sorry, go on": the unheard words are spoken again
            self._expected = self._heard + unspoken
            self._submit(p.Resume(id=f"r{self.tally.turns}"))

    def _submit(self, command) -> None:
        self.line.send(command)

    def _words(self, n: int) -> list[str]:
        k = self.options.turn_words
        return [WORDS[(n * 7 + self.index + i) % len(WORDS)] for i in range(k)]

    # -- what arrives

    def on_item(self, item: object) -> None:
        if isinstance(item, (AudioFrame, bytes)):
            if not self.line.plays(item):
                return  # silenced by a pause/reset: never played
            now = time.monotonic()
            self.meter.frame_sent()
            if self._segment_start is None:
                self._segment_start = now
            self._segment_frames += 1
            self.tally.frames += 1
            self._utterance_frames += 1
            if self._barge_pending and self._utterance_frames >= self.options.barge_after and \
                    not self._waiting_paused:
                self._barge_in()
            return
        self.meter.event(item)
        match item:
            case p.Started(position=position):
                self._note_position(position)
                self._utterance_frames, self._segment_start, self._segment_frames = 0, None, 0
            case p.Resumed():
                self._segment_start, self._segment_frames = None, 0
            case p.Word(word=word):
                self._heard.append(_norm(word))
            case p.Paused() if self._waiting_paused:
                self._note_position(item.position)
                self._after_pause(item)
            case p.Done():
                self.tally.utterances_done += 1
                self._check_words()
                if not self._waiting_paused:  # a barge-in that came too late answers with `paused` next
                    self.next_turn()
            case p.ErrorEvent(code=code):
                self.tally.errors[code] = self.tally.errors.get(code, 0) + 1
                self._waiting_paused = False
                self.next_turn()  # carry on: the error is counted and reported

    def _check_words(self) -> None:
        self.tally.words_spoken += len(self._heard)
        if self._heard != self._expected:
            self.tally.word_mismatches += 1
            if len(self.tally.mismatch_examples) < 3:
                self.tally.mismatch_examples.append(f"turn {self.tally.turns}: expected {self._expected}, "
                                                    f"spoken {self._heard}")
        self._heard, self._expected = [], []

    def _note_position(self, position: int) -> None:
        if position < self._position:  # the context was rebuilt: a rollover
            self.tally.rollovers += 1
        self._position = position


def _norm(word: str) -> str:
    return re.sub(r"[^a-z0-9']", "", word.lower())


# -- the run ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    turn_words: int = 14
    barge_every: int = 3
    barge_after: int = 20
    switch_every: int = 5


def process_sample(audio_s: float, t0: float) -> Sample:
    return Sample(round(audio_s, 1), round(time.perf_counter() - t0, 1), round(rss_mb(), 1), threading.active_count(),
                  len(os.listdir("/proc/self/fd")))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def write_voice(path: Path, seconds: float, pitch_hz: float) -> None:
    """A voice prefix file: a tone (the simulated codec hears no speech anyway)."""
    import numpy as np
    import soundfile

    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    soundfile.write(str(path), 0.2 * np.sin(2 * np.pi * pitch_hz * t), SAMPLE_RATE)


class EngineCalls:
    """The calls on an engine built as the server builds it, driven directly (no sockets)."""

    leaked_tasks = None  # no event loop here

    def __init__(self, config, metrics: Metrics) -> None:
        from dia2stream.serve.build import build_engine

        _, self.engine = build_engine(config, metrics)

    def line(self, index: int, inbox: queue.Queue) -> EngineLine:
        return EngineLine(self.engine, index, inbox)

    def alive(self) -> bool:
        return self.engine.running

    def all_closed(self) -> None:
        pass

    def close(self) -> None:
        self.engine.close()


class ServedCalls:
    """The calls through the real server (`serve.server.run` on its own loop and thread), each a
    websocket from a client loop on another thread. Counts the server loop's asyncio tasks before
    the first call and after the last one closed (`leaked_tasks`)."""

    def __init__(self, config) -> None:
        from dia2stream.serve.server import run

        self._port: concurrent.futures.Future = concurrent.futures.Future()
        self._status: concurrent.futures.Future = concurrent.futures.Future()
        self._server: dict = {}

        async def serve() -> int:
            self._server["loop"], self._server["stop"] = asyncio.get_running_loop(), asyncio.Event()
            return await run(config, self._port, stop=self._server["stop"])

        self._server_thread = threading.Thread(target=lambda: self._status.set_result(asyncio.run(serve())),
                                               name="longcalls-server", daemon=True)
        self._server_thread.start()
        self.port = self._port.result(timeout=300)
        self.client_loop = asyncio.new_event_loop()
        self._client_thread = threading.Thread(target=self.client_loop.run_forever, name="longcalls-clients",
                                               daemon=True)
        self._client_thread.start()
        self.tasks_before = self._server_tasks()
        self.leaked_tasks: int | None = None

    def line(self, index: int, inbox: queue.Queue) -> SocketLine:
        return SocketLine(self.client_loop, f"ws://127.0.0.1:{self.port}/", index, inbox)

    def alive(self) -> bool:
        return self._server_thread.is_alive()

    def all_closed(self) -> None:
        """Every call has closed: wait until the server has let go of them, then count its tasks."""
        import urllib.request

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=10) as response:
                if json.loads(response.read())["calls"] == 0:
                    break
            time.sleep(0.1)
        time.sleep(0.5)  # handlers wind down after their call is freed
        self.leaked_tasks = self._server_tasks() - self.tasks_before

    def _server_tasks(self) -> int:
        async def count() -> int:
            return len(asyncio.all_tasks())

        return asyncio.run_coroutine_threadsafe(count(), self._server["loop"]).result(timeout=30)

    def close(self) -> None:
        self._server["loop"].call_soon_threadsafe(self._server["stop"].set)
        self._server_thread.join(timeout=60)
        self.client_loop.call_soon_threadsafe(self.client_loop.stop)
        self._client_thread.join(timeout=30)
        self.client_loop.close()


def long_calls(calls: int, audio_s: float, profile: str = DEFAULT_PROFILE, context_frames: int = 400,
               rollover_frames: int = 150, warmup_s: float | None = None, report_every_s: float = 60.0,
               options: Options = Options(), out=sys.stdout, max_wall_s: float | None = None,
               through_server: bool = False, engine_process: str = "on") -> LongCallsReport:
    """Run the calls until each has heard `audio_s` of audio (or `max_wall_s` passed); prints a
    progress line every `report_every_s` to `out` (None: silent). `through_server`: over
    websockets through the real server (its engine in a process of its own unless
    `engine_process` is "off"), else on the engine directly."""
    from dia2stream.serve.config import ServerConfig

    gc.collect()
    t0 = time.perf_counter()
    before = process_sample(0.0, t0)
    with tempfile.TemporaryDirectory(prefix="dia2-longcalls-") as tmp:
        voices = []
        for i, name in enumerate(VOICES):
            path = Path(tmp) / f"{name}.wav"
            write_voice(path, 2.0, 180.0 + 60 * i)
            voices.append(f"{name}={path},[S1] Hello, this is {name} speaking.")
        config = ServerConfig(host="127.0.0.1", port=0, simulate_gpu=profile, max_calls=calls,
                              context_frames=context_frames, rollover_frames=rollover_frames, overload_refusal_s=0.0,
                              voices=tuple(voices), voice_cache=str(Path(tmp) / "cache"), log_level="WARNING",
                              web=False, engine_process=engine_process)
        metrics = Metrics(gpu_memory=None, process=False)
        place = ServedCalls(config) if through_server else EngineCalls(config, metrics)
        inbox: queue.Queue = queue.Queue()
        target = int(audio_s / FRAME_SECONDS)
        warmup_s = min(60.0, audio_s / 5) if warmup_s is None else warmup_s
        callers: list[Caller] = []
        baseline = final = None
        samples: list[Sample] = []
        deadline = None if max_wall_s is None else time.monotonic() + max_wall_s
        try:
            callers = [Caller(place.line(i, inbox), i, target, options, metrics) for i in range(calls)]
            for caller in callers:
                caller.next_turn()
            next_sample = warmup_s
            while not all(c.finished for c in callers):
                if deadline is not None and time.monotonic() > deadline:
                    print(f"longcalls: stopped after {max_wall_s:.0f} s of wall time", file=out or sys.stderr)
                    break
                if not place.alive():
                    raise RuntimeError("the engine or server stopped")
                try:
                    index, item = inbox.get(timeout=1.0)
                except queue.Empty:
                    continue
                callers[index].on_item(item)
                heard = sum(c.tally.frames for c in callers) * FRAME_SECONDS / calls
                if heard >= next_sample:
                    final = process_sample(heard, t0)
                    baseline = baseline or final
                    samples.append(final)
                    next_sample = heard + report_every_s
                    if out is not None:
                        print(f"audio {final.audio_s:7.1f} s/call  wall {final.wall_s:7.1f} s  RSS {final.rss_mb:7.1f} "
                              f"MiB ({final.rss_mb - baseline.rss_mb:+.1f})  threads {final.threads}  fds {final.fds}"
                              f"  underruns {sum(c.meter.underruns for c in callers)}", file=out, flush=True)
            heard = sum(c.tally.frames for c in callers) * FRAME_SECONDS / calls
            final = process_sample(heard, t0)
            samples.append(final)
            for caller in callers:
                caller.line.close()
            place.all_closed()
        finally:
            place.close()
    wall = time.perf_counter() - t0
    totals = add_tallies([c.tally for c in callers])
    for caller in callers:
        caller.tally.underruns = caller.meter.underruns
    totals.underruns = sum(c.meter.underruns for c in callers)
    leaked_tasks = place.leaked_tasks
    callers.clear()
    del place
    gc.collect()
    after = process_sample(0.0, t0)
    return LongCallsReport(calls=calls, audio_s_per_call=round(final.audio_s, 1), wall_s=round(wall, 1),
                           context_frames=context_frames, rollover_frames=rollover_frames, before=before,
                           baseline=baseline or final, final=final, after=after, totals=totals, samples=samples,
                           through_server=through_server, leaked_tasks=leaked_tasks)


def add_tallies(tallies: list[CallTally]) -> CallTally:
    total = CallTally()
    for t in tallies:
        for name in ("frames", "turns", "utterances_done", "barge_ins", "voice_switches", "rollovers", "words_sent",
                     "words_spoken", "words_unspoken", "word_mismatches"):
            setattr(total, name, getattr(total, name) + getattr(t, name))
        for code, n in t.errors.items():
            total.errors[code] = total.errors.get(code, 0) + n
        total.mismatch_examples.extend(t.mismatch_examples[: max(0, 5 - len(total.mismatch_examples))])
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dia2stream.tools.longcalls", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=64, help="concurrent calls")
    parser.add_argument("--audio-s", type=float, default=1800.0, help="seconds of audio each call hears")
    parser.add_argument("--simulate-gpu", default=DEFAULT_PROFILE, help="the GPU profile (default: %(default)s)")
    parser.add_argument("--context-frames", type=int, default=400, help="small, so calls roll over every few turns")
    parser.add_argument("--rollover-frames", type=int, default=150)
    parser.add_argument("--warmup-s", type=float, default=None, help="audio per call before the baseline "
                        "(default: a fifth of --audio-s, at most 60 s)")
    parser.add_argument("--report-every-s", type=float, default=60.0, help="audio per call between samples")
    parser.add_argument("--max-wall-s", type=float, default=None, help="stop after this much wall time")
    parser.add_argument("--server", action="store_true", help="through the real server over websockets (checks "
                        "the server's tasks too); default: on the engine directly")
    parser.add_argument("--engine-process", choices=("on", "off"), default="on",
                        help="with --server: the server's engine in a process of its own (default) or not")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.audio_s <= 0:
        parser.error("--calls and --audio-s must be positive")
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = long_calls(args.calls, args.audio_s, args.simulate_gpu, args.context_frames, args.rollover_frames,
                        args.warmup_s, args.report_every_s, max_wall_s=args.max_wall_s,
                        through_server=args.server, engine_process=args.engine_process)
    print(report.summary(), flush=True)
    if args.json:
        Path(args.json).write_text(report.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
