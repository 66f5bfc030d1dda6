"""Wire audio formats (dia2stream/formats.py): streaming resampling without clicks, G.711, headers,
reset, and `format` validation in the protocol."""

from __future__ import annotations

import json
import struct
import warnings

import numpy as np
import pytest
import soxr

from dia2stream.wire import formats
from dia2stream.wire import protocol as p
from dia2stream.wire.formats import (
    FORMAT_NAMES,
    FORMATS,
    FrameEncoder,
    alaw_decode,
    alaw_encode,
    decode_frame,
    encode_samples,
    float_to_pcm16,
    ulaw_decode,
    ulaw_encode,
)

RATE = 24_000
FRAME = 1_920
TONE_HZ = 1_000.0


def sine(seconds: float, hz: float = TONE_HZ, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def frames_of(signal: np.ndarray) -> list[np.ndarray]:
    return [signal[i:i + FRAME] for i in range(0, len(signal) - FRAME + 1, FRAME)]


def stream_through(name: str, signal: np.ndarray) -> tuple[np.ndarray, list[bytes]]:
    """Encode `signal` frame by frame; return the decoded audio (float) and the messages."""
    encoder = FrameEncoder(name)
    messages = [encoder.encode(f) for f in frames_of(signal)]
    audio = np.concatenate([decode_frame(m, name) for m in messages]).astype(np.float64) / 32767
    return audio, messages


def off_tone_fraction(audio: np.ndarray, rate: int, hz: float = TONE_HZ, band_hz: float = 30.0) -> float:
    """Share of the energy further than `band_hz` from the tone (Blackman window: low leakage)."""
    spectrum = np.abs(np.fft.rfft(audio * np.blackman(len(audio)))) ** 2
    freqs = np.fft.rfftfreq(len(audio), 1 / rate)
    return float(spectrum[np.abs(freqs - hz) > band_hz].sum() / spectrum.sum())


def steady(audio: np.ndarray, rate: int) -> np.ndarray:
    """Drop the first 0.2 s (the latency's silence and the filter's start) and keep whole seconds."""
    return audio[rate // 5: rate // 5 + 2 * rate]


# ---------------------------------------------------------------------------------------------
# Streaming resampling: no discontinuity at frame edges
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_sine_frame_by_frame_has_no_edge_discontinuity(name):
    fmt = FORMATS[name]
    audio, _ = stream_through(name, sine(2.6))
    one_shot = soxr.resample(sine(2.6), RATE, fmt.sample_rate, quality="HQ").astype(np.float64)
    if fmt.encoding != "pcm_s16le":  # compare like with like: the one-shot audio through G.711 too
        one_shot = decode_frame(encode_samples(one_shot, fmt), fmt).astype(np.float64) / 32767
    streamed = off_tone_fraction(steady(audio, fmt.sample_rate), fmt.sample_rate)
    reference = off_tone_fraction(steady(one_shot, fmt.sample_rate), fmt.sample_rate)
    # int16 PCM: both ~1e-10; G.711: both ~1e-4 (its quantisation noise). A click every 80 ms
    # would lift the streamed figure by orders of magnitude (see the stateless test below).
    assert streamed <= 2 * reference + 1e-9, (streamed, reference)


def test_the_spectral_check_catches_frames_resampled_one_by_one():
    """A stateless resampler (each frame alone) clicks at every frame edge: the check sees it."""
    signal = sine(2.6)
    chopped = np.concatenate([soxr.resample(f, RATE, 8_000, quality="HQ") for f in frames_of(signal)])
    whole = soxr.resample(signal, RATE, 8_000, quality="HQ")
    assert off_tone_fraction(steady(chopped, 8_000), 8_000) > 100 * off_tone_fraction(steady(whole, 8_000), 8_000)


@pytest.mark.parametrize("name", ["pcm_16000", "pcm_8000"])
def test_frame_by_frame_equals_one_chunk_after_the_latency(name):
    """Chunking into frames changes nothing: the samples are those of the whole signal resampled in
    one piece by the same soxr engine, shifted by the encoder's latency (which is silence)."""
    rate = FORMATS[name].sample_rate
    signal = np.random.default_rng(3).uniform(-0.9, 0.9, 30 * FRAME).astype(np.float32)
    encoder = FrameEncoder(name)
    streamed = np.concatenate([decode_frame(encoder.encode(f), name) for f in frames_of(signal)])
    whole = float_to_pcm16(formats._resample_stream(rate).resample_chunk(signal))
    lag = encoder.latency_samples
    assert not streamed[:lag].any(), "the latency is silence"
    assert np.array_equal(streamed[lag:], whole[: len(streamed) - lag])


# ---------------------------------------------------------------------------------------------
# Headers and sizes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, samples, size", [
    ("pcm_24000", 1920, 4 + 3840), ("pcm_16000", 1280, 4 + 2560), ("pcm_8000", 640, 4 + 1280),
    ("ulaw_8000", 640, 4 + 640), ("alaw_8000", 640, 4 + 640)])
def test_every_frame_header_counts_its_samples(name, samples, size):
    fmt = FORMATS[name]
    assert (fmt.frame_samples, fmt.frame_bytes) == (samples, size)
    _, messages = stream_through(name, np.random.default_rng(0).uniform(-1, 1, 40 * FRAME).astype(np.float32))
    for message in messages:  # the first one (shortened by soxr's delay) included
        assert len(message) == size
        assert struct.unpack_from("<I", message)[0] == samples
        assert len(decode_frame(message, name)) == samples


def test_pcm_24000_is_byte_identical_to_the_protocol_encoder():
    frame = np.random.default_rng(1).uniform(-1.2, 1.2, FRAME).astype(np.float32)
    assert FrameEncoder("pcm_24000").encode(frame) == p.encode_audio_frame(frame)
    assert FrameEncoder().format.name == "pcm_24000"


def test_decode_frame_rejects_wrong_lengths():
    with pytest.raises(ValueError):
        decode_frame(b"\x01\x00", "pcm_8000")
    with pytest.raises(ValueError):  # 640 samples of µ-law are 640 bytes, not 1280
        decode_frame(struct.pack("<I", 640) + bytes(1280), "ulaw_8000")
    with pytest.raises(ValueError):
        decode_frame(struct.pack("<I", 640) + bytes(640), "pcm_8000")
    with pytest.raises(ValueError):
        FrameEncoder("mp3_44100")


def test_encoder_refuses_frames_of_the_wrong_shape_or_type():
    encoder = FrameEncoder("pcm_8000")
    with pytest.raises(ValueError):
        encoder.encode(np.zeros(1000, np.float32))
    with pytest.raises(TypeError):
        encoder.encode(np.zeros(FRAME, np.int16))


# ---------------------------------------------------------------------------------------------
# Reset
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_reset_forgets_the_past(name):
    """After reset the output is exactly that of a fresh encoder, whatever came before."""
    rng = np.random.default_rng(2)
    frames = frames_of(rng.uniform(-0.5, 0.5, 6 * FRAME).astype(np.float32))
    used = FrameEncoder(name)
    for f in frames_of(sine(0.5)):
        used.encode(f)
    used.reset()
    fresh = FrameEncoder(name)
    assert [used.encode(f) for f in frames] == [fresh.encode(f) for f in frames]


def test_without_reset_the_stream_continues():
    """Not resetting keeps soxr's held-back audio: the next frame starts with the previous tail."""
    encoder = FrameEncoder("pcm_8000")
    for f in frames_of(sine(0.5)):
        encoder.encode(f)
    after_tone = decode_frame(encoder.encode(np.zeros(FRAME, np.float32)), "pcm_8000")
    assert np.abs(after_tone[: encoder.latency_samples // 2]).max() > 1000  # the tone's tail
    encoder.reset()
    assert not decode_frame(encoder.encode(np.zeros(FRAME, np.float32)), "pcm_8000").any()


def test_latency_is_constant_and_small():
    assert FrameEncoder("pcm_24000").latency_samples == 0
    assert 0 < FrameEncoder("pcm_16000").latency_ms <= 20
    assert 0 < FrameEncoder("ulaw_8000").latency_ms <= 40


# ---------------------------------------------------------------------------------------------
# G.711
# ---------------------------------------------------------------------------------------------

ALL_INT16 = np.arange(-32768, 32768, dtype=np.int16)


@pytest.mark.parametrize("encode, decode", [(ulaw_encode, ulaw_decode), (alaw_encode, alaw_decode)])
def test_g711_round_trip_within_half_a_step(encode, decode):
    decoded = decode(encode(ALL_INT16)).astype(np.int32)
    error = np.abs(decoded - ALL_INT16.astype(np.int32))
    # log-PCM: the step doubles with each segment; the error stays within half a step plus the
    # bits dropped to 14/13 bits (at most 11 at the bottom, ~5 % above), except past the top code.
    inside = np.abs(ALL_INT16.astype(np.int32)) <= 32124
    assert np.all(error[inside] <= np.maximum(12, np.abs(ALL_INT16[inside].astype(np.int32)) / 16))
    assert np.all(np.abs(decoded) <= 32256)
    # codes are monotonic in the value: no segment is out of order
    assert np.all(np.diff(decoded) >= 0)


@pytest.mark.parametrize("encode, decode", [(ulaw_encode, ulaw_decode), (alaw_encode, alaw_decode)])
def test_g711_every_code_decodes_and_re_encodes_to_itself(encode, decode):
    codes = np.arange(256, dtype=np.uint8)
    again = encode(decode(codes))
    same = again == codes
    # µ-law has two zeros (0x7F "negative zero" and 0xFF); both decode to 0, which codes as 0xFF
    assert np.all(same | ((codes == 0x7F) & (again == 0xFF))), codes[~same]


def test_g711_known_codes():
    assert ulaw_encode(np.array([0, 32767, -32768]) .astype(np.int16)).tolist() == [0xFF, 0x80, 0x00]
    assert alaw_encode(np.array([0, 32767, -32768]).astype(np.int16)).tolist() == [0xD5, 0xAA, 0x2A]


@pytest.mark.parametrize("lin2, to_lin, encode, decode", [
    ("lin2ulaw", "ulaw2lin", ulaw_encode, ulaw_decode), ("lin2alaw", "alaw2lin", alaw_encode, alaw_decode)])
def test_g711_matches_audioop_bit_for_bit(lin2, to_lin, encode, decode):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")  # gone in Python 3.13
    ref = np.frombuffer(getattr(audioop, lin2)(ALL_INT16.astype("<i2").tobytes(), 2), np.uint8)
    assert np.array_equal(encode(ALL_INT16), ref)
    table = np.frombuffer(getattr(audioop, to_lin)(bytes(range(256)), 2), "<i2")
    assert np.array_equal(decode(np.arange(256)), table)


@pytest.mark.parametrize("name", ["ulaw_8000", "alaw_8000"])
def test_g711_frames_carry_the_pcm_8000_audio(name):
    signal = sine(1.0, hz=440.0, amplitude=0.3)
    pcm, _ = stream_through("pcm_8000", signal)
    g711, _ = stream_through(name, signal)
    assert np.max(np.abs(g711 - pcm)) < 0.3 / 32 + 1e-3  # within G.711's error at that level
    snr = 10 * np.log10(np.sum(pcm ** 2) / np.sum((g711 - pcm) ** 2))
    assert snr > 30, snr


# ---------------------------------------------------------------------------------------------
# Protocol: `format` on start/reset, `ready.formats`
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", [{"cmd": "start", "text": "[S1] Hi."}, {"cmd": "reset"}])
def test_format_field_on_start_and_reset(cmd):
    for name in FORMAT_NAMES:
        command = p.parse_command(json.dumps({**cmd, "format": name}))
        assert command.format == name
        assert json.loads(p.command_to_json(command))["format"] == name
    assert p.parse_command(json.dumps(cmd)).format is None  # absent: the call keeps its format
    for bad in ["mp3", "PCM_24000", "", 8000, True, ["ulaw_8000"]]:
        with pytest.raises(p.ProtocolError) as err:
            p.parse_command(json.dumps({**cmd, "format": bad, "id": "x"}))
        assert err.value.code == "invalid_field" and "'format'" in err.value.message
        assert err.value.id == "x" and err.value.cmd == cmd["cmd"]


def test_format_is_not_a_field_of_other_commands():
    with pytest.raises(p.ProtocolError) as err:
        p.parse_command(json.dumps({"cmd": "inject", "text": "hi", "format": "ulaw_8000"}))
    assert err.value.code == "invalid_field"


def test_ready_lists_the_formats():
    ready = p.Ready(model="tiny", device="cpu", voices=[], max_lead_ms=1000)
    assert json.loads(ready.to_json())["formats"] == list(FORMATS)
    assert p.parse_event(ready.to_json()).formats == list(FORMAT_NAMES)
