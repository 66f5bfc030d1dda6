"""One frame of a call's audio on its way out, as every sender (native, compatible APIs, HTTP) takes it.

A call emits its frames as 24 kHz float PCM, stamped with the output format it asked for and
whether the frame continues the one before (`fresh` when it does not: a new turn, a resume). The
wire encoding (soxr resampling, G.711) is the sender's work, off the generation thread: a
connection's `FrameWriter` turns each frame it really sends into its binary message.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dia2stream.wire.formats import DEFAULT_FORMAT, FrameEncoder


@dataclass(frozen=True)
class AudioFrame:
    pcm: np.ndarray  # float32 [FRAME_SAMPLES] in [-1, 1] at SAMPLE_RATE
    epoch: int  # the call's epoch when it was made: a sender drops frames older than a pause or reset
    index: int  # frame index within the utterance
    format: str = DEFAULT_FORMAT  # the wire format the call's client asked for (formats.FORMATS)
    fresh: bool = False  # does not continue the frame before (a new turn, a resume): the encoder restarts


class FrameWriter:
    """A connection's frames as binary messages in their format, with the streaming encoder's
    state kept between frames (replaced when the format changes, reset at a fresh frame)."""

    def __init__(self) -> None:
        self._encoder = FrameEncoder(DEFAULT_FORMAT)

    def message(self, frame: AudioFrame) -> bytes:
        if frame.format != self._encoder.format.name:
            self._encoder = FrameEncoder(frame.format)
        elif frame.fresh:
            self._encoder.reset()
        return self._encoder.encode(frame.pcm)
