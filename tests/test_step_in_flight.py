"""One step in flight (issue 18, item 3): the next step is launched before the host applies the
actions of the one before. What makes that safe: the text state machine previews the step after
an unknown action without changing anything, and the frame picks its text by the previous
step's action, then its own."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vendor_dia2.frame import pick_text
from vendor_dia2.script import ScriptEntry
from vendor_dia2.state_machine import TextStateMachine

PAD, NW = 0, 3


def word(text, *tokens):
    return ScriptEntry(text=text, tokens=tuple(tokens), padding=len(tokens))


def pause(frames):
    return ScriptEntry(text="", tokens=(), padding=frames)


entry_st = st.one_of(
    st.builds(lambda n, t: word(f"w{n}", *range(20, 20 + t)), st.integers(0, 99), st.integers(1, 4)),
    st.builds(pause, st.integers(0, 5)))


def fresh(ahead, max_padding, initial_padding):
    return TextStateMachine(PAD, NW, second_stream_ahead=ahead, max_padding=max_padding,
                            initial_padding=initial_padding)


@settings(max_examples=200, deadline=None)
@given(script=st.lists(entry_st, max_size=8), later=st.lists(entry_st, max_size=4),
       actions=st.lists(st.integers(0, 1), min_size=1, max_size=60), ahead=st.integers(0, 2),
       final=st.booleans(), push_at=st.integers(0, 60), finish_at=st.integers(0, 80),
       rewind_at=st.integers(0, 80), drop_at=st.integers(0, 80),
       max_padding=st.integers(0, 6), initial_padding=st.integers(0, 3))
def test_preview_after_is_process_then_preview_on_a_copy(script, later, actions, ahead, final, push_at, finish_at,
                                                         rewind_at, drop_at, max_padding, initial_padding):
    m = fresh(ahead, max_padding, initial_padding)
    m.push(script, final=final)
    marks = []
    step = 0
    for i, action in enumerate(actions):
        if i == push_at:
            m.push(later, final=False)
        if i == finish_at:
            m.finish()
        if i == drop_at:
            m.drop_queued()  # the queue no longer ends at its log's end
        if i == rewind_at and marks:
            step, row = marks[len(marks) // 2]  # a barge-in: the logs now run past the live row
            m.rewind(row)
            del marks[len(marks) // 2:]
        marks.append((step, m.mark()))
        before, row, logs = m.snapshot(), m.mark(), (len(m.logs.transcript), len(m.logs.ahead), len(m.logs.tokens))
        for guess in (0, 1):
            got = m.preview_after(step, guess)
            assert m.snapshot() == before and m.mark() == row
            assert (len(m.logs.transcript), len(m.logs.ahead), len(m.logs.tokens)) == logs
            copy = fresh(ahead, max_padding, initial_padding)
            copy.restore(before)
            copy.process(step, guess)
            assert got == copy.preview(step + 1), (step, guess)
        m.process(step, action)
        step += 1


def test_the_frame_picks_by_the_previous_action_then_its_own():
    # choices[slot, previous, action] = a token pair unique to that cell
    choices = torch.tensor([[[[100 * s + 10 * prev + a, -(100 * s + 10 * prev + a)] for a in (0, 1)]
                             for prev in (0, 1)] for s in range(4)])
    previous = torch.tensor([0, 1, 0, 1])
    action = torch.tensor([0, 0, 1, 1])
    got = pick_text(choices, previous, action)
    assert got[:, 0].tolist() == [0, 110, 201, 311]
    assert got[:, 1].tolist() == [0, -110, -201, -311]
    # actions other than 1 are pad, as upstream maps them
    assert pick_text(choices, torch.tensor([2, 2, 2, 2]), torch.tensor([5, 5, 5, 5]))[:, 0].tolist() == [0, 100, 200, 300]
