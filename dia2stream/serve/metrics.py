"""Server metrics in Prometheus format, on a registry of their own (not prometheus_client's
global one), so several servers in one process (tests) never share counters.

Plain methods, safe from any thread (the generation thread calls `frame_step_ms` every frame,
about a microsecond each); no knowledge of sockets or models:

    metrics = Metrics()
    metrics.set_info(model="2b", device="cuda:0", max_calls=32)
    metrics.frame_step_ms(13.7, calls=16)     # engine, once per batched step
    metrics.frames_sent(1); metrics.underrun()  # per call, as frames go out / arrive late
    metrics.first_byte_ms(180.0); metrics.speech_onset_ms(230.0)
    metrics.calls_active(3); metrics.call_refused("busy"); metrics.error("rate_limited")
    metrics.connection_closed("flood")        # the server closed a connection itself, and why
    body, content_type = metrics.render()      # HttpGate's /metrics callback

Names and meanings are listed in docs/operations.md (tested against METRIC_NAMES).
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.process_collector import ProcessCollector

from dia2stream.clock import FRAME_RATE
from dia2stream.wire.protocol import ErrorCode

PREFIX = "dia2"
# Latency buckets (seconds): first byte and speech onset targets are ~0.25 s at load.
LATENCY_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
# Frame-step buckets (seconds): a frame lasts 80 ms; 13-25 ms measured on an H100.
STEP_BUCKETS = (0.002, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06,
                0.08, 0.1, 0.2)
_ERROR_CODES = frozenset(code.value for code in ErrorCode)
OTHER = "other"  # label for an error code or refusal reason not known here (bounds cardinality)
REFUSAL_REASONS = frozenset({"busy", "unauthorized", "origin", "method", "shutting_down", "overloaded"})
# Why the server closed a connection itself (abuse policy, a client not reading, idle, a failed engine).
CLOSE_REASONS = frozenset({"flood", "binary", "oversize", "not_reading", "idle_timeout", "engine_failed"})

GpuProbe = Callable[[], "tuple[float, float] | None"]  # (allocated, reserved) bytes, or None


def torch_gpu_memory() -> tuple[float, float] | None:
    """CUDA memory of the current device from torch's allocator (no device sync), or None."""
    import sys

    torch = sys.modules.get("torch")  # never import torch just to answer a scrape
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return float(torch.cuda.memory_allocated()), float(torch.cuda.memory_reserved())


class Metrics:
    def __init__(self, gpu_memory: GpuProbe | None = torch_gpu_memory, process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._info = Info(f"{PREFIX}_server", "model, device and call slots of this server", registry=r)
        self._onset = Histogram(f"{PREFIX}_speech_onset_seconds",
                                "from the command that began an utterance to the moment a client playing "
                                "frames back to back from the first reaches the first word",
                                buckets=LATENCY_BUCKETS, registry=r)
        self._first_byte = Histogram(f"{PREFIX}_time_to_first_byte_seconds",
                                     "from the command that began an utterance to sending its first audio frame",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self._step = Histogram(f"{PREFIX}_frame_step_seconds",
                               "one batched frame step of the engine (all active calls)",
                               buckets=STEP_BUCKETS, registry=r)
        self._step_calls = Gauge(f"{PREFIX}_frame_step_calls", "calls in the last frame step", registry=r)
        self._underruns = Counter(f"{PREFIX}_underruns",
                                  "audio frames ready after the moment they should have started playing",
                                  registry=r)
        self._frames = Counter(f"{PREFIX}_frames_sent", "audio frames sent to clients", registry=r)
        self._audio = Counter(f"{PREFIX}_audio_sent_seconds", "seconds of audio sent to clients", registry=r)
        self._active = Gauge(f"{PREFIX}_calls_active", "connections holding a call slot", registry=r)
        self._refused = Counter(f"{PREFIX}_calls_refused",
                                "connections refused, by reason (busy, unauthorized, origin, method, "
                                "shutting_down, overloaded)", ["reason"], registry=r)
        self._errors = Counter(f"{PREFIX}_errors", "error events sent, by protocol error code", ["code"],
                               registry=r)
        self._closed = Counter(f"{PREFIX}_connections_closed",
                               "connections the server closed itself, by reason (flood, binary, oversize: the "
                               "abuse policy, 1008; not_reading; idle_timeout; engine_failed)", ["reason"],
                               registry=r)
        self._gpu_allocated = Gauge(f"{PREFIX}_gpu_memory_allocated_bytes",
                                    "GPU memory held by tensors (torch allocator); 0 without a GPU", registry=r)
        self._gpu_reserved = Gauge(f"{PREFIX}_gpu_memory_reserved_bytes",
                                   "GPU memory reserved by torch's caching allocator; 0 without a GPU", registry=r)
        if gpu_memory is not None:
            # Read at scrape time, so the value is current and costs nothing between scrapes.
            self._gpu_allocated.set_function(lambda: (gpu_memory() or (0.0, 0.0))[0])
            self._gpu_reserved.set_function(lambda: (gpu_memory() or (0.0, 0.0))[1])
        if process:
            ProcessCollector(namespace=PREFIX, registry=r)  # RSS, CPU, open fds (Linux)
        for code in _ERROR_CODES | {OTHER}:
            self._errors.labels(code=code)  # every code present from the start, as 0
        for reason in REFUSAL_REASONS | {OTHER}:
            self._refused.labels(reason=reason)
        for reason in CLOSE_REASONS | {OTHER}:
            self._closed.labels(reason=reason)

    def engine_process(self, pid: int) -> None:
        """The engine's own process (`--engine-process on`): its RSS, CPU and fds as
        `dia2_engine_process_*`, beside the server process's `dia2_process_*`."""
        ProcessCollector(namespace=f"{PREFIX}_engine", pid=lambda: pid, registry=self.registry)

    def gpu_memory_from(self, probe: GpuProbe) -> None:
        """Read the GPU memory gauges from `probe` from now on (the engine process's figures)."""
        self._gpu_allocated.set_function(lambda: (probe() or (0.0, 0.0))[0])
        self._gpu_reserved.set_function(lambda: (probe() or (0.0, 0.0))[1])

    # -- what the engine and server report ----------------------------------------------------

    def set_info(self, **labels: object) -> None:
        self._info.info({k: str(v) for k, v in labels.items()})

    def speech_onset_ms(self, ms: float) -> None:
        self._onset.observe(ms / 1000.0)

    def first_byte_ms(self, ms: float) -> None:
        self._first_byte.observe(ms / 1000.0)

    def frame_step_ms(self, ms: float, calls: int | None = None) -> None:
        self._step.observe(ms / 1000.0)
        if calls is not None:
            self._step_calls.set(calls)

    def underrun(self, n: int = 1) -> None:
        self._underruns.inc(n)

    def frames_sent(self, n: int = 1) -> None:
        self._frames.inc(n)
        self._audio.inc(n / FRAME_RATE)

    def calls_active(self, n: int) -> None:
        self._active.set(n)

    def call_refused(self, reason: str) -> None:
        self._refused.labels(reason=reason if reason in REFUSAL_REASONS else OTHER).inc()

    def connection_closed(self, reason: str) -> None:
        self._closed.labels(reason=reason if reason in CLOSE_REASONS else OTHER).inc()

    def error(self, code: str) -> None:
        self._errors.labels(code=code if code in _ERROR_CODES else OTHER).inc()

    # -- exposition -----------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def value(self, name: str, **labels: str) -> float | None:
        """One sample's current value by its exposed name (tests, /health)."""
        return self.registry.get_sample_value(name, labels or None)


# Every family this module exposes (docs/operations.md lists exactly these).
METRIC_NAMES = (
    f"{PREFIX}_server_info",
    f"{PREFIX}_speech_onset_seconds",
    f"{PREFIX}_time_to_first_byte_seconds",
    f"{PREFIX}_frame_step_seconds",
    f"{PREFIX}_frame_step_calls",
    f"{PREFIX}_underruns_total",
    f"{PREFIX}_frames_sent_total",
    f"{PREFIX}_audio_sent_seconds_total",
    f"{PREFIX}_calls_active",
    f"{PREFIX}_calls_refused_total",
    f"{PREFIX}_errors_total",
    f"{PREFIX}_connections_closed_total",
    f"{PREFIX}_gpu_memory_allocated_bytes",
    f"{PREFIX}_gpu_memory_reserved_bytes",
)
