"""Exchanging two rows of a set of device buffers: eagerly, or as one replay of a CUDA graph.

Moving a call to another slot (the engine does it so that a new turn steps in a small batch)
exchanges that slot's rows in every buffer of the stepper and of the Mimi stream: ~60 tensors in
the stepper and every tensor of Mimi's streaming state, one indexed copy each, a few hundred
launches. The H200 bench timed a whole move at 5.85 ms (`swap_ms`, run 21b, synchronised, host
launches included; 4.33 ms in run 22, the rows no longer set by a blocking copy), and the engine
makes about two per new turn, with the step in flight drained first; on the simulated GPU a move of 5.85 ms instead of 0.3 ms added ~100 ms to the call-centre
onsets' p95 at 64 calls (docs/benchmarks.md, run 21).

`RowSwap` runs a swap body over two row numbers held in a static device tensor. Graphed, the
body is captured once and each swap is two one-element fills and one replay. The body
must read the rows only from that tensor, and every buffer it touches must live as long as the
swap (static buffers written in place: the stepper's slot table, the Mimi stream's state, which
its decode graphs already need stable).

On by default (`GRAPHED`): on the H200 (run 22) moved calls under graphs kept the tokens of
unmoved calls in eager steps, and a move took 1.24 ms instead of 4.33.
"""

from __future__ import annotations

from typing import Callable

import torch

# Capture swaps as CUDA graphs where the owner runs CUDA graphs (H200 run 22: 1.24 ms a move
# against 4.33 eager; call-centre 128 onsets' p95 ~40 % lower, no underruns against 62).
GRAPHED = True

SwapBody = Callable[[torch.Tensor, "int | None"], None]  # (rows [2] long on the device, extent) -> None


class RowSwap:
    """Swaps of two rows through `body(pair, extent)`: `pair` is [a, b] on the device; `extent`
    is the caller's host knowledge of how much of the rows hold data (an eager swap may copy
    only that), None in a graph, which replays one shape for every pair: whole rows."""

    def __init__(self, body: SwapBody, device: torch.device, *, graph: bool, whole: bool = False):
        self.body = body
        self.whole = whole  # eager swaps copy whole rows too, as a graph does (to test that path on a CPU)
        self.pair = torch.zeros(2, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        if graph and device.type == "cuda":
            self.graph = self._capture()

    @property
    def graphed(self) -> bool:
        return self.graph is not None

    def __call__(self, a: int, b: int, extent: int | None = None) -> None:
        # two fills with the rows as kernel arguments: a copy from a host tensor would wait for
        # the stream (a blocking copy synchronises), and so for the step in flight
        self.pair[0].fill_(a)
        self.pair[1].fill_(b)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.body(self.pair, None if self.whole else extent)

    def _capture(self) -> torch.cuda.CUDAGraph:
        """Capture the body over rows (0, 0): a swap of a row with itself leaves every buffer as
        it was, so the warm-up and the capture change nothing."""
        self.pair.zero_()
        side = torch.cuda.Stream(self.pair.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.body(self.pair, None)  # warm-up: allocations and lazy inits outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.body(self.pair, None)
        torch.cuda.current_stream().synchronize()
        return graph
