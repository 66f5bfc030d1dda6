"""moshi internals that vendor_dia2/moshi_private.py relies on are still there, as written for.

Each failure names the installed moshi and the version the shim was written for: when moshi
moves, this file says what moved before the codec misbehaves."""

import dataclasses

import pytest
import torch

from vendor_dia2 import moshi_private
from vendor_dia2.codec import MimiCodec

MOVED = (f"moshi {moshi_private.installed_version()} is installed; vendor_dia2/moshi_private.py was written for "
         f"moshi {moshi_private.WRITTEN_FOR}")


@pytest.fixture(scope="module")
def codec():
    return MimiCodec.load("random-small")


def test_default_mimi_config_is_where_the_shim_reads_it():
    config = moshi_private.mimi_config()
    missing = {"seanet", "transformer", "quantizer", "sample_rate", "frame_rate", "channels"} - set(config)
    assert not missing, f"{MOVED}: loaders._mimi_config lacks {sorted(missing)}"
    assert (config["sample_rate"], config["frame_rate"]) == (24000, 12.5), f"{MOVED}: Mimi's rates changed"
    config["seanet"]["n_filters"] = -1
    assert moshi_private.mimi_config()["seanet"]["n_filters"] != -1, "mimi_config must hand out a copy"


def test_codebooks_have_the_buffers_the_shim_seeds(codec):
    books = moshi_private.codebooks(codec.model)
    assert books, f"{MOVED}: no EuclideanCodebook with embedding_sum and _initialized buffers"
    for book in books:
        assert book.initialized, f"{MOVED}: seeding _initialized no longer marks a codebook initialised"
        table = book.embedding
        assert table.abs().sum() > 0, f"{MOVED}: the codebook table does not follow embedding_sum"
        torch.testing.assert_close(table, book.embedding_sum / book.cluster_usage[:, None],
                                   msg=f"{MOVED}: the codebook table is no longer embedding_sum / cluster_usage")


def test_streaming_states_hold_only_what_the_shim_copies(codec):
    codec.open_stream(2)
    try:
        states = codec.stream_states()
        assert states, f"{MOVED}: the decoder side has no streaming modules"
        for name, state in states.items():
            assert dataclasses.is_dataclass(state), f"{MOVED}: {name}'s streaming state is not a dataclass"
            for key, value in moshi_private.state_fields(state).items():
                known = (value is None or isinstance(value, (torch.Tensor, bool, int, float, torch.device))
                         or moshi_private.is_ring_cache(value))
                assert known, f"{MOVED}: {name}.{key} is a {type(value).__name__}, which the shim does not copy"
                if isinstance(value, torch.Tensor) and value.dim():
                    assert value.shape[0] == 2, f"{MOVED}: {name}.{key} does not keep the batch on dim 0"
                if moshi_private.is_ring_cache(value):
                    assert value.cache.shape[1] == 2 and value.end_offset.shape == (2,), (
                        f"{MOVED}: {name}.{key}'s ring cache does not keep the batch on dim 1")
    finally:
        codec.close_stream()


def test_a_row_snapshot_carries_the_whole_decoder_state(codec):
    """Decode, snapshot row 0, decode on, restore: the replay gives the same audio. Catches a
    state field the shim does not see (the replay would differ)."""
    codes = torch.randint(0, 2048, (1, 32, 6), generator=torch.Generator().manual_seed(0))
    codec.open_stream(1)
    try:
        for t in range(3):
            codec.decode_frame(codes[:, :, t])
        snap = codec.snapshot_row(0)
        first = [codec.decode_frame(codes[:, :, t]) for t in range(3, 6)]
        codec.restore_row(0, snap)
        again = [codec.decode_frame(codes[:, :, t]) for t in range(3, 6)]
    finally:
        codec.close_stream()
    for a, b in zip(first, again):
        assert torch.equal(a, b), f"{MOVED}: a restored row decodes differently"


def test_row_snapshots_taken_together_equal_one_at_a_time_and_restore_the_same(codec):
    """The engine marks every row due in a step with one copy per state tensor
    (`snapshot_rows`): each snapshot must hold what `snapshot_row` holds, and restoring it must
    bring its row back to decode the same audio, whichever other rows were taken with it."""
    codes = torch.randint(0, 2048, (3, 32, 6), generator=torch.Generator().manual_seed(1))
    codec.open_stream(3)
    try:
        for t in range(3):
            codec.decode_frame(codes[:, :, t])
        together = codec.snapshot_rows([2, 0])
        alone = [codec.snapshot_row(2), codec.snapshot_row(0)]
        for a, b in zip(together, alone):
            assert a.states.keys() == b.states.keys()
            for name in a.states:
                for key, value in a.states[name].items():
                    other = b.states[name][key]
                    if isinstance(value, dict):
                        assert torch.equal(value["cache"], other["cache"]) and torch.equal(value["end_offset"],
                                                                                            other["end_offset"])
                    elif isinstance(value, torch.Tensor):
                        assert torch.equal(value, other), (name, key)
                    else:
                        assert value == other
        first = [codec.decode_frame(codes[:, :, t]) for t in range(3, 6)]
        codec.restore_row(2, together[0])
        codec.restore_row(0, together[1])
        again = [codec.decode_frame(codes[:, :, t]) for t in range(3, 6)]
    finally:
        codec.close_stream()
    for a, b in zip(first, again):
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
