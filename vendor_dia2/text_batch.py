"""Every slot's text state machine previewed and advanced as one numpy operation per step.

A `TextStateMachine` bound to a slot of a `TextBatch` keeps its row of ints (`ROW_FIELDS`) in the
batch's table `rows[slot]`, so a step reads and writes every stepping slot's state at once. What
a step needs of the machine's logs is cached beside the row when Python changes it (a push, a
drop, a rewind, a word starting): the first token and token count of the next queued entry, and
a window of the pending word's and the look-ahead's tokens. A step then is:

- `preview(slots)`: both possible (main, second) answers of every slot, [k, 2, 2], from the rows
  and caches alone;
- `advance(slots, actions, steps)`: the tokens each slot emits, [k, 2]. A slot whose step takes
  the next queued entry (a word starts, or a break), or whose cached window does not reach the
  token it pops, runs its machine's own `process` (the reference, in Python: the transcript and
  the look-ahead grow there) and refreshes its caches; every other slot (a pad, a token of the
  word being spoken, a hold, the end) is advanced by the vectorised rules below.

The rules are `state_machine._process`/`_outcome`, written over columns; `tests/test_text_batch.py`
checks them token for token against per-call machines.
"""

from __future__ import annotations

import numpy as np

from .state_machine import NO_STEP, ROW_FIELDS, TextStateMachine

_F = {name: k for k, name in enumerate(ROW_FIELDS)}
NEXT_ENTRY, QUEUE_END = _F["next_entry"], _F["queue_end"]
PENDING_POS, PENDING_END = _F["pending_pos"], _F["pending_end"]
AHEAD_POS, AHEAD_END = _F["ahead_pos"], _F["ahead_end"]
END_STEP, BUDGET, FORCED = _F["end_step"], _F["padding_budget"], _F["forced_padding"]
FINAL, STARVED = _F["final"], _F["starved"]

WINDOW = 16  # tokens of the pending word and of the look-ahead cached per slot


class RowCursor:
    """A bound machine's live row: `TextCursor`'s fields, read from and written to the batch's
    table (a view of row `slot`; the batch points it at the new row when the call moves)."""

    __slots__ = ("_row",)

    def __init__(self, row: np.ndarray):
        self._row = row


def _field(k: int) -> property:
    def get(self) -> int:
        return int(self._row[k])

    def put(self, value: int) -> None:
        self._row[k] = value

    return property(get, put)


for _k, _name in enumerate(ROW_FIELDS):
    setattr(RowCursor, _name, _field(_k))


class TextBatch:
    def __init__(self, slots: int, pad_id: int, new_word_id: int, second_stream_ahead: int, window: int = WINDOW):
        self.n, self.window = slots, window
        self.pad_id, self.new_word_id, self.ahead = int(pad_id), int(new_word_id), int(second_stream_ahead)
        self.rows = np.zeros((slots, len(ROW_FIELDS)), dtype=np.int64)  # [slots, fields]: bound machines' state
        self.machines: list[TextStateMachine | None] = [None] * slots
        # caches of the logs near each row's offsets (`refresh`)
        self.next_count = np.full(slots, -1, dtype=np.int64)  # tokens of the next queued entry; -1: queue empty
        self.next_first = np.zeros(slots, dtype=np.int64)  # its first token (pad for a break)
        self.pending_base = np.zeros(slots, dtype=np.int64)  # pending_pos when the window was cached
        self.pending_window = np.zeros((slots, window), dtype=np.int64)  # tokens from pending_base on
        self.ahead_base = np.zeros(slots, dtype=np.int64)
        self.ahead_window = np.zeros((slots, window), dtype=np.int64)

    # -- binding (generation thread)

    def bind(self, machine: TextStateMachine, slot: int) -> None:
        """`machine`'s state lives in row `slot` from now on (the slot's call was attached)."""
        if self.machines[slot] is not None and self.machines[slot] is not machine:
            self.machines[slot].unbind()
        self.machines[slot] = machine
        machine.bind(self, slot)

    def unbind(self, slot: int) -> None:
        machine, self.machines[slot] = self.machines[slot], None
        if machine is not None:
            machine.unbind()

    def row(self, slot: int) -> RowCursor:
        return RowCursor(self.rows[slot])

    def swap(self, a: int, b: int) -> None:
        """The calls on slots `a` and `b` exchanged places: their rows, caches and machines."""
        if a == b:
            return
        for table in (self.rows, self.next_count, self.next_first, self.pending_base, self.pending_window,
                      self.ahead_base, self.ahead_window):
            table[[a, b]] = table[[b, a]]
        self.machines[a], self.machines[b] = self.machines[b], self.machines[a]
        for slot in (a, b):
            if self.machines[slot] is not None:
                self.machines[slot].moved_to(slot)

    def refresh(self, slot: int) -> None:
        """Cache what the next steps read of `slot`'s logs (its machine changed them or its
        offsets from Python)."""
        logs = self.machines[slot].logs
        row = self.rows[slot].tolist()
        start, end = row[NEXT_ENTRY], row[QUEUE_END]
        if start < end:
            count = logs.counts[start]
            self.next_count[slot] = count
            self.next_first[slot] = logs.tokens[logs.starts[start]] if count else self.pad_id
        else:
            self.next_count[slot] = -1
        for pos_k, end_k, base, window, log in ((PENDING_POS, PENDING_END, self.pending_base, self.pending_window,
                                                 logs.tokens),
                                                (AHEAD_POS, AHEAD_END, self.ahead_base, self.ahead_window, logs.ahead)):
            pos = row[pos_k]
            n = max(0, min(row[end_k] - pos, self.window))
            base[slot] = pos
            if n:
                window[slot, :n] = log[pos:pos + n]

    # -- a step over many slots

    def preview(self, slots: np.ndarray) -> np.ndarray:
        """Both possible answers of each slot's next step, [k, 2 (action), 2 (main, second)]."""
        slots = np.asarray(slots, dtype=np.int64)
        r = self.rows[slots]  # [k, F]
        pending_head, pending, pending_off = self._heads(slots, r, PENDING_POS, PENDING_END, self.pending_base,
                                                         self.pending_window)
        ahead_head, ahead, ahead_off = self._heads(slots, r, AHEAD_POS, AHEAD_END, self.ahead_base,
                                                   self.ahead_window)
        count, first = self.next_count[slots], self.next_first[slots]
        free = ~pending & (r[:, FORCED] <= 0)  # the model may choose (else a pad is forced)
        out = np.empty((len(slots), 2, 2), dtype=np.int64)
        for action in (0, 1):
            new_word = free & ((r[:, BUDGET] <= 0) | (action == 1))
            word = new_word & (count > 0)
            marker = word | (new_word & (count < 0) & (r[:, FINAL] == 1) & (self.ahead > 0)
                             & (r[:, END_STEP] == NO_STEP))
            main = np.where(word, first, pending_head)
            if self.ahead == 0:
                out[:, action, 0] = out[:, action, 1] = np.where(marker, self.new_word_id, main)
            else:
                out[:, action, 0] = main
                out[:, action, 1] = np.where(marker, self.new_word_id, ahead_head)
        # a window that does not reach the head: the machine answers itself (rare: a word longer
        # than the window, a look-ahead that grew past it)
        for i in np.flatnonzero((pending & (pending_off >= self.window)) | (ahead & (ahead_off >= self.window))):
            out[i] = self.machines[slots[i]].preview(0)
        return out

    def advance(self, slots: np.ndarray, actions: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """Apply each slot's sampled action at its step (`steps[i]`: the position it stepped
        from); the (main, second) tokens each emits, [k, 2]."""
        slots = np.asarray(slots, dtype=np.int64)
        actions, steps = np.asarray(actions), np.asarray(steps, dtype=np.int64)
        r = self.rows[slots]  # a copy: written back below for the vectorised slots
        pending_head, pending, pending_off = self._heads(slots, r, PENDING_POS, PENDING_END, self.pending_base,
                                                         self.pending_window)
        ahead_head, ahead, ahead_off = self._heads(slots, r, AHEAD_POS, AHEAD_END, self.ahead_base,
                                                   self.ahead_window)
        count = self.next_count[slots]
        new_word = ~pending & (r[:, FORCED] <= 0) & ((r[:, BUDGET] <= 0) | (actions == 1))
        by_machine = ((new_word & (count >= 0)) | (pending & (pending_off >= self.window))
                      | (ahead & (ahead_off >= self.window)))
        out = np.empty((len(slots), 2), dtype=np.int64)

        # vectorised: no entry is taken. A wanted new word holds (text not final) or ends.
        hold = new_word & (r[:, FINAL] == 0)
        ending = new_word & (r[:, FINAL] == 1)
        unset = r[:, END_STEP] == NO_STEP
        marker = ending & unset & (self.ahead > 0)
        r[:, STARVED] |= hold
        r[:, END_STEP] = np.where(ending & unset, steps, r[:, END_STEP])
        pad = ~marker
        r[:, BUDGET] -= pad & (r[:, BUDGET] > 0)
        r[:, FORCED] -= pad & (r[:, FORCED] > 0)
        pop = pad & pending
        main = np.where(pop, pending_head, self.pad_id)
        r[:, PENDING_POS] += pop
        if self.ahead == 0:
            out[:, 0] = out[:, 1] = np.where(marker, self.new_word_id, main)
        else:
            pop_ahead = pad & ahead
            out[:, 0] = main  # a marker's main is the pending word's first token: there is none
            out[:, 1] = np.where(marker, self.new_word_id, np.where(pop_ahead, ahead_head, self.pad_id))
            r[:, AHEAD_POS] += pop_ahead
        vector = ~by_machine
        self.rows[slots[vector]] = r[vector]

        # by the machine: a word or a break starts (the transcript and look-ahead grow), or a
        # window ran out; each refreshes its caches
        for i in np.flatnonzero(by_machine):
            out[i] = self.machines[slots[i]].process(int(steps[i]), int(actions[i]))
        return out

    def _heads(self, slots, r, pos_k, end_k, base, window):
        """The first token of a run (pad if empty), whether it is non-empty, its offset in the window."""
        present = r[:, pos_k] < r[:, end_k]
        off = r[:, pos_k] - base[slots]
        head = window[slots, np.clip(off, 0, self.window - 1)]
        return np.where(present, head, self.pad_id), present, off
