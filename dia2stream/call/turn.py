"""The turn a call is speaking: where it stands in the context, its words, and its pacing.

Pacing: a caller's player plays what it gets in real time, so the audio sent runs ahead of it by
the frames sent less the time played since pacing (re)started: at the turn's first frame, after a
resume (nothing is heard until the next frame), and at the end of a hold (the player played on).
The scheduler reads that lead to decide when a call must step again.

Words: each text command's words belong to it (its `id`): a `word` event carries the id of the
command that sent the word.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from dia2stream.clock import FRAME_SECONDS
from dia2stream.wire import protocol as p

_TURN_SERIALS = itertools.count()
# The turn's fields that are aligned frame positions: a context rebuilt at other positions moves them.
_POSITIONS = ("start_position", "first_frame", "next_frame", "send_from", "first_word_frame")


@dataclass
class Turn:
    """Bookkeeping of the utterance being spoken."""

    id: p.ClientId | None
    start_position: int
    first_frame: int  # first aligned frame index this turn may decode
    started_at: float
    next_frame: int  # next aligned frame index to decode
    words_before: int  # transcript entries that belong to earlier turns
    send_from: int | None = None  # first aligned frame sent (first word less the lead-in), once known
    first_word_frame: int | None = None  # aligned frame of the turn's first word
    frames_sent: int = 0
    first_audio_at: float | None = None
    # The most lead the caller's buffer has had since pacing last (re)started (first audio, a
    # resume, the end of a hold): the scheduler tops a buffer that was never full up first.
    lead_peak: float = 0.0
    # Resumed after a pause: the caller hears nothing until the next frame, so pacing restarts
    # with that frame, and until then the turn is starting again, not behind real time.
    resumed: bool = False
    # (words pushed by this turn's text commands up to and including one command, its id): the
    # n-th word of the turn belongs to the first command whose count exceeds n
    word_marks: list = field(default_factory=list)
    words_pushed: int = 0
    words_emitted: int = 0
    pace_origin: float = 0.0  # wall time that frame `pace_frames` of playback corresponds to
    pace_frames: int = 0
    serial: int = field(default_factory=lambda: next(_TURN_SERIALS))  # this process's turns in order (step traces)

    # -- pacing ----------------------------------------------------------------------------------

    @property
    def awaiting_first_audio(self) -> bool:
        """The caller waits for this turn's first audio, or for its first after a resume."""
        return self.first_audio_at is None or self.resumed

    def lead_seconds(self, now: float) -> float:
        """How far the audio sent so far runs ahead of a client playing it in real time."""
        if self.awaiting_first_audio:
            return 0.0
        return (self.frames_sent - self.pace_frames) * FRAME_SECONDS - (now - self.pace_origin)

    def restart_pacing(self, now: float, lead: float = 0.0) -> None:
        """The player stands `lead` seconds ahead of the next frame from `now` on."""
        self.pace_origin, self.pace_frames = now + lead, self.frames_sent
        self.lead_peak = lead

    def frame_sent(self, now: float) -> None:
        """One more frame went to the caller (`now`): its first, or its first after a resume,
        starts the pacing."""
        if self.awaiting_first_audio:
            self.first_audio_at = self.first_audio_at or now
            self.resumed = False
            self.restart_pacing(now)
        self.frames_sent += 1
        self.lead_peak = max(self.lead_peak, self.lead_seconds(now))

    def timings_ms(self) -> tuple[float | None, float | None]:
        """(time to first audio, onset: to its first word) from the text's arrival, once heard."""
        if self.first_audio_at is None:
            return None, None
        ttfa = round((self.first_audio_at - self.started_at) * 1000, 1)
        return ttfa, round(ttfa + (self.first_word_frame - self.send_from) * FRAME_SECONDS * 1000, 1)

    # -- words -----------------------------------------------------------------------------------

    def add_words(self, count: int, owner: p.ClientId | None) -> None:
        """`count` words pushed by a text command whose id is `owner`."""
        if count:
            self.words_pushed += count
            self.word_marks.append((self.words_pushed, owner))

    def word_owner(self, n: int) -> p.ClientId | None:
        """The id of the command that sent the turn's n-th word (the turn's id when none did)."""
        for count, owner in self.word_marks:
            if n < count:
                return owner
        return self.id

    def keep_words(self, kept: int) -> None:
        """Only the turn's first `kept` words stand (a barge-in dropped the rest)."""
        self.word_marks = [(min(count, kept), owner) for count, owner in self.word_marks]
        self.words_pushed = kept

    # -- the context ------------------------------------------------------------------------------

    def shift(self, delta: int) -> None:
        """The context was rebuilt with every frame `delta` positions on."""
        for name in _POSITIONS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value + delta)
