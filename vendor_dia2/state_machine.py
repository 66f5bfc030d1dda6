"""The text state machine: sampled actions → the (main, second) text tokens of each frame (spec §7).

The model decides, frame by frame, whether a new word starts (action 1) or not (action 0). The
machine feeds the script's words in as it asks for them: on a new word it emits the new-word
marker and queues the word's tokens, which go out one per following pad frame; it forces pads
while a word (or a break) is still being spoken and forces a new word when the model has padded
for `max_padding` frames.

Beyond upstream, for streaming:
- HOLD: text can arrive in pieces (`push(..., final=False)`). While the queue is empty and the
  text is not final, a new word finds nothing: the frame pads, the machine reports `starved`, and
  the utterance does NOT end. Entries pushed later are consumed normally; after `finish()` the
  empty queue ends the utterance as upstream does.
- Injection: pushing entries after the end was reached clears `end_step` (the utterance goes on).
- `preview(step)` gives both possible outcomes without mutating (the GPU step picks on device).

State without per-step objects. A call steps every 80 ms for as long as it lives, and its
rollback history keeps the state before each of the last few hundred steps. So the machine's
mutable state is a fixed row of integers (`mark()`, `ROW_FIELDS`) over logs that only grow:
the entries pushed (and the start of each one's tokens in a flat token log), the look-ahead
tokens taken, and the transcript. The pending word is a run of the token log, the look-ahead a
run of its own log, the queue a run of the entry log. Nothing a step does removes from a log, so
every row recorded since the last `reset()`/`restore()` still describes its state exactly, and
`rewind(row)` returns to it (only the transcript is cut back to the row's length: it only grows
between rows). A queue that no longer ends at its log's end (after a rewind or a `drop_queued`)
is copied there before anything is appended, so the rows that still see the old entries keep
seeing them.

`snapshot()`/`restore()` exchange the whole state as a `TextState` of plain lists (voices keep
one on disk; tests compare them); `state` is the live state, read and written in place.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from .script import ScriptEntry

ACTION_PAD = 0
ACTION_NEW_WORD = 1

NO_STEP = -(1 << 62)  # `end_step` unset, in a row (any step, moved by any rollover, stays far above it)

# The machine's mutable state as a row of ints, in this order (`mark()`, `rewind()`).
ROW_FIELDS = (
    "next_entry",  # the queue is entries[next_entry:queue_end]
    "queue_end",
    "pending_pos",  # the current word's tokens not yet emitted: tokens[pending_pos:pending_end]
    "pending_end",
    "ahead_pos",  # second-stream tokens not yet emitted: ahead[ahead_pos:ahead_end]
    "ahead_end",
    "end_step",  # step at which a new word found the (final) queue empty; NO_STEP if none
    "padding_budget",  # pads left before a new word is forced
    "forced_padding",  # pads that must come before the next new word
    "final",  # 1: no more text will be pushed for this utterance
    "starved",  # 1: a new word was wanted while holding for more text
    "words",  # transcript length
)
ROW_END_STEP = ROW_FIELDS.index("end_step")
ROW_WORDS = ROW_FIELDS.index("words")


@dataclass
class TextState:
    """The machine's whole state as plain lists: what `snapshot()` gives and `restore()` takes."""

    entries: list[ScriptEntry] = field(default_factory=list)  # queue: entries[next_entry:] left
    next_entry: int = 0
    padding_budget: int = 0  # pads left before a new word is forced
    forced_padding: int = 0  # pads that must come before the next new word
    pending: list[int] = field(default_factory=list)  # tokens of the current word not yet emitted
    lookahead: list[int] = field(default_factory=list)  # second-stream tokens not yet emitted
    end_step: int | None = None  # step at which a new word found the (final) queue empty
    transcript: list[tuple[str, int]] = field(default_factory=list)  # (word, new-word step)
    final: bool = False  # no more text will be pushed for this utterance
    starved: bool = False  # a new word was wanted while holding for more text

    def copy(self) -> "TextState":
        """Entries are immutable, so shallow list copies are a full copy."""
        return TextState(entries=list(self.entries), next_entry=self.next_entry, padding_budget=self.padding_budget,
                         forced_padding=self.forced_padding, pending=list(self.pending),
                         lookahead=list(self.lookahead), end_step=self.end_step, transcript=list(self.transcript),
                         final=self.final, starved=self.starved)


@dataclass(slots=True)
class TextCursor:
    """The live row: every int `process` changes (the fields of `ROW_FIELDS`)."""

    next_entry: int = 0
    queue_end: int = 0
    pending_pos: int = 0
    pending_end: int = 0
    ahead_pos: int = 0
    ahead_end: int = 0
    end_step: int = NO_STEP
    padding_budget: int = 0
    forced_padding: int = 0
    final: int = 0
    starved: int = 0
    words: int = 0


assert tuple(f.name for f in fields(TextCursor)) == ROW_FIELDS


class TextLogs:
    """What the rows point into; only ever appended to (see the module docstring). Entries are
    kept as columns (a word's text, where its tokens begin, how many, its padding), not as
    `ScriptEntry` objects: a long conversation keeps every word it was given, and strings and
    int arrays are nothing the garbage collector has to walk."""

    __slots__ = ("texts", "starts", "counts", "paddings", "tokens", "ahead", "transcript")

    def __init__(self):
        self.texts: list[str] = []  # entry i's text
        self.starts = array("q")  # where entry i's tokens begin in `tokens`
        self.counts = array("q")  # how many it has (0: a break)
        self.paddings = array("q")
        self.tokens = array("q")
        self.ahead = array("q")
        self.transcript: list[tuple[str, int]] = []

    @property
    def entry_count(self) -> int:
        """How many entries were logged."""
        return len(self.texts)

    def entry(self, index: int) -> ScriptEntry:
        start = self.starts[index]
        return ScriptEntry(text=self.texts[index], tokens=tuple(self.tokens[start:start + self.counts[index]]),
                           padding=self.paddings[index])

    def append(self, entry: ScriptEntry) -> None:
        self.texts.append(entry.text)
        self.starts.append(len(self.tokens))
        self.counts.append(len(entry.tokens))
        self.paddings.append(entry.padding)
        self.tokens.extend(entry.tokens)

    def append_copies(self, start: int, end: int) -> None:
        """Entries start..end again at the end (their tokens are not copied: they never change)."""
        for column in (self.texts, self.starts, self.counts, self.paddings):
            column.extend(column[start:end])


class TextStateMachine:
    def __init__(
        self,
        pad_id: int,
        new_word_id: int,
        *,
        max_padding: int = 6,
        initial_padding: int = 2,
        second_stream_ahead: int = 0,
    ):
        if max_padding < 0 or initial_padding < 0 or second_stream_ahead < 0:
            raise ValueError("max_padding, initial_padding and second_stream_ahead must be >= 0")
        self.pad_id = int(pad_id)
        self.new_word_id = int(new_word_id)
        self.max_padding = int(max_padding)
        self.initial_padding = int(initial_padding)
        self.second_stream_ahead = int(second_stream_ahead)
        self.reset()

    # --- text in ----------------------------------------------------------------------------

    def push(self, entries, *, final: bool = True) -> None:
        """Append entries. `final=False`: more text of this turn will follow (hold for it)."""
        new = list(entries)
        for entry in new:
            if not isinstance(entry, ScriptEntry):
                raise TypeError(f"push() takes ScriptEntry items, got {type(entry).__name__}")
        c = self._cur
        if new:
            self._queue_at_log_end()
            self._append_entries(new)
            c.queue_end = self._logs.entry_count
            c.starved = 0
            c.end_step = NO_STEP  # text injected after the end: the utterance continues
        elif final:
            c.starved = 0
        c.final = int(bool(final))

    def drop_queued(self) -> list[str]:
        """Forget every entry not consumed yet, and the look-ahead taken from them (a barge-in
        discards what the caller did not hear); returns the dropped words."""
        dropped = self.queued_words()
        c = self._cur
        c.queue_end = c.next_entry
        c.ahead_pos = c.ahead_end
        return dropped

    def finish(self) -> None:
        """Mark the text final without adding entries: an empty queue now ends the utterance."""
        self._cur.final = 1
        self._cur.starved = 0

    def clear_pending(self) -> None:
        """Forget the rest of the word being spoken (the caller cut it off)."""
        self._cur.pending_pos = self._cur.pending_end

    def cut_word(self, hold_steps: int) -> None:
        """The caller cut the word being spoken off: forget the rest of its tokens and the pads it
        asked for, pad for `hold_steps` steps (a turn's lead-in), and start the next word queued
        then, as a spent padding budget does, whatever the action."""
        c = self._cur
        c.pending_pos = c.pending_end
        c.forced_padding = int(hold_steps)
        c.padding_budget = 0

    def clear_lookahead(self) -> None:
        """Forget the second stream's look-ahead (words that must not leak into what follows)."""
        self._cur.ahead_pos = self._cur.ahead_end

    # --- frames -----------------------------------------------------------------------------

    def process(self, step: int, action: int, *, forced: bool = False) -> tuple[int, int]:
        """Apply the sampled `action` at frame `step`; returns this step's (main, second) tokens.

        `forced=True` (prefix warm-up) takes the action as given, except while tokens are pending.
        """
        return _process(self, self._cur, self._logs, int(step), int(action), bool(forced))

    def preview(self, step: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(what `process(step, 0)` would return, what `process(step, 1)` would return), read
        off the state without changing it (every call does this every frame)."""
        return _outcome(self, self._cur, self._logs, ACTION_PAD), _outcome(self, self._cur, self._logs, ACTION_NEW_WORD)

    def preview_after(self, step: int, action: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """`preview(step + 1)` as it would read after `process(step, action)`, with nothing
        changed: the two outcomes of the step after one whose action the host does not know yet
        (a step in flight). Runs `process` on a copy of the row and cuts back what it appended
        to the logs (the transcript, the look-ahead)."""
        logs = self._logs
        words, ahead = len(logs.transcript), len(logs.ahead)
        c = TextCursor(*_values(self._cur))
        try:
            _process(self, c, logs, int(step), int(action), False)
            return _outcome(self, c, logs, ACTION_PAD), _outcome(self, c, logs, ACTION_NEW_WORD)
        finally:
            del logs.transcript[words:]
            del logs.ahead[ahead:]

    # --- state ------------------------------------------------------------------------------

    def mark(self) -> tuple[int, ...]:
        """The state as a row of ints (`ROW_FIELDS`), valid for `rewind` until the next
        `reset()` or `restore()`."""
        return _values(self._cur)

    def hold_words(self, steps: int) -> None:
        """Pads, not a new word, for at least the next `steps` steps, whatever the action (a
        turn's lead-in before its first word, as `initial_padding` is before a script's); then
        the next word queued starts at once, as a spent padding budget does."""
        self._cur.forced_padding = max(self._cur.forced_padding, int(steps))
        self._cur.padding_budget = 0

    def rewind(self, row) -> None:
        """Back to the state `row` (from `mark()` since the last reset or restore, its steps
        moved by `shift_steps` as the machine's were): the transcript is cut back to its length."""
        values = [int(v) for v in row]
        logs = self._logs
        assert values[1] <= logs.entry_count and values[3] <= len(logs.tokens) and values[5] <= len(logs.ahead) \
            and values[ROW_WORDS] <= len(logs.transcript), "a row from before the last reset or restore"
        del logs.transcript[values[ROW_WORDS]:]
        self._cur = TextCursor(*values)

    def shift_steps(self, delta: int) -> None:
        """Move every step of the state (transcript, end) by `delta`: the context was rebuilt at
        other positions."""
        c, logs = self._cur, self._logs
        logs.transcript[:] = [(word, step + delta) for word, step in logs.transcript]
        if c.end_step != NO_STEP:
            c.end_step += delta

    def snapshot(self) -> TextState:
        c, logs = self._cur, self._logs
        return TextState(entries=self.queued_entries(), next_entry=0,
                         padding_budget=c.padding_budget, forced_padding=c.forced_padding,
                         pending=logs.tokens[c.pending_pos:c.pending_end].tolist(),
                         lookahead=logs.ahead[c.ahead_pos:c.ahead_end].tolist(),
                         end_step=None if c.end_step == NO_STEP else c.end_step,
                         transcript=list(logs.transcript), final=bool(c.final), starved=bool(c.starved))

    def restore(self, state: "TextState | LiveTextState") -> None:
        """The machine takes `state` (a copy of it): new logs, so rows marked before no longer apply."""
        if isinstance(state, LiveTextState):
            state = state.snapshot()
        logs = self._logs = TextLogs()
        logs.tokens.extend(state.pending)
        logs.ahead.extend(state.lookahead)
        logs.transcript.extend(state.transcript)
        self._append_entries(state.entries[state.next_entry:])
        self._cur = TextCursor(
            next_entry=0, queue_end=logs.entry_count, pending_pos=0, pending_end=len(state.pending), ahead_pos=0,
            ahead_end=len(state.lookahead), end_step=NO_STEP if state.end_step is None else state.end_step,
            padding_budget=state.padding_budget, forced_padding=state.forced_padding, final=int(state.final),
            starved=int(state.starved), words=len(logs.transcript))

    def reset(self) -> None:
        self._logs = TextLogs()
        self._cur = TextCursor(padding_budget=self.initial_padding, forced_padding=self.initial_padding)

    @property
    def state(self) -> "LiveTextState":
        """The live state (not a copy): TextState's fields, read and written in place."""
        return LiveTextState(self)

    @property
    def cursor(self) -> TextCursor:
        """The live row of ints."""
        return self._cur

    @property
    def logs(self) -> TextLogs:
        """What the row points into (read only: the machine alone appends to them)."""
        return self._logs

    @property
    def end_step(self) -> int | None:
        return None if self._cur.end_step == NO_STEP else self._cur.end_step

    @property
    def transcript(self) -> list[tuple[str, int]]:
        return list(self._logs.transcript)

    @property
    def words(self) -> list[tuple[str, int]]:
        """The live transcript (not a copy): (word, new-word step), in order."""
        return self._logs.transcript

    @property
    def starved(self) -> bool:
        return bool(self._cur.starved)

    @property
    def final(self) -> bool:
        return bool(self._cur.final)

    @property
    def remaining_entries(self) -> int:
        return self._cur.queue_end - self._cur.next_entry

    def queued_entries(self) -> list[ScriptEntry]:
        """The entries pushed and not consumed yet, in order."""
        return [self._logs.entry(i) for i in range(self._cur.next_entry, self._cur.queue_end)]

    def queued_words(self) -> list[str]:
        """The words (not breaks) pushed and not consumed yet."""
        logs = self._logs
        return [logs.texts[i] for i in range(self._cur.next_entry, self._cur.queue_end) if logs.counts[i]]

    def queued_chars(self) -> int:
        """Characters of the entries pushed and not consumed yet."""
        return sum(len(text) for text in self._logs.texts[self._cur.next_entry:self._cur.queue_end])

    @property
    def last_word_step(self) -> int | None:
        transcript = self._logs.transcript
        return transcript[-1][1] if transcript else None

    # --- the logs ---------------------------------------------------------------------------

    def _queue_at_log_end(self) -> None:
        """Entries are appended at the entry log's end: if the queue does not end there (a rewind
        or a drop since), copy it there first, leaving the entries older rows see in place."""
        c, logs = self._cur, self._logs
        if c.queue_end != logs.entry_count:
            start, end = c.next_entry, c.queue_end
            c.next_entry = logs.entry_count
            logs.append_copies(start, end)
            c.queue_end = logs.entry_count

    def _append_entries(self, entries) -> None:
        for entry in entries:
            self._logs.append(entry)

    def _extend_lookahead(self, c: TextCursor, tokens) -> None:
        """Append to the look-ahead run of row `c`, at the look-ahead log's end (copied there
        first if a rewind left it elsewhere)."""
        ahead = self._logs.ahead
        if c.ahead_end != len(ahead):
            run = ahead[c.ahead_pos:c.ahead_end]
            c.ahead_pos = len(ahead)
            ahead.extend(run)
        ahead.extend(tokens)
        c.ahead_end = len(ahead)


class TokenRun(Sequence):
    """A live run of tokens (the pending word, the look-ahead): reads the machine's state, and
    `clear()` empties the run."""

    __slots__ = ("_m", "_which")

    def __init__(self, machine: TextStateMachine, which: str):
        self._m, self._which = machine, which

    def _bounds(self):
        c, logs = self._m.cursor, self._m.logs
        if self._which == "pending":
            return logs.tokens, c.pending_pos, c.pending_end
        return logs.ahead, c.ahead_pos, c.ahead_end

    def __len__(self) -> int:
        _, start, end = self._bounds()
        return max(0, end - start)

    def __getitem__(self, index):
        log, start, end = self._bounds()
        return log[start:end].tolist()[index]

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return repr(list(self))

    def clear(self) -> None:
        if self._which == "pending":
            self._m.clear_pending()
        else:
            self._m.clear_lookahead()


class LiveTextState:
    """`TextStateMachine.state`: the live state with `TextState`'s fields (a view, not a copy).
    Compares equal to the `TextState` of the same state."""

    __slots__ = ("_m",)

    def __init__(self, machine: TextStateMachine):
        object.__setattr__(self, "_m", machine)

    def __getattr__(self, name: str):
        m = object.__getattribute__(self, "_m")
        c = m.cursor
        match name:
            case "entries":
                return m.queued_entries()
            case "next_entry":
                return 0
            case "pending" | "lookahead":
                return TokenRun(m, name)
            case "transcript":
                return m.words
            case "end_step":
                return m.end_step
            case "final" | "starved":
                return bool(getattr(c, name))
            case "padding_budget" | "forced_padding":
                return getattr(c, name)
        raise AttributeError(name)

    def __setattr__(self, name: str, value) -> None:
        if name not in ("padding_budget", "forced_padding"):
            raise AttributeError(f"{name} cannot be set on the live state; use the machine's methods")
        setattr(self._m.cursor, name, int(value))

    def snapshot(self) -> TextState:
        return self._m.snapshot()

    def __eq__(self, other) -> bool:
        if isinstance(other, LiveTextState):
            other = other.snapshot()
        return isinstance(other, TextState) and self._m.snapshot() == other

    __hash__ = None

    def __repr__(self) -> str:
        return f"LiveTextState({self._m.snapshot()!r})"


def _process(m: TextStateMachine, c: TextCursor, logs: TextLogs, step: int, action: int, forced: bool
             ) -> tuple[int, int]:
    """Spec §7 `process`, steps 1-5, on the row `c` (mutated) over `logs` (appended to)."""
    # 1. action index → new_word / pad
    new_word = action == ACTION_NEW_WORD
    pending = c.pending_pos < c.pending_end

    # 2. overrides
    if pending:
        new_word = False
    elif forced:
        pass
    elif c.forced_padding > 0:
        new_word = False
    elif c.padding_budget <= 0 and not new_word:
        new_word = True

    # 3. a new word consumes the next entry
    if new_word:
        if c.next_entry < c.queue_end:
            index = c.next_entry
            c.next_entry = index + 1
            count = logs.counts[index]
            if count:
                logs.transcript.append((logs.texts[index], step))
                c.words += 1
                c.pending_pos = logs.starts[index]
                c.pending_end = c.pending_pos + count
                pending = True
                if m.second_stream_ahead > 0:
                    ahead = _nth_upcoming_word(c, logs, m.second_stream_ahead)
                    if ahead is not None:
                        start = logs.starts[ahead]
                        m._extend_lookahead(c, logs.tokens[start:start + logs.counts[ahead]])
                c.padding_budget = m.max_padding
            else:  # a break: pad for its length
                new_word = False
            c.forced_padding = logs.paddings[index]
        elif not c.final:  # HOLD: wait for more text; the utterance does not end
            new_word = False
            c.starved = 1
        else:
            new_word = m.second_stream_ahead > 0 and c.end_step == NO_STEP
            if c.end_step == NO_STEP:
                c.end_step = step

    # 4. main token
    if new_word:
        main = m.new_word_id
    else:
        if c.padding_budget > 0:
            c.padding_budget -= 1
        if c.forced_padding > 0:
            c.forced_padding -= 1
        main = _pop_pending(c, logs, m.pad_id)

    # 5. second stream
    if m.second_stream_ahead == 0:
        return main, main
    if new_word:
        return _pop_pending(c, logs, m.pad_id), m.new_word_id
    if c.ahead_pos < c.ahead_end:
        second = logs.ahead[c.ahead_pos]
        c.ahead_pos += 1
    else:
        second = m.pad_id
    return main, second


def _values(c: TextCursor) -> tuple[int, ...]:
    """The row `c` as a tuple, in `ROW_FIELDS` order."""
    return (c.next_entry, c.queue_end, c.pending_pos, c.pending_end, c.ahead_pos, c.ahead_end, c.end_step,
            c.padding_budget, c.forced_padding, c.final, c.starved, c.words)


def _pop_pending(c: TextCursor, logs: TextLogs, pad_id: int) -> int:
    if c.pending_pos < c.pending_end:
        token = logs.tokens[c.pending_pos]
        c.pending_pos += 1
        return token
    return pad_id


def _outcome(m: TextStateMachine, c: TextCursor, logs: TextLogs, action: int) -> tuple[int, int]:
    """The (main, second) tokens `_process(m, c, logs, step, action)` returns, with nothing
    changed. What `_process` changes beyond that (budgets, the queue, the look-ahead it extends)
    does not reach this step's tokens: a new word emits the marker and its first token only."""
    new_word = action == ACTION_NEW_WORD
    pending = c.pending_pos < c.pending_end
    if pending or c.forced_padding > 0:
        new_word = False
    elif c.padding_budget <= 0 and not new_word:
        new_word = True
    first = logs.tokens[c.pending_pos] if pending else m.pad_id
    if new_word:
        if c.next_entry < c.queue_end:
            if logs.counts[c.next_entry]:
                first = logs.tokens[logs.starts[c.next_entry]]
            else:  # a break
                new_word = False
        elif not c.final:  # holding for more text
            new_word = False
        else:
            new_word = m.second_stream_ahead > 0 and c.end_step == NO_STEP
    if m.second_stream_ahead == 0:
        return (m.new_word_id, m.new_word_id) if new_word else (first, first)
    if new_word:
        return first, m.new_word_id
    return first, (logs.ahead[c.ahead_pos] if c.ahead_pos < c.ahead_end else m.pad_id)


def _nth_upcoming_word(c: TextCursor, logs: TextLogs, n: int) -> int | None:
    """The index of the n-th (1-based) entry with tokens still in the queue."""
    seen = 0
    for index in range(c.next_entry, c.queue_end):
        if logs.counts[index]:
            seen += 1
            if seen == n:
                return index
    return None
