"""The call's phase machine (call/phases.py): the transitions the protocol's commands make."""

import pytest

from dia2stream.call.phases import TRANSITIONS, Phase, PhaseError, PhaseEvent, PhaseMachine

E = PhaseEvent


def walk(*events: PhaseEvent) -> PhaseMachine:
    machine = PhaseMachine()
    for event in events:
        machine.go(event)
    return machine


def test_a_resume_goes_back_to_the_phase_the_call_was_paused_from():
    assert walk(E.BEGIN_TURN, E.PAUSE, E.RESUME).phase is Phase.GENERATING
    assert walk(E.BEGIN_TURN, E.WORDS_RAN_OUT, E.PAUSE, E.RESUME).phase is Phase.HOLDING


def test_a_flush_while_paused_from_a_hold_resumes_to_generating_so_the_turn_can_end():
    machine = walk(E.BEGIN_TURN, E.WORDS_RAN_OUT, E.PAUSE, E.FINAL_TEXT)
    assert machine.phase is Phase.PAUSED
    assert machine.go(E.RESUME) is Phase.GENERATING


def test_a_barge_in_after_the_turn_ended_pauses_it_and_a_resume_speaks_on():
    machine = walk(E.BEGIN_TURN, E.TURN_ENDED, E.ROLLED_BACK)
    assert machine.phase is Phase.PAUSED
    assert walk(E.BEGIN_TURN, E.TURN_ENDED, E.ROLLED_BACK, E.PAUSE, E.RESUME).phase is Phase.GENERATING
    assert walk(E.BEGIN_TURN, E.TURN_ENDED, E.ROLLED_BACK, E.CALLER_SPOKE).phase is Phase.IDLE


@pytest.mark.parametrize("phase", list(Phase))
def test_reset_goes_to_none_from_every_phase_and_pause_from_every_phase_is_allowed(phase):
    assert PhaseMachine(phase).go(E.RESET) is Phase.NONE
    PhaseMachine(phase).go(E.PAUSE)


@pytest.mark.parametrize("phase, event", [(Phase.NONE, E.RESUME), (Phase.GENERATING, E.BEGIN_TURN),
                                          (Phase.HOLDING, E.TURN_ENDED), (Phase.IDLE, E.WORDS_RAN_OUT),
                                          (Phase.GENERATING, E.CALLER_SPOKE)])
def test_a_change_the_table_does_not_allow_is_an_error_and_changes_nothing(phase, event):
    machine = PhaseMachine(phase)
    with pytest.raises(PhaseError):
        machine.go(event)
    assert machine.phase is phase


def test_every_phase_is_reachable_and_every_event_is_used():
    reached = {Phase.NONE}
    while True:
        more = {target for (phase, _), (target, _) in TRANSITIONS.items() if phase in reached and isinstance(target, Phase)}
        if more <= reached:
            break
        reached |= more
    assert reached == set(Phase)
    assert {event for _, event in TRANSITIONS} == set(PhaseEvent)
