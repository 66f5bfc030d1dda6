"""Voice prefix plan (spec §9): timed words + Mimi codes of one or two speakers → the entries the
state machine consumes during warm-up, the new-word steps at which it consumes them, and the
delayed code grid that `FrameStepper.prefill` writes into the call's buffer (and teacher-forces
with the clean boundary; see `runtime.PrefixBoundary`).

    plan = build_prefix_plan([PrefixSpeaker(codes1, words1, "[S1]"), PrefixSpeaker(codes2, words2, "[S2]")],
                             tokenizer, delays, audio_bos, audio_pad)
    text = warm_up_text(machine, plan, pad_id, bos_id)  # [F + 1, 2]
    stepper.prefill(0, plan.delayed, text, plan.frames)  # upstream's boundary: steps go on from F - 1

Word steps follow upstream (dia2/runtime/voice_clone.py): a word starting at `start_s` starts
at frame `round(start_s · 12.5)` (but never before the previous word's tokens are out); its
new-word step is one frame earlier. Speaker-1 steps are shifted by +3, speaker-2 steps by
speaker 1's frame count. Warm-up starts from a fresh call's step-0 text, `[bos, pad]`, as
upstream's does (dia2/runtime/generator.py).

Two upstream quirks have opt-in fixes; by default this module behaves as upstream does:
- `fit_words=True` (build_prefix_plan): after the shifts a word can be due while the previous
  word's tokens are still going out, and words near the end can be due at or after the last
  prefix frame. Upstream's warm-up then never consumes them, so they stay queued and the first
  generated turn speaks them again. The fix pushes a colliding word later and drops words whose
  tokens would not be out by the last prefix frame.
- `clear_lookahead=True` (warm_up_text): second-stream look-ahead tokens queued during warm-up
  (the prefix words' upcoming words) are dropped instead of leaking into the first turn.
The server (dia2stream/voice.py) turns both on; docs/design.md "Parity with upstream".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .delays import delay_codes
from .config import FRAME_RATE
from .script import ScriptEntry
from .state_machine import ACTION_NEW_WORD, ACTION_PAD, TextStateMachine

SPEAKER1_SHIFT = 3  # upstream shifts speaker 1's new-word steps by 3 frames


@dataclass(frozen=True)
class TimedWord:
    word: str
    start_s: float
    end_s: float


@dataclass(frozen=True)
class PrefixSpeaker:
    codes: torch.Tensor  # aligned Mimi codes [Q, F_i]
    words: Sequence[TimedWord]
    tag: str  # "[S1]" or "[S2]"


@dataclass(frozen=True)
class PrefixPlan:
    entries: list[ScriptEntry]
    steps: list[int]  # new-word step of each entry
    aligned: torch.Tensor  # [Q, F]
    delayed: torch.Tensor  # [Q, F + max_delay], bos before each codebook starts
    speaker_frames: list[int]
    dropped: list[str]  # words left out of the plan (did not fit)

    @property
    def frames(self) -> int:
        return int(self.aligned.shape[1])


def speaker_entries(words: Sequence[TimedWord], tokenizer, tag: str, offset: int) -> list[tuple[ScriptEntry, int]]:
    """Entries of one speaker with their new-word steps (+ `offset`), spec §9."""
    toks = [tuple(int(t) for t in tokenizer.encode(f"{tag} {w.word}" if i == 0 else w.word)) for i, w in enumerate(words)]
    starts, ends, prev_end = [], [], -1
    for w, tk in zip(words, toks):
        start = max(prev_end + 1, round(w.start_s * FRAME_RATE))
        starts.append(start)
        ends.append(start + len(tk))
        prev_end = ends[-1]
    out = []
    for i, (w, tk) in enumerate(zip(words, toks)):
        if i + 1 < len(words):
            next_start = max(ends[i] + 1, round(words[i + 1].start_s * FRAME_RATE))
        else:
            next_start = max(ends[i] + 1, round(w.end_s * FRAME_RATE))
        padding = max(0, next_start - starts[i] - 1)
        out.append((ScriptEntry(text=w.word, tokens=tk, padding=padding), starts[i] - 1 + offset))
    return out


def build_prefix_plan(speakers: Sequence[PrefixSpeaker], tokenizer, delays: Sequence[int], audio_bos: int,
                      audio_pad: int, *, fit_words: bool = False) -> PrefixPlan:
    if not speakers:
        raise ValueError("a prefix needs at least one speaker")
    codes = [s.codes.long().cpu() for s in speakers]
    aligned = torch.cat(codes, dim=1)
    frames = aligned.shape[1]
    planned: list[tuple[ScriptEntry, int]] = []
    offset = 0
    for i, (speaker, c) in enumerate(zip(speakers, codes)):
        shift = SPEAKER1_SHIFT if i == 0 else offset
        planned += speaker_entries(speaker.words, tokenizer, speaker.tag, shift)
        offset += c.shape[1]
    entries, steps, dropped = fit_word_steps(planned, frames, fit_words=fit_words)
    delayed = delay_codes(aligned, list(delays), audio_pad)
    for k, delay in enumerate(delays):
        delayed[k, :delay] = audio_bos
    return PrefixPlan(entries, steps, aligned, delayed, [c.shape[1] for c in codes], dropped)


def fit_word_steps(planned: Sequence[tuple[ScriptEntry, int]], frames: int, *, fit_words: bool
                   ) -> tuple[list[ScriptEntry], list[int], list[str]]:
    """(entries, new-word steps, dropped words) of `planned` over `frames` frames. `fit_words`:
    push a word that collides with the previous one later, drop a word whose tokens would not be
    out by the last frame (see the module docstring); else keep upstream's steps."""
    entries, steps, dropped = [], [], []
    free_at = 0  # first step at which the previous word's tokens are all out
    for entry, step in planned:
        if fit_words:
            step = max(step, free_at)  # after the shifts a word may collide with the previous one: push it later
            if step + len(entry.tokens) > frames - 1:
                dropped.append(entry.text)
                continue
        entries.append(entry)
        steps.append(step)
        free_at = step + len(entry.tokens) + 1
    return entries, steps, dropped


def turn_word_steps(words: Sequence[TimedWord], tokenizer, tag: str, frames: int
                    ) -> tuple[list[ScriptEntry], list[int], list[str]]:
    """One speaker's turn placed on `frames` frames of its own audio, to be appended to a
    conversation (a caller's turn): entries and new-word steps counted from the turn's first
    frame, as speaker 2 of a prefix is placed from its own first frame (no shift); a colliding
    word is pushed later and words that do not fit come back as dropped (`fit_words`)."""
    return fit_word_steps(speaker_entries(words, tokenizer, tag, 0), frames, fit_words=True)


def warm_up_text(machine: TextStateMachine, plan: PrefixPlan, pad_id: int, bos_id: int, *,
                 script: Sequence[ScriptEntry] = (), clear_lookahead: bool = False) -> torch.Tensor:
    """Drive `machine` (fresh) through the prefix with forced actions; the text inputs [F + 1, 2]
    of steps 0..F: step 0 gets `[bos_id, pad]` like any fresh call (spec §5), step t+1 gets what
    the machine answered at step t.

    `script`: the entries to speak after the prefix, when known. Upstream queues them behind the
    prefix words before warm-up, so with a second text stream the look-ahead of the last prefix
    words already shows the script's first words. (The server prepares a voice before any text
    exists and pushes the script later.)

    With a plan built without `fit_words`, prefix words the warm-up could not consume stay queued
    in `machine` (upstream's behaviour: they are spoken by the first turn).
    """
    machine.push([*plan.entries, *script], final=True)
    text = torch.empty((plan.frames + 1, 2), dtype=torch.long)
    text[0, 0], text[0, 1] = bos_id, pad_id
    text[1:] = forced_text(machine, plan.steps, plan.frames)
    if clear_lookahead:
        machine.clear_lookahead()  # look-ahead of prefix words must not leak into the turn
    return text


def forced_text(machine: TextStateMachine, new_word_steps: Sequence[int], frames: int, start: int = 0) -> torch.Tensor:
    """Drive `machine` through steps start..start + frames - 1 with forced actions (a new word at
    `start + s` for each s in `new_word_steps`, else pad) over the entries already pushed; the
    (main, second) text it answers at each step, [frames, 2]. A voice prefix starts at 0; a
    caller's turn appended to a conversation starts at the call's position."""
    new_word = set(new_word_steps)
    text = torch.empty((frames, 2), dtype=torch.long)
    for t in range(frames):
        action = ACTION_NEW_WORD if t in new_word else ACTION_PAD
        text[t] = torch.tensor(machine.process(start + t, action, forced=True))
    return text
