"""Exchanging row pairs of a set of device buffers: eagerly, or as one replay of a CUDA graph.

Moving a call to another slot (the engine does it so that a new turn steps in a small batch)
exchanges that slot's rows in every buffer of the stepper and of the Mimi stream: ~60 tensors in
the stepper and every tensor of Mimi's streaming state, one indexed copy each, a few hundred
launches. The H200 bench timed a whole move at 5.85 ms (`swap_ms`, run 21b, synchronised, host
launches included; 4.33 ms in run 22, the rows no longer set by a blocking copy), and the engine
makes about two per new turn; on the simulated GPU a move of 5.85 ms instead of 0.3 ms added
~100 ms to the call-centre onsets' p95 at 64 calls (docs/benchmarks.md, run 21).

`RowSwap` runs a swap body over row pairs held in a static device tensor. Graphed, the body is
captured once per number of pairs (`PAIR_GROUPS`), and a compaction's moves are one replay: the
rows set by two one-element fills (one pair) or one queued copy from pinned memory. The body
must read the rows only from that tensor, and every buffer it touches must live as long as the
swap (static buffers written in place: the stepper's slot table, the Mimi stream's state, which
its decode graphs already need stable).

On by default (`GRAPHED`): on the H200 (run 22) moved calls under graphs kept the tokens of
unmoved calls in eager steps, and a move took 1.24 ms instead of 4.33.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .transfers import pinned_for

# Capture swaps as CUDA graphs where the owner runs CUDA graphs (H200 run 22: 1.24 ms a move
# against 4.33 eager; call-centre 128 onsets' p95 ~40 % lower, no underruns against 62).
GRAPHED = True

# Pairs one replay exchanges, a graph per size. A move's cost is mostly its launches (~0.4 of
# 1.24 ms are its bytes, estimated), and one compaction makes up to ~13 moves at once (simulated
# H200, 64 calls in lock-step: 407 moves in 178 compactions), each its own replay before. A graph
# for every size up to 8: a group padded up (by repeating its last pair, which writes the same rows
# with the same values) would pay the padding's bytes, and so could cost more than moves one by one.
PAIR_GROUPS = (1, 2, 3, 4, 5, 6, 7, 8)

SwapBody = Callable[[torch.Tensor, "int | None"], None]  # (pairs [2k] long on the device, extent) -> None


def crossed(pairs: torch.Tensor) -> torch.Tensor:
    """[a1, b1, a2, b2, ...] -> [b1, a1, b2, a2, ...]: `t[pairs] = t[crossed(pairs)]` exchanges
    every pair's rows (the pairs must not share a row)."""
    return pairs.view(-1, 2).flip(1).reshape(-1)


class RowSwap:
    """Swaps of row pairs through `body(pairs, extent)`: `pairs` is [a1, b1, a2, b2, ...] on the
    device; `extent` is the caller's host knowledge of how much of the rows hold data (an eager
    swap may copy only that), None in a graph, which replays one shape for any rows: whole rows."""

    def __init__(self, body: SwapBody, device: torch.device, *, graph: bool, whole: bool = False,
                 groups: tuple[int, ...] = PAIR_GROUPS):
        self.body = body
        self.whole = whole  # eager swaps copy whole rows too, as a graph does (to test that path on a CPU)
        self.groups = groups
        self.pairs = torch.zeros(2 * max(groups), dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if graph and device.type == "cuda":
            self.graphs = {k: self._capture(k) for k in groups}

    @property
    def graphed(self) -> bool:
        return bool(self.graphs)

    def __call__(self, pairs: Sequence[tuple[int, int]], extent: int | None = None) -> None:
        """Exchange the rows of each pair (no row in two pairs): one replay or body run per
        `max(groups)` pairs."""
        largest = max(self.groups)
        for start in range(0, len(pairs), largest):
            self._swap_group(list(pairs[start:start + largest]), extent)

    def _swap_group(self, pairs: list[tuple[int, int]], extent: int | None) -> None:
        k = next(size for size in self.groups if size >= len(pairs))
        padded = pairs + [pairs[-1]] * (k - len(pairs))
        rows = self.pairs[:2 * k]
        if k == 1:
            # two fills with the rows as kernel arguments: a copy from a host tensor would wait
            # for the stream (a blocking copy synchronises), and so for the step in flight
            rows[0].fill_(padded[0][0])
            rows[1].fill_(padded[0][1])
        else:
            rows.copy_(pinned_for(torch.tensor(padded, dtype=torch.long).flatten(), rows.device), non_blocking=True)
        graph = self.graphs.get(k)
        if graph is not None:
            graph.replay()
        else:
            self.body(rows, None if self.whole else extent)

    def _capture(self, k: int) -> torch.cuda.CUDAGraph:
        """Capture the body over k pairs of rows (0, 0): a swap of a row with itself leaves every
        buffer as it was, so the warm-up and the capture change nothing."""
        rows = self.pairs[:2 * k]
        rows.zero_()
        side = torch.cuda.Stream(rows.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.body(rows, None)  # warm-up: allocations and lazy inits outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.body(rows, None)
        torch.cuda.current_stream().synchronize()
        return graph
