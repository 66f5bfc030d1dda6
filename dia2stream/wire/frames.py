"""One frame of a call's audio on its way out, as every sender (native, compatible APIs, HTTP) takes it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AudioFrame:
    pcm: np.ndarray  # float32 [FRAME_SAMPLES] in [-1, 1] at SAMPLE_RATE
    epoch: int  # the call's epoch when it was made: a sender drops frames older than a pause or reset
    index: int  # frame index within the utterance
    data: bytes = b""  # the binary message in the call's format (header + samples)
