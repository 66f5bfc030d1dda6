import pytest
import torch

from vendor_dia2.delays import delay_codes, max_delay, undelay_codes

DIA2_DELAYS = [16] + [18] * 31
PAD = 2049


def test_max_delay():
    assert max_delay(DIA2_DELAYS) == 18
    assert max_delay([0, 3, 1]) == 3
    assert max_delay(torch.tensor([2, 5])) == 5
    assert max_delay([]) == 0


def test_delay_small_grid_exact():
    aligned = torch.tensor([[1, 2, 3], [4, 5, 6]])
    delayed = delay_codes(aligned, [0, 2], pad_id=9)
    assert delayed.tolist() == [[1, 2, 3, 9, 9], [9, 9, 4, 5, 6]]
    assert undelay_codes(delayed, [0, 2]).tolist() == aligned.tolist()
    # Undelay reads delayed[k, i + d_k]: here a hand-made grid.
    grid = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    assert undelay_codes(grid, [1, 3]).tolist() == [[11], [23]]


@pytest.mark.parametrize(
    "delays",
    [DIA2_DELAYS, [2] + [3] * 31, [0, 1, 2, 3], [0, 0, 0], [5]],
)
@pytest.mark.parametrize("batched", [False, True])
def test_delay_then_undelay_is_identity(delays, batched):
    gen = torch.Generator().manual_seed(len(delays) + int(batched))
    q, t = len(delays), 23
    shape = (3, q, t) if batched else (q, t)
    aligned = torch.randint(0, 2048, shape, generator=gen)
    delayed = delay_codes(aligned, delays, PAD)
    assert delayed.shape == (*shape[:-1], t + max_delay(delays))
    assert delayed.dtype == aligned.dtype
    assert torch.equal(undelay_codes(delayed, delays), aligned)
    # Cells outside each codebook's stream are pad, and exactly those.
    for k, d in enumerate(delays):
        row = delayed[..., k, :]
        assert torch.equal(row[..., d : d + t], aligned[..., k, :])
        assert (row[..., :d] == PAD).all() and (row[..., d + t :] == PAD).all()
    expected_pads = sum(max_delay(delays) for _ in delays) * (3 if batched else 1)
    assert int((delayed == PAD).sum()) == expected_pads


def test_undelay_then_delay_restores_the_real_cells():
    delays = DIA2_DELAYS
    delayed = torch.randint(0, 2048, (32, 40))
    round_trip = delay_codes(undelay_codes(delayed, delays), delays, PAD)
    for k, d in enumerate(delays):
        assert torch.equal(round_trip[k, d : d + 22], delayed[k, d : d + 22])


def test_edge_cases_and_errors():
    assert delay_codes(torch.zeros(2, 0, dtype=torch.long), [1, 2], 7).tolist() == [[7, 7], [7, 7]]
    assert undelay_codes(torch.zeros(2, 2, dtype=torch.long), [1, 2]).shape == (2, 0)
    with pytest.raises(ValueError, match="fewer than the max delay"):
        undelay_codes(torch.zeros(2, 1, dtype=torch.long), [1, 2])
    with pytest.raises(ValueError, match="3 delays for 2 codebooks"):
        delay_codes(torch.zeros(2, 4, dtype=torch.long), [0, 1, 2], 0)
    with pytest.raises(ValueError, match=">= 0"):
        delay_codes(torch.zeros(2, 4, dtype=torch.long), [0, -1], 0)
    with pytest.raises(ValueError, match="grid"):
        delay_codes(torch.zeros(4, dtype=torch.long), [0], 0)
