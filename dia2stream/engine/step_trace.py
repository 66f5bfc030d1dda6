"""A log of what the engine ran, one JSON line each (`--step-trace FILE`), to see where a new
turn's start-up goes: every frame step (why, how many calls, how many of them starting, the
padded batch, the lane, the starting turns it carried), every step's application (how long after
its launch, the wait for the device, the host work: a real GPU's step costs under load), every
batch of slot moves, every piece of planned work. `python -m dia2stream.tools.step_trace FILE` reads it back.

The engine writes it on the generation thread, so each line is small and buffered; with no file
nothing is built (`StepTrace.off()` answers every call with nothing).
"""

from __future__ import annotations

import io
import json
import time

from dia2stream.engine.scheduler import is_starting


class StepTrace:
    """Appends one line per event to `out` (any text stream)."""

    def __init__(self, out: io.TextIOBase | None):
        self._out = out

    @classmethod
    def to_file(cls, path: str | None) -> "StepTrace":
        return cls(open(path, "w", buffering=1 << 16) if path else None)  # noqa: SIM115 (closed by close())

    @property
    def on(self) -> bool:
        return self._out is not None

    def step(self, reason: str, calls: list, batch: int, full: bool) -> None:
        """A frame step launched for `calls` (`Call`s) at padded size `batch` in the full lane or not."""
        if self._out is None:
            return
        turns = [call.turn.serial for call in calls if call.turn is not None and is_starting(call)]
        self._write({"t": time.monotonic(), "kind": "step", "reason": reason, "calls": len(calls),
                     "batch": batch, "full": full, "starting": turns})

    def applied(self, batch: int, full: bool, since_launch_s: float, wait_s: float, host_s: float) -> None:
        """A step's outputs taken: how long after its launch, how much of that the generation thread
        waited for the device, and its host work (launch and application, waits excluded)."""
        if self._out is not None:
            self._write({"t": time.monotonic(), "kind": "applied", "batch": batch, "full": full,
                         "since_launch_ms": round(since_launch_s * 1000, 3), "wait_ms": round(wait_s * 1000, 3),
                         "host_ms": round(host_s * 1000, 3)})

    def moves(self, count: int) -> None:
        if self._out is not None and count:
            self._write({"t": time.monotonic(), "kind": "moves", "count": count})

    def planned(self, what: str) -> None:
        if self._out is not None:
            self._write({"t": time.monotonic(), "kind": "planned", "what": what})

    def flush(self) -> None:
        if self._out is not None:
            self._out.flush()

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def _write(self, event: dict) -> None:
        self._out.write(json.dumps(event, separators=(",", ":")) + "\n")
