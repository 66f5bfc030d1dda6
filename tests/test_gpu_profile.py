"""`python -m dia2stream.bench --profile-out`: a GPU profile for the simulated GPU, written from
measured figures (profiles/README.md), and the checked-in H200 profile is the one its run gives."""

from __future__ import annotations

import json
from pathlib import Path

from dia2stream.engine.simulated import GpuProfile
from dia2stream.tools.bench import gpu_profile, main

ROOT = Path(__file__).resolve().parent.parent


def _stats(p50: float) -> dict:
    return {"p50": p50, "p95": p50, "min": p50, "n": 10}


def test_a_profile_from_a_run_that_measured_everything_estimates_nothing(tmp_path):
    batched = {"batch_sizes": [1, 2, 4], "swap_ms": _stats(0.21),
               "swap_pairs_ms": {"1": _stats(0.21), "2": _stats(0.3), "3": _stats(0.41)}}
    for n, full, lite, dec in ((1, 7.0, 2.5, 2.0), (4, 9.0, 3.0, 2.4)):
        batched[str(n)] = {"step_ms": _stats(full), "lite_step_ms": _stats(lite), "mimi_decode_ms": _stats(dec),
                           "padded_to": n, "decode_rows": n}
    result = {"device": "GPU X", "preset": "2b", "batched": batched, "mimi_decode_ms": _stats(2.0),
              "voice_prefill": {"prefix_frames": 125, "parallel_prefill_ms": _stats(25.0)}}
    raw = gpu_profile(result, "run X")
    assert "ESTIMATED" not in raw["source"] and "not measured" not in raw["source"]
    path = tmp_path / "x.json"
    path.write_text(json.dumps(raw))
    profile = GpuProfile.load(path)
    assert profile.full_step_ms == {1: 7.0, 4: 9.0} and profile.lite_step_ms == {1: 2.5, 4: 3.0}
    assert profile.decode_ms == {1: 2.0, 4: 2.4}
    assert profile.swap_ms == 0.21 and profile.prefill_ms_per_frame == 0.2
    assert profile.swap_pair_ms == 0.1  # (0.41 - 0.21) / 2: a pair more in one swap


def test_the_checked_in_h200_profile_is_what_run_13_gives(tmp_path):
    out = tmp_path / "h200.json"
    assert main(["--profile-from", str(ROOT / "docs/bench/run13-h200/bench.json"), "--profile-out", str(out)]) == 0
    checked_in = json.loads((ROOT / "profiles/h200-2b.json").read_text())
    made = json.loads(out.read_text())
    assert {k: v for k, v in made.items() if k != "source"} == {k: v for k, v in checked_in.items() if k != "source"}
    profile = GpuProfile.load(ROOT / "profiles/h200-2b.json")
    assert profile.gpu == "NVIDIA H200" and profile.full_step_ms[64] == 15.328
    assert "ESTIMATED" in profile.source  # the run did not time the decoder-only lane batched
