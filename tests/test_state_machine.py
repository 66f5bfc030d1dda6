import random

import pytest

from vendor_dia2.script import ScriptEntry
from vendor_dia2.state_machine import TextState, TextStateMachine

PAD, NW = 0, 3


def word(text, *tokens):
    return ScriptEntry(text=text, tokens=tuple(tokens), padding=len(tokens))


def pause(frames):
    return ScriptEntry(text="", tokens=(), padding=frames)


A, B, C = word("a", 10, 11), word("b", 12), word("c", 13, 14)


def machine(entries=(A, B), *, final=True, **kw):
    m = TextStateMachine(PAD, NW, **kw)
    m.push(entries, final=final)
    return m


def run(m, actions, start=0, forced=False):
    return [m.process(start + i, a, forced=forced) for i, a in enumerate(actions)]


def mains(outputs):
    return [main for main, _ in outputs]


def test_model_always_pads_budget_forces_words():
    m = machine()
    out = run(m, [0] * 18)
    assert all(main == second for main, second in out)
    #            initial  A   tokens  4 free pads   B   12  5 pads        end
    assert mains(out) == [0, 0, NW, 10, 11, 0, 0, 0, 0, NW, 12, 0, 0, 0, 0, 0, 0, 0]
    assert m.transcript == [("a", 2), ("b", 9)]
    assert m.end_step == 16
    assert m.last_word_step == 9
    assert m.remaining_entries == 0
    assert not m.starved


def test_model_always_new_word_is_held_by_forced_padding():
    m = machine()
    out = run(m, [1] * 9)
    assert mains(out) == [0, 0, NW, 10, 11, NW, 12, 0, 0]
    assert m.transcript == [("a", 2), ("b", 5)]
    assert m.end_step == 7  # set once, the first time the queue is found empty
    assert m.process(9, 1) == (PAD, PAD)
    assert m.end_step == 7


def test_initial_padding():
    m = machine(initial_padding=0)
    assert m.process(0, 0) == (NW, NW)  # budget 0: a pad is forced into a new word
    assert m.transcript == [("a", 0)]
    m = machine(initial_padding=4)
    assert mains(run(m, [1] * 5)) == [0, 0, 0, 0, NW]
    assert m.transcript == [("a", 4)]
    assert m.state.padding_budget == 6 and m.state.forced_padding == 2


def test_hold_words_pads_before_the_next_word_whatever_the_action():
    m = machine(initial_padding=0)
    m.hold_words(3)
    assert mains(run(m, [1] * 4)) == [0, 0, 0, NW]  # the model asked for a word at once
    assert m.transcript == [("a", 3)]
    m = machine(initial_padding=0)
    m.hold_words(1)
    assert mains(run(m, [0] * 2)) == [0, NW]  # ... or it would have padded on: the word starts after the hold
    m = machine(initial_padding=4)
    m.hold_words(2)  # never shortens a longer hold
    assert mains(run(m, [1] * 5)) == [0, 0, 0, 0, NW]


def test_cut_word_drops_the_rest_of_the_word_and_its_pads_then_holds():
    m = machine((ScriptEntry(text="c", tokens=(13, 14), padding=5), B), initial_padding=0)
    assert mains(run(m, [1, 0])) == [NW, 13]  # 14 and three more pads are still to come
    m.drop_queued()  # as after a barge-in: b was not heard
    m.cut_word(2)
    m.push([A], final=True)
    assert mains(run(m, [0] * 3, start=2)) == [PAD, PAD, NW]  # no 14, no pads of c: the hold, then a
    assert m.transcript == [("c", 0), ("a", 4)]  # ... even where the model would pad on
    m = machine((A,), initial_padding=0)
    m.cut_word(1)  # with nothing being spoken: the hold and the word after it
    assert mains(run(m, [0, 0])) == [PAD, NW]


def test_actions_other_than_one_are_pad():
    m = machine()
    run(m, [0, 0])
    assert m.process(2, 7) == (NW, NW)  # 7 is pad, but the empty budget forces a new word
    m = machine(initial_padding=0)
    m.state.padding_budget = 3
    assert m.process(0, 2) == (PAD, PAD)
    assert m.process(1, -1) == (PAD, PAD)
    assert m.transcript == []


def test_break_entry_pads_for_its_length():
    m = machine([word("a", 10), pause(3), word("b", 12)])
    out = run(m, [1] * 10)
    assert mains(out) == [0, 0, NW, 10, 0, 0, 0, NW, 12, 0]
    assert m.transcript == [("a", 2), ("b", 7)]  # the break is not in the transcript
    assert m.end_step == 9


def test_second_stream_ahead_two():
    m = machine([A, B, C], second_stream_ahead=2)
    out = run(m, [1] * 12)
    assert out == [
        (0, 0),
        (0, 0),
        (10, NW),  # new word "a": main is its first token, second the marker
        (11, 13),  # look-ahead: the 2nd upcoming word ("c") on the second stream
        (0, 14),
        (12, NW),  # "b": no 2nd upcoming word
        (0, 0),
        (13, NW),
        (14, 0),
        (0, 0),
        (0, NW),  # final new-word marker when the text runs out
        (0, 0),
    ]
    assert m.transcript == [("a", 2), ("b", 5), ("c", 7)]
    assert m.end_step == 10


def test_forced_actions_override_padding_rules():
    m = machine()
    assert m.process(0, 1, forced=True) == (NW, NW)  # despite initial forced padding
    assert m.process(1, 1, forced=True) == (10, 10)  # pending tokens still win
    assert m.process(2, 1, forced=True) == (11, 11)
    assert mains(run(m, [0] * 10, start=3, forced=True)) == [0] * 10  # no budget forcing
    assert m.transcript == [("a", 0)]
    assert m.process(13, 1, forced=True) == (NW, NW)
    assert m.transcript == [("a", 0), ("b", 13)]


def test_hold_mode_waits_for_text_then_ends_after_finish():
    m = machine([A], final=False)
    out = run(m, [1] * 8)
    assert mains(out) == [0, 0, NW, 10, 11, 0, 0, 0]
    assert m.starved and m.end_step is None
    assert m.transcript == [("a", 2)]

    m.push([B], final=False)
    assert not m.starved and m.remaining_entries == 1
    assert m.process(8, 1) == (NW, NW)
    assert m.process(9, 1) == (12, 12)
    assert m.process(10, 0) == (PAD, PAD)  # budget left: a pad stays a pad
    assert mains(run(m, [1] * 3, start=11)) == [0, 0, 0]
    assert m.starved and m.end_step is None

    m.finish()
    assert not m.starved
    assert m.process(14, 1) == (PAD, PAD)
    assert m.end_step == 14
    assert m.transcript == [("a", 2), ("b", 8)]


def test_hold_mode_with_pads_and_second_stream_has_no_end_marker():
    m = machine([word("a", 10)], final=False, second_stream_ahead=2)
    out = run(m, [0] * 12)
    assert out[2] == (10, NW)
    assert all(o == (PAD, PAD) for o in out[3:])  # no final new_word marker while holding
    assert m.starved and m.end_step is None
    m.finish()
    assert m.process(12, 0) == (PAD, NW)  # now the text is over: marker, end
    assert m.end_step == 12


def test_fresh_machine_holds_until_text_arrives():
    m = TextStateMachine(PAD, NW)
    assert mains(run(m, [1] * 4)) == [0, 0, 0, 0]
    assert m.starved and m.end_step is None
    m.push([B])
    assert m.process(4, 1) == (NW, NW)
    assert m.transcript == [("b", 4)]


def test_injection_after_end_continues_the_utterance():
    m = machine([B])
    run(m, [1] * 6)
    assert m.end_step == 4
    m.push([C])
    assert m.end_step is None
    assert mains(run(m, [1] * 5, start=6)) == [NW, 13, 14, 0, 0]
    assert m.transcript == [("b", 2), ("c", 6)]
    assert m.end_step == 9


def test_preview_matches_process_and_does_not_mutate():
    rng = random.Random(0)
    entries = [word(f"w{i}", *range(20 + i, 20 + i + rng.randint(1, 3))) for i in range(8)]
    entries.insert(3, pause(4))
    for ahead in (0, 2):
        m = machine(entries, second_stream_ahead=ahead)
        for step in range(60):
            if step == 30:
                m.push([word("late", 90, 91)], final=True)
            before = m.snapshot()
            pad_out, nw_out = m.preview(step)
            assert m.snapshot() == before
            for action, expected in ((0, pad_out), (1, nw_out)):
                other = machine((), second_stream_ahead=ahead)
                other.restore(before)
                assert other.process(step, action) == expected
            action = rng.randint(0, 1)
            assert m.process(step, action) == (nw_out if action == 1 else pad_out)
        assert m.end_step is not None
        assert [w for w, _ in m.transcript] == [e.text for e in entries if e.tokens] + ["late"]


def test_preview_differs_when_model_can_choose():
    m = machine()
    run(m, [0, 0, 1, 0, 0])  # "a" done at step 4, budget left
    assert m.preview(5) == ((PAD, PAD), (NW, NW))
    assert m.transcript == [("a", 2)]


def test_snapshot_restore_round_trip():
    m = machine([A, B, C], second_stream_ahead=2)
    run(m, [1, 1, 1])
    snap = m.snapshot()
    assert isinstance(snap, TextState)
    first = run(m, [0, 1, 1, 0, 1, 1, 1], start=3)
    end, transcript = m.end_step, m.transcript
    assert snap.transcript == [("a", 2)]  # the snapshot did not move with the machine
    m.restore(snap)
    assert run(m, [0, 1, 1, 0, 1, 1, 1], start=3) == first
    assert (m.end_step, m.transcript) == (end, transcript)
    m.restore(snap)  # restoring twice works: restore copies
    assert run(m, [0, 1, 1, 0, 1, 1, 1], start=3) == first


def test_reset_and_properties():
    m = machine([A, B, C])
    assert m.remaining_entries == 3 and m.last_word_step is None
    run(m, [1] * 4)
    assert m.remaining_entries == 2 and m.last_word_step == 2
    m.reset()
    assert m.snapshot() == TextState(padding_budget=2, forced_padding=2)
    assert m.remaining_entries == 0 and m.transcript == [] and m.end_step is None


def test_push_rejects_non_entries_and_bad_args():
    m = TextStateMachine(PAD, NW)
    with pytest.raises(TypeError):
        m.push([(10, 11)])
    with pytest.raises(ValueError):
        TextStateMachine(PAD, NW, max_padding=-1)


# Property test: the read-only preview (every call, every frame) equals processing a copy of the
# state, for any script, any text streaming (held, pushed late, finished) and any actions.
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

entry_st = st.one_of(
    st.builds(lambda n, t: word(f"w{n}", *range(20, 20 + t)), st.integers(0, 99), st.integers(1, 4)),
    st.builds(pause, st.integers(0, 5)))


@settings(max_examples=200, deadline=None)
@given(script=st.lists(entry_st, max_size=8), later=st.lists(entry_st, max_size=4),
       actions=st.lists(st.integers(0, 1), min_size=1, max_size=60), ahead=st.integers(0, 2),
       final=st.booleans(), push_at=st.integers(0, 60), finish_at=st.integers(0, 80),
       max_padding=st.integers(0, 6), initial_padding=st.integers(0, 3))
def test_preview_is_processing_a_copy(script, later, actions, ahead, final, push_at, finish_at, max_padding,
                                      initial_padding):
    m = machine(script, final=final, second_stream_ahead=ahead, max_padding=max_padding,
                initial_padding=initial_padding)
    for step, action in enumerate(actions):
        if step == push_at:
            m.push(later, final=False)
        if step == finish_at:
            m.finish()
        before = m.snapshot()
        previews = m.preview(step)
        assert m.snapshot() == before
        for choice, expected in enumerate(previews):
            copy = machine((), second_stream_ahead=ahead, max_padding=max_padding, initial_padding=initial_padding)
            copy.restore(before)
            assert copy.process(step, choice) == expected, (step, choice)
        assert m.process(step, action) == previews[action]
