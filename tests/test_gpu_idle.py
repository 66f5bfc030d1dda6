"""tools/gpu_idle: the GPU's busy time is the union of its kernels (overlaps once), and the tool
runs end to end on the simulated GPU (no kernels there: all idle)."""

import json
from pathlib import Path

import pytest

from dia2stream.tools.gpu_idle import main, union_us, window_figures

PROFILE = Path(__file__).resolve().parents[1] / "profiles" / "h200-2b.json"


def test_kernels_on_two_streams_that_overlap_count_once():
    assert union_us([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20
    assert union_us([]) == 0


def test_idle_share_is_the_window_less_the_kernels():
    figures = window_figures(window_s=0.100, steps=4, kernels=[(0, 30_000), (50_000, 80_000)])
    assert figures["step_ms"] == 25.0 and figures["gpu_busy_ms_per_step"] == 15.0
    assert figures["gpu_idle_share"] == pytest.approx(0.4)


@pytest.mark.slow
def test_the_tool_runs_on_the_simulated_gpu(tmp_path):
    out = tmp_path / "idle.json"
    assert main(["--simulate-gpu", str(PROFILE), "--calls", "2", "--steps", "5", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["calls"] == 2 and row["steps"] >= 5 and row["gpu_busy_ms_per_step"] == 0.0
    assert row["gpu_idle_share_unprofiled"] == 1.0 and row["step_ms_unprofiled"] > 0
