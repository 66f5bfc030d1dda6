"""The text state machine's state as a row of ints (`mark`/`rewind`) and a call's rollback history
as a ring of such rows (`call/history.py`): a rewind stands exactly where the mark was taken,
whatever happened since (pushes, drops, finishes, rewinds to later marks), and the ring keeps
the newest records in order through wrap-around, rollbacks and rollovers."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dia2stream.call.history import RollbackLog
from vendor_dia2.state_machine import NO_STEP, ROW_END_STEP, ROW_FIELDS, TextState, TextStateMachine

from helpers import pause, word  # noqa: E402

PAD, NW = 0, 3


entry_st = st.one_of(
    st.builds(lambda n, t: word(f"w{n}", *range(20 + n, 20 + n + t)), st.integers(0, 99), st.integers(1, 4)),
    st.builds(pause, st.integers(0, 5)))

op_st = st.one_of(
    st.tuples(st.just("step"), st.integers(0, 1)),
    st.tuples(st.just("forced"), st.integers(0, 1)),
    st.tuples(st.just("push"), st.lists(entry_st, max_size=4), st.booleans()),
    st.tuples(st.just("finish")),
    st.tuples(st.just("drop")),
    st.tuples(st.just("clear_lookahead")),
    st.tuples(st.just("clear_pending")),
    st.tuples(st.just("mark")),
    st.tuples(st.just("rewind"), st.integers(0, 1000)),
    st.tuples(st.just("shift"), st.integers(-50, 50)),
)


def apply(m, op, step):
    match op:
        case ("step", action):
            return m.process(step, action)
        case ("forced", action):
            return m.process(step, action, forced=True)
        case ("push", entries, final):
            m.push(entries, final=final)
        case ("finish",):
            m.finish()
        case ("drop",):
            return m.drop_queued()
        case ("clear_lookahead",):
            m.clear_lookahead()
        case ("clear_pending",):
            m.clear_pending()


def shifted(state: TextState, delta: int) -> TextState:
    out = state.copy()
    out.transcript = [(w, s + delta) for w, s in out.transcript]
    out.end_step = None if out.end_step is None else out.end_step + delta
    return out


@settings(max_examples=300, deadline=None)
@given(script=st.lists(entry_st, max_size=8), ops=st.lists(op_st, min_size=1, max_size=80), ahead=st.integers(0, 2),
       max_padding=st.integers(0, 6), initial_padding=st.integers(0, 3))
def test_rewind_stands_where_the_mark_was_taken(script, ops, ahead, max_padding, initial_padding):
    """As a call uses it: marks taken along the way, a rewind to one of them (the later ones are
    then forgotten, as a rollback forgets them), steps moved by a rollover. After a rewind the
    machine equals its snapshot at the mark, and runs on exactly as a fresh machine restored from
    that snapshot does."""
    kw = dict(second_stream_ahead=ahead, max_padding=max_padding, initial_padding=initial_padding)
    m = TextStateMachine(PAD, NW, **kw)
    m.push(script, final=False)
    marks: list[tuple[tuple, TextState]] = []  # (row, snapshot at the mark), oldest first
    step = 0
    for op in ops:
        match op:
            case ("mark",):
                marks.append((m.mark(), m.snapshot()))
            case ("rewind", pick) if marks:
                k = pick % len(marks)
                row, snap = marks[k]
                del marks[k + 1:]
                m.rewind(row)
                assert m.snapshot() == snap
                assert m.state == snap
            case ("shift", delta):  # every kept mark moves with the machine (the call's ring does the same)
                m.shift_steps(delta)
                marks = [(row[:ROW_END_STEP] + ((row[ROW_END_STEP] + delta) if row[ROW_END_STEP] != NO_STEP
                                                 else NO_STEP,) + row[ROW_END_STEP + 1:], shifted(snap, delta))
                         for row, snap in marks]
                step += delta
            case _:
                reference = TextStateMachine(PAD, NW, **kw)
                reference.restore(m.snapshot())
                assert apply(m, op, step) == apply(reference, op, step)
                assert m.snapshot() == reference.snapshot()
                step += 1


def test_rewind_before_a_drop_sees_the_dropped_words_again():
    """A barge-in drops the queue and new text follows; a rollback to before the drop stands
    where it stood, with the old queue (the entries a row points at are never overwritten)."""
    m = TextStateMachine(PAD, NW)
    m.push([word("a", 10), word("b", 11), word("c", 12)])
    for t in range(3):
        m.process(t, 1)
    before = m.mark(), m.snapshot()
    m.process(3, 1)
    m.process(4, 1)
    assert m.drop_queued() == ["c"]
    m.push([word("d", 13)])
    assert m.queued_words() == ["d"]
    m.rewind(before[0])
    assert m.snapshot() == before[1] and m.queued_words() == ["b", "c"]
    m.push([word("e", 14)])  # the queue moves to the log's end: what it sees is b, c, e
    assert m.queued_words() == ["b", "c", "e"]
    out = [m.process(t, 1) for t in range(3, 12)]
    assert [w for w, _ in m.transcript] == ["a", "b", "c", "e"]
    assert [main for main, _ in out if main not in (PAD, NW)] == [10, 11, 12, 14]  # "a" was still pending


def test_restore_starts_new_logs_and_rows_of_the_old_ones_are_refused():
    m = TextStateMachine(PAD, NW)
    m.push([word("a", 10, 11), word("b", 12)])
    for t in range(4):
        m.process(t, 1)
    row = m.mark()
    m.restore(TextState(padding_budget=1))
    with pytest.raises(AssertionError):
        m.rewind(row)


def test_live_state_reads_and_writes_in_place():
    m = TextStateMachine(PAD, NW, second_stream_ahead=1)
    m.push([word("a", 10, 11), word("b", 12, 13)])
    for t in range(3):
        m.process(t, 1)
    assert list(m.state.pending) == [11] and list(m.state.lookahead) == [12, 13]
    m.state.lookahead.clear()
    assert not m.state.lookahead and m.snapshot().lookahead == []
    m.state.padding_budget = 5
    assert m.snapshot().padding_budget == 5
    assert m.state == m.snapshot()
    with pytest.raises(AttributeError):
        m.state.next_entry = 3


def rows(n, start=0):
    return [(start + i, (i, i + 1), tuple(range(i, i + len(ROW_FIELDS)))) for i in range(n)]


def test_ring_keeps_the_newest_records_in_order_through_wrap_around():
    log = RollbackLog(5)
    for position, text_in, text in rows(12):
        log.record(position, text_in, text)
    assert log.positions() == [7, 8, 9, 10, 11]
    found = log.find(9)
    assert (found.position, found.text_in, found.text) == (9, (9, 10), tuple(range(9, 9 + len(ROW_FIELDS))))
    assert log.find(6) is None and log.find(12) is None


def test_ring_rollback_drops_the_steps_taken_back_and_records_on():
    log = RollbackLog(5)
    for r in rows(12):
        log.record(*r)
    log.drop_from(9)
    assert log.positions() == [7, 8]
    for r in rows(5, start=9):
        log.record(*r)
    assert log.positions() == [9, 10, 11, 12, 13]
    log.drop_from(3)
    assert log.positions() == [] and len(log) == 0


def test_ring_rebase_keeps_a_window_and_moves_its_steps_and_ends():
    log = RollbackLog(8)
    end = 3 + ROW_END_STEP
    for position in range(20):
        text = [0] * len(ROW_FIELDS)
        text[ROW_END_STEP] = NO_STEP if position % 2 else position - 5
        log.record(position, (1, 2), tuple(text))
    log.rebase(-10, keep_from=14, upto=17)
    assert log.positions() == [4, 5, 6, 7]
    ends = [log.find(p).text[ROW_END_STEP] for p in range(4, 8)]
    assert ends == [14 - 5 - 10, NO_STEP, 16 - 5 - 10, NO_STEP]
    log.record(8, (1, 2), (0,) * len(ROW_FIELDS))
    assert log.positions() == [4, 5, 6, 7, 8]
    assert end == 3 + ROW_FIELDS.index("end_step")


def test_ring_stores_ints_not_objects():
    """The point of the ring: recording a step allocates nothing the garbage collector tracks."""
    import gc

    log = RollbackLog(64)
    m = TextStateMachine(PAD, NW)
    m.push([word(f"w{i}", 10 + i) for i in range(50)])
    tracked = len(gc.get_objects())
    for t in range(200):
        log.record(t, (PAD, PAD), m.mark())
        m.process(t, t % 2)
    # the transcript grows by a tuple per word (at most 50), nothing per step
    assert len(gc.get_objects()) - tracked < 60
    assert log.positions() == list(range(136, 200))
