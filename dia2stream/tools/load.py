"""Load test: N concurrent calls, each a short conversation, measured as the callers hear them.

    python -m dia2stream.tools.load [ws://127.0.0.1:8765/] --calls 8 --turns 3 [--pause-every 2]
    python -m dia2stream.tools.load ws://127.0.0.1:8765/ --pattern call-centre --calls 64 --turns 4
        [--text "[S1] ..."] [--inject-text " ..."] [--format ulaw_8000] [--ramp S]
        [--duration-limit S] [--step-timeout S] [--json out.json] [--plot out.png] [--quiet]

Each call opens its own websocket to the one URL given (loopback by default), sends `start`,
then after each `done` an `inject` (the warm next turn), M turns in all; every K-th turn is
interrupted by a `pause` once a few frames have arrived and continued with `resume`. A call
refused with `busy` (close 1013, or HTTP 503 from a balancer) tries again after a short backoff
(--busy-retries, dia2stream/tools/retry.py); one refused at every try counts as a refusal, not an
error. Frames are played back in
simulated real time (dia2stream.tools.playback: a player with no jitter buffer), so the report gives
what callers hear: time to first byte, speech onset (until the first word's frame plays),
inter-frame gaps and underruns, as p50/p95/p99 over the calls' turns, split by turn kind
(`start` vs `inject` after `done`). Bounded in calls, turns and time (--duration-limit): it
stops by itself. Exit status: 0 when no call had an error, 1 otherwise, 2 on bad arguments.
`--plot` draws the onset distribution per turn kind and the underruns over time
(dia2stream.tools.load_plot; needs matplotlib, the `plot` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from websockets.exceptions import ConnectionClosed

from dia2stream.tools import callcentre, playback
from dia2stream.tools.bounded import run_within
from dia2stream.tools.retry import CLOSE_TRY_AGAIN_LATER, Busy, BusyRetry, Refusal, open_call
from dia2stream.wire.formats import FORMAT_NAMES, decode_frame
from dia2stream.wire.protocol import MAX_MESSAGE_BYTES

DEFAULT_URL = "ws://127.0.0.1:8765/"
MAX_CALLS = 1024
MAX_TURNS = 1000
PAUSE_AFTER_FRAMES = 5  # a paused turn is interrupted once this many of its frames arrived
PAUSE_S = 0.3  # how long a paused turn stays paused


@dataclass
class Turn:
    kind: str  # "start" (the call's first turn) or "inject" (after `done`)
    id: str
    sent_at: float  # perf_counter when the command was sent
    segments: list[list[float]] = field(default_factory=list)  # frame arrivals, split at pauses
    resumed_at: list[float] = field(default_factory=list)  # when each `resume` was sent
    words: list[tuple[str, int]] = field(default_factory=list)  # (word, frame)
    paused: bool = False
    frames_after_paused: int = 0  # protocol violations
    done: dict | None = None
    error: str | None = None

    def playbacks(self) -> list[playback.Playback]:
        """One simulated playback per segment; the first one carries the speech onset."""
        onset = self.words[0][1] if self.words else None
        commands = [self.sent_at] + self.resumed_at
        return [playback.simulate(seg, commands[min(i, len(commands) - 1)], onset if i == 0 else None)
                for i, seg in enumerate(self.segments) if seg]

    def metrics(self) -> dict[str, Any]:
        plays = self.playbacks()
        first = plays[0] if plays else None
        ms = lambda s: None if s is None else round(1000 * s, 2)  # noqa: E731
        return {
            "kind": self.kind, "id": self.id,
            "frames": sum(len(s) for s in self.segments),
            "ttfb_ms": ms(first.first_byte_s if first else None),
            "onset_ms": ms(first.onset_s if first else None),
            "onset_frame": self.words[0][1] if self.words else None,
            "underruns": sum(p.underruns for p in plays),
            "stall_ms": ms(sum(p.stall_s for p in plays)),
            "gaps_ms": [ms(g) for p in plays for g in p.gaps_s],
            "words": [w for w, _ in self.words],
            "paused": self.paused,
            "frames_after_paused": self.frames_after_paused,
            "server_ttfa_ms": (self.done or {}).get("ttfa_ms"),
            # On the script's own clock (perf_counter seconds): when the turn began and when each
            # late frame arrived, for plots over time.
            "sent_at_s": round(self.sent_at, 4),
            "underruns_at_s": [round(a, 4) for p in plays for a, late in zip(p.arrivals, p.late_s) if late > 0],
            "done": self.done is not None,
            "error": self.error,
        }


@dataclass
class Call:
    index: int
    busy: bool = False  # refused with `busy` at every try
    refusals: int = 0  # `busy` refusals, the retried ones included
    close_code: int | None = None
    turns: list[Turn] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    finished: bool = False  # all turns done

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "busy": self.busy, "refusals": self.refusals, "close_code": self.close_code,
                "finished": self.finished, "errors": self.errors,
                "turns": [t.metrics() for t in self.turns]}


@dataclass
class Progress:
    started: float = field(default_factory=time.perf_counter)
    running: int = 0
    finished: int = 0
    turns: int = 0
    frames: int = 0
    busy: int = 0  # refusals, the retried ones included
    errors: int = 0


class CallError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# One call
# ---------------------------------------------------------------------------------------------


async def run_call(call: Call, args: argparse.Namespace, progress: Progress) -> None:
    """One call's conversation, recorded into `call` as it goes (so a cut-off call keeps its turns)."""
    await asyncio.sleep(args.ramp * call.index / max(1, args.calls))
    progress.running += 1
    try:
        def refused(refusal: Refusal) -> None:
            call.refusals += 1
            progress.busy += 1
            if refusal.how == "error busy" and refusal.close_code != CLOSE_TRY_AGAIN_LATER:
                call.errors.append(f"busy refusal closed with {refusal.close_code}, not 1013")

        try:
            ws, first = await open_call(args.url, BusyRetry(attempts=args.busy_retries + 1),
                                        open_timeout=args.step_timeout, on_refused=refused, close_timeout=2,
                                        max_size=MAX_MESSAGE_BYTES)
        except Busy as e:
            call.busy = True
            call.close_code = e.refusals[-1].close_code
            return
        async with ws:
            if first.get("event") not in ("ready", "error"):
                raise CallError(f"expected 'ready', got {first!r:.80}")
            if first["event"] == "error":
                raise CallError(f"refused: {first.get('code')}: {first.get('message')}")
            for t in range(args.turns):
                turn = await run_turn(ws, call, t, args, progress)
                progress.turns += 1
                if turn.error:
                    raise CallError(turn.error)
            call.finished = True
    except CallError as e:
        call.errors.append(str(e))
    except ConnectionClosed as e:
        code = e.rcvd.code if e.rcvd else None
        call.close_code = code
        call.errors.append(f"connection closed: {code} {e.rcvd.reason if e.rcvd else ''}".strip())
    except (OSError, asyncio.TimeoutError) as e:
        call.errors.append(f"{type(e).__name__}: {e}")
    finally:
        progress.running -= 1
        progress.finished += 1
        progress.errors += bool(call.errors)


async def run_turn(ws, call: Call, t: int, args: argparse.Namespace, progress: Progress) -> Turn:
    """Send one turn's command and read until its `done` (pausing and resuming it if due)."""
    turn_id = f"c{call.index}-t{t}"
    if t == 0:
        command: dict[str, Any] = {"cmd": "start", "text": args.text, "id": turn_id}
        if args.format:
            command["format"] = args.format
        if args.seed is not None:
            command["seed"] = args.seed + call.index
    else:
        command = {"cmd": "inject", "text": args.inject_text, "id": turn_id}
    pause_due = args.pause_every > 0 and (t + 1) % args.pause_every == 0
    await ws.send(json.dumps(command))
    turn = Turn("start" if t == 0 else "inject", turn_id, time.perf_counter())
    call.turns.append(turn)
    turn.segments.append([])
    pause_sent = paused_now = False
    while True:
        message = await receive(ws, args)
        now = time.perf_counter()
        if isinstance(message, bytes):
            check_frame(message, args.format)
            progress.frames += 1
            if paused_now:  # the protocol forbids it: report, keep counting
                turn.frames_after_paused += 1
                turn.error = "audio frame after 'paused'"
            turn.segments[-1].append(now)
            if pause_due and not pause_sent and sum(map(len, turn.segments)) == PAUSE_AFTER_FRAMES:
                await ws.send(json.dumps({"cmd": "pause", "id": f"{turn_id}-pause"}))
                pause_sent = True
            continue
        event = message.get("event")
        if event == "word" and message.get("id") == turn_id:
            turn.words.append((str(message.get("word", "")), int(message.get("frame", 0))))
        elif event == "paused":
            turn.paused = paused_now = True
            if turn.done is not None:  # the turn ended before the pause took effect
                return turn
            await asyncio.sleep(PAUSE_S)
            await ws.send(json.dumps({"cmd": "resume", "id": f"{turn_id}-resume"}))
            turn.resumed_at.append(time.perf_counter())
        elif event == "resumed":
            paused_now = False
            turn.segments.append([])
        elif event == "done" and message.get("id") == turn_id:
            turn.done = message
            if not (pause_sent and not turn.paused):  # else wait for `paused`: it answers our pause
                return turn
        elif event == "error":
            turn.error = f"error {message.get('code')}: {message.get('message')}"
        if turn.error:
            return turn


async def receive(ws, args: argparse.Namespace) -> bytes | dict:
    """The next message: bytes for a frame, a dict for an event."""
    try:
        message = await asyncio.wait_for(ws.recv(), args.step_timeout)
    except asyncio.TimeoutError:
        raise CallError(f"nothing received for {args.step_timeout:g} s") from None
    if isinstance(message, bytes):
        return message
    try:
        event = json.loads(message)
    except ValueError:
        raise CallError(f"event is not JSON: {message[:80]!r}") from None
    if not isinstance(event, dict):
        raise CallError(f"event is not an object: {message[:80]!r}")
    return event


def check_frame(data: bytes, fmt: str | None) -> None:
    try:
        decode_frame(data, fmt or "pcm_24000")
    except ValueError as e:
        raise CallError(f"bad audio frame: {e}") from None


# ---------------------------------------------------------------------------------------------
# All calls, the report
# ---------------------------------------------------------------------------------------------


async def run_load(args: argparse.Namespace) -> tuple[list[Call], float]:
    """Every call at once (spread over --ramp seconds), bounded by --duration-limit."""
    progress = Progress()
    calls = [Call(i) for i in range(args.calls)]
    tasks = [asyncio.create_task(run_call(call, args, progress)) for call in calls]
    reporter = asyncio.create_task(report_progress(progress, args))
    try:
        pending = await run_within(tasks, args.duration_limit)
    finally:
        reporter.cancel()
    for call, task in zip(calls, tasks):
        if task in pending:
            call.errors.append(f"stopped by --duration-limit {args.duration_limit:g} s")
        elif task.exception() is not None:  # a bug here, not the server's: report, do not hide
            call.errors.append(f"load script error: {task.exception()!r}")
    return calls, time.perf_counter() - progress.started


async def report_progress(progress: Progress, args: argparse.Namespace) -> None:
    if args.quiet or args.progress <= 0:
        return
    while True:
        await asyncio.sleep(args.progress)
        print(f"[{time.perf_counter() - progress.started:6.1f}s] running {progress.running}, "
              f"finished {progress.finished}/{args.calls}, turns {progress.turns}, "
              f"frames {progress.frames}, busy {progress.busy}, errors {progress.errors}",
              file=sys.stderr, flush=True)


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}
    a = np.asarray(values, dtype=np.float64)
    return {"n": len(values), "p50": round(float(np.percentile(a, 50)), 2),
            "p95": round(float(np.percentile(a, 95)), 2), "p99": round(float(np.percentile(a, 99)), 2),
            "max": round(float(a.max()), 2)}


def summarize(calls: list[Call], wall_s: float) -> dict[str, Any]:
    served = [[t.metrics() for t in c.turns] for c in calls if not c.busy and c.turns]
    turns = [t for call_turns in served for t in call_turns]
    by_kind: dict[str, Any] = {}
    for kind in ("start", "inject", "all"):
        chosen = [t for t in turns if kind in ("all", t["kind"])]
        by_kind[kind] = {
            "turns": len(chosen),
            "ttfb_ms": percentiles([t["ttfb_ms"] for t in chosen if t["ttfb_ms"] is not None]),
            "onset_ms": percentiles([t["onset_ms"] for t in chosen if t["onset_ms"] is not None]),
        }
    return {
        "calls": len(calls),
        "finished": sum(c.finished for c in calls),
        "busy_refusals": sum(c.busy for c in calls),  # calls refused at every try
        "busy_retried": sum(c.refusals for c in calls) - sum(c.busy for c in calls),
        "calls_with_errors": sum(bool(c.errors) for c in calls),
        "errors": [f"call {c.index}: {e}" for c in calls for e in c.errors],
        "turns": len(turns),
        "frames": sum(t["frames"] for t in turns),
        "wall_s": round(wall_s, 3),
        "by_kind": by_kind,
        "gap_ms": percentiles([g for t in turns for g in t["gaps_ms"]]),
        "max_gap_ms_per_call": percentiles(
            [max(g for t in ts for g in t["gaps_ms"]) for ts in served if any(t["gaps_ms"] for t in ts)]),
        "underruns": sum(t["underruns"] for t in turns),
        "underruns_per_call": percentiles([sum(t["underruns"] for t in ts) for ts in served]),
        "stall_ms_per_call": percentiles([sum(t["stall_ms"] for t in ts) for ts in served]),
    }


def format_table(summary: dict[str, Any]) -> str:
    rows = [("time to first byte, start (ms)", summary["by_kind"]["start"]["ttfb_ms"]),
            ("time to first byte, inject (ms)", summary["by_kind"]["inject"]["ttfb_ms"]),
            ("speech onset, start (ms)", summary["by_kind"]["start"]["onset_ms"]),
            ("speech onset, inject (ms)", summary["by_kind"]["inject"]["onset_ms"]),
            ("inter-frame gap (ms)", summary["gap_ms"]),
            ("largest gap per call (ms)", summary["max_gap_ms_per_call"]),
            ("underruns per call", summary["underruns_per_call"]),
            ("stall per call (ms)", summary["stall_ms_per_call"])]
    cell = lambda v: "-" if v is None else f"{v:g}"  # noqa: E731
    lines = [f"{'':34}{'n':>6}{'p50':>10}{'p95':>10}{'p99':>10}{'max':>10}"]
    for name, s in rows:
        lines.append(f"{name:34}{s['n']:>6}" + "".join(f"{cell(s[k]):>10}" for k in ("p50", "p95", "p99", "max")))
    lines.append(f"calls {summary['calls']}: finished {summary['finished']}, busy refusals "
                 f"{summary['busy_refusals']}, with errors {summary['calls_with_errors']}; turns "
                 f"{summary['turns']}, frames {summary['frames']}, underruns {summary['underruns']}, "
                 f"wall {summary['wall_s']:.1f} s")
    lines += [f"  {e}" for e in summary["errors"][:20]]
    return "\n".join(lines)


# The call-centre pattern's own options (flag: attribute), and their defaults: given with the
# lock-step pattern they would do nothing, so they are refused there.
CALL_CENTRE_ONLY = {"--arrival-window": "arrival_window", "--barge-in-every": "barge_in_every",
                    "--user-turn-seconds": "user_turn_seconds", "--user-turn-file": "user_turn_file"}
CALL_CENTRE_DEFAULTS = {"arrival_window": 20.0, "barge_in_every": 5, "user_turn_seconds": 0.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m dia2stream.tools.load", description=__doc__.split("\n\n")[0])
    ap.add_argument("url", nargs="?", default=DEFAULT_URL, help=f"server websocket URL (default {DEFAULT_URL})")
    ap.add_argument("--calls", type=int, default=1, help=f"concurrent calls, 1..{MAX_CALLS} (default 1)")
    ap.add_argument("--turns", type=int, default=2, help=f"turns per call, 1..{MAX_TURNS} (default 2)")
    ap.add_argument("--text", default="[S1] Thanks for calling. Let me check that for you.",
                    help="text of each call's first turn (start)")
    ap.add_argument("--inject-text", default=" Okay, I found it. Anything else?",
                    help="text of every later turn (inject after done)")
    ap.add_argument("--pause-every", type=int, default=0, metavar="K",
                    help=f"pause every K-th turn after {PAUSE_AFTER_FRAMES} frames, resume after "
                         f"{PAUSE_S:g} s (default 0: never)")
    ap.add_argument("--format", choices=FORMAT_NAMES, help="audio format asked for in start")
    ap.add_argument("--seed", type=int, help="seed of call i is SEED + i (default: the server's)")
    ap.add_argument("--ramp", type=float, default=0.0, metavar="S",
                    help="spread the calls' connections over S seconds (default 0: all at once)")
    ap.add_argument("--duration-limit", type=float, default=300.0, metavar="S",
                    help="stop every call after S seconds (default 300)")
    ap.add_argument("--step-timeout", type=float, default=30.0, metavar="S",
                    help="longest wait for any one message (default 30)")
    ap.add_argument("--progress", type=float, default=5.0, metavar="S",
                    help="progress line on stderr every S seconds (0: none)")
    ap.add_argument("--pattern", choices=("lock-step", "call-centre"), default="lock-step",
                    help="lock-step (default: every call at once, turn after turn, the worst case) or call-centre "
                         "(Poisson arrivals, streamed text, the caller speaking between turns, barge-ins; "
                         "dia2stream/tools/callcentre.py)")
    ap.add_argument("--arrival-window", type=float, metavar="S",
                    help="call-centre: calls arrive at random over S seconds (default 20)")
    ap.add_argument("--barge-in-every", type=int, metavar="N",
                    help="call-centre: about one turn in N is interrupted (default 5; 0: never)")
    ap.add_argument("--user-turn-seconds", type=float, metavar="S",
                    help="call-centre: send S seconds of synthetic caller audio as a user_turn before each agent "
                         "turn after the first (default 0: none)")
    ap.add_argument("--user-turn-file", nargs=2, metavar=("FILE", "TRANSCRIPT"),
                    help="call-centre: send this recorded caller's turn (WAV or FLAC, and what is said in it) as a "
                         "user_turn before each agent turn after the first")
    ap.add_argument("--busy-retries", type=int, default=3, metavar="N",
                    help="a call refused busy (close 1013, or HTTP 503 from a balancer or a draining server) "
                         "tries again up to N times after a short backoff, as a client behind a balancer "
                         "must (default 3; 0 counts the first refusal)")
    ap.add_argument("--json", metavar="PATH", help="write config, summary and per-call turns as JSON")
    ap.add_argument("--plot", metavar="PATH", help="draw onset per turn kind and underruns over time (PNG/SVG/PDF; "
                                                   "needs matplotlib: pip install 'dia2stream[plot]')")
    ap.add_argument("--plot-title", metavar="TEXT", help="title of the plot (default: calls, turns and URL)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    url = urlparse(args.url)
    if url.scheme not in ("ws", "wss") or not url.hostname:
        ap.error(f"not a websocket URL: {args.url!r}")
    if not 1 <= args.calls <= MAX_CALLS:
        ap.error(f"--calls must be in 1..{MAX_CALLS}")
    if not 1 <= args.turns <= MAX_TURNS:
        ap.error(f"--turns must be in 1..{MAX_TURNS}")
    if args.busy_retries < 0:
        ap.error("--busy-retries must be 0 or more")
    if args.pause_every < 0 or args.ramp < 0 or args.duration_limit <= 0 or args.step_timeout <= 0:
        ap.error("--pause-every and --ramp must be >= 0, --duration-limit and --step-timeout > 0")
    given = [flag for flag, name in CALL_CENTRE_ONLY.items() if getattr(args, name) is not None]
    if given and args.pattern != "call-centre":
        ap.error(f"{', '.join(given)}: only with --pattern call-centre")
    for name, default in CALL_CENTRE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.arrival_window < 0 or args.barge_in_every < 0:
        ap.error("--arrival-window and --barge-in-every must be >= 0")
    if not 0 <= args.user_turn_seconds <= 30:
        ap.error("--user-turn-seconds must be in 0..30 (the server's default --max-user-turn-seconds)")
    if args.user_turn_file:
        path = Path(args.user_turn_file[0])
        if args.user_turn_seconds:
            ap.error("--user-turn-file and --user-turn-seconds: give one of them")
        if path.suffix.lower() not in (".wav", ".flac"):
            ap.error(f"--user-turn-file: {path} is not a .wav or .flac file")
        if not path.is_file():
            ap.error(f"--user-turn-file: {path} does not exist (or is not a file)")
    if args.plot:
        try:  # before any call is made, not after the run
            import matplotlib  # noqa: F401
        except ImportError:
            ap.error("--plot needs matplotlib: pip install 'dia2stream[plot]'")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.pattern == "call-centre":
        calls, wall_s = asyncio.run(callcentre.run_pattern(args))
        summary = callcentre.summarize(calls, wall_s, percentiles)
        print(callcentre.format_table(summary), flush=True)
    else:
        calls, wall_s = asyncio.run(run_load(args))
        summary = summarize(calls, wall_s)
        print(format_table(summary), flush=True)
    if args.json:
        config = {k: v for k, v in vars(args).items() if k not in ("json", "quiet")}
        with open(args.json, "w") as f:
            json.dump({"config": config, "summary": summary, "calls": [c.to_dict() for c in calls]}, f, indent=1)
    if args.plot:
        from dia2stream.tools.load_plot import plot_load

        title = args.plot_title or f"{args.calls} calls x {args.turns} turns, {args.url}"
        plot_load([c.to_dict() for c in calls], summary, args.plot, title)
        print(f"plot: {args.plot}", flush=True)
    return 1 if summary["calls_with_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
