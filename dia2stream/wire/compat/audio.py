"""Audio for the compatible APIs: the call's 24 kHz float frames as one stream of bytes in the
format a hosted API's client asked for (PCM at any of its rates, float PCM, G.711, MP3).

    encoder = StreamEncoder(parse_format("mp3_22050_32"))   # one per stream of audio (a context)
    chunk = encoder.encode(frame)    # bytes for one 80 ms frame (may be short or empty for MP3)
    tail = encoder.finish()          # what the resampler and the MP3 encoder still hold

Unlike the native protocol's frames, these APIs carry plain byte streams with no per-message
sample count, so the resampler's output is passed on as it comes (soxr's variable-rate engine,
as `wire.formats` uses, releases it at a constant delay) and flushed at the end of a stream.
MP3 comes from LAME through `lameenc` (a maintained binding with its own wheels), fed 16-bit PCM.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np
import soxr

from dia2stream.clock import SAMPLE_RATE
from dia2stream.wire.formats import alaw_encode, float_to_pcm16, ulaw_encode

PCM_S16LE, PCM_F32LE, ULAW, ALAW, MP3 = "pcm_s16le", "pcm_f32le", "ulaw", "alaw", "mp3"
PCM_RATES = (8_000, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000)
MP3_RATES = (22_050, 24_000, 44_100)  # MPEG-2 / MPEG-1 layer III rates LAME writes without resampling again
MP3_BITRATES = (32, 64, 96, 128, 192)


@dataclass(frozen=True)
class StreamFormat:
    """One output format: `codec` is one of PCM_S16LE, PCM_F32LE, ULAW, ALAW, MP3."""

    codec: str
    sample_rate: int
    bitrate_kbps: int | None = None  # MP3 only

    @property
    def mime_type(self) -> str:
        return {MP3: "audio/mpeg", ULAW: "audio/basic"}.get(self.codec, "audio/pcm")


def parse_elevenlabs_format(name: str) -> StreamFormat:
    """ElevenLabs' `output_format` (`pcm_24000`, `ulaw_8000`, `alaw_8000`, `mp3_22050_32`, ...);
    ValueError naming what is supported otherwise."""
    parts = name.split("_") if isinstance(name, str) else []
    mp3 = None
    try:
        if len(parts) == 2 and parts[0] == "pcm" and int(parts[1]) in PCM_RATES:
            return StreamFormat(PCM_S16LE, int(parts[1]))
        if len(parts) == 2 and parts[0] in ("ulaw", "alaw") and parts[1] == "8000":
            return StreamFormat(ULAW if parts[0] == "ulaw" else ALAW, 8_000)
        if len(parts) == 3 and parts[0] == "mp3" and int(parts[1]) in MP3_RATES and int(parts[2]) in MP3_BITRATES:
            mp3 = StreamFormat(MP3, int(parts[1]), int(parts[2]))
    except ValueError:
        pass
    if mp3 is not None:
        if importlib.util.find_spec("lameenc") is None:
            raise ValueError(f"output_format {name!r}: this server has no MP3 encoder (pip install "
                             "dia2stream[compat]); use pcm_<rate>, ulaw_8000 or alaw_8000")
        return mp3
    raise ValueError(f"output_format {name!r} is not supported; use pcm_<rate> ({', '.join(map(str, PCM_RATES))}), "
                     f"ulaw_8000, alaw_8000 or mp3_<rate>_<kbps> (rates {', '.join(map(str, MP3_RATES))}, "
                     f"kbps {', '.join(map(str, MP3_BITRATES))})")


class StreamEncoder:
    """24 kHz float frames → a byte stream of one `StreamFormat`; state per stream."""

    def __init__(self, fmt: StreamFormat):
        self.format = fmt
        self._resampler = None if fmt.sample_rate == SAMPLE_RATE else soxr.ResampleStream(
            SAMPLE_RATE, fmt.sample_rate, 1, dtype="float32", quality="HQ", vr=True)
        self._mp3 = _mp3_encoder(fmt) if fmt.codec == MP3 else None
        self.samples_out = 0  # samples at the output rate handed to the codec so far

    def encode(self, frame: np.ndarray) -> bytes:
        samples = np.asarray(frame, dtype=np.float32)
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples)
        return self._code(samples)

    def finish(self) -> bytes:
        """The end of the stream: what the resampler holds back, and the MP3 encoder's last frame."""
        out = b""
        if self._resampler is not None:
            out = self._code(self._resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        if self._mp3 is not None:
            out += bytes(self._mp3.flush())
        return out

    def _code(self, samples: np.ndarray) -> bytes:
        self.samples_out += len(samples)
        codec = self.format.codec
        if codec == PCM_F32LE:
            return np.clip(samples, -1.0, 1.0).astype("<f4").tobytes()
        pcm = float_to_pcm16(samples)
        if codec == PCM_S16LE:
            return pcm.astype("<i2").tobytes()
        if codec == ULAW:
            return ulaw_encode(pcm).tobytes()
        if codec == ALAW:
            return alaw_encode(pcm).tobytes()
        return bytes(self._mp3.encode(pcm.astype("<i2").tobytes()))


def _mp3_encoder(fmt: StreamFormat):
    import lameenc  # optional: only MP3 output needs it (the [compat] extra)

    encoder = lameenc.Encoder()
    encoder.set_bit_rate(fmt.bitrate_kbps)
    encoder.set_in_sample_rate(fmt.sample_rate)
    encoder.set_out_sample_rate(fmt.sample_rate)
    encoder.set_channels(1)
    encoder.set_quality(5)  # LAME's speed/quality middle ground: real time is what matters here
    return encoder
