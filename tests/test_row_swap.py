"""`RowSwap`: a swap body run eagerly with the caller's extent, or whole (as a CUDA graph runs it)."""

import pytest
import torch

from vendor_dia2.row_swap import RowSwap, crossed


def _rows():
    return torch.arange(12.0).view(4, 3)


def _body(buffer, seen):
    def body(pair, extent):
        seen.append(extent)
        cols = buffer.shape[1] if extent is None else extent
        buffer[pair, :cols] = buffer[crossed(pair), :cols]
    return body


def test_an_eager_swap_passes_the_extent_and_exchanges_the_rows():
    buffer, seen = _rows(), []
    swap = RowSwap(_body(buffer, seen), torch.device("cpu"), graph=True)  # no graph off CUDA
    assert not swap.graphed
    swap([(0, 3)], extent=2)
    assert seen == [2]
    assert buffer[0].tolist() == [9.0, 10.0, 2.0] and buffer[3].tolist() == [0.0, 1.0, 11.0]
    assert buffer[1].tolist() == [3.0, 4.0, 5.0]


def test_a_whole_swap_ignores_the_extent():
    buffer, seen = _rows(), []
    RowSwap(_body(buffer, seen), torch.device("cpu"), graph=False, whole=True)([(1, 2)], extent=1)
    assert seen == [None]
    assert buffer[1].tolist() == [6.0, 7.0, 8.0] and buffer[2].tolist() == [3.0, 4.0, 5.0]


def _swapped_one_by_one(rows: torch.Tensor, pairs) -> torch.Tensor:
    out = rows.clone()
    for a, b in pairs:
        out[[a, b]] = out[[b, a]]
    return out


@pytest.mark.parametrize("pairs", [[(0, 5)], [(0, 5), (1, 4)], [(0, 5), (2, 3), (4, 1)],
                                   [(0, 7), (1, 6), (2, 5), (3, 4), (8, 9)]])
def test_several_pairs_in_one_swap_are_the_pairs_one_by_one(pairs):
    """With groups of 1, 2, 4 and 8 pairs: three pairs run as a group of four (the last repeated),
    five as one of eight."""
    buffer, seen = torch.arange(30.0).view(10, 3), []
    swap = RowSwap(_body(buffer, seen), torch.device("cpu"), graph=False, groups=(1, 2, 4, 8))
    swap(pairs, extent=3)
    assert torch.equal(buffer, _swapped_one_by_one(torch.arange(30.0).view(10, 3), pairs))
    assert len(seen) == 1  # one body run for all of them


def test_more_pairs_than_the_largest_group_take_one_run_per_group():
    buffer, seen = torch.arange(60.0).view(20, 3), []
    pairs = [(i, 19 - i) for i in range(9)]
    RowSwap(_body(buffer, seen), torch.device("cpu"), graph=False, groups=(1, 2, 4))(pairs, extent=3)
    assert torch.equal(buffer, _swapped_one_by_one(torch.arange(60.0).view(20, 3), pairs))
    assert len(seen) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs")
def test_a_graphed_swap_replays_for_any_pair_and_leaves_the_buffers_as_they_were_at_capture():
    buffer, seen = _rows().cuda(), []
    swap = RowSwap(_body(buffer, seen), torch.device("cuda"), graph=True)
    assert swap.graphed
    assert torch.equal(buffer.cpu(), _rows())  # capturing swapped row 0 with itself
    swap([(0, 3)])
    swap([(1, 0)])
    expected = _rows()
    expected[[0, 3]] = expected[[3, 0]]
    expected[[1, 0]] = expected[[0, 1]]
    assert torch.equal(buffer.cpu(), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs")
def test_graphed_swaps_of_several_pairs_are_the_pairs_one_by_one():
    rows = torch.arange(30.0).view(10, 3)
    buffer, seen = rows.cuda(), []
    swap = RowSwap(_body(buffer, seen), torch.device("cuda"), graph=True, groups=(1, 4))
    pairs = [(0, 5), (2, 3), (4, 1)]  # a group of four, padded
    swap(pairs)
    assert torch.equal(buffer.cpu(), _swapped_one_by_one(rows, pairs))
