"""What one connection's send loop measures for `/metrics`: frames sent, underruns, and each
utterance's time to first byte and speech onset.

**Underrun** (the server's view of `playback.simulate`): a player with no jitter buffer starts
a segment's first frame the moment it is sent and each later frame when the previous one has
played (80 ms later). A frame handed to the socket after the moment the player needs it is an
underrun, and the player's schedule slips by that much (one late frame is one underrun, not a
cascade). A segment begins at `started` and at `resumed`: the silence of a pause is the
client's choice, not an underrun. A hold (a streamed turn waiting for its next words) is not
visible here, so the first frame after a long hold counts as one underrun: the caller does hear
that gap. Measured at send time, so network delay to the client is not included.

First byte and onset come from the `done` event, which the call computes from its own clocks
(an utterance that ends without `done` — reset, pause then start, context_full — reports none).

Counters are batched per connection and flushed at every event (at least every word), so the
per-frame cost is one clock read and a comparison.
"""

from __future__ import annotations

import time

from dia2stream.clock import FRAME_SECONDS
from dia2stream.wire import protocol as p
from dia2stream.serve.metrics import Metrics

LATE_TOLERANCE_S = 0.002  # event-loop jitter below this is not a gap anyone hears


class DeliveryMeter:
    def __init__(self, metrics: Metrics, clock=time.monotonic) -> None:
        self._metrics = metrics
        self._clock = clock
        self._due: float | None = None  # when the player needs the next frame; None: new segment
        self._frames = 0  # sent, not yet flushed
        self._underruns = 0
        self.underruns = 0  # this connection's total (tests, logs)

    def frame_sent(self) -> None:
        now = self._clock()
        if self._due is not None and now > self._due + LATE_TOLERANCE_S:
            self._underruns += 1
            self.underruns += 1
            self._due = now  # the schedule slips
        elif self._due is None:
            self._due = now
        self._due += FRAME_SECONDS
        self._frames += 1

    def event(self, event: object) -> None:
        """Every event the send loop sends (after its frames)."""
        if isinstance(event, (p.Started, p.Resumed, p.Paused)):
            self._due = None
        elif isinstance(event, p.Done):
            if event.ttfa_ms is not None:
                self._metrics.first_byte_ms(event.ttfa_ms)
            if event.onset_ms is not None:
                self._metrics.speech_onset_ms(event.onset_ms)
        elif isinstance(event, p.ErrorEvent):
            self._metrics.error(event.code)
        self.flush()

    def flush(self) -> None:
        if self._frames:
            self._metrics.frames_sent(self._frames)
            self._frames = 0
        if self._underruns:
            self._metrics.underrun(self._underruns)
            self._underruns = 0
