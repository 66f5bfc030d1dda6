# run 21c's diagnosis (copied into tests/ for the run, then removed): compiled CUDA graphs against
# eager steps of the fp32 tiny checkpoint, with each of the two new attention kernels on or off.
# tests/test_decode_attention.py::test_compiled_graphs_take_eager_tokens keeps the failing case.
import pytest, torch
from tests.test_gpu import _batched_run, gpu_tts  # noqa: F401

@pytest.mark.parametrize("dec,stage", [(False, True), (True, False), (False, False), (True, True)])
def test_diag(gpu_tts, monkeypatch, dec, stage):
    from vendor_dia2 import model, decode_attention
    monkeypatch.setattr(model, "BATCHED_STAGE_ATTENTION", stage)
    monkeypatch.setattr(decode_attention, "ENABLED", dec)
    pattern = [[True, True, True, True]] * 24 + [[True, False, False, False]] * 6 + [[True, True, True, True]] * 6
    eager = _batched_run(gpu_tts, graph=False, pattern=pattern, kernels="triton")
    graph = _batched_run(gpu_tts, graph=True, pattern=pattern, kernels="triton", compile=True)
    diff = (eager[1] != graph[1]).nonzero()
    print(f"DIAG dec={dec} stage={stage}: actions equal {eager[0] == graph[0]}, codes differ at {diff.shape[0]} cells, first {diff[:3].tolist()}")
