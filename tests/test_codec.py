"""MimiCodec: streaming == batch, special ids, snapshots, resets, loading. CPU, random weights."""

import pytest
import torch

from vendor_dia2.codec import (
    CODEBOOK_SIZE,
    FRAME_SAMPLES,
    NUM_CODEBOOKS,
    CodecLoadError,
    MimiCodec,
    sanitize_codes,
)

ATOL = 1e-5


@pytest.fixture(scope="module")
def small():
    return MimiCodec.load("random-small")


def random_codes(batch, frames, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, CODEBOOK_SIZE, (batch, NUM_CODEBOOKS, frames), generator=gen)


def stream_decode(codec, codes):
    """codes [B, 32, F] frame by frame through the open stream -> [B, F * 1920]."""
    return torch.cat([codec.decode_frame(codes[:, :, t]) for t in range(codes.shape[-1])], dim=-1)


def test_sanitize_maps_out_of_range_to_zero():
    codes = torch.tensor([-2, -1, 0, 5, 2047, 2048, 2049, 99999])
    assert sanitize_codes(codes).tolist() == [0, 0, 0, 5, 2047, 0, 0, 0]


def test_streaming_matches_batch_small(small):
    codes = random_codes(2, 6)
    batch = small.decode(codes)
    assert batch.shape == (2, 1, 6 * FRAME_SAMPLES) and batch.dtype == torch.float32
    assert batch.abs().max() <= 1.0
    small.open_stream(2)
    streamed = stream_decode(small, codes)
    torch.testing.assert_close(streamed, batch[:, 0], atol=ATOL, rtol=0)


def test_streaming_matches_batch_full_size():
    codec = MimiCodec.load("random")
    assert sum(p.numel() for p in codec.model.parameters()) > 70_000_000
    codes = random_codes(1, 4, seed=1)
    batch = codec.decode(codes)
    codec.open_stream(1)
    streamed = stream_decode(codec, codes)
    torch.testing.assert_close(streamed, batch[:, 0], atol=ATOL, rtol=0)


def test_codes_matter(small):
    """Random codebooks are initialised (moshi leaves them at zero): codes change the audio."""
    a, b = random_codes(1, 3, seed=2), random_codes(1, 3, seed=3)
    assert (small.decode(a) - small.decode(b)).abs().max() > 1e-4


@pytest.mark.parametrize("special", [2048, 2049, -2])
def test_special_ids_decode_like_zero(small, special):
    codes = random_codes(1, 4, seed=4)
    codes[0, ::3, 1] = special  # a few codebooks of frame 1
    codes[0, :, 3] = special  # the whole of frame 3
    zeroed = codes.clone()
    zeroed[zeroed == special] = 0
    assert torch.equal(small.decode(codes), small.decode(zeroed))
    small.open_stream(1)
    special_stream = stream_decode(small, codes)
    small.open_stream(1)
    assert torch.equal(special_stream, stream_decode(small, zeroed))


def test_snapshot_restore_replays_identically(small):
    codes = random_codes(2, 8, seed=5)
    small.open_stream(2)
    stream_decode(small, codes[:, :, :3])
    snap = small.snapshot_stream()
    first = stream_decode(small, codes[:, :, 3:6])
    small.restore_stream(snap)
    again = stream_decode(small, codes[:, :, 3:6])
    assert torch.equal(first, again)
    # The snapshot holds copies: decoding more did not change it, so it restores twice.
    stream_decode(small, codes[:, :, 6:8])
    small.restore_stream(snap)
    assert torch.equal(first, stream_decode(small, codes[:, :, 3:6]))


def test_reset_equals_fresh_stream(small):
    codes = random_codes(2, 5, seed=6)
    small.open_stream(2)
    fresh = stream_decode(small, codes)
    stream_decode(small, random_codes(2, 4, seed=7))
    small.reset_stream()
    torch.testing.assert_close(stream_decode(small, codes), fresh, atol=1e-6, rtol=0)


def test_reset_mask_resets_only_chosen_rows(small):
    history, codes = random_codes(2, 3, seed=8), random_codes(2, 4, seed=9)
    small.open_stream(2)
    fresh = stream_decode(small, codes)
    small.reset_stream()
    stream_decode(small, history)
    continued_snap = small.snapshot_stream()
    continued = stream_decode(small, codes)
    small.restore_stream(continued_snap)
    small.reset_stream(torch.tensor([True, False]))
    out = stream_decode(small, codes)
    torch.testing.assert_close(out[0], fresh[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], continued[1], atol=1e-6, rtol=0)


def test_warm_stream_equals_frame_by_frame(small):
    prefix, codes = random_codes(1, 7, seed=10), random_codes(1, 3, seed=11)
    small.open_stream(1)
    stream_decode(small, prefix)
    expected = stream_decode(small, codes)
    small.open_stream(1)
    small.warm_stream(prefix)
    torch.testing.assert_close(stream_decode(small, codes), expected, atol=ATOL, rtol=0)


def test_encode_shape_and_dtype(small):
    wav = 0.1 * torch.randn(2, 1, 3 * FRAME_SAMPLES + 100, generator=torch.Generator().manual_seed(0))
    codes = small.encode(wav)
    assert codes.shape == (2, NUM_CODEBOOKS, 4) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < CODEBOOK_SIZE
    assert small.encode(wav[0, 0]).shape == (1, NUM_CODEBOOKS, 4)
    assert small.decode(codes).shape == (2, 1, 4 * FRAME_SAMPLES)


def test_encode_and_batch_decode_leave_open_stream_alone(small):
    codes = random_codes(1, 4, seed=12)
    small.open_stream(1)
    expected = stream_decode(small, codes)
    small.open_stream(1)
    out = [small.decode_frame(codes[:, :, 0])]
    small.encode(0.1 * torch.randn(1, 1, 2 * FRAME_SAMPLES))
    small.decode(random_codes(1, 2, seed=13))
    out += [small.decode_frame(codes[:, :, t]) for t in range(1, 4)]
    torch.testing.assert_close(torch.cat(out, -1), expected, atol=1e-6, rtol=0)


def test_stream_errors(small):
    small.close_stream()
    with pytest.raises(RuntimeError, match="open_stream"):
        small.decode_frame(random_codes(1, 1)[:, :, 0])
    small.open_stream(2)
    with pytest.raises(ValueError, match="2 rows"):
        small.decode_frame(random_codes(1, 1)[:, :, 0])
    assert small.decode_frame(random_codes(1, 1)[0, :, 0].expand(2, -1)).shape == (2, FRAME_SAMPLES)


def test_random_load_is_deterministic_and_keeps_global_rng(small):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    other = MimiCodec.load("random-small")
    assert torch.equal(torch.rand(3), before)  # the global RNG was not consumed
    mine, theirs = small.model.state_dict(), other.model.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert (other.sample_rate, other.frame_samples, other.num_codebooks) == (24000, 1920, 32)
    assert other.source == "random-small" and other.dtype == torch.float32


def test_missing_path_is_a_load_error(tmp_path):
    with pytest.raises(CodecLoadError, match="random"):
        MimiCodec.load(str(tmp_path / "nope.safetensors"))
    with pytest.raises(CodecLoadError, match="tokenizer-e351c8d8"):
        MimiCodec.load(tmp_path)


def test_offline_repo_is_a_load_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: nothing to fall back on
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(CodecLoadError) as info:
        MimiCodec.load("kyutai/moshiko-pytorch-bf16")
    message = str(info.value)
    assert "kyutai/moshiko-pytorch-bf16" in message and "random" in message
    assert "local path" in message


def test_loads_local_safetensors(small, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in small.model.state_dict().items()}
    save_file(state, str(tmp_path / "tokenizer-e351c8d8-checkpoint125.safetensors"))
    # Real files hold the full-size model; a small one must fail with a CodecLoadError.
    with pytest.raises(CodecLoadError, match="could not load"):
        MimiCodec.load(tmp_path)
