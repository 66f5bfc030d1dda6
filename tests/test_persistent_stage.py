"""The persistent depformer stage (one launch a stage, `persistent_stage.py`) against the torch
math and the five-launch Triton stage, within bf16 tolerance, at 1, 2 and 4 rows.

Runs on CUDA (a grid of one program per SM, its barriers real), or on the CPU under Triton's
interpreter (`TRITON_INTERPRET=1` with triton installed) with a grid of one program, whose
barriers are then trivial; skipped otherwise, as on CI's CPU machine, whose torch wheel has no
Triton.
"""

import pytest
import torch

from vendor_dia2 import kernels
from vendor_dia2.model import (StageLayerWeights, StageShape, StageWeights, depformer_stage,
                               depformer_stage_logits_fused)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not kernels.available(DEVICE), reason="needs CUDA, or triton with TRITON_INTERPRET=1")
if kernels.available(DEVICE):
    from vendor_dia2 import persistent_stage

STAGES = 31
SMALL = (StageShape(heads=4, head_dim=16, hidden=96, eps=1e-5, activations=("silu", "linear"), real_codes=128), 64)
FULL = (StageShape(heads=16, head_dim=64, hidden=4096, eps=1e-5, activations=("silu", "linear"), real_codes=2048), 1024)


def _randn(*shape, scale=1.0, generator):
    return (torch.randn(*shape, generator=generator) * scale).to(DEVICE, torch.bfloat16)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return float((out - ref).norm() / ref.norm())


def _stage(shape: StageShape, dim: int, layers: int, rows: int, slot: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    h, dh, hidden = shape.heads, shape.head_dim, shape.hidden
    weights = []
    for _ in range(layers):
        weights.append(StageLayerWeights(
            pre_norm=_randn(dim, generator=g), in_proj=_randn(3 * h * dh, dim, scale=dim ** -0.5, generator=g),
            qk_map=(torch.randn(2, dh, dh, generator=g) * dh ** -0.5).to(DEVICE, torch.bfloat16),
            out_proj=_randn(dim, h * dh, scale=(h * dh) ** -0.5, generator=g), post_norm=_randn(dim, generator=g),
            wi=_randn(2 * hidden, dim, scale=dim ** -0.5, generator=g),
            wo=_randn(dim, hidden, scale=hidden ** -0.5, generator=g)))
    caches = [(_randn(rows, h, STAGES, dh, generator=g), _randn(rows, h, STAGES, dh, generator=g)) for _ in weights]
    slots = torch.arange(STAGES, device=DEVICE)
    stage = StageWeights(embed=_randn(300, dim, generator=g), layers=tuple(weights), norm=_randn(dim, generator=g),
                         logits=_randn(shape.real_codes + 2, dim, generator=g),
                         mask=(slots <= slot)[None, None, None, :], slot=slots[slot:slot + 1].clone())
    return stage, caches, _randn(rows, dim, generator=g), g


def _copies(caches):
    return [(k.clone(), v.clone()) for k, v in caches]


def _assert_caches_match(got, want, slot, tolerance):
    for (gk, gv), (wk, wv) in zip(got, want):
        assert _rel(gk[:, :, slot], wk[:, :, slot]) < tolerance  # the stage's keys and values land in its slot
        assert _rel(gv[:, :, slot], wv[:, :, slot]) < tolerance
        others = [s for s in range(STAGES) if s != slot]
        assert torch.equal(gk[:, :, others], wk[:, :, others])  # and nothing else is touched
        assert torch.equal(gv[:, :, others], wv[:, :, others])


@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("slot", [0, 17])
def test_one_launch_stage_matches_the_torch_stage(rows, slot):
    shape, dim = SMALL
    stage, caches, x, _ = _stage(shape, dim, layers=4, rows=rows, slot=slot, seed=rows * 31 + slot)
    torch_caches, one_caches = _copies(caches), _copies(caches)
    # the torch stage adds the previous codebook's embedding itself: give it a zero row
    zero_embed = torch.zeros_like(stage.embed)
    ref = depformer_stage(x, StageWeights(**{**stage.__dict__, "embed": zero_embed}),
                          torch.zeros(rows, dtype=torch.long, device=DEVICE), torch_caches, shape)
    counters = persistent_stage.StageCounters(STAGES, torch.device(DEVICE))
    out = persistent_stage.stage_logits(x, stage, one_caches, shape, index=slot, counters=counters.of(slot))
    assert out.shape == ref.shape == (rows, shape.real_codes)
    # four layers of roundings apart (the torch path rounds after each op): as far as the
    # five-launch Triton stage is from it, and that one is all but equal to ours
    assert _rel(out, ref) < 3e-2
    five = depformer_stage_logits_fused(x, stage, _copies(caches), shape, index=slot)
    assert _rel(out, five) < 5e-3
    # four layers of the torch path's roundings (the eager ops round after each op) apart
    _assert_caches_match(one_caches, torch_caches, slot, 3e-2)
    assert torch.equal(counters.counts, torch.zeros_like(counters.counts))  # left at zero for the next launch


@pytest.mark.parametrize("rows,branches", [(1, 1), (2, 2), (4, 2)])
def test_one_launch_stage_adds_the_previous_codes_embedding_as_the_five_launch_stage_does(rows, branches):
    shape, dim = SMALL
    slot = 30
    stage, caches, projected, g = _stage(shape, dim, layers=2, rows=rows, slot=slot, seed=7 + rows)
    code = torch.randint(0, stage.embed.shape[0], (rows // branches,), generator=g).to(DEVICE)
    five_caches, one_caches = _copies(caches), _copies(caches)
    x = projected + torch.nn.functional.embedding(code.repeat_interleave(branches), stage.embed)
    ref = depformer_stage_logits_fused(x, stage, five_caches, shape, index=slot)
    counters = persistent_stage.StageCounters(STAGES, torch.device(DEVICE))
    out = persistent_stage.stage_logits(projected, stage, one_caches, shape, index=slot, counters=counters.of(slot),
                                        code=code, branches=branches)
    # the same tiles and rounding points as the five launches: equal but for the order of a few sums
    assert _rel(out, ref) < 5e-3
    _assert_caches_match(one_caches, five_caches, slot, 5e-3)
    # and the torch stage from the same input rows
    ref_torch = depformer_stage(projected, stage, code.repeat_interleave(branches), _copies(caches), shape)
    assert _rel(out, ref_torch) < 2e-2


def test_counters_stay_zero_over_many_launches_of_one_stage():
    """The barrier's counters are reset by the launch itself: repeated launches (as a replayed
    graph makes) need no reset from outside and give the same logits."""
    shape, dim = SMALL
    stage, caches, x, _ = _stage(shape, dim, layers=2, rows=2, slot=3, seed=11)
    counters = persistent_stage.StageCounters(STAGES, torch.device(DEVICE))
    first = persistent_stage.stage_logits(x, stage, _copies(caches), shape, index=3, counters=counters.of(3))
    for _ in range(3):
        again = persistent_stage.stage_logits(x, stage, _copies(caches), shape, index=3, counters=counters.of(3))
        assert torch.equal(again, first)
    assert int(counters.counts.abs().sum()) == 0


@pytest.mark.skipif(DEVICE != "cuda", reason="full size on the GPU only (minutes under the interpreter)")
@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("slot", [0, 30])
def test_full_size_stage_on_the_gpu_grid_matches_the_five_launch_stage(rows, slot):
    """The 2b depformer's shape on a grid of one program per SM: the barriers are real here."""
    shape, dim = FULL
    stage, caches, x, _ = _stage(shape, dim, layers=4, rows=rows, slot=slot, seed=rows + slot)
    five_caches, one_caches = _copies(caches), _copies(caches)
    ref = depformer_stage_logits_fused(x, stage, five_caches, shape, index=slot)
    counters = persistent_stage.StageCounters(STAGES, torch.device(DEVICE))
    for _ in range(3):  # the counters come back to zero, and each launch takes the same path
        out = persistent_stage.stage_logits(x, stage, _copies(caches), shape, index=slot, counters=counters.of(slot))
    out = persistent_stage.stage_logits(x, stage, one_caches, shape, index=slot, counters=counters.of(slot))
    assert _rel(out, ref) < 5e-3
    _assert_caches_match(one_caches, five_caches, slot, 5e-3)
    assert int(counters.counts.abs().sum()) == 0


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="whole frames on the GPU only (the interpreter takes minutes a frame)")
@pytest.mark.parametrize("cfg", [False, True])
@pytest.mark.parametrize("sampler", ["torch", "triton"])
def test_whole_greedy_frames_take_the_five_launch_stages_tokens(tiny_dir, monkeypatch, cfg, sampler):
    """100 graphed frames of the tiny checkpoint in bf16, greedy, after a voice prefix: the same
    actions and codes with each stage as one launch as with its 21 launches, under either draw."""
    from stepping import prefill_voice, speak_frames
    from vendor_dia2 import Dia2
    from vendor_dia2.runtime import SamplingParams

    tts = Dia2.from_pretrained(str(tiny_dir), device=DEVICE, dtype=torch.bfloat16)

    def run(one_launch: bool):
        monkeypatch.setattr(persistent_stage, "ENABLED", one_launch)
        stepper = tts.new_stepper(cfg=cfg, max_positions=140, use_cuda_graph=True, kernels="triton", sampler=sampler)
        assert (stepper.frame.stage_counters is not None) == one_launch
        stepper.set_sampling(0, SamplingParams(seed=5, cfg_scale=2.0 if cfg else 1.0, text_temperature=0.0,
                                               audio_temperature=0.0))
        prefill_voice(tts, stepper)
        return speak_frames(tts, stepper, 100)

    five, one = run(False), run(True)
    assert five[0] == one[0]
    assert torch.equal(five[1], one[1])
    assert sum(five[0]) > 0  # words were taken
