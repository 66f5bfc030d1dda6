#!/usr/bin/env python
"""Speak a text through a running dia2stream server and report latency; write the audio as WAV.

    python test_client.py "[S1] Hello there." [--url ws://127.0.0.1:8765/]
        [--inject TEXT --inject-at SECONDS] [--pause-at SECONDS [--played-ms MS|auto]]
        [--resume-at SECONDS] [--voice NAME] [--seed N] [--stream-words [--word-interval S]]
        [--format pcm_24000|pcm_16000|pcm_8000|ulaw_8000|alaw_8000] [-o out.wav] [--timeout S] [--quiet]
        [--busy-retries N] [--user-turn FILE.wav "TRANSCRIPT" [--inject TEXT]]

Times given to --inject-at/--pause-at/--resume-at are seconds after `start` was sent.
--format asks for that wire format; the WAV is written at its rate (G.711 decoded to 16-bit PCM).
--played-ms sends `played_ms` with the pause (`auto`: what a player that plays frames back to back
from the first one has played by then). The summary gives each utterance's speech onset (from the
command until such a player reaches the first word's frame, dia2stream.tools.playback) and word times.
The client stops at the `done` that covers the last text it sent (see docs/protocol.md, ids),
or, when the last scheduled command is a pause, half a second after `paused` (checking that no
audio frame arrives after it). Exit status: 0 ok, 1 error event / protocol violation / closed
connection, 2 timeout. A `busy` refusal is tried again up to --busy-retries times after a short
backoff, as a client behind a balancer must (dia2stream/tools/retry.py).
--user-turn sends the caller's turn (a WAV/FLAC file and what was said in it) between turns: after
the first utterance's `done`, then waits for `user_turn_done`; --inject is then the agent's answer,
sent at once (not at --inject-at), and the client stops at its `done` (at `user_turn_done` without it).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import re
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np
import soundfile as sf
from websockets.exceptions import ConnectionClosed

from dia2stream.wire import formats

from dia2stream.tools import playback
from dia2stream.tools.retry import Busy, BusyRetry, open_call
from dia2stream.wire import protocol as p
START_ID = "turn-1"
INJECT_ID = "inject-1"
USER_TURN_ID = "user-turn-1"
PAUSE_GRACE_S = 0.5  # after a final pause: how long to watch for (forbidden) late frames


@dataclass(frozen=True)
class Action:
    """A command to send `at_s` seconds after `start`."""

    at_s: float
    command: p.Command
    played_ms: float | str | None = None  # a pause's `played_ms` (a number, or "auto")


@dataclass
class Utterance:
    """One `started` … `done`: arrival times of its frames (split at pauses) and its words."""

    id: str | int | None
    command_at: float | None  # when the command that began it was sent
    segments: list[list[float]] = field(default_factory=lambda: [[]])
    words: list[p.Word] = field(default_factory=list)

    def playback(self) -> playback.Playback | None:
        """The first segment as a back-to-back player plays it (None without a command time)."""
        if self.command_at is None:
            return None
        onset = self.words[0].frame if self.words else None
        return playback.simulate(self.segments[0], self.command_at, onset)

    def play_starts(self) -> list[float]:
        """When each frame starts playing; a segment after a pause restarts at its first frame."""
        return [t for seg in self.segments for t in playback.simulate(seg, 0.0).play_starts]

    def played_ms(self, at: float) -> float:
        """Audio of this utterance a back-to-back player has played by `at` (all segments)."""
        return 1000 * sum(playback.simulate(seg, 0.0).played_s(at) for seg in self.segments if seg)


@dataclass
class Run:
    """What the client has seen so far."""

    format: formats.AudioFormat = formats.FORMATS[formats.DEFAULT_FORMAT]
    sample_rate: int = p.SAMPLE_RATE
    frame_samples: int = p.FRAME_SAMPLES
    t_start: float | None = None  # perf_counter when `start` was sent
    t_first_audio: float | None = None
    t_end: float | None = None
    frames: list[np.ndarray] = field(default_factory=list)
    odd_frames: int = 0  # frames whose size is not frame_samples
    sent: int = 0  # actions sent so far
    paused: bool = False
    frames_after_pause: int = 0
    finish_at: float | None = None  # perf_counter at which to stop without a done
    dones: list[p.Done] = field(default_factory=list)
    failure: str | None = None
    sent_at: dict = field(default_factory=dict)  # command id -> perf_counter when sent
    utterances: list[Utterance] = field(default_factory=list)
    # commands sent in answer to events, not at a time: the caller's turn after the first `done`,
    # then the agent's answer after `user_turn_done`
    followups: collections.deque = field(default_factory=collections.deque)


# ---------------------------------------------------------------------------------------------
# Main flow
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


async def run(args: argparse.Namespace) -> int:
    actions = build_actions(args)
    state = Run()
    if args.user_turn:
        try:
            state.followups.extend(user_turn_followups(args))
        except OSError as e:
            return fail(f"cannot read {args.user_turn[0]}: {e}")
    if args.format:
        state.format = formats.get_format(args.format)
    deadline = time.perf_counter() + args.timeout
    try:
        try:
            ws, first = await open_call(args.url, BusyRetry(attempts=args.busy_retries + 1),
                                        open_timeout=args.timeout, close_timeout=2,
                                        on_refused=lambda refusal: say(args, f"busy ({refusal}); trying again"))
        except Busy as e:
            return fail(f"server refused: {e}")
        async with ws:
            ready = p.parse_event(json.dumps(first))
            if not isinstance(ready, (p.Ready, p.ErrorEvent)):
                return fail(f"expected 'ready', got {ready.event!r}")
            if isinstance(ready, p.ErrorEvent):
                return fail(f"server refused: {ready.code}: {ready.message}")
            state.sample_rate, state.frame_samples = ready.sample_rate, ready.frame_samples
            if args.format:  # frames come at the format's rate, not the model's
                state.sample_rate, state.frame_samples = state.format.sample_rate, state.format.frame_samples
            say(args, f"ready: model={ready.model} protocol={ready.protocol} device={ready.device} "
                      f"{ready.sample_rate} Hz, {ready.frame_samples} samples/frame, "
                      f"voices={ready.voices}, max_lead_ms={ready.max_lead_ms}", always=True)
            if ready.protocol != p.PROTOCOL_VERSION:
                print(f"warning: server speaks protocol {ready.protocol}, "
                      f"client {p.PROTOCOL_VERSION}", file=sys.stderr)
            sender = asyncio.create_task(send_actions(ws, actions, state, args))
            try:
                status = await receive_until_finished(ws, actions, state, deadline, args)
            finally:
                sender.cancel()
    except ConnectionClosed as e:
        return fail(f"connection closed: code={e.rcvd.code if e.rcvd else None} "
                    f"reason={e.rcvd.reason if e.rcvd else ''!r}")
    except (OSError, asyncio.TimeoutError) as e:
        return fail(f"cannot connect to {args.url}: {e!r}", code=2 if isinstance(e, TimeoutError) else 1)
    if status == 2:
        write_wav(args.output, state)
        return fail(f"timeout after {args.timeout:g} s ({state.failure})", code=2)
    write_wav(args.output, state)
    print_summary(state, args)
    if state.failure:
        return fail(state.failure)
    return 0


def build_actions(args: argparse.Namespace) -> list[Action]:
    """Every command the client sends, with its time after `start`, in sending order."""
    tuning = dict(voice=args.voice, seed=args.seed, format=args.format)
    actions: list[Action] = []
    if args.stream_words:
        fragments = text_fragments(args.text)
        actions.append(Action(0.0, p.Start(text=fragments[0], final=False, id=START_ID, **tuning)))
        for i, fragment in enumerate(fragments[1:], start=1):
            actions.append(Action(i * args.word_interval, p.Inject(text=fragment, final=False)))
        actions.append(Action(len(fragments) * args.word_interval, p.Flush()))
    else:
        actions.append(Action(0.0, p.Start(text=args.text, id=START_ID, **tuning)))
    if args.inject is not None and not args.user_turn:
        actions.append(Action(args.inject_at, p.Inject(text=args.inject, id=INJECT_ID)))
    if args.pause_at is not None:
        actions.append(Action(args.pause_at, p.Pause(id="pause-1"), played_ms=args.played_ms))
    if args.resume_at is not None:
        actions.append(Action(args.resume_at, p.Resume(id="resume-1")))
    actions.sort(key=lambda a: a.at_s)  # stable: equal times keep the order above
    return actions


def user_turn_followups(args: argparse.Namespace) -> list[p.Command]:
    """The caller's turn from --user-turn FILE TRANSCRIPT (format from the file's extension), and
    the agent's answer (--inject) after it."""
    path, transcript = args.user_turn
    fmt = "flac" if path.lower().endswith(".flac") else "wav"
    with open(path, "rb") as f:
        audio = base64.b64encode(f.read()).decode()
    out: list[p.Command] = [p.UserTurn(audio_b64=audio, format=fmt, transcript=transcript, id=USER_TURN_ID)]
    if args.inject is not None:
        out.append(p.Inject(text=args.inject, id=INJECT_ID))
    return out


def text_fragments(text: str) -> list[str]:
    """Split into word fragments as an LLM would stream them; a speaker tag stays with its word."""
    words = re.findall(r"(?:\[S\d\]\s*)*\S+", text.strip())
    return [w if i == 0 else " " + w for i, w in enumerate(words)] or [text]


def expected_done_id(actions: list[Action]) -> str | int | None:
    """The id the final `done` carries: that of the last id-bearing start/inject sent."""
    ids = [a.command.id for a in actions
           if isinstance(a.command, (p.Start, p.Inject)) and a.command.id is not None]
    return ids[-1] if ids else None


async def send_actions(ws, actions: list[Action], state: Run, args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    for action in actions:
        delay = t0 + action.at_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        message = p.command_to_json(action.command)
        if action.played_ms is not None:
            # the protocol dataclass does not carry played_ms yet: add it to the JSON here
            played = action.played_ms
            if played == "auto":
                played = round(state.utterances[-1].played_ms(time.perf_counter())) if state.utterances else 0
            message = json.dumps({**json.loads(message), "played_ms": played})
        if isinstance(action.command, p.Start):
            state.t_start = time.perf_counter()
        if getattr(action.command, "id", None) is not None:
            state.sent_at[action.command.id] = time.perf_counter()
        await ws.send(message)
        state.sent += 1
        say(args, f"[{elapsed(state):7.3f}s] -> {short(message)}")


async def receive_until_finished(ws, actions: list[Action], state: Run, deadline: float,
                                 args: argparse.Namespace) -> int:
    """Handle messages until finished (0), an error (1) or the deadline (2)."""
    final_id = expected_done_id(actions)
    last_is_pause = isinstance(actions[-1].command, p.Pause)
    while True:
        now = time.perf_counter()
        stop_at = min(deadline, state.finish_at or deadline)
        try:
            message = await asyncio.wait_for(ws.recv(), timeout=max(0.0, stop_at - now))
        except asyncio.TimeoutError:
            if state.finish_at is not None and time.perf_counter() < deadline:
                state.t_end = state.t_end or time.perf_counter()
                return 0
            state.failure = "no final 'done'" if state.sent == len(actions) else "commands unsent"
            return 2
        if isinstance(message, bytes):
            if not handle_audio(message, state):
                state.t_end = time.perf_counter()
                return 1
            continue
        event = p.parse_event(message)
        say(args, f"[{elapsed(state):7.3f}s] <- {describe(event)}",
            always=isinstance(event, p.ErrorEvent))
        all_sent = state.sent == len(actions)
        if isinstance(event, p.ErrorEvent):
            state.failure = f"error event: {event.code}: {event.message}"
            state.t_end = time.perf_counter()
            return 1
        if isinstance(event, p.Started):
            state.utterances.append(Utterance(event.id, state.sent_at.get(event.id)))
        elif isinstance(event, p.Word) and state.utterances:
            state.utterances[-1].words.append(event)
        elif isinstance(event, p.Resumed) and state.utterances:
            state.utterances[-1].segments.append([])
        if isinstance(event, p.Paused):
            state.paused = True
            if all_sent and last_is_pause:
                state.t_end = time.perf_counter()
                state.finish_at = state.t_end + PAUSE_GRACE_S
        elif isinstance(event, (p.Resumed, p.Started)):
            state.paused = False
        elif isinstance(event, p.Done):
            state.dones.append(event)
            if all_sent and (event.id == final_id or event.id is None):
                if state.followups:  # the caller speaks between turns
                    final_id = await send_followup(ws, state, args)
                    continue
                state.t_end = time.perf_counter()
                return 0
        elif isinstance(event, p.UserTurnDone):
            if not state.followups:
                state.t_end = time.perf_counter()
                return 0
            final_id = await send_followup(ws, state, args)


async def send_followup(ws, state: Run, args: argparse.Namespace) -> str | int | None:
    """Send the next event-driven command; returns the id of the `done` to wait for next."""
    command = state.followups.popleft()
    state.sent_at[command.id] = time.perf_counter()
    message = p.command_to_json(command)
    await ws.send(message)
    say(args, f"[{elapsed(state):7.3f}s] -> {short(message)}")
    return command.id


def handle_audio(message: bytes, state: Run) -> bool:
    """Keep one frame; False (with `state.failure`) if it is not a frame of the expected format."""
    try:
        samples = formats.decode_frame(message, state.format)
    except ValueError as e:
        state.failure = f"audio frame is not {state.format.name}: {e}"
        return False
    now = time.perf_counter()
    if state.t_first_audio is None:
        state.t_first_audio = now
    if state.utterances:
        state.utterances[-1].segments[-1].append(now)
    if state.paused:
        state.frames_after_pause += 1
        state.failure = f"protocol violation: {state.frames_after_pause} audio frame(s) after 'paused'"
    if samples.shape[0] != state.frame_samples:
        state.odd_frames += 1
    state.frames.append(samples)
    return True


# ---------------------------------------------------------------------------------------------
# Output helpers
# ---------------------------------------------------------------------------------------------


def print_summary(state: Run, args: argparse.Namespace) -> None:
    samples = sum(f.shape[0] for f in state.frames)
    audio_s = samples / state.sample_rate
    wall_s = (state.t_end or time.perf_counter()) - (state.t_start or time.perf_counter())
    ttfa = ("n/a" if state.t_first_audio is None or state.t_start is None
            else f"{(state.t_first_audio - state.t_start) * 1000:.0f} ms")
    rtf = f"{wall_s / audio_s:.3f}" if audio_s > 0 else "n/a"
    print(f"time to first audio: {ttfa}")
    print(f"frames: {len(state.frames)}" + (f" ({state.odd_frames} not {state.frame_samples} samples)"
                                            if state.odd_frames else ""))
    print(f"audio: {audio_s:.2f} s   wall: {wall_s:.2f} s   real-time factor (wall/audio): {rtf}")
    for done in state.dones:
        ttfa_ms = "n/a" if done.ttfa_ms is None else f"{done.ttfa_ms:.0f} ms"
        print(f"server done id={done.id}: frames={done.frames} audio={done.audio_s:.2f} s "
              f"wall={done.wall_s:.2f} s ttfa={ttfa_ms}")
    for utterance in state.utterances:
        print_onset(utterance)
    if args.output and state.frames:
        print(f"wrote {args.output} ({state.format.name}, {state.sample_rate} Hz)")


def print_onset(utterance: Utterance) -> None:
    """Speech onset and word times of one utterance, as a back-to-back player hears them."""
    heard = utterance.playback()
    onset = "n/a" if heard is None or heard.onset_s is None else f"{heard.onset_s * 1000:.0f} ms"
    first = "n/a" if heard is None or heard.first_byte_s is None else f"{heard.first_byte_s * 1000:.0f} ms"
    underruns = "" if heard is None else f", underruns {heard.underruns}"
    print(f"utterance id={utterance.id}: first byte {first}, speech onset {onset}{underruns}")
    words = []
    starts = utterance.play_starts()
    for word in utterance.words:
        at = ""
        if heard is not None and word.frame < len(starts):
            at = f" heard +{(starts[word.frame] - heard.command_at) * 1000:.0f} ms"
        words.append(f"{word.word}@{word.start_s:.2f}s{at}")
    if words:
        print("  words: " + ", ".join(words))


def write_wav(path: str | None, state: Run) -> None:
    if not path or not state.frames:
        return
    audio = np.concatenate(state.frames).astype(np.int16)
    sf.write(path, audio, state.sample_rate, subtype="PCM_16")


def describe(event: p.Event) -> str:
    """One short line per event (words are compact)."""
    if isinstance(event, p.Word):
        return f"word {event.word!r} @{event.start_s:.2f}s"
    fields = {k: v for k, v in event.to_dict().items() if k != "event"}
    return f"{event.event} {json.dumps(fields, ensure_ascii=False)}"


def short(message: str, limit: int = 120) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."


def elapsed(state: Run) -> float:
    return 0.0 if state.t_start is None else time.perf_counter() - state.t_start


def say(args: argparse.Namespace, line: str, always: bool = False) -> None:
    if always or not args.quiet:
        print(line, flush=True)


def fail(reason: str, code: int = 1) -> int:
    print(f"FAILED: {reason}", file=sys.stderr)
    return code


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("text", help='text to speak, e.g. "[S1] Hello there."')
    ap.add_argument("--url", default="ws://127.0.0.1:8765/")
    ap.add_argument("--inject", metavar="TEXT", help="text to inject (continues the turn)")
    ap.add_argument("--inject-at", type=float, default=1.0, metavar="SECONDS",
                    help="when to send --inject, seconds after start (default 1.0)")
    ap.add_argument("--pause-at", type=float, metavar="SECONDS")
    ap.add_argument("--played-ms", metavar="MS|auto",
                    help="send played_ms with the pause: a number, or 'auto' (what a back-to-back "
                         "player has played by then); left out when not given")
    ap.add_argument("--format", choices=formats.FORMAT_NAMES,
                    help="wire audio format to ask for in start (default: the server's, pcm_24000)")
    ap.add_argument("--resume-at", type=float, metavar="SECONDS")
    ap.add_argument("--voice", help="prepared voice name for start")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--stream-words", action="store_true",
                    help="send the text word by word with final:false, then flush")
    ap.add_argument("--word-interval", type=float, default=0.15, metavar="S",
                    help="seconds between streamed words (default 0.15)")
    ap.add_argument("-o", "--output", default="out.wav", help="WAV to write ('' for none)")
    ap.add_argument("--timeout", type=float, default=60.0, help="overall limit in seconds")
    ap.add_argument("--busy-retries", type=int, default=3, metavar="N",
                    help="when refused busy (close 1013, or HTTP 503 from a balancer or a draining server), "
                         "try again up to N times after a short backoff (default 3)")
    ap.add_argument("--user-turn", nargs=2, metavar=("FILE", "TRANSCRIPT"),
                    help="after the first utterance, send the caller's turn (WAV/FLAC file and what was said); "
                         "--inject is then the agent's answer")
    ap.add_argument("--quiet", action="store_true", help="print only ready, errors and summary")
    args = ap.parse_args(argv)
    url = urlsplit(args.url)
    if url.scheme not in ("ws", "wss") or not url.hostname:
        ap.error(f"--url: not a websocket URL (ws://host:port/ or wss://...): {args.url!r}")
    if not args.timeout > 0 or args.timeout == float("inf"):
        ap.error("--timeout must be a number of seconds more than 0")
    if args.busy_retries < 0:
        ap.error("--busy-retries must be 0 or more")
    if args.resume_at is not None and (args.pause_at is None or args.resume_at <= args.pause_at):
        ap.error("--resume-at needs an earlier --pause-at")
    if args.played_ms is not None:
        if args.pause_at is None:
            ap.error("--played-ms needs --pause-at")
        if args.played_ms != "auto":
            try:
                args.played_ms = float(args.played_ms)
            except ValueError:
                ap.error("--played-ms must be a number of milliseconds or 'auto'")
            if args.played_ms.is_integer():
                args.played_ms = int(args.played_ms)
    return args


if __name__ == "__main__":
    sys.exit(main())
