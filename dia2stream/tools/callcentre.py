"""The call-centre load pattern: the server driven as an orchestrator drives it during real calls.

    python -m dia2stream.tools.load ws://127.0.0.1:8765/ --pattern call-centre --calls 64 --turns 4 \
        --arrival-window 20 [--barge-in-every 5] [--user-turn-seconds 5 | --user-turn-file caller.wav "TRANSCRIPT"] \
        [--seed 0] [--json out.json]

- Calls arrive at random (a Poisson process) over `--arrival-window` seconds, not all at once.
- Each agent turn's text is streamed as an LLM writes it: `final: false` fragments of a word or
  two every ~40 ms, then `flush`.
- Between turns the caller speaks for 1.5-4 s, starting once the agent's audio has played out
  (the simulated player's end, dia2stream.tools.playback).
- About one turn in `--barge-in-every` is interrupted: after 0.5-2 s of its audio has played, a
  `pause` with the `played_ms` the player actually played, and at once the next turn (an
  `inject`, which replaces the words not heard).
- With `--user-turn-seconds S`, the caller's speech goes into the call's context before each agent
  turn after the first (after the caller spoke, and after a barge-in): a `user_turn` of S seconds
  of synthetic µ-law audio and a transcript that fits it, sent right before the turn's first text
  (the worst case: no LLM gap to hide the prefill in). `user_turn_done.prefill_ms` is reported.
  `--user-turn-file FILE TRANSCRIPT` sends a recorded caller's turn (WAV or FLAC, and what is said
  in it) instead.

Onset is reported per turn kind: `first` (the call's opening turn, a `start`), `next` (a turn
after the caller spoke), `after_barge_in` (the turn sent right after an interruption); with
underruns (count and stalled milliseconds) per call. The lock-step pattern (every call at once,
turn after turn) stays the default of the load script: it is the worst case.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

import numpy as np

from dia2stream.clock import FRAME_SECONDS
from dia2stream.tools import playback
from dia2stream.tools.bounded import run_within
from dia2stream.wire.formats import ulaw_encode
from dia2stream.wire.protocol import MAX_MESSAGE_BYTES

FRAGMENT_EVERY_S = 0.04  # an LLM's token cadence
CALLER_SPEAKS_S = (1.5, 4.0)
BARGE_IN_AFTER_S = (0.5, 2.0)  # audio played before the caller interrupts

CALLER_WORDS = ("yes", "that", "is", "right", "my", "name", "is", "Smith", "please", "thanks")
CALLER_WORDS_PER_S = 2.0  # a calm speaker: leaves every word its tokens' frames
CALLER_RATE = 8_000  # the synthetic caller's audio: telephony µ-law

AGENT_LINES = [
    "Thanks for calling, my name is Sam. How can I help you today?",
    "Sure, let me pull up your account. Could you give me the last name on it?",
    "Thank you. I can see the order you placed on Tuesday; it shipped this morning.",
    "It should arrive by Friday. Would you like me to send the tracking number by text?",
    "Done. Is there anything else I can help you with while I have you on the line?",
    "Of course. I have changed the delivery address, and you will get a confirmation email.",
]


@dataclass
class AgentTurn:
    kind: str  # "first", "next" or "after_barge_in"
    id: str
    sent_at: float
    base_frame: int = 0  # frame index of this turn's first frame within the utterance (after a rollback: heard)
    arrivals: list[float] = field(default_factory=list)
    first_word_frame: int | None = None
    interrupted: bool = False
    frames_at_pause: int = 0  # the utterance's whole frames heard: the next frame the server sends has this index
    done: bool = False

    def playback(self) -> playback.Playback:
        onset = None if self.first_word_frame is None else self.first_word_frame - self.base_frame
        return playback.simulate(self.arrivals, self.sent_at, onset)

    def metrics(self) -> dict[str, Any]:
        play = self.playback()
        onset = play.onset_s
        return {"kind": self.kind, "id": self.id, "frames": len(self.arrivals),
                "onset_ms": None if onset is None else round(onset * 1000, 2),
                "underruns": play.underruns, "stall_ms": round(play.stall_s * 1000, 2),
                "interrupted": self.interrupted, "done": self.done}


@dataclass
class CallCentreCall:
    index: int
    arrives_at: float
    busy: bool = False
    turns: list[AgentTurn] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    finished: bool = False
    prefill_ms: list[float] = field(default_factory=list)  # user_turn_done.prefill_ms of each caller's turn

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "arrives_at": round(self.arrives_at, 3), "busy": self.busy,
                "finished": self.finished, "errors": self.errors, "turns": [t.metrics() for t in self.turns],
                "user_turn_prefill_ms": self.prefill_ms}


def arrival_times(calls: int, window_s: float, rng: random.Random) -> list[float]:
    """`calls` Poisson arrivals, scaled so the last one lands inside the window."""
    times, t = [], 0.0
    for _ in range(calls):
        t += rng.expovariate(1.0)
        times.append(t)
    scale = window_s / times[-1] if times and times[-1] > 0 else 0.0
    return [x * scale for x in times]


def fragments(text: str, rng: random.Random) -> list[str]:
    """The text as an LLM streams it: pieces of one or two words, spaces kept."""
    words = text.split(" ")
    out, i = [], 0
    while i < len(words):
        n = 1 + (rng.random() < 0.4)
        out.append(" ".join(words[i:i + n]))
        i += n
    return [piece if k == 0 else " " + piece for k, piece in enumerate(out)]


async def run_call(call: CallCentreCall, args: argparse.Namespace, t0: float, rng: random.Random) -> None:
    await asyncio.sleep(max(0.0, t0 + call.arrives_at - time.perf_counter()))
    try:
        async with connect(args.url, open_timeout=args.step_timeout, close_timeout=2,
                           max_size=MAX_MESSAGE_BYTES) as ws:
            ready = json.loads(await asyncio.wait_for(ws.recv(), args.step_timeout))
            if ready.get("event") == "error" and ready.get("code") == "busy":
                call.busy = True
                return
            kind = "first"
            for t in range(args.turns):
                if t and sends_user_turns(args):  # the caller's turn (or interruption) enters the context
                    await ws.send(user_turn_message(args, f"c{call.index}-u{t}"))
                barge = args.barge_in_every > 0 and rng.random() < 1.0 / args.barge_in_every and t < args.turns - 1
                turn = await speak_turn(ws, call, t, kind, barge, args, rng)
                if turn.interrupted:
                    kind = "after_barge_in"  # the next turn follows at once
                    continue
                end = turn.playback().end_s or time.perf_counter()
                await asyncio.sleep(max(0.0, end - time.perf_counter()) + rng.uniform(*CALLER_SPEAKS_S))
                kind = "next"
            call.finished = True
    except ConnectionClosed as e:
        call.errors.append(f"connection closed: {e.rcvd.code if e.rcvd else None}")
    except (OSError, asyncio.TimeoutError, ValueError, RuntimeError) as e:
        call.errors.append(f"{type(e).__name__}: {e}")


async def speak_turn(ws, call: CallCentreCall, t: int, kind: str, barge: bool, args, rng) -> AgentTurn:
    """Stream one agent turn's text, read its audio, interrupt it if `barge`."""
    turn_id = f"c{call.index}-t{t}"
    text = AGENT_LINES[(call.index + t) % len(AGENT_LINES)]
    pieces = fragments(text, rng)
    # after a barge-in the inject resumes the paused utterance (its frames count on from what was
    # heard), unless a caller's turn came between: that ended it, and the answer is a new utterance
    resumes = kind == "after_barge_in" and not sends_user_turns(args)
    base = call.turns[-1].frames_at_pause if resumes else 0
    turn = AgentTurn(kind, turn_id, time.perf_counter(), base_frame=base)
    call.turns.append(turn)
    first = {"cmd": "start", "text": "[S1] " + pieces[0]} if t == 0 else {"cmd": "inject", "text": " " + pieces[0]}
    await ws.send(json.dumps({**first, "final": False, "id": turn_id}))
    streamer = asyncio.create_task(stream_rest(ws, pieces[1:], turn_id))
    interrupt_at = rng.uniform(*BARGE_IN_AFTER_S) if barge else None
    try:
        while True:
            message = await asyncio.wait_for(ws.recv(), args.step_timeout)
            now = time.perf_counter()
            if isinstance(message, bytes):
                turn.arrivals.append(now)
                if interrupt_at is not None and turn.playback().played_s(now) >= interrupt_at:
                    streamer.cancel()
                    played_ms = round(turn.playback().played_s(now) * 1000 + base * FRAME_SECONDS * 1000, 1)
                    await ws.send(json.dumps({"cmd": "pause", "played_ms": played_ms, "id": f"{turn_id}-barge"}))
                    await _until(ws, "paused", args)
                    turn.frames_at_pause = int(played_ms // (FRAME_SECONDS * 1000))  # where the rollback stands
                    turn.interrupted = True
                    return turn
                continue
            event = json.loads(message)
            name = event.get("event")
            if name == "word" and turn.first_word_frame is None and event.get("id") == turn_id:
                turn.first_word_frame = int(event["frame"])
            elif name == "done" and event.get("id") == turn_id:
                turn.done = True
                return turn
            elif name == "user_turn_done":
                call.prefill_ms.append(float(event["prefill_ms"]))
            elif name == "error":
                raise RuntimeError(f"error {event.get('code')}: {event.get('message')}")
    finally:
        streamer.cancel()


@functools.lru_cache(maxsize=4)
def caller_audio(seconds: float) -> str:
    """`seconds` of a synthetic caller (a voiced, wavering tone with noise) as base64 µ-law."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * CALLER_RATE)) / CALLER_RATE
    voice = 0.25 * np.sin(2 * np.pi * (140 + 20 * np.sin(2 * np.pi * 0.7 * t)) * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    pcm = np.clip((voice + 0.01 * rng.standard_normal(t.size)) * 32767, -32768, 32767).astype(np.int16)
    return base64.b64encode(bytes(ulaw_encode(pcm))).decode()


def sends_user_turns(args: argparse.Namespace) -> bool:
    return bool(args.user_turn_seconds or args.user_turn_file)


def user_turn_message(args: argparse.Namespace, turn_id: str) -> str:
    """The recorded caller's turn (`--user-turn-file`), else `--user-turn-seconds` of the synthetic one."""
    if args.user_turn_file:
        path, transcript = args.user_turn_file
        audio, fmt = recorded_audio(path)
        return json.dumps({"cmd": "user_turn", "audio": audio, "format": fmt, "transcript": transcript, "id": turn_id})
    words = max(1, int(args.user_turn_seconds * CALLER_WORDS_PER_S))
    transcript = " ".join(CALLER_WORDS[i % len(CALLER_WORDS)] for i in range(words))
    return json.dumps({"cmd": "user_turn", "audio": caller_audio(args.user_turn_seconds), "format": "ulaw_8000",
                       "transcript": transcript, "id": turn_id})


RECORDED_FORMATS = {".wav": "wav", ".flac": "flac"}  # file suffix -> user_turn format


@functools.lru_cache(maxsize=2)
def recorded_audio(path: str) -> tuple[str, str]:
    """A WAV/FLAC file as user_turn's (base64 audio, format); read once for every call."""
    fmt = RECORDED_FORMATS[Path(path).suffix.lower()]
    return base64.b64encode(Path(path).read_bytes()).decode(), fmt


async def stream_rest(ws, pieces: list[str], turn_id: str) -> None:
    for piece in pieces:
        await asyncio.sleep(FRAGMENT_EVERY_S)
        await ws.send(json.dumps({"cmd": "inject", "text": piece, "final": False, "id": turn_id}))
    await asyncio.sleep(FRAGMENT_EVERY_S)
    await ws.send(json.dumps({"cmd": "flush"}))


async def _until(ws, name: str, args) -> dict:
    while True:
        message = await asyncio.wait_for(ws.recv(), args.step_timeout)
        if isinstance(message, str):
            event = json.loads(message)
            if event.get("event") == name:
                return event
            if event.get("event") == "error":
                raise RuntimeError(f"error {event.get('code')}: {event.get('message')}")


async def run_pattern(args: argparse.Namespace) -> tuple[list[CallCentreCall], float]:
    rng = random.Random(args.seed or 0)
    calls = [CallCentreCall(i, at) for i, at in enumerate(arrival_times(args.calls, args.arrival_window, rng))]
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(run_call(c, args, t0, random.Random((args.seed or 0) * 1000 + c.index)))
             for c in calls]
    pending = await run_within(tasks, args.duration_limit)
    for call, task in zip(calls, tasks):
        if task in pending:
            call.errors.append(f"stopped by --duration-limit {args.duration_limit:g} s")
    return calls, time.perf_counter() - t0


def summarize(calls: list[CallCentreCall], wall_s: float, percentiles) -> dict[str, Any]:
    served = [c for c in calls if not c.busy]
    turns = [t.metrics() for c in served for t in c.turns]
    by_kind = {kind: {"turns": sum(t["kind"] == kind for t in turns),
                      "onset_ms": percentiles([t["onset_ms"] for t in turns
                                               if t["kind"] == kind and t["onset_ms"] is not None])}
               for kind in ("first", "next", "after_barge_in")}
    per_call = [[t.metrics() for t in c.turns] for c in served]
    return {
        "pattern": "call-centre", "calls": len(calls), "finished": sum(c.finished for c in calls),
        "busy_refusals": sum(c.busy for c in calls), "calls_with_errors": sum(bool(c.errors) for c in calls),
        "errors": [f"call {c.index}: {e}" for c in calls for e in c.errors],
        "turns": len(turns), "barge_ins": sum(t["interrupted"] for t in turns), "wall_s": round(wall_s, 3),
        "by_kind": by_kind,
        "underruns": sum(t["underruns"] for t in turns),
        "user_turns": sum(len(c.prefill_ms) for c in served),
        "user_turn_prefill_ms": percentiles([ms for c in served for ms in c.prefill_ms]),
        "underruns_per_call": percentiles([sum(t["underruns"] for t in ts) for ts in per_call]),
        "stall_ms_per_call": percentiles([sum(t["stall_ms"] for t in ts) for ts in per_call]),
    }


def format_table(summary: dict[str, Any]) -> str:
    rows = [(f"onset, {kind.replace('_', ' ')} turns (ms)", summary["by_kind"][kind]["onset_ms"])
            for kind in ("first", "next", "after_barge_in")]
    rows += [("underruns per call", summary["underruns_per_call"]), ("stall per call (ms)", summary["stall_ms_per_call"])]
    if summary["user_turns"]:
        rows.append(("caller's turn prefill (ms)", summary["user_turn_prefill_ms"]))
    cell = lambda v: "-" if v is None else f"{v:g}"  # noqa: E731
    lines = [f"{'call-centre':34}{'n':>6}{'p50':>10}{'p95':>10}{'p99':>10}{'max':>10}"]
    for name, s in rows:
        lines.append(f"{name:34}{s['n']:>6}" + "".join(f"{cell(s[k]):>10}" for k in ("p50", "p95", "p99", "max")))
    lines.append(f"calls {summary['calls']}: finished {summary['finished']}, busy refusals {summary['busy_refusals']}, "
                 f"with errors {summary['calls_with_errors']}; turns {summary['turns']} ({summary['barge_ins']} "
                 f"interrupted), underruns {summary['underruns']}, wall {summary['wall_s']:.1f} s")
    lines += [f"  {e}" for e in summary["errors"][:20]]
    return "\n".join(lines)
