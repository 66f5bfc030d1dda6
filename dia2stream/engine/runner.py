"""Runs what the scheduler planned on the stepper and the codec, and returns the results as data.

The runner knows slots, not calls: a step takes each stepped slot's two possible text answers
(or four, when the slot's step before is still in flight) and returns its sampled action,
later (`launch` queues it and returns; `PendingStep.wait` gives the actions); a decode takes the slots whose frame is ready and returns their
PCM rows (`decode_later` queues it and returns, so the host can work while the device decodes);
a replay re-decodes one frame of a slot's rolled-back codec row. Timing of each piece feeds the
scheduler's cost model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class StepResult:
    actions: dict[int, int]  # slot -> sampled action (0 pad, 1 new word)
    batch: int  # the padded batch size it ran at
    full: bool  # the full lane (False: decoder-only)
    seconds: float  # host time the step held the host up: its launch and the wait for its actions


@dataclass
class PendingStep:
    """A step launched on the device, its actions on the way to the host."""

    frame: object  # the stepper's launched frame (`wait()` -> the actions of every slot)
    slots: tuple[int, ...]
    batch: int
    full: bool
    launch_seconds: float  # host time the launch took

    def wait(self) -> StepResult:
        """The step's actions; `seconds` counts the launch and this wait, not the host's own work
        between them."""
        t0 = time.perf_counter()
        actions = self.frame.wait()
        seconds = self.launch_seconds + time.perf_counter() - t0
        return StepResult({slot: actions[slot] for slot in self.slots}, self.batch, self.full, seconds)


@dataclass(frozen=True)
class PendingDecode:
    """A decode queued on the device, its PCM on the way to the host."""

    pcm: object  # the codec's pending PCM (`wait()` -> [rows, samples] on the host)
    launch_seconds: float  # host time the launch took

    def wait(self) -> tuple[np.ndarray, float]:
        """The PCM rows on the host, and the seconds the decode held the host up: its launch
        and the wait (the host's own work in between is not the decode's cost)."""
        t0 = time.perf_counter()
        pcm = self.pcm.wait()
        return pcm, self.launch_seconds + time.perf_counter() - t0


class Runner:
    def __init__(self, stepper, codec, rows: int):
        self.stepper, self.codec, self.rows = stepper, codec, rows
        self._choices: list = [None] * stepper.n
        self._active = [False] * stepper.n
        self._decode_rows = torch.zeros(rows, dtype=torch.bool)
        # on the device, as the codes a replay takes (a slot's aligned codes): a host buffer made
        # each replayed frame two host waits (the copy out, and the decode's copy back; H200 run 37)
        self._replay_codes = torch.zeros(rows, stepper.num_codebooks, dtype=torch.long,
                                         device=stepper.ready_codes.device)
        # a step's ready codes with replaying rows' frames in their place (`decode_later(replays=)`)
        self._mixed_codes = torch.zeros(rows, stepper.num_codebooks, dtype=torch.long,
                                        device=stepper.ready_codes.device)

    def launch(self, choices: dict[int, object]) -> PendingStep:
        """Queue one frame step for the slots in `choices` and return at once. `choices[slot]`:
        both text answers of the slot's next step, or both for each action of its step before
        when that one is still in flight (`SlotTable.stage_step`)."""
        for slot, choice in choices.items():
            self._choices[slot], self._active[slot] = choice, True
        t0 = time.perf_counter()
        try:
            frame = self.stepper.launch(self._choices, self._active)
        finally:
            for slot in choices:
                self._choices[slot], self._active[slot] = None, False
        return PendingStep(frame, tuple(choices), self.stepper.last_batch, self.stepper.last_full,
                           time.perf_counter() - t0)

    def decode(self, slots: list[int]) -> tuple[np.ndarray, float]:
        """One batched decode of the ready frame of `slots`; PCM rows [rows, samples] on the host."""
        return self.decode_later(slots).wait()

    def decode_later(self, slots: list[int], replays: dict[int, torch.Tensor] | None = None) -> "PendingDecode":
        """Queue one batched decode of the ready frame of `slots` and return at once: the host
        works on while the device decodes; `wait()` gives the PCM rows on the host. `replays`
        (slot -> codes [Q]): slots outside the step whose rollback re-decode takes its next frame
        in the same decode (their PCM is not wanted), instead of in one of its own."""
        self._decode_rows.zero_()
        self._decode_rows[slots] = True
        codes = self.stepper.ready_codes[: self.rows]
        t0 = time.perf_counter()
        if replays:
            codes = self._mixed_codes
            codes.copy_(self.stepper.ready_codes[: self.rows])
            for slot, frame in replays.items():
                codes[slot] = frame
                self._decode_rows[slot] = True
        pcm = self.codec.decode_frame_async(codes, self._decode_rows)
        return PendingDecode(pcm, time.perf_counter() - t0)

    def snapshot_codec_rows(self, slots: list[int]) -> list:
        """Snapshots of the codec rows of `slots` (rollback marks), taken together: one copy per
        state tensor for all of them (`MimiCodec.snapshot_rows`)."""
        return self.codec.snapshot_rows(slots)

    def replay(self, slot: int, codes: torch.Tensor) -> float:
        """Decode one frame `codes` [Q] into `slot`'s codec row alone (a rollback's re-decode)."""
        self._decode_rows.zero_()
        self._decode_rows[slot] = True
        self._replay_codes[slot] = codes
        t0 = time.perf_counter()
        self.codec.decode_frame(self._replay_codes, self._decode_rows)
        return time.perf_counter() - t0
