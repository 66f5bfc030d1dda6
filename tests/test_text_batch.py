"""The batched text state machine (`vendor_dia2/text_batch.py`) equals per-call
`TextStateMachine`s token for token: several slots, random scripts streamed in pieces, random
actions, finishes, barge-in drops, rewinds to marked rows and slot swaps, with and without the
second stream's look-ahead, and windows small enough that the machine's own path runs too."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vendor_dia2.script import ScriptEntry
from vendor_dia2.state_machine import TextStateMachine
from vendor_dia2.text_batch import TextBatch

PAD, NW = 0, 3
SLOTS = 4


def word(text, *tokens):
    return ScriptEntry(text=text, tokens=tuple(tokens), padding=len(tokens))


def pause(frames):
    return ScriptEntry(text="", tokens=(), padding=frames)


entry_st = st.one_of(
    st.builds(lambda n, t: word(f"w{n}", *range(20 + n, 20 + n + t)), st.integers(0, 99), st.integers(1, 6)),
    st.builds(pause, st.integers(0, 5)))

slot_st = st.integers(0, SLOTS - 1)
op_st = st.one_of(
    st.tuples(st.just("step"), st.lists(slot_st, min_size=1, max_size=SLOTS, unique=True),
              st.lists(st.integers(0, 1), min_size=SLOTS, max_size=SLOTS)),
    st.tuples(st.just("push"), slot_st, st.lists(entry_st, max_size=4), st.booleans()),
    st.tuples(st.just("finish"), slot_st),
    st.tuples(st.just("drop"), slot_st),
    st.tuples(st.just("mark"), slot_st),
    st.tuples(st.just("rewind"), slot_st),
    st.tuples(st.just("swap"), slot_st, slot_st),
)


@settings(max_examples=250, deadline=None)
@given(scripts=st.lists(st.lists(entry_st, max_size=6), min_size=SLOTS, max_size=SLOTS),
       ops=st.lists(op_st, min_size=1, max_size=60), ahead=st.integers(0, 2), window=st.integers(1, 5),
       max_padding=st.integers(0, 6), initial_padding=st.integers(0, 3))
def test_batch_equals_machines_token_for_token(scripts, ops, ahead, window, max_padding, initial_padding):
    kw = dict(second_stream_ahead=ahead, max_padding=max_padding, initial_padding=initial_padding)
    batch = TextBatch(SLOTS, PAD, NW, ahead, window=window)
    bound = [TextStateMachine(PAD, NW, **kw) for _ in range(SLOTS)]  # bound[s]: the machine on slot s
    alone = [TextStateMachine(PAD, NW, **kw) for _ in range(SLOTS)]  # the reference, stepped one by one
    for slot in range(SLOTS):
        for m in (bound[slot], alone[slot]):
            m.push(scripts[slot], final=False)
        batch.bind(bound[slot], slot)
    steps = [0] * SLOTS
    marks: list[list] = [[] for _ in range(SLOTS)]
    for op in ops:
        match op:
            case ("step", slots, actions):
                order = np.array(slots)
                previews = batch.preview(order)
                expected = [alone[s].preview(steps[s]) for s in slots]
                assert previews.tolist() == [[list(a), list(b)] for a, b in expected]
                acts = np.array([actions[s] for s in slots])
                got = batch.advance(order, acts, np.array([steps[s] for s in slots]))
                want = [alone[s].process(steps[s], actions[s]) for s in slots]
                assert got.tolist() == [list(w) for w in want]
                for s in slots:
                    steps[s] += 1
            case ("push", s, entries, final):
                bound[s].push(entries, final=final)
                alone[s].push(entries, final=final)
            case ("finish", s):
                bound[s].finish()
                alone[s].finish()
            case ("drop", s):
                assert bound[s].drop_queued() == alone[s].drop_queued()
            case ("mark", s):
                marks[s].append((bound[s].mark(), alone[s].mark(), steps[s]))
            case ("rewind", s) if marks[s]:
                mine, theirs, steps[s] = marks[s].pop()
                bound[s].rewind(mine)
                alone[s].rewind(theirs)
            case ("swap", a, b):  # the calls on slots a and b exchange places
                batch.swap(a, b)
                for table in (bound, alone, steps, marks):
                    table[a], table[b] = table[b], table[a]
        for s in range(SLOTS):
            assert bound[s].snapshot() == alone[s].snapshot(), (op, s)


def test_a_long_conversation_touches_python_only_when_a_word_starts(monkeypatch):
    """The point of the batch: a pad or a token of the word being spoken is advanced by the
    vectorised rules; the machine's own `process` runs for the steps that take an entry."""
    batch = TextBatch(2, PAD, NW, 2)
    machines = [TextStateMachine(PAD, NW, second_stream_ahead=2) for _ in range(2)]
    for slot, m in enumerate(machines):
        m.push([word(f"w{i}", 20 + i, 21 + i, 22 + i) for i in range(10)], final=True)
        batch.bind(m, slot)
    by_machine = []
    process = TextStateMachine.process

    def counting(self, step, action, **kw):
        by_machine.append(step)
        return process(self, step, action, **kw)

    monkeypatch.setattr(TextStateMachine, "process", counting)
    slots = np.array([0, 1])
    for t in range(100):
        batch.preview(slots)
        batch.advance(slots, np.array([t % 2, 0]), np.array([t, t]))
    words = sum(len(m.transcript) for m in machines)
    assert words == 20 and len(by_machine) == words  # every entry once, nothing else


def test_unbind_keeps_the_state():
    batch = TextBatch(1, PAD, NW, 0)
    m = TextStateMachine(PAD, NW)
    m.push([word("a", 10, 11), word("b", 12)])
    batch.bind(m, 0)
    batch.advance(np.array([0]), np.array([1]), np.array([0]))
    before = m.snapshot()
    batch.unbind(0)
    assert m.snapshot() == before
    assert m.process(1, 1) == (PAD, PAD)  # initial padding still forced
