"""Wire audio formats: the model's 24 kHz frames as PCM at 24/16/8 kHz or G.711 µ-law/A-law at 8 kHz.

    encoder = FrameEncoder("ulaw_8000")   # one per call, when the call's format is chosen
    message = encoder.encode(frame)       # each 1920-sample float32 frame -> one binary message
    encoder.reset()                       # when the next frame does not continue the last one
    samples = decode_frame(message, "ulaw_8000")   # client side: int16 at 8 kHz

Every binary message is `<u32 LE sample count><payload>`: int16 LE for PCM, one byte per sample
for G.711. Each 80 ms frame carries exactly `rate × 0.08` samples (1920, 1280 or 640).

Resampling is streaming and stateful (one `soxr.ResampleStream` per encoder), so consecutive
frames join without clicks. soxr holds back a little output until it has seen the input that
follows (its filter needs it); its variable-rate engine (`vr=True`, used at a fixed ratio) holds
back a constant amount, where the fixed-rate engine releases output in irregular blocks of up to
~73 ms at 8 kHz. The encoder puts exactly that constant amount of silence ahead of the first frame
after each reset (`latency_samples`: 25 ms at 8 kHz, 10 ms at 16 kHz), so every frame is full
and the audio runs that much behind the 24 kHz timeline; the last `latency_samples` of audio
fed before a reset are never sent (an utterance's end is silence). Cost on CPU: about 0.1 ms
per frame for a resampled format (soxr's variable-rate engine is ~10x slower than its fixed-rate
one), 0.03 ms for G.711, nothing for pcm_24000; keep it off the GPU frame loop's thread.

`protocol.py` validates `format` against `FORMATS`; the frame clock is `dia2stream.clock`'s.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

import numpy as np
import soxr

from dia2stream.clock import FRAME_SAMPLES, SAMPLE_RATE

FRAME_HEADER = struct.Struct("<I")  # sample count, little-endian

PCM_S16LE = "pcm_s16le"
ULAW = "ulaw"
ALAW = "alaw"


@dataclass(frozen=True)
class AudioFormat:
    name: str
    sample_rate: int
    encoding: str  # PCM_S16LE, ULAW or ALAW
    bytes_per_sample: int

    @property
    def frame_samples(self) -> int:
        """Samples in one 80 ms frame at this rate (the header's count)."""
        return self.sample_rate * FRAME_SAMPLES // SAMPLE_RATE

    @property
    def frame_bytes(self) -> int:
        return FRAME_HEADER.size + self.frame_samples * self.bytes_per_sample


FORMATS: dict[str, AudioFormat] = {
    f.name: f
    for f in (
        AudioFormat("pcm_24000", 24_000, PCM_S16LE, 2),
        AudioFormat("pcm_16000", 16_000, PCM_S16LE, 2),
        AudioFormat("pcm_8000", 8_000, PCM_S16LE, 2),
        AudioFormat("ulaw_8000", 8_000, ULAW, 1),
        AudioFormat("alaw_8000", 8_000, ALAW, 1),
    )
}
DEFAULT_FORMAT = "pcm_24000"
FORMAT_NAMES: tuple[str, ...] = tuple(FORMATS)


def get_format(fmt: str | AudioFormat) -> AudioFormat:
    """The format named `fmt` (or `fmt` itself); ValueError for an unknown name."""
    if isinstance(fmt, AudioFormat):
        return fmt
    try:
        return FORMATS[fmt]
    except (KeyError, TypeError):
        raise ValueError(f"unknown audio format {fmt!r}; known: {', '.join(FORMAT_NAMES)}") from None


# ---------------------------------------------------------------------------------------------
# Encoder (server side, one per call)
# ---------------------------------------------------------------------------------------------


class FrameEncoder:
    """Turns the call's 24 kHz float frames into wire messages of one format; state per call."""

    def __init__(self, fmt: str | AudioFormat = DEFAULT_FORMAT):
        self.format = get_format(fmt)
        self.latency_samples = soxr_latency_samples(self.format.sample_rate)
        self._stream = self._new_stream()
        self._pending = np.zeros(self.latency_samples, np.float32)

    @property
    def latency_ms(self) -> float:
        """How far the frames' audio runs behind the model's timeline (0 at 24 kHz)."""
        return 1000.0 * self.latency_samples / self.format.sample_rate

    def reset(self) -> None:
        """Forget the audio fed so far: call when the next frame does not continue the last one
        (a new utterance, a rollback, frames skipped). The next frame starts with the latency's
        silence again."""
        if self._stream is not None:
            self._stream.clear()
        self._pending = np.zeros(self.latency_samples, np.float32)

    def encode(self, frame: np.ndarray) -> bytes:
        """One binary message from one 1920-sample float frame in [-1, 1] (clipped)."""
        frame = np.asarray(frame)
        if frame.shape != (FRAME_SAMPLES,):
            raise ValueError(f"expected a ({FRAME_SAMPLES},) frame, got shape {frame.shape}")
        if not np.issubdtype(frame.dtype, np.floating):
            raise TypeError(f"expected float samples, got {frame.dtype}")
        return encode_samples(self._resample(frame.astype(np.float32, copy=False)), self.format)

    def _resample(self, frame: np.ndarray) -> np.ndarray:
        if self._stream is None:
            return frame
        pending = np.concatenate([self._pending, self._stream.resample_chunk(frame)])
        n = self.format.frame_samples
        if len(pending) < n:  # soxr released less than its measured latency allows: never seen
            pending = np.concatenate([pending, np.zeros(n - len(pending), np.float32)])
        out, self._pending = pending[:n], pending[n:]
        return out

    def _new_stream(self) -> soxr.ResampleStream | None:
        if self.format.sample_rate == SAMPLE_RATE:
            return None
        return _resample_stream(self.format.sample_rate)


def _resample_stream(rate: int) -> soxr.ResampleStream:
    # vr=True at a fixed ratio: soxr's variable-rate engine releases output at a constant delay
    # (the fixed-rate one bunches it into blocks), with passband flat to 0.95 × Nyquist and
    # > 110 dB alias rejection (measured; see tests/test_formats.py).
    return soxr.ResampleStream(SAMPLE_RATE, rate, 1, dtype="float32", quality="HQ", vr=True)


@functools.lru_cache(maxsize=None)
def soxr_latency_samples(rate: int, probe_frames: int = 50) -> int:
    """Output samples soxr holds back at `rate`: the most the output ever lags `frames × n`,
    measured once on silence (soxr's output counts do not depend on the samples' values)."""
    if rate == SAMPLE_RATE:
        return 0
    stream = _resample_stream(rate)
    n = rate * FRAME_SAMPLES // SAMPLE_RATE
    produced, lag = 0, 0
    silence = np.zeros(FRAME_SAMPLES, np.float32)
    for k in range(1, probe_frames + 1):
        produced += len(stream.resample_chunk(silence))
        lag = max(lag, k * n - produced)
    return lag


def encode_samples(samples: np.ndarray, fmt: str | AudioFormat) -> bytes:
    """`<u32 count><payload>` for float samples already at the format's rate."""
    fmt = get_format(fmt)
    pcm = float_to_pcm16(samples)
    if fmt.encoding == ULAW:
        payload = ulaw_encode(pcm).tobytes()
    elif fmt.encoding == ALAW:
        payload = alaw_encode(pcm).tobytes()
    else:
        payload = pcm.astype("<i2", copy=False).tobytes()
    return FRAME_HEADER.pack(len(pcm)) + payload


def float_to_pcm16(samples: np.ndarray) -> np.ndarray:
    """Clip to [-1, 1], scale by 32767, round: the same mapping as protocol.encode_audio_frame."""
    return np.rint(np.clip(np.asarray(samples, np.float32), -1.0, 1.0) * 32767.0).astype(np.int16)


# ---------------------------------------------------------------------------------------------
# Client side
# ---------------------------------------------------------------------------------------------


def decode_frame(data: bytes | bytearray | memoryview, fmt: str | AudioFormat = DEFAULT_FORMAT) -> np.ndarray:
    """int16 samples (at the format's rate) of one binary message; ValueError on a bad length."""
    fmt = get_format(fmt)
    data = bytes(data)
    if len(data) < FRAME_HEADER.size:
        raise ValueError(f"audio frame of {len(data)} bytes has no 4-byte length prefix")
    (count,) = FRAME_HEADER.unpack_from(data)
    payload = data[FRAME_HEADER.size:]
    if len(payload) != count * fmt.bytes_per_sample:
        raise ValueError(f"{fmt.name} frame prefix says {count} samples "
                         f"({count * fmt.bytes_per_sample} bytes) but carries {len(payload)} bytes")
    if fmt.encoding == ULAW:
        return ulaw_decode(np.frombuffer(payload, np.uint8))
    if fmt.encoding == ALAW:
        return alaw_decode(np.frombuffer(payload, np.uint8))
    return np.frombuffer(payload, "<i2").astype(np.int16)


def decode_samples(payload: bytes | bytearray | memoryview, fmt: str | AudioFormat) -> np.ndarray:
    """int16 samples (at the format's rate) of headerless audio in a wire format: what a client
    sends as a caller's turn. ValueError when the bytes are not whole samples."""
    fmt = get_format(fmt)
    if len(payload) % fmt.bytes_per_sample:
        raise ValueError(f"{len(payload)} bytes are not whole {fmt.name} samples of {fmt.bytes_per_sample} bytes")
    if fmt.encoding == ULAW:
        return ulaw_decode(np.frombuffer(payload, np.uint8))
    if fmt.encoding == ALAW:
        return alaw_decode(np.frombuffer(payload, np.uint8))
    return np.frombuffer(payload, "<i2").astype(np.int16)


# ---------------------------------------------------------------------------------------------
# G.711 (ITU-T G.711 segment coding, vectorised). Encoders take int16 PCM; like the classic
# reference coders they first drop to 14 bits (µ-law) or 13 bits (A-law) with an arithmetic
# shift, so results match Python's audioop bit for bit.
# ---------------------------------------------------------------------------------------------

_ULAW_BIAS = 0x21  # 33, added in the 14-bit domain so every segment starts at a power of two
_ULAW_MAX = 0x1FFF  # biased 14-bit magnitude that codes as segment 7, step 15


def ulaw_encode(pcm: np.ndarray) -> np.ndarray:
    """int16 PCM -> µ-law bytes (uint8)."""
    v = np.asarray(pcm, np.int16).astype(np.int32) >> 2
    negative = v < 0
    magnitude = np.minimum(np.abs(v) + _ULAW_BIAS, _ULAW_MAX)
    segment = np.floor(np.log2(magnitude)).astype(np.int32) - 5  # magnitude >= 33: segment >= 0
    step = (magnitude >> (segment + 1)) & 0x0F
    code = (segment << 4) | step | np.where(negative, 0x80, 0)
    return (~code & 0xFF).astype(np.uint8)  # G.711 transmits µ-law inverted: 0x80 set = positive


def alaw_encode(pcm: np.ndarray) -> np.ndarray:
    """int16 PCM -> A-law bytes (uint8)."""
    v = np.asarray(pcm, np.int16).astype(np.int32) >> 3
    negative = v < 0
    magnitude = np.where(negative, ~v, v)  # one's complement: -1 -> 0, symmetric around -0.5
    segment = np.maximum(np.floor(np.log2(np.maximum(magnitude, 1))).astype(np.int32) - 4, 0)
    step = (magnitude >> np.maximum(segment, 1)) & 0x0F
    code = (segment << 4) | step
    return (code ^ np.where(negative, 0x55, 0xD5)).astype(np.uint8)  # even bits inverted; 0x80 = positive


def _ulaw_table() -> np.ndarray:
    code = ~np.arange(256, dtype=np.int32) & 0xFF
    segment, step = (code >> 4) & 0x07, code & 0x0F
    magnitude = (((step << 3) + (_ULAW_BIAS << 2)) << segment) - (_ULAW_BIAS << 2)
    return np.where(code & 0x80, -magnitude, magnitude).astype(np.int16)


def _alaw_table() -> np.ndarray:
    code = np.arange(256, dtype=np.int32) ^ 0x55
    segment, step = (code >> 4) & 0x07, code & 0x0F
    # the middle of the step's interval, in 16-bit units (13-bit value << 3)
    magnitude = np.where(segment == 0, (step << 4) + 8, ((step << 4) + 0x108) << np.maximum(segment - 1, 0))
    return np.where(code & 0x80, magnitude, -magnitude).astype(np.int16)


_ULAW_DECODE = _ulaw_table()
_ALAW_DECODE = _alaw_table()


def ulaw_decode(codes: np.ndarray) -> np.ndarray:
    """µ-law bytes -> int16 PCM."""
    return _ULAW_DECODE[np.asarray(codes, np.uint8)]


def alaw_decode(codes: np.ndarray) -> np.ndarray:
    """A-law bytes -> int16 PCM."""
    return _ALAW_DECODE[np.asarray(codes, np.uint8)]
