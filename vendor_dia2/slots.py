"""The per-slot device state of a `FrameStepper`, and the host mirrors its scheduling reads.

Every tensor here has one row (or `branches` rows) per call slot and persists across frames, so
a captured CUDA graph reads and writes the same memory on every replay. The frame advances a
slot's position on the device; the host keeps a mirror of each slot's position, teacher-forced
prefix and cache offset (`SlotPlace`) so that choosing a batch size, a lane or a cache bucket
never reads the device. `SlotTable.place` is the one writer of a slot's place: device and host
always change together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .config import Dia2Config
from .model import Dia2Model
from . import row_swap
from .row_swap import RowSwap

UNGENERATED = -2  # delayed-buffer cell not written yet
NEW_WORD_ACTION = 1  # upstream maps action index 1 to new_word and everything else to pad


@dataclass(frozen=True)
class SamplingParams:
    """Upstream GenerationConfig defaults (DIA2_SPEC.md §8)."""

    text_temperature: float = 0.6
    text_top_k: int = 50
    audio_temperature: float = 0.8
    audio_top_k: int = 50
    cfg_scale: float = 2.0
    seed: int = 0


@dataclass(frozen=True)
class SlotPlace:
    """Where a slot stands, as the host sees it: the position its next step runs, the aligned
    frames a prefix teacher-forces, and its cache slot minus its RoPE position."""

    position: int = 0
    prefix_frames: int = 0
    cache_offset: int = 0


class SlotPlaces:
    """The host mirror of every slot's place, as arrays: a step moves every live slot on in one
    vectorised add (a `SlotPlace` per slot per step was Python work, and garbage, that grew with
    the calls). `places[call]` reads and writes one slot's place as a `SlotPlace`."""

    def __init__(self, n: int):
        self.position = np.zeros(n, dtype=np.int64)
        self.prefix_frames = np.zeros(n, dtype=np.int64)
        self.cache_offset = np.zeros(n, dtype=np.int64)

    def __getitem__(self, call: int) -> SlotPlace:
        return SlotPlace(int(self.position[call]), int(self.prefix_frames[call]), int(self.cache_offset[call]))

    def __setitem__(self, call: int, place: SlotPlace) -> None:
        self.position[call], self.prefix_frames[call], self.cache_offset[call] = \
            place.position, place.prefix_frames, place.cache_offset

    def advance(self, live: np.ndarray) -> None:
        self.position[live] += 1

    def swap(self, a: int, b: int) -> None:
        for column in (self.position, self.prefix_frames, self.cache_offset):
            column[[a, b]] = column[[b, a]]

    def furthest_cache_slot(self, b: int) -> int:
        """The highest decoder cache slot slots 0..b-1 write next (position plus cache offset)."""
        return int((self.position[:b] + self.cache_offset[:b]).max())

    def need_codes(self, live: np.ndarray, first_stage_delay: int) -> bool:
        """Whether any of `live` samples codes an output reads at its next step."""
        return bool(np.any(self.position[live] + 1 >= first_stage_delay + self.prefix_frames[live]))


@dataclass
class StepperSnapshot:
    """Copies of one slot's device state (row-sized), restorable into any slot of a stepper with the
    same CFG mode and context size (`FrameStepper.restore`)."""

    positions: torch.Tensor  # [1], on the host
    tokens: torch.Tensor  # [branches, C]
    buffer: torch.Tensor  # [1, Q, max_positions + 2]
    prefix_frames: torch.Tensor  # [1], on the host
    caches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per layer [branches, H, length, Dh]
    length: int = 0  # cache slots that hold data (0..length-1); only those are copied
    cache_offset: int = 0  # cache slot minus RoPE position (1 after an upstream-boundary prefill)


@dataclass
class HostStaging:
    """One step's host side: the text choices and active mask it copies in, the actions it copies
    out (pinned on CUDA, so the copies are asynchronous), and the event after its last copy."""

    choices: torch.Tensor  # [n, 2, 2, 2] as `SlotTable.text_choices`
    active: torch.Tensor  # [n] bool
    action: torch.Tensor  # [n]
    done: object = None  # a torch.cuda.Event once a copy was queued; None on CPU (copies are done at once)

    @classmethod
    def allocate(cls, n: int, device: torch.device) -> "HostStaging":
        pinned = device.type == "cuda"
        return cls(torch.zeros(n, 2, 2, 2, dtype=torch.long, pin_memory=pinned),
                   torch.zeros(n, dtype=torch.bool, pin_memory=pinned),
                   torch.zeros(n, dtype=torch.long, pin_memory=pinned))

    def record(self) -> None:
        if self.action.is_pinned():
            self.done = torch.cuda.Event()
            self.done.record()

    def wait(self) -> None:
        if self.done is not None:
            self.done.synchronize()
            self.done = None


@dataclass
class PendingActions:
    """A step's sampled actions on their way to the host; `wait()` gives them, one per slot."""

    staging: HostStaging

    def wait(self) -> list[int]:
        self.staging.wait()
        return self.staging.action.tolist()


class SlotTable:
    """Inputs, outputs, caches and sampling settings of `n` slots, rows laid out `[slot, branch]`."""

    # Buffers must be normal tensors even when built inside inference mode (as `Dia2.generate`
    # builds its stepper): inference tensors cannot be updated in place outside it later.
    @torch.inference_mode(False)
    def __init__(self, model: Dia2Model, *, n: int, branches: int, max_positions: int, bos_token_id: int):
        config: Dia2Config = model.config
        d = config.data
        dev = next(model.parameters()).device
        self.config, self.device = config, dev
        self.n, self.branches, self.rows = n, branches, n * branches
        self.bos_token_id = int(bos_token_id)
        # one cache slot more than positions: after an upstream-boundary prefill a slot runs one ahead
        self.decoder_caches, self.depformer_caches = model.new_caches(self.rows, max_positions + 2)
        long = dict(device=dev, dtype=torch.long)
        f32 = dict(device=dev, dtype=torch.float32)
        self.delays = torch.tensor(d.delay_pattern, **long)  # [Q]
        # inputs of the next step
        self.tokens = torch.zeros(self.rows, d.channels, **long)
        self.positions = torch.zeros(n, **long)
        self.buffer = torch.full((n, d.num_codebooks, max_positions + 2), UNGENERATED, **long)
        self.prefix_frames = torch.zeros(n, **long)  # aligned frames teacher-forced (voice prefix, rollback)
        self.cache_offset = torch.zeros(n, **long)  # cache slot = position + offset (PrefixBoundary)
        # [call, previous action is new_word, action is new_word, (main, second)]: with a step in
        # flight the host does not know a call's text state yet, so it previews both outcomes of
        # the step before and the frame picks by that step's action (still in `action`) first
        self.text_choices = torch.zeros(n, 2, 2, 2, **long)
        self.active = torch.zeros(n, device=dev, dtype=torch.bool)
        # sampling, per draw stream: column 0 the action (text sampling), columns 1..Q the codebooks
        self.seeds = torch.zeros(n, **long)
        self.stream_temperature = torch.zeros(n, 1 + d.num_codebooks, **f32)
        self.stream_top_k = torch.ones(n, 1 + d.num_codebooks, **long)
        self.cfg_scale = torch.ones(n, **f32)
        # outputs of the last step
        self.action = torch.zeros(n, **long)
        self.text_out = torch.zeros(n, 2, **long)
        self.codes = torch.zeros(n, d.num_codebooks, **long)
        self.ready_codes = torch.zeros(n, d.num_codebooks, **long)  # aligned frame position + 1 - max_delay
        # host side: the mirrors, and pinned staging for the one copy in and the one copy out, two
        # of each: while one step's copies may still be queued, the next step stages into the other
        self.places = SlotPlaces(n)
        self._staging = [HostStaging.allocate(n, dev) for _ in range(2)]
        self._next_staging = 0
        self._branch_rows = torch.arange(branches, device=dev)  # a slot's rows, relative to its first
        self.capture_swap(graph=False)

    def row_slice(self, call: int) -> slice:
        return slice(call * self.branches, (call + 1) * self.branches)

    # -- the one writer of a slot's place --------------------------------------------------------

    def place(self, call: int, position: int, *, prefix_frames: int | None = None,
              cache_offset: int | None = None) -> None:
        """Stand slot `call` at `position` (and, where given, set its teacher-forced prefix and
        cache offset), on the device and in the host mirror together."""
        old = self.places[call]
        new = SlotPlace(position=int(position),
                        prefix_frames=old.prefix_frames if prefix_frames is None else int(prefix_frames),
                        cache_offset=old.cache_offset if cache_offset is None else int(cache_offset))
        # One-element fills: `tensor[i] = number` copies the number from host memory and waits for
        # the stream, the step in flight included (H200 run 35c, sync debug mode); `fill_` takes it
        # as a kernel argument. Every start, rollback and next turn places its slot.
        self.positions[call].fill_(new.position)
        self.prefix_frames[call].fill_(new.prefix_frames)
        self.cache_offset[call].fill_(new.cache_offset)
        self.places[call] = new

    def advanced(self, live: np.ndarray) -> None:
        """The frame moved every live slot one position on (on the device): follow on the host."""
        self.places.advance(live)

    # -- per-slot settings and inputs -----------------------------------------------------------

    def set_sampling(self, call: int, params: SamplingParams) -> None:
        # fills, not element assignments: those wait for the step in flight (`place`)
        self.stream_temperature[call, 0].fill_(params.text_temperature)
        self.stream_temperature[call, 1:].fill_(params.audio_temperature)
        self.stream_top_k[call, 0].fill_(params.text_top_k)
        self.stream_top_k[call, 1:].fill_(params.audio_top_k)
        self.cfg_scale[call].fill_(params.cfg_scale)
        self.seeds[call].fill_(params.seed)

    def reset(self, call: int, position: int = 0) -> None:
        """The step-0 inputs of DIA2_SPEC.md §5, an empty delayed buffer, nothing forced."""
        d = self.config.data
        self.place(call, position, prefix_frames=0, cache_offset=0)
        self.buffer[call].fill_(UNGENERATED)
        rows = self.tokens[self.row_slice(call)]
        rows[0, 0].fill_(self.bos_token_id)  # fills, not element assignments (`place`)
        rows[0, 1].fill_(d.text_pad_token_id)
        if self.branches == 2:
            rows[1, 0].fill_(d.text_zero_token_id)
            rows[1, 1].fill_(d.text_pad_token_id)
        rows[:, 2:].fill_(d.audio_bos)

    def stage_step(self, choices, live: np.ndarray) -> "HostStaging":
        """Copy this step's text choices and active mask to the device (one copy each), from the
        pinned buffers the step before did not use. `choices[call]` is either the two outcomes of
        the call's step ([action, (main, second)]: its text state is known) or those two for each
        action of its step before ([previous action, action, (main, second)]: that step is still
        in flight). The host side is filled through numpy views in one assignment: five tensor
        element writes per call were ~5 ms of host time a step at 64 calls (H200 trace, issue 18)."""
        staging = self._staging[self._next_staging]
        self._next_staging = 1 - self._next_staging
        staging.wait()  # its copies of two steps ago must have left before it is rewritten
        active = staging.active.numpy()
        active[:] = False
        active[live] = True
        picked = np.array([choices[call] for call in live], dtype=np.int64)
        staging.choices.numpy()[live] = picked.reshape(len(live), -1, 2, 2)  # a known state fills both halves
        self.text_choices.copy_(staging.choices, non_blocking=True)
        self.active.copy_(staging.active, non_blocking=True)
        return staging

    def read_actions_later(self, staging: "HostStaging") -> "PendingActions":
        """Queue the copy of the last step's sampled actions to the host (into `staging`, the
        buffers that step was staged from) and return at once; `wait()` gives them."""
        staging.action.copy_(self.action, non_blocking=True)
        staging.record()
        return PendingActions(staging)

    def read_actions(self) -> list[int]:
        """The sampled actions of the last step: the one device-to-host copy (synchronises)."""
        return self.read_actions_later(self._staging[1 - self._next_staging]).wait()

    # -- two slots, exchanged ---------------------------------------------------------------------

    def swap(self, pairs: list[tuple[int, int]]) -> None:
        """Exchange everything the slots of each pair (a, b) own, device and host, so a call keeps
        going on its new row as it would have on its old one (the draws are keyed by seed and
        position, not by row). No slot may be in two pairs. One indexed copy per tensor for all
        pairs (`_swap_rows`), or one replay of them all (`row_swap.GRAPHED`)."""
        pairs = [(a, b) for a, b in pairs if a != b]
        if not pairs:
            return
        self._row_swap(pairs, extent=max(self._filled(slot) for pair in pairs for slot in pair))
        for a, b in pairs:
            self.places.swap(a, b)

    @torch.inference_mode()  # the slot tensors are made under inference mode
    def capture_swap(self, graph: bool, whole: bool = False) -> None:
        """Set up `swap`: eager, or (`graph`, on CUDA) one CUDA graph captured now; `whole`: eager
        swaps copy whole cache rows, as the graph does."""
        self._row_swap = RowSwap(self._swap_rows, self.device, graph=graph, whole=whole)

    @property
    def swap_graphed(self) -> bool:
        return self._row_swap.graphed

    def _swap_rows(self, pair: torch.Tensor, filled: int | None) -> None:
        """The device side of `swap` for the slot pairs in `pair` [a1, b1, ...]: the decoder caches over the
        `filled` slots either call has written (the rest of a cache row is never read: the causal
        mask stops at a slot's position), or whole in a graph (None: ~0.4 GB at 2b with a
        2,048-slot cache, a fraction of a millisecond). The depformer caches are not state:
        every frame writes them before reading."""
        crossed = row_swap.crossed(pair)
        rows = (pair[:, None] * self.branches + self._branch_rows).flatten()  # [a1's rows, b1's rows, ...]
        rows_crossed = (crossed[:, None] * self.branches + self._branch_rows).flatten()
        for t in self._per_slot_tensors():
            t[pair] = t[crossed]
        self.tokens[rows] = self.tokens[rows_crossed]
        filled = self.decoder_caches[0].length if filled is None else filled
        for cache in self.decoder_caches:
            for t in (cache.k, cache.v):
                t[rows, :, :filled] = t[rows_crossed, :, :filled]

    def _filled(self, call: int) -> int:
        """Decoder cache slots a slot has written (those a step may read), at most the cache."""
        place = self.places[call]
        return min(place.position + place.cache_offset + 1, self.decoder_caches[0].length)

    def _per_slot_tensors(self) -> list[torch.Tensor]:
        """Every device tensor with one row per slot (the decoder rows, `[slot, branch]`, apart)."""
        return [self.positions, self.buffer, self.prefix_frames, self.cache_offset, self.text_choices, self.active,
                self.seeds, self.stream_temperature, self.stream_top_k, self.cfg_scale, self.action, self.text_out,
                self.codes, self.ready_codes]

    # -- one slot, copied ------------------------------------------------------------------------

    def snapshot(self, call: int) -> StepperSnapshot:
        place = self.places[call]
        length = place.position + place.cache_offset + 1
        rows = self.row_slice(call)
        caches = [(c.k[rows, :, :length].clone(), c.v[rows, :, :length].clone()) for c in self.decoder_caches]
        # position and prefix from the host mirror, on the host: `restore` reads them without a device read
        return StepperSnapshot(torch.tensor([place.position]), self.tokens[rows].clone(),
                               self.buffer[call:call + 1].clone(), torch.tensor([place.prefix_frames]),
                               caches, length, place.cache_offset)

    def restore(self, call: int, snap: StepperSnapshot) -> None:
        rows = self.row_slice(call)
        self.tokens[rows] = snap.tokens.to(self.device)
        self.buffer[call:call + 1].copy_(snap.buffer)
        for cache, (k, v) in zip(self.decoder_caches, snap.caches):
            cache.k[rows, :, : snap.length].copy_(k)
            cache.v[rows, :, : snap.length].copy_(v)
        self.place(call, int(snap.positions[0]), prefix_frames=int(snap.prefix_frames[0]),
                   cache_offset=int(snap.cache_offset))

    def tensors(self, call: int) -> dict[str, torch.Tensor]:
        """Copies of every device tensor a slot owns, whole (caches included, all slots of them):
        for checking that work on one slot leaves another bit-identical."""
        rows = self.row_slice(call)
        out = {"tokens": self.tokens[rows], "positions": self.positions[call], "buffer": self.buffer[call],
               "prefix_frames": self.prefix_frames[call], "cache_offset": self.cache_offset[call],
               "seeds": self.seeds[call], "stream_temperature": self.stream_temperature[call],
               "stream_top_k": self.stream_top_k[call], "cfg_scale": self.cfg_scale[call]}
        for i, c in enumerate(self.decoder_caches):
            out[f"decoder_cache.{i}.k"], out[f"decoder_cache.{i}.v"] = c.k[rows], c.v[rows]
        return {name: t.clone() for name, t in out.items()}
