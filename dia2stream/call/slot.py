"""A call's handle on its slot: its rows of the engine's stepper and its row of the codec.

A call reads and resets its own device state through this handle and nothing else; it never
sees the engine or another call's rows. Model work a command asks for is not run in the command
handler: it waits here until the engine's scheduler plans it between frames, and the call does
not step until it is done: `pending_replay` (re-decoding the Mimi row after a rollback, one
frame at a time) and `pending_prefill` (a caller's turn appended to the context in one parallel
prefill, run once the replay is done).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class CallSettings:
    """What a call needs of its engine's configuration and model."""

    context_frames: int
    max_lead_ms: float
    lead_in_frames: int
    rollover_frames: int
    min_turn_frames: int
    max_pending_text_chars: int
    cfg_scale: float
    seed: int
    tail_frames: int  # steps after the last word that flush the delayed codebooks
    text_pad_token_id: int


@dataclass
class CodecReplay:
    """Planned work: put the codec row back to `snapshot`, then decode `codes` [Q, F] into it."""

    snapshot: object
    codes: torch.Tensor
    done: int = 0  # frames decoded so far

    @property
    def frames_left(self) -> int:
        return self.codes.shape[1] - self.done


@dataclass(frozen=True)
class PlannedPrefill:
    """Planned work: `run` appends known frames to the call's context (a caller's turn) through
    this handle's `encode` and `prefill`; the engine runs it between frames, when no call is near
    running dry, and before the call's next command."""

    run: Callable[[], None]
    what: str  # for logs


class SlotHandle:
    """Slot `index` of `stepper` (its CFG rows) and row `index` of `codec`'s stream. The engine
    may move the call to another slot between frames (its whole device state goes with it:
    `FrameStepper.swap_rows`), and tells the handle so (`moved_to`): a call always reaches its own
    state through its handle, whichever slot it sits on."""

    def __init__(self, stepper, codec, index: int):
        self._stepper, self._codec, self.index = stepper, codec, index
        self.pending_replay: CodecReplay | None = None
        self.pending_prefill: PlannedPrefill | None = None

    def moved_to(self, index: int) -> None:
        """The engine moved this call's state to slot `index` (stepper rows and codec row)."""
        self.index = index

    # -- the slot's state, read

    @property
    def position(self) -> int:
        return self._stepper.position(self.index)

    @property
    def ready_frame(self) -> int:
        """The aligned frame whose codes the last step made ready."""
        return self._stepper.ready_frame_index(self.index)

    @property
    def max_delay(self) -> int:
        return self._stepper.max_delay

    @property
    def bos_token_id(self) -> int:
        return self._stepper.bos_token_id

    @property
    def has_guidance(self) -> bool:
        return self._stepper.branches == 2

    def needs_depformer(self) -> bool:
        return self._stepper.needs_depformer(self.index)

    def text_inputs(self) -> tuple[int, int]:
        return self._stepper.text_inputs(self.index)

    def aligned_codes(self, start: int, stop: int) -> torch.Tensor:
        return self._stepper.aligned_codes(self.index, start, stop)

    # -- the slot's state, written (host and device copies, no model work)

    def reset(self) -> None:
        self._stepper.reset_call(self.index)
        self.reset_codec()

    def reset_codec(self) -> None:
        self.pending_replay = None
        self.pending_prefill = None
        mask = torch.zeros(self._codec.stream_batch_size, dtype=torch.bool)
        mask[self.index] = True
        self._codec.reset_stream(mask)

    def set_sampling(self, params) -> None:
        self._stepper.set_sampling(self.index, params)

    def rewind(self, position: int, text: tuple[int, int]) -> None:
        self._stepper.rewind(self.index, position, text)

    def prefill(self, delayed: torch.Tensor, text: torch.Tensor, frames: int, boundary, start: int = 0) -> None:
        self._stepper.prefill(self.index, delayed, text, frames, boundary=boundary, start=start)

    def codec_snapshot(self):
        return self._codec.snapshot_row(self.index)

    def restore_voice(self, state, machine) -> None:
        from dia2stream.voices.voice import restore_voice

        self.pending_replay = None
        self.pending_prefill = None
        restore_voice(state, self._stepper, machine, self._codec, self.index)

    # -- planned model work

    def replay_codec(self, snapshot, codes: torch.Tensor) -> None:
        """Ask for the codec row to stand where decoding `codes` after `snapshot` leaves it. The
        engine does it between frames (`take_replay_frame`), before this slot decodes again."""
        self._codec.restore_row(self.index, snapshot)
        self.pending_replay = CodecReplay(snapshot, codes) if codes.shape[1] else None

    def plan_prefill(self, work: PlannedPrefill) -> None:
        assert self.pending_prefill is None, "one planned prefill at a time (the engine runs it before the next command)"
        self.pending_prefill = work

    def take_prefill(self) -> PlannedPrefill | None:
        work, self.pending_prefill = self.pending_prefill, None
        return work

    def encode(self, wav) -> torch.Tensor:
        """Mimi codes [Q, F] of 24 kHz mono audio (model work: planned, never in a handler)."""
        return self._codec.encode(torch.as_tensor(wav))[0]

    def next_replay_codes(self) -> torch.Tensor | None:
        """The next frame of the pending replay, [Q], or None when there is none."""
        replay = self.pending_replay
        if replay is None:
            return None
        return replay.codes[:, replay.done]

    def replay_frame_done(self) -> None:
        replay = self.pending_replay
        replay.done += 1
        if replay.frames_left == 0:
            self.pending_replay = None
