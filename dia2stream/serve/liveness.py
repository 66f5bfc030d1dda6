"""Liveness: whether the engine can still serve, decided from its `/health` figures alone, so the
same rule holds whether the engine runs on a thread of this process or elsewhere.

The engine cannot serve when
- its generation thread recorded a failure (a sticky device error: a CUDA fault poisons the
  process) or is gone (`failure` in the figures), or
- calls have been waiting for a frame step for more than `stall_s` (`stalled_s`): a step that
  hangs, or one that fails every time.

The server's watchdog (`Dia2Server.watch_engine`, a task on the event loop, never on the
generation thread) checks this a few times a second. On a failure `/health`, `/ready` and the
agent check say `failed`, every connection gets `error` `internal_error` with the reason and
close 1011, and `run()` returns EXIT_ENGINE_FAILED, so a supervisor restarts the process.
"""

from __future__ import annotations

from typing import Any

EXIT_ENGINE_FAILED = 1  # the process's exit status after an engine failure (0: a normal stop)
ENGINE_FAILED_CLOSE_CODE = 1011  # websocket close: the server hit an unexpected condition
WATCH_INTERVAL_S = 0.25  # how often the watchdog looks
# After the calls are closed, /health keeps answering 503 with the reason this long before the
# process exits, so a probe already on its way reads why instead of a refused connection.
FAILED_EXIT_DELAY_S = 1.0


def engine_failure(figures: dict[str, Any], stall_s: float) -> str | None:
    """Why the engine cannot serve, from `Engine.health()` figures, or None. `stall_s`: 0 turns
    the stall rule off."""
    if figures.get("failure"):
        return str(figures["failure"])
    stalled = float(figures.get("stalled_s") or 0.0)
    if stall_s and stalled > stall_s:
        return f"no frame step for {stalled:.1f} s while calls were waiting for one (limit {stall_s:g} s)"
    return None
