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
- All mutable state lives in one `TextState`, copied by `snapshot()`/`restore()`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from .script import ScriptEntry

ACTION_PAD = 0
ACTION_NEW_WORD = 1


@dataclass
class TextState:
    """Everything `TextStateMachine` mutates."""

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

    def copy(self, transcript: bool = True) -> "TextState":
        """Entries are immutable, so shallow list copies are a full copy. `transcript=False`
        leaves the transcript out (it only grows: a caller that keeps its length can take the
        prefix back from the live state, instead of copying a whole call's words every frame)."""
        return TextState(
            entries=list(self.entries),
            next_entry=self.next_entry,
            padding_budget=self.padding_budget,
            forced_padding=self.forced_padding,
            pending=list(self.pending),
            lookahead=list(self.lookahead),
            end_step=self.end_step,
            transcript=list(self.transcript) if transcript else [],
            final=self.final,
            starved=self.starved,
        )


def shifted(state: TextState, delta: int) -> TextState:
    """A copy of `state` with every step moved by `delta` (a context rebuilt at other positions)."""
    out = state.copy()
    out.transcript = [(word, step + delta) for word, step in out.transcript]
    if out.end_step is not None:
        out.end_step += delta
    return out


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
        self._state = self._fresh_state()

    # --- text in ----------------------------------------------------------------------------

    def push(self, entries, *, final: bool = True) -> None:
        """Append entries. `final=False`: more text of this turn will follow (hold for it)."""
        st = self._state
        new = list(entries)
        for entry in new:
            if not isinstance(entry, ScriptEntry):
                raise TypeError(f"push() takes ScriptEntry items, got {type(entry).__name__}")
        if st.next_entry:  # drop consumed entries so long sessions don't grow the list
            del st.entries[: st.next_entry]
            st.next_entry = 0
        st.entries.extend(new)
        st.final = bool(final)
        if new:
            st.starved = False
            st.end_step = None  # text injected after the end: the utterance continues
        elif final:
            st.starved = False

    def drop_queued(self) -> list[str]:
        """Forget every entry not consumed yet, and the look-ahead taken from them (a barge-in
        discards what the caller did not hear); returns the dropped words."""
        st = self._state
        dropped = [e.text for e in st.entries[st.next_entry:] if e.tokens]
        del st.entries[st.next_entry:]
        st.lookahead.clear()
        return dropped

    def finish(self) -> None:
        """Mark the text final without adding entries: an empty queue now ends the utterance."""
        self._state.final = True
        self._state.starved = False

    # --- frames -----------------------------------------------------------------------------

    def process(self, step: int, action: int, *, forced: bool = False) -> tuple[int, int]:
        """Apply the sampled `action` at frame `step`; returns this step's (main, second) tokens.

        `forced=True` (prefix warm-up) takes the action as given, except while tokens are pending.
        """
        return _process(self, self._state, int(step), int(action), bool(forced))

    def preview(self, step: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(what `process(step, 0)` would return, what `process(step, 1)` would return), read
        off the state without copying it (every call does this every frame)."""
        return _outcome(self, self._state, ACTION_PAD), _outcome(self, self._state, ACTION_NEW_WORD)

    # --- state ------------------------------------------------------------------------------

    def snapshot(self) -> TextState:
        return self._state.copy()

    def restore(self, state: TextState) -> None:
        self._state = copy.deepcopy(state) if not isinstance(state, TextState) else state.copy()

    def reset(self) -> None:
        self._state = self._fresh_state()

    @property
    def state(self) -> TextState:
        """The live state (not a copy)."""
        return self._state

    @property
    def end_step(self) -> int | None:
        return self._state.end_step

    @property
    def transcript(self) -> list[tuple[str, int]]:
        return list(self._state.transcript)

    @property
    def starved(self) -> bool:
        return self._state.starved

    @property
    def final(self) -> bool:
        return self._state.final

    @property
    def remaining_entries(self) -> int:
        return len(self._state.entries) - self._state.next_entry

    @property
    def last_word_step(self) -> int | None:
        transcript = self._state.transcript
        return transcript[-1][1] if transcript else None

    def _fresh_state(self) -> TextState:
        return TextState(padding_budget=self.initial_padding, forced_padding=self.initial_padding)


def _process(m: TextStateMachine, st: TextState, step: int, action: int, forced: bool) -> tuple[int, int]:
    """Spec §7 `process`, steps 1-5, on the state `st` (mutated)."""
    # 1. action index → new_word / pad
    new_word = action == ACTION_NEW_WORD

    # 2. overrides
    if st.pending:
        new_word = False
    elif forced:
        pass
    elif st.forced_padding > 0:
        new_word = False
    elif st.padding_budget <= 0 and not new_word:
        new_word = True

    # 3. a new word consumes the next entry
    if new_word:
        if st.next_entry < len(st.entries):
            entry = st.entries[st.next_entry]
            st.next_entry += 1
            if entry.tokens:
                st.transcript.append((entry.text, step))
                st.pending.extend(entry.tokens)
                if m.second_stream_ahead > 0:
                    ahead = _nth_upcoming_word(st, m.second_stream_ahead)
                    if ahead is not None:
                        st.lookahead.extend(ahead.tokens)
                st.padding_budget = m.max_padding
            else:  # a break: pad for its length
                new_word = False
            st.forced_padding = entry.padding
        elif not st.final:  # HOLD: wait for more text; the utterance does not end
            new_word = False
            st.starved = True
        else:
            new_word = m.second_stream_ahead > 0 and st.end_step is None
            if st.end_step is None:
                st.end_step = step

    # 4. main token
    if new_word:
        main = m.new_word_id
    else:
        if st.padding_budget > 0:
            st.padding_budget -= 1
        if st.forced_padding > 0:
            st.forced_padding -= 1
        main = st.pending.pop(0) if st.pending else m.pad_id

    # 5. second stream
    if m.second_stream_ahead == 0:
        return main, main
    if new_word:
        second = m.new_word_id
        main = st.pending.pop(0) if st.pending else m.pad_id
    else:
        second = st.lookahead.pop(0) if st.lookahead else m.pad_id
    return main, second


def _outcome(m: TextStateMachine, st: TextState, action: int) -> tuple[int, int]:
    """The (main, second) tokens `_process(m, st, step, action)` returns, with `st` untouched.
    What `_process` changes beyond that (budgets, the queue, the look-ahead it extends) does not
    reach this step's tokens: a new word emits the marker and its first token only."""
    new_word = action == ACTION_NEW_WORD
    if st.pending or st.forced_padding > 0:
        new_word = False
    elif st.padding_budget <= 0 and not new_word:
        new_word = True
    pending = st.pending
    if new_word:
        if st.next_entry < len(st.entries):
            entry = st.entries[st.next_entry]
            if entry.tokens:
                pending = entry.tokens
            else:  # a break
                new_word = False
        elif not st.final:  # holding for more text
            new_word = False
        else:
            new_word = m.second_stream_ahead > 0 and st.end_step is None
    first = pending[0] if pending else m.pad_id
    if m.second_stream_ahead == 0:
        return (m.new_word_id, m.new_word_id) if new_word else (first, first)
    if new_word:
        return first, m.new_word_id
    return first, (st.lookahead[0] if st.lookahead else m.pad_id)


def _nth_upcoming_word(st: TextState, n: int) -> ScriptEntry | None:
    """The n-th (1-based) entry with tokens still in the queue."""
    seen = 0
    for entry in st.entries[st.next_entry :]:
        if entry.tokens:
            seen += 1
            if seen == n:
                return entry
    return None
