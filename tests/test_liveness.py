"""The liveness rule (issue 19) from engine figures alone, and the engine's part in it: a device
error is told from a call's own bug, and stalled_s grows only while calls wait. Whole-server
behaviour (503, internal_error, exit status) is in test_isolation.py."""

from __future__ import annotations

import torch

from dia2stream.engine.engine import is_device_fault
from dia2stream.serve.liveness import engine_failure


def figures(**kw):
    return {"calls": 1, "stalled_s": 0.0, "failure": None, **kw}


def test_a_recorded_failure_or_a_long_stall_fails_the_engine_and_nothing_else_does():
    assert engine_failure(figures(), stall_s=5) is None
    assert engine_failure(figures(stalled_s=4.9), stall_s=5) is None
    assert "5.1 s" in engine_failure(figures(stalled_s=5.1), stall_s=5)
    assert engine_failure(figures(stalled_s=500), stall_s=0) is None  # the watchdog is off
    assert engine_failure(figures(failure="AcceleratorError: CUDA error"), stall_s=0) == "AcceleratorError: CUDA error"


def test_device_faults_are_told_from_other_errors():
    assert is_device_fault(torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
    assert is_device_fault(RuntimeError("CUDA error: device-side assert triggered"))
    assert is_device_fault(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"))
    assert not is_device_fault(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not is_device_fault(RuntimeError("shape mismatch"))
    assert not is_device_fault(ValueError("CUDA error"))  # not what torch raises
