"""What a caller hears: a model of a client that plays frames back to back as they arrive.

    heard = simulate(arrivals, command_at=t0, onset_frame=first_word["frame"])
    heard.onset_s, heard.first_byte_s, heard.underruns, heard.play_starts

The player has no jitter buffer: it starts the first frame the moment it arrives, and starts each
later frame when the previous one has finished playing, or, if the frame is not there yet, the
moment it arrives. A frame that arrives after the moment it should have started is an
**underrun**: the caller hears a gap, and the schedule **slips** by that much (a player without a
jitter buffer cannot catch up, so every later frame plays that much later too; one late frame
is one underrun, not a cascade).

**Speech onset** is the time from the command until the player reaches the frame where the first
word starts (the first `word` event's `frame`: its index within the utterance). Time to first
byte is when the first frame arrived. Pure functions: times are seconds on any one clock.

A paused and resumed utterance is several *segments* of frames: simulate each on its own (the
silence of a pause is not an underrun); speech onset belongs to the first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from dia2stream.clock import FRAME_SECONDS



@dataclass(frozen=True)
class Playback:
    """One segment of frames as the player plays it."""

    command_at: float
    arrivals: tuple[float, ...]
    play_starts: tuple[float, ...]  # when each frame starts playing
    late_s: tuple[float, ...]  # per frame: how late it arrived for its slot (0 when on time)
    onset_frame: int | None  # the first word's frame, if known
    frame_s: float = FRAME_SECONDS

    @property
    def first_byte_s(self) -> float | None:
        """Time from the command to the first frame's arrival."""
        return self.arrivals[0] - self.command_at if self.arrivals else None

    @property
    def onset_s(self) -> float | None:
        """Time from the command until the first word's frame starts playing; None if that frame
        never arrived (or no word is known)."""
        if self.onset_frame is None or not 0 <= self.onset_frame < len(self.play_starts):
            return None
        return self.play_starts[self.onset_frame] - self.command_at

    @property
    def underruns(self) -> int:
        """Frames that arrived after the moment they should have started playing."""
        return sum(1 for late in self.late_s if late > 0)

    @property
    def stall_s(self) -> float:
        """Total gap heard: the sum of the underruns' lateness (how far the schedule slipped)."""
        return sum(self.late_s)

    @property
    def gaps_s(self) -> list[float]:
        """Times between consecutive arrivals."""
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]

    @property
    def end_s(self) -> float | None:
        """When the last frame finishes playing (on the input clock)."""
        return self.play_starts[-1] + self.frame_s if self.play_starts else None

    def played_s(self, at: float) -> float:
        """Seconds of this segment's audio the caller has heard by time `at`: what an
        orchestrator would report as `played_ms` / 1000 on a barge-in at `at`."""
        return sum(min(max(at - start, 0.0), self.frame_s) for start in self.play_starts)


def simulate(
    arrivals: Sequence[float],
    command_at: float,
    onset_frame: int | None = None,
    frame_s: float = FRAME_SECONDS,
    tolerance_s: float = 1e-6,
) -> Playback:
    """Play one segment's frames (arrival times, in order) back to back from the first one.

    A frame later than its slot by at most `tolerance_s` counts as on time (clock rounding)."""
    arrivals = tuple(float(t) for t in arrivals)
    if any(b < a for a, b in zip(arrivals, arrivals[1:])):
        raise ValueError("arrival times must not decrease")
    starts: list[float] = []
    late: list[float] = []
    for i, arrived in enumerate(arrivals):
        due = arrived if i == 0 else starts[-1] + frame_s
        late.append(arrived - due if arrived - due > tolerance_s else 0.0)
        starts.append(max(due, arrived))  # the schedule slips by the lateness
    return Playback(command_at, arrivals, tuple(starts), tuple(late), onset_frame, frame_s)
