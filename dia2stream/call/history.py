"""A call's rollback history: for each of its last steps, what a rollback needs to stand before
that step again (its position, its text inputs, the text state machine's row, how much of the
client's text it had seen), in one preallocated ring of ints; the client's text since
(`TextLog`); and snapshots of the call's Mimi row (`CodecMarks`).

A call steps 12.5 times a second for as long as it lives; a Python object per step (a record
holding a copy of the text state's lists) made hundreds of live objects per call for the garbage
collector to walk: at 64 calls a full collection took ~250 ms on the engine's thread. Here a step
writes one row of ints into an array allocated when the call is, and a rollover moves every
position with one vectorised add.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from vendor_dia2.state_machine import NO_STEP, ROW_END_STEP, ROW_FIELDS

_POSITION, _TEXT_IN = 0, slice(1, 3)
_TEXT = slice(3, 3 + len(ROW_FIELDS))
_END_STEP = 3 + ROW_END_STEP
_TEXT_SEEN = 3 + len(ROW_FIELDS)
_COLUMNS = _TEXT_SEEN + 1


@dataclass(frozen=True)
class StepBefore:
    """The state before step `position`: the text state machine's row and the step's text inputs."""

    position: int
    text: tuple[int, ...]  # `TextStateMachine.mark()` before the step
    text_in: tuple[int, int]  # what the previous step gave
    text_seen: int = 0  # the client's text the state had taken: `TextLog` serials up to this one


class RollbackLog:
    """The last `capacity` steps' `StepBefore`s of one call, oldest first, as rows of one array."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._rows = np.zeros((capacity, _COLUMNS), dtype=np.int64)  # [capacity, fields]
        self._head = 0  # the oldest row
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def record(self, position: int, text_in: tuple[int, int], text: tuple[int, ...], text_seen: int = 0) -> None:
        """The state before step `position` (the oldest row goes when the ring is full)."""
        index = self._head + self._count
        if index >= self.capacity:
            index -= self.capacity
        if self._count == self.capacity:
            self._head = index + 1 if index + 1 < self.capacity else 0
        else:
            self._count += 1
        self._rows[index] = (position, *text_in, *text, text_seen)

    def find(self, position: int) -> StepBefore | None:
        """The newest record of step `position`, or None if none is kept."""
        rows = self._ordered()
        hits = np.flatnonzero(rows[:, _POSITION] == position)
        if not len(hits):
            return None
        row = rows[hits[-1]].tolist()
        return StepBefore(position=row[_POSITION], text=tuple(row[_TEXT]), text_in=tuple(row[_TEXT_IN]),
                          text_seen=row[_TEXT_SEEN])

    def oldest_text_seen(self) -> int | None:
        """The least client text any record had taken (None with no record): a rollback never
        needs the client's text from before it again."""
        return int(self._ordered()[:, _TEXT_SEEN].min()) if self._count else None

    def drop_from(self, position: int) -> None:
        """Forget the newest records back to the last one before step `position` (a rollback:
        the steps from there on are taken back)."""
        earlier = np.flatnonzero(self._ordered()[:, _POSITION] < position)
        self._count = int(earlier[-1]) + 1 if len(earlier) else 0

    def rebase(self, delta: int, keep_from: int, upto: int) -> None:
        """Keep the records of steps keep_from..upto, their steps moved by `delta` (a context
        rebuilt at other positions); the rest is dropped."""
        rows = self._ordered()
        kept = rows[(rows[:, _POSITION] >= keep_from) & (rows[:, _POSITION] <= upto)]  # a copy
        kept[:, _POSITION] += delta
        end = kept[:, _END_STEP]
        end[end != NO_STEP] += delta
        self._rows[: len(kept)] = kept
        self._head, self._count = 0, len(kept)

    def clear(self) -> None:
        self._head = self._count = 0

    def positions(self) -> list[int]:
        """The steps recorded, oldest first."""
        return self._ordered()[:, _POSITION].tolist()

    def _ordered(self) -> np.ndarray:
        """The records oldest first: a view while they do not wrap, else a copy."""
        end = self._head + self._count
        if end <= self.capacity:
            return self._rows[self._head:end]
        return np.concatenate((self._rows[self._head:], self._rows[: end - self.capacity]))


@dataclass(frozen=True)
class TextPushed:
    """Text the client sent, as the call gave it to its text state machine: `push(entries,
    final=final)` (a flush: no entries, final)."""

    serial: int
    entries: tuple
    final: bool


class TextLog:
    """The client's text of the last steps, numbered: a rollback stands the text state machine
    where it was before a step, and gives it again what came after (`since`), so that text sent
    after the point rolled back to is not lost with the steps taken back."""

    def __init__(self):
        self._pushed: deque[TextPushed] = deque()
        self.serial = 0  # of the last text logged

    def add(self, entries, final: bool) -> None:
        self.serial += 1
        self._pushed.append(TextPushed(self.serial, tuple(entries), final))

    def since(self, serial: int) -> list[TextPushed]:
        """The text logged after `serial`, in order."""
        return [pushed for pushed in self._pushed if pushed.serial > serial]

    def forget_up_to(self, serial: int | None) -> None:
        """Forget the text up to `serial` (no record needs it); None: all of it."""
        while self._pushed and (serial is None or self._pushed[0].serial <= serial):
            self._pushed.popleft()

    def clear(self) -> None:
        self._pushed.clear()


class CodecMarks:
    """Snapshots of a call's Mimi row, each before the frame it was taken at, oldest first: a
    rollback restores the last one at or before the frame it goes back to, then re-decodes the
    frames between. At most `capacity` are kept (the oldest go)."""

    def __init__(self, capacity: int):
        self._marks: deque = deque(maxlen=capacity)  # (frame, snapshot)

    def add(self, frame: int, snapshot) -> None:
        self._marks.append((frame, snapshot))

    def last_at_or_before(self, frame: int) -> tuple[int, object] | None:
        """(its frame, the snapshot) of the newest mark at or before `frame`, or None."""
        return next((mark for mark in reversed(self._marks) if mark[0] <= frame), None)

    def drop_after(self, frame: int) -> None:
        """Forget the marks past `frame` (a rollback took those frames back)."""
        while self._marks and self._marks[-1][0] > frame:
            self._marks.pop()

    def rebase(self, delta: int, keep_from: int, upto: int) -> None:
        """Keep the marks of frames keep_from..upto, moved by `delta` (a context rebuilt at other
        positions); the rest is dropped."""
        kept = [(frame + delta, snapshot) for frame, snapshot in self._marks if keep_from <= frame <= upto]
        self._marks.clear()
        self._marks.extend(kept)

    def restart_at(self, frame: int, snapshot) -> None:
        """Only this mark stands (nothing before `frame` is ever decoded again)."""
        self.clear()
        self.add(frame, snapshot)

    def clear(self) -> None:
        self._marks.clear()
