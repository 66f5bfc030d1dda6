"""A call's phase machine: every phase change a call makes, in one table.

    none ──begin turn──▶ generating ──words ran out──▶ holding ──text came──▶ generating
                             │  └──────turn ended──▶ idle ──begin turn──▶ generating
                             └──pause──▶ paused ──resume──▶ (the phase it was paused from)

A pause remembers where a resume goes back to (`PhaseMachine.resume_to`): holding, if the turn
was waiting for text, else generating. Reset (a reset command, a full context, a fault, the
client leaving) goes to none from anywhere. The events that leave a phase as it is are listed
too, so that an event the table does not name in some phase is a bug in the call, raised as
`PhaseError`, never a silent change.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Phase(Enum):
    NONE = "none"  # nothing started since connect/reset
    GENERATING = "generating"
    HOLDING = "holding"  # words ran out, more text of the turn is expected
    PAUSED = "paused"
    IDLE = "idle"  # utterance done, warm


class PhaseEvent(Enum):
    BEGIN_TURN = "a turn begins (start, or inject after done)"
    WORDS_RAN_OUT = "every word sent is spoken and the text is not final"
    TEXT_CAME = "text (or its end) came for a holding turn"
    TURN_ENDED = "the turn's last frame is out"
    PAUSE = "pause"
    ROLLED_BACK = "a barge-in rolled the call back to what the caller heard"
    RESUME = "resume, or inject while paused"
    FINAL_TEXT = "flush: the turn's text is complete"
    CALLER_SPOKE = "the caller's turn went into the context"
    RESET = "reset, full context, fault or the client left"


class PhaseError(RuntimeError):
    """A call asked its phase machine for a change the table does not allow: a bug in the call."""


# Where a resume goes: the phase the call was paused from.
RESUMED = "resumed"

_N, _G, _H, _P, _I = Phase.NONE, Phase.GENERATING, Phase.HOLDING, Phase.PAUSED, Phase.IDLE
_ALL = tuple(Phase)
E = PhaseEvent

# (phase, event) -> (next phase, where a later resume goes back to; None keeps it)
TRANSITIONS: dict[tuple[Phase, PhaseEvent], tuple[Phase | str, Phase | None]] = {
    **{(phase, E.BEGIN_TURN): (_G, None) for phase in (_N, _I, _P)},
    (_G, E.WORDS_RAN_OUT): (_H, None),
    (_H, E.TEXT_CAME): (_G, None),
    (_G, E.TURN_ENDED): (_I, None),
    (_G, E.PAUSE): (_P, _G),
    (_H, E.PAUSE): (_P, _H),
    **{(phase, E.PAUSE): (phase, None) for phase in (_N, _P, _I)},
    (_I, E.ROLLED_BACK): (_P, _G),  # the caller was still playing a finished turn
    **{(phase, E.ROLLED_BACK): (phase, None) for phase in (_G, _H, _P)},
    (_P, E.RESUME): (RESUMED, None),
    (_P, E.FINAL_TEXT): (_P, _G),  # a resume would otherwise hold for text that is not coming, with no done
    **{(phase, E.FINAL_TEXT): (phase, None) for phase in (_G, _I)},
    (_P, E.CALLER_SPOKE): (_I, None),  # the paused turn ended where the caller cut in
    (_I, E.CALLER_SPOKE): (_I, None),
    **{(phase, E.RESET): (_N, _G) for phase in _ALL},
}


@dataclass
class PhaseMachine:
    phase: Phase = Phase.NONE
    resume_to: Phase = Phase.GENERATING

    def go(self, event: PhaseEvent) -> Phase:
        """Take `event`; returns the phase it leads to."""
        try:
            target, resume_to = TRANSITIONS[(self.phase, event)]
        except KeyError:
            raise PhaseError(f"no {event.name.lower()} from {self.phase.value}") from None
        self.phase = self.resume_to if target == RESUMED else target
        if resume_to is not None:
            self.resume_to = resume_to
        return self.phase
