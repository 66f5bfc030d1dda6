"""Which shape a frame runs at, and the CUDA graphs captured for each shape.

A step pads its batch to one of `batch_sizes` (the smallest that covers the highest active slot),
takes one of two lanes (full, or decoder-only), and attends over one of `length_buckets` decoder
cache lengths. On CUDA every (batch size, lane, length) is captured once at start-up as a CUDA
graph, never on a request; with `compile` the layer and stage functions inside are compiled
(up to `compile_max_calls` calls; larger batches run eager inside their graphs).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from .frame import FrameFunctions

# Decoder cache lengths a bucketed batch may attend over (plus the whole cache): a turn's first
# 20 s, 41 s, then everything.
CACHE_BUCKETS = (256, 512)

# torch.compile's shapes (set before the stepper is built). False: torch's automatic dynamic
# shapes, which compile each function again for a second batch size and cache length before
# marking them dynamic (H200, run 38: a cold start spent 63 s in graphs, batch 1-8 ~15 s each).
# True: every shape dynamic from the first compile, one compile serving every size.
DYNAMIC_SHAPES = False

FrameCall = Callable[[FrameFunctions, int, bool, int], None]  # (functions, batch size, full lane, cache length)

log = logging.getLogger(__name__)


def default_batch_sizes(n_calls: int) -> tuple[int, ...]:
    """Powers of two below `n_calls`, and `n_calls`: a step pads to the next one up."""
    sizes, b = [], 1
    while b < n_calls:
        sizes.append(b)
        b *= 2
    return tuple(sizes + [n_calls])


class FrameGraphs:
    """The shapes a stepper's frame runs at, the functions each uses, and their captured graphs."""

    def __init__(self, eager: FrameFunctions, *, n_calls: int, cache_length: int, batch_sizes: tuple[int, ...] | None,
                 compile: bool, compile_max_calls: int | None, use_cuda_graph: bool,
                 cache_buckets: tuple[int, ...] | None):
        self.batch_sizes = tuple(sorted(set(batch_sizes or default_batch_sizes(n_calls))))
        if self.batch_sizes[-1] > n_calls or self.batch_sizes[0] < 1:
            raise ValueError(f"batch sizes {self.batch_sizes} must lie in 1..{n_calls}")
        self.cache_length = cache_length
        # A step attends over the filled part of the cache only, rounded up to a bucket (one graph
        # per bucket; compiled code sees the length as a dynamic dimension): at 64 calls the
        # attention over all 1502 slots was 6.1 of 15.3 ms of GPU time (docs/benchmarks.md, run 10).
        # `cache_buckets` (default: CACHE_BUCKETS with CUDA graphs, none without) exists for tests.
        buckets = (CACHE_BUCKETS if use_cuda_graph else ()) if cache_buckets is None else cache_buckets
        self.length_buckets = tuple(sorted({l for l in buckets if l < cache_length} | {cache_length}))
        self.use_cuda_graph = use_cuda_graph
        # Batch sizes above `compile_max_calls` (default: none) run the eager functions inside
        # their CUDA graphs; compiled ones were measured faster at every size once the cache write
        # stayed out of the compiled code (model.write_cache; docs/benchmarks.md, runs 8-10).
        self.compile_max_calls = (compile_max_calls or n_calls) if compile else 0
        self._eager = self._compiled = eager
        if compile:
            self._compiled = _compiled_functions(eager)
        self._graphs: dict[tuple[int, bool, int], torch.cuda.CUDAGraph] = {}

    def functions_for(self, b: int) -> FrameFunctions:
        return self._compiled if b <= self.compile_max_calls else self._eager

    def batch_size_for(self, slots: int) -> int:
        """The padded batch size a step over slots 0..slots-1 runs at."""
        for b in self.batch_sizes:
            if b >= slots:
                return b
        raise ValueError(f"slot {slots - 1} lies past the largest batch size {self.batch_sizes[-1]}: "
                         "it can be prefilled and snapshotted, not stepped")

    def length_for(self, need: int) -> int:
        """The bucket of cache slots a step that writes up to slot `need - 1` attends over."""
        if len(self.length_buckets) == 1:
            return self.cache_length
        return next(l for l in self.length_buckets if l >= need)

    def run(self, frame: FrameCall, b: int, full: bool, length: int) -> None:
        """Replay the captured graph of this shape, or run the frame eagerly where there is none."""
        graph = self._graphs.get((b, full, length))
        if graph is not None:
            graph.replay()
            return
        with torch.inference_mode():
            frame(self.functions_for(b), b, full, length)

    def capture_all(self, frame: FrameCall) -> None:
        """Capture `frame` as CUDA graphs, one per (batch size, lane, cache length), sharing one
        memory pool. The caller makes sure no slot is active, so the warm-up steps (run first, on a
        side stream, as capture requires) leave positions, buffers and inputs as they are."""
        if not self.use_cuda_graph:
            return
        pool = torch.cuda.graph_pool_handle()
        started = time.perf_counter()
        for i, b in enumerate(self.batch_sizes):
            t0 = time.perf_counter()
            fns = self.functions_for(b)
            for full in (True, False):
                for length in self.length_buckets:
                    stream = torch.cuda.Stream()
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream), torch.inference_mode():
                        for _ in range(3):
                            frame(fns, b, full, length)
                    torch.cuda.current_stream().wait_stream(stream)
                    graph = torch.cuda.CUDAGraph()
                    with torch.inference_mode(), torch.cuda.graph(graph, pool=pool):
                        frame(fns, b, full, length)
                    self._graphs[(b, full, length)] = graph
            torch.cuda.synchronize()
            # start-up takes minutes on a cold compile cache: say where it is, and what each size cost
            log.info("frame graphs for batch %d captured (%d of %d sizes, %s): %.1f s", b, i + 1,
                     len(self.batch_sizes), "compiled" if b <= self.compile_max_calls else "eager",
                     time.perf_counter() - t0)
        log.info("%d frame graphs captured in %.1f s", len(self._graphs), time.perf_counter() - started)

    @property
    def captured(self) -> int:
        """How many graphs are captured (0 without CUDA graphs)."""
        return len(self._graphs)


def _compiled_functions(eager: FrameFunctions) -> FrameFunctions:
    """One compiled graph serves all 31 stages and all layers (their weights are arguments),
    fusing the elementwise work between matmuls; compiled at capture time, never per request.
    Each batch size is another shape: let dynamo mark the batch dimension dynamic."""
    from torch import _dynamo
    _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
    # torch.compile wraps lazily: a function the frame never calls is never compiled
    dynamic = True if DYNAMIC_SHAPES else None
    return FrameFunctions(*(torch.compile(fn, dynamic=dynamic) for fn in eager))
