"""Voice input under abuse (issue 13): audio refused from its header before decoding (finding 5)
and a disk cache of prepared voices bounded by size with LRU eviction (finding 9, disk half)."""

from __future__ import annotations

import io
import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dia2stream.voices import voice as v
from dia2stream.voices.voice import VoiceCache, VoiceError, read_audio


def constant_flac(seconds: float, channels: int, rate: int = 48_000) -> bytes:
    """A constant signal compresses to almost nothing in FLAC: small on the wire, huge decoded."""
    buf = io.BytesIO()
    block = np.full((rate, channels), 0.25, dtype=np.float32)
    with sf.SoundFile(buf, "w", samplerate=rate, channels=channels, format="FLAC", subtype="PCM_16") as f:
        for _ in range(int(seconds)):
            f.write(block)
    return buf.getvalue()


def short_wav(seconds=0.5, channels=1, rate=16_000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    wav = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, np.stack([wav] * channels, axis=1), rate, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = constant_flac(60, 8)  # 60 s x 8 ch x 48 kHz: 92 MB as float32, ~30 KB as FLAC
    assert len(data) < 200_000
    return data


def no_decode(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the audio was decoded before its header was checked")

    monkeypatch.setattr(v.sf, "read", refuse)


def test_long_many_channel_flac_is_refused_from_the_header_without_decoding(bomb, monkeypatch):
    no_decode(monkeypatch)
    with pytest.raises(VoiceError) as info:
        read_audio(bomb, 30.0, max_channels=8)  # channels allowed: the length alone refuses it
    assert info.value.code == "bad_audio" and "longer than" in info.value.message
    with pytest.raises(VoiceError) as info:
        read_audio(bomb, 300.0)  # long enough: the channel count refuses it
    assert info.value.code == "bad_audio" and "8 channels" in info.value.message


def test_refusing_a_bomb_costs_little_memory(bomb):
    tracemalloc.start()
    try:
        with pytest.raises(VoiceError):
            read_audio(bomb, 30.0, max_channels=8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024  # the old code decoded all of it first: ~92 MB


@pytest.mark.parametrize("data, words", [
    (short_wav(channels=3), "3 channels"),
    (short_wav(seconds=3.0), "longer than"),
    (short_wav(rate=4_000), "sample rate 4000"),
])
def test_header_checks(data, words, monkeypatch):
    no_decode(monkeypatch)
    with pytest.raises(VoiceError) as info:
        read_audio(data, 2.0)
    assert info.value.code == "bad_audio" and words in info.value.message


def test_decode_is_bounded_even_if_the_header_understates(monkeypatch):
    seen = {}
    real = v.sf.read

    def spy(file, *args, **kwargs):
        seen.update(kwargs)
        return real(file, *args, **kwargs)

    monkeypatch.setattr(v.sf, "read", spy)
    wav = read_audio(short_wav(seconds=0.5, channels=2), 2.0)
    assert abs(len(wav) - 12_000) <= 1 and wav.dtype == np.float32
    assert seen["frames"] == 2 * 16_000 + 1  # at most max_seconds (+1 to detect more) decoded


def test_unreadable_and_empty_are_bad_audio():
    for data in (b"", b"not audio at all", b"RIFF\x00\x00\x00\x00WAVE"):
        with pytest.raises(VoiceError) as info:
            read_audio(data, 30.0)
        assert info.value.code == "bad_audio"


# --- VoiceCache ---------------------------------------------------------------------------


class FakeState:
    """Stands in for VoiceState: save() writes a marker and a blob of a given size."""

    def __init__(self, key: str, size: int) -> None:
        self.key, self.size = key, size

    def save(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "state.safetensors").write_bytes(b"\x00" * self.size)
        (directory / "voice.json").write_text(json.dumps({"key": self.key}))


@pytest.fixture
def fake_load(monkeypatch):
    def load(directory, device="cpu"):
        meta = json.loads((Path(directory) / "voice.json").read_text())
        if "broken" in meta:
            raise ValueError("truncated")
        return FakeState(meta["key"], 0)

    monkeypatch.setattr(v.VoiceState, "load", staticmethod(load))


def age(cache: VoiceCache, key: str, seconds_ago: float) -> None:
    t = 1_700_000_000 - seconds_ago
    os.utime(cache.directory(key) / "voice.json", (t, t))


def key(i: int) -> str:
    return f"{i:032x}" + "0" * 32  # entries are named by the first 32 hex digits


def test_cache_evicts_least_recently_used_past_the_limit(tmp_path, fake_load):
    cache = VoiceCache(tmp_path / "states", max_bytes=3_500)
    for i in range(3):
        cache.save(key(i), FakeState(key(i), 1_000))
        age(cache, key(i), 100 - i)  # 0 oldest, 2 newest
    assert cache.load(key(0)) is not None  # a load is a use: 0 becomes the newest
    cache.save(key(3), FakeState(key(3), 1_000))  # 4 x ~1 KB > 3.5 KB: one must go
    present = {i for i in range(4) if cache.directory(key(i)).exists()}
    assert present == {0, 2, 3}  # 1 was the least recently used
    assert cache.size() <= 3_500


def test_cache_never_evicts_the_entry_just_saved(tmp_path, fake_load):
    cache = VoiceCache(tmp_path / "states", max_bytes=500)
    cache.save(key(0), FakeState(key(0), 100))
    cache.save(key(1), FakeState(key(1), 2_000))  # alone over the limit: kept, the other goes
    assert not cache.directory(key(0)).exists()
    assert cache.load(key(1)).key == key(1)


def test_cache_miss_wrong_key_and_broken_entries(tmp_path, fake_load):
    cache = VoiceCache(tmp_path / "states", max_bytes=None)
    assert cache.load(key(5)) is None
    cache.save(key(5), FakeState(key(5), 10))
    assert cache.load(key(5)[:32] + "f" * 32) is None  # same folder, other full key
    (cache.directory(key(5)) / "voice.json").write_text(json.dumps({"key": key(5), "broken": 1}))
    assert cache.load(key(5)) is None and not cache.directory(key(5)).exists()
    assert cache.prune() == []  # no limit: nothing evicted
    assert not [p for p in cache.root.iterdir() if p.name.startswith(".partial-")]
