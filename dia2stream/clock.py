"""The frame clock every room of the server counts in, and the other model-wide limits.

They are the model's (Mimi's 24 kHz audio in 80 ms frames, the sampler's candidate table), so
they are defined once in `vendor_dia2.config`; the server imports them from here.
"""

from vendor_dia2.config import FRAME_RATE, FRAME_SAMPLES, FRAME_SECONDS, MAX_TOP_K, SAMPLE_RATE

FRAME_MS = FRAME_SECONDS * 1000

__all__ = ["FRAME_MS", "FRAME_RATE", "FRAME_SAMPLES", "FRAME_SECONDS", "MAX_TOP_K", "SAMPLE_RATE"]
